"""llama.cpp as the decode benchmark's external reference: pp and tg tokens/s of a GGUF
model through llama-cpp-python, on the same prompt ids and thread count as our runs.

llama-cpp-python compiles llama.cpp when installed, so it often lives in a virtual
environment of its own (e.g. ``CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install
llama-cpp-python``: a native build has crashed on multi-token prompts on some of our
CPUs): the measurement runs in a subprocess of whichever Python interpreter has it.
"""

from __future__ import annotations

import json
import subprocess
import sys

# Runs in the interpreter that has llama_cpp. argv: gguf path, threads, gen tokens,
# repeats; stdin: the prompt ids as JSON. Prints one JSON line.
_SCRIPT = r"""
import json, statistics, sys, time
import llama_cpp
path, threads, gen, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ids = json.loads(sys.stdin.read())
llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=len(ids) + gen + 8,
                      n_batch=max(len(ids), 8), verbose=False)
pps, tgs = [], []
for r in range(repeats + 1):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    for _ in range(gen):
        llm.eval([llm.sample(temp=0.0)])
    t2 = time.perf_counter()
    if r:
        pps.append(len(ids) / (t1 - t0))
        tgs.append(gen / (t2 - t1))
print(json.dumps({"pp_tok_s": statistics.median(pps), "tg_tok_s": statistics.median(tgs),
                  "version": getattr(llama_cpp, "__version__", "?")}))
"""


class LlamaCppError(RuntimeError):
    """llama-cpp-python is missing from the interpreter, or its run failed."""


def time_llama_cpp(
    gguf: str, ids: list[int], gen_tokens: int, threads: int, python: str | None = None, repeats: int = 3
) -> dict:
    """Median pp and tg tokens/s of ``gguf`` in llama.cpp (greedy, ``threads`` threads), run by
    ``python`` (default: this interpreter); also the llama-cpp-python version."""
    python = python or sys.executable
    try:
        proc = subprocess.run(
            [python, "-c", _SCRIPT, gguf, str(threads), str(gen_tokens), str(repeats)],
            input=json.dumps(ids),
            capture_output=True,
            text=True,
            timeout=1800,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LlamaCppError(f"cannot run llama.cpp through {python}: {exc}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if "No module named 'llama_cpp'" in proc.stderr:
            last = f"{python} has no llama_cpp: pip install llama-cpp-python (or pass the Python that has it)"
        raise LlamaCppError(f"llama.cpp run failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
