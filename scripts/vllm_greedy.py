"""Greedy agreement of vLLM (through the dsf plugin) with `dsf generate` on one checkpoint.

    .venv/bin/python scripts/vllm_greedy.py CKPT --out DIR [--prompts 20] [--max-tokens 32]

Runs `dsf generate`'s greedy loop here for each prompt (Austen passages from the bundled
corpus), then vLLM's offline API in .venv-vllm (tests/vllm_plugin/vllm_checks.py, vLLM's
default torch.compile mode, float32 as `dsf generate` runs), and writes how many
prompts agree token for token, with the first difference of any that do not, to
DIR/greedy.json and DIR/greedy.md with the machine's description.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", required=True, help="result folder, e.g. benchmarks/results/avx2/vllm")
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    args = parser.parse_args()

    from dsf_runtime import load_model
    from dsf_runtime.benchmarks.results_io import environment, write_results
    from dsf_runtime.benchmarks.serving import bench_prompts
    from dsf_runtime.generate import generate_text

    prompts = bench_prompts(args.prompts)
    model, tokenizer = load_model(args.ckpt)
    ours = [list(generate_text(model, tokenizer, p, max_tokens=args.max_tokens).token_ids) for p in prompts]
    del model
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "vllm.json"
        cmd = [args.vllm_python, str(ROOT / "tests" / "vllm_plugin" / "vllm_checks.py"), args.ckpt, str(out)]
        cmd += ["--compile", "--max-tokens", str(args.max_tokens)]
        for p in prompts:
            cmd += ["--prompt", p]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        theirs = [r["token_ids"] for r in json.loads(out.read_text())["outputs"]]
    rows = []
    for i, (a, b) in enumerate(zip(ours, theirs)):
        first = next(
            (k for k, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b))
        )
        rows.append(
            {"prompt": i, "dsf_tokens": len(a), "vllm_tokens": len(b), "identical": a == b, "first_difference": first}
        )
    same = sum(r["identical"] for r in rows)
    payload = {
        "environment": environment(),
        "checkpoint": args.ckpt,
        "max_tokens": args.max_tokens,
        "identical": same,
        "prompts": len(rows),
        "rows": rows,
    }
    table = (
        f"CPU: {payload['environment']['cpu']}. Greedy tokens, `dsf generate` against vLLM with the dsf plugin (float32, torch.compile), "
        f"{args.max_tokens} new tokens per prompt: **{same} of {len(rows)} prompts identical**.\n\n"
        "| prompt | dsf tokens | vLLM tokens | identical | first difference |\n|---|---|---|---|---|\n"
        + "\n".join(
            f"| {r['prompt']} | {r['dsf_tokens']} | {r['vllm_tokens']} | {r['identical']} | {r['first_difference']} |"
            for r in rows
        )
    )
    write_results(Path(args.out), "greedy", payload, table)
    print(table)


if __name__ == "__main__":
    main()
