"""Runs inside vLLM's environment (.venv-vllm; scripts/vllm_env.sh): loads a checkpoint with
vLLM's offline API and writes the greedy tokens and top log-probabilities as JSON.

    python vllm_checks.py CKPT OUT.json --tp 1 [--compile] [--prompt TEXT ...]
"""

from __future__ import annotations

import argparse
import json
import os


def cpu_binding(tp: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for ``tp`` workers: the allowed CPUs in ``tp`` groups."""
    cpus = sorted(os.sched_getaffinity(0))
    step = max(1, len(cpus) // tp)
    groups = [cpus[i * step : (i + 1) * step] or cpus[-1:] for i in range(tp)]
    return "|".join(",".join(map(str, g)) for g in groups)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt")
    parser.add_argument("out")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="vLLM's default torch.compile mode (else eager)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--prompt", action="append", required=True)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends a function to the workers
    if args.tp > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_binding(args.tp))
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.ckpt,
        dtype=args.dtype,
        enforce_eager=not args.compile,
        max_model_len=256,
        max_num_seqs=4,
        seed=0,
        tensor_parallel_size=args.tp,
    )
    outputs = llm.generate(args.prompt, SamplingParams(temperature=0, max_tokens=args.max_tokens, logprobs=5))
    result = [
        {
            "token_ids": list(o.outputs[0].token_ids),
            "logprobs": [{str(k): v.logprob for k, v in step.items()} for step in o.outputs[0].logprobs],
        }
        for o in outputs
    ]
    from dsf_runtime.vllm_plugin.method import output_form

    forms = llm.apply_model(output_form)  # one per worker
    with open(args.out, "w") as f:
        json.dump({"outputs": result, "output_layer": forms}, f)


if __name__ == "__main__":
    main()
