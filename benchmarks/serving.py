"""Serving benchmark: aggregate tokens/s, time to first token and inter-token latency
with 1, 4, 8 and 16 concurrent streaming clients against an OpenAI-compatible server.

Two parts:
- engines: the generation loops a server could use, without HTTP, at 1/4/8 streams
  (ours; transformers' `generate` one stream at a time and left-padded as one static
  batch; transformers' continuous batching `generate_batch`), to justify the choice;
- servers: `dsf serve` on the DSF checkpoint and on the dense model in fp32 and bf16
  (each a subprocess, as users run it), or on a LLaMA-7B-shaped stack whose weights
  do not fit in the LLC; with `--external vllm`, `vllm serve` (our plugin) on the same
  DSF checkpoint and vLLM on the dense model in bf16; plus any other OpenAI-compatible
  server given by URL (transformers serve, llama.cpp's server), driven by the same
  async client.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from dsf_runtime.data import evaluation_text

STREAMS = (1, 4, 8, 16)


class Server(NamedTuple):
    """A server the bench starts: its label, the model it serves and the extra arguments
    of its command; ``engine`` "dsf" is `dsf serve`, "vllm" is `vllm serve`."""

    label: str
    model: str
    extra: list[str]
    engine: str = "dsf"


def _short(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def dsf_servers(checkpoint: str | None, dense: str | None) -> list[Server]:
    """The `dsf serve` runs to measure: the DSF checkpoint as it is stored, and the dense
    model both in float32 and in bfloat16 (the dense baseline a CPU user would pick
    depends on the CPU: bf16 halves the bytes, but needs bf16 hardware to compute fast)."""
    servers = [Server(f"dsf serve, DSF {_short(checkpoint)}", checkpoint, [])] if checkpoint else []
    if dense:
        for dtype, short in (("float32", "fp32"), ("bfloat16", "bf16")):
            servers.append(Server(f"dsf serve, dense {_short(dense)} {short}", dense, ["--dtype", dtype]))
    return servers


def vllm_servers(checkpoint: str | None, dense_dir: str | None) -> list[Server]:
    """`vllm serve` runs: the DSF checkpoint through our plugin (float32 dense parts, as
    `dsf serve` runs it) and the dense model in bfloat16, vLLM's usual choice on CPUs."""
    servers = []
    if checkpoint:
        servers.append(Server(f"vllm serve, DSF {_short(checkpoint)}", checkpoint, ["--dtype", "float32"], "vllm"))
    if dense_dir:
        servers.append(
            Server(f"vllm serve, dense {_short(dense_dir)} bf16", dense_dir, ["--dtype", "bfloat16"], "vllm")
        )
    return servers


def dense_model_dir(dense: str, work_dir: str | Path) -> str:
    """A model directory for ``dense`` (an embedded model is written out once, under
    ``work_dir``), for servers that read only Hugging Face directories."""
    if Path(dense).is_dir():
        return dense
    from dsf_runtime.models import load_dense

    out = Path(work_dir) / _short(dense)
    if not (out / "config.json").is_file():
        model, tokenizer = load_dense(dense)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return str(out)


def stack_servers(work_dir: str | Path, num_layers: int = 4, sparsity: float = 0.5) -> list[Server]:
    """`dsf serve` runs on a LLaMA-7B-shaped stack (random weights; weights past the LLC):
    DSF as stored (fp32 dense parts) and in bf16, dense in fp32 and bf16."""
    from dsf_runtime.benchmarks.decode import write_llama7b_stack

    dense_dir, dsf_dir = write_llama7b_stack(work_dir, num_layers, sparsity)
    name = f"llama7b-stack x{num_layers}"
    bf16 = ["--dtype", "bfloat16"]
    return [
        Server(f"dsf serve, DSF {name}", str(dsf_dir), []),
        Server(f"dsf serve, DSF {name} bf16", str(dsf_dir), bf16),
        Server(f"dsf serve, dense {name} fp32", str(dense_dir), ["--dtype", "float32"]),
        Server(f"dsf serve, dense {name} bf16", str(dense_dir), bf16),
    ]


def bench_prompts(count: int, words: int = 40) -> list[str]:
    """``count`` different passages of held-out Austen text, ``words`` words each."""
    tokens = evaluation_text().split()
    step = max(len(tokens) // (count + 1), words)
    return [" ".join(tokens[i * step : i * step + words]) for i in range(count)]


# ---- engines, without HTTP ------------------------------------------------------------------


def _engine_run(model: nn.Module, tokenizer, prompts: list[str], max_tokens: int) -> tuple[int, float]:
    """All prompts submitted at once, the engine stepping on this (main) thread as in `dsf serve`."""
    import queue

    from dsf_runtime.serve.engine import Engine, collect
    from dsf_runtime.serve.sampling import SamplingParams

    engine = Engine(model, tokenizer, max_concurrency=max(len(prompts), 1), max_model_len=512)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    engine.submit(tokenizer(prompts[0])["input_ids"], SamplingParams(max_tokens=2, temperature=0), lambda o: None)
    engine.run_until_idle()  # warm-up
    sinks = [queue.Queue() for _ in prompts]
    start = time.perf_counter()
    for p, sink in zip(prompts, sinks):
        engine.submit(tokenizer(p)["input_ids"], params, sink.put)
    engine.run_until_idle()
    seconds = time.perf_counter() - start
    results = [collect(iter(sink.get_nowait, None)) for sink in sinks]
    return sum(r.completion_tokens for r in results), seconds


@torch.inference_mode()
def _hf_sequential(model: nn.Module, tokenizer, prompts: list[str], max_tokens: int) -> tuple[int, float]:
    start = time.perf_counter()
    total = 0
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt")["input_ids"]
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
        total += out.shape[1] - ids.shape[1]
    return total, time.perf_counter() - start


@torch.inference_mode()
def _hf_padded(model: nn.Module, tokenizer, prompts: list[str], max_tokens: int) -> tuple[int, float]:
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    start = time.perf_counter()
    out = model.generate(
        **batch,
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts), time.perf_counter() - start


@torch.inference_mode()
def _hf_continuous(model: nn.Module, tokenizer, prompts: list[str], max_tokens: int) -> tuple[int, float]:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    # a fixed paged cache (16 pages x 256 tokens): left to itself it sizes the cache from free memory (12 GB here)
    cb_config = ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=1024)
    config = GenerationConfig(
        max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1, pad_token_id=tokenizer.eos_token_id
    )
    inputs = [tokenizer(p)["input_ids"] for p in prompts]
    start = time.perf_counter()
    out = model.generate_batch(
        inputs=inputs, generation_config=config, continuous_batching_config=cb_config, progress_bar=False
    )
    seconds = time.perf_counter() - start
    return sum(len(o.generated_tokens) for o in out.values()), seconds


ENGINES = {
    "dsf engine (continuous batching, static KV cache)": _engine_run,
    "transformers generate, one stream at a time": _hf_sequential,
    "transformers generate, left-padded static batch": _hf_padded,
    "transformers generate_batch (continuous batching)": _hf_continuous,
}


def compare_engines(model: nn.Module, tokenizer, streams=STREAMS, max_tokens: int = 32) -> list[dict]:
    """Aggregate output tokens/s of every engine at each stream count (same prompts, greedy)."""
    rows = []
    for name, fn in ENGINES.items():
        for n in streams:
            prompts = bench_prompts(n)
            try:
                tokens, seconds = fn(model, tokenizer, prompts, max_tokens)
                rows.append(
                    {"engine": name, "streams": n, "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}
                )
            except Exception as exc:  # an engine that cannot run this model is reported, not fatal
                rows.append({"engine": name, "streams": n, "error": f"{type(exc).__name__}: {exc}"[:200]})
            print(
                f"  {name} x{n}: " + (f"{rows[-1]['tok_s']:.1f} tok/s" if "tok_s" in rows[-1] else rows[-1]["error"]),
                flush=True,
            )
    return rows


# ---- servers, over HTTP ---------------------------------------------------------------------


@dataclass
class LoadResult:
    server: str
    streams: int
    requests: int
    output_tokens: int
    seconds: float
    tok_s: float
    ttft_mean_s: float
    ttft_p90_s: float
    itl_mean_s: float
    complete: bool  # every request returned max_tokens tokens with finish_reason "length"


async def _one_stream(http, model: str, prompt: str, max_tokens: int, extra: dict) -> dict:
    """One streaming completion: token arrival times and the final usage."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    start = time.perf_counter()
    times, usage, reason, text = [], None, None, []
    async with http.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    times.append(time.perf_counter() - start)
                    text.append(choice["text"])
                reason = choice.get("finish_reason") or reason
    tokens = usage["completion_tokens"] if usage else len(times)
    return {"times": times, "tokens": tokens, "reason": reason, "text": "".join(text)}


async def _drive(url: str, model: str, prompts: list[str], streams: int, rounds: int, max_tokens: int) -> list[dict]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0)) as http:
        extra = {"ignore_eos": True}
        try:  # warm-up; servers that refuse the ignore_eos extension get standard fields only
            await _one_stream(http, model, prompts[0], 4, extra)
        except RuntimeError as exc:
            print(f"    {url} refused ignore_eos ({str(exc)[:80]}); sending standard fields only", flush=True)
            extra = {}
            await _one_stream(http, model, prompts[0], 4, extra)

        async def client(k: int) -> list[dict]:
            return [
                await _one_stream(http, model, prompts[(k + r * streams) % len(prompts)], max_tokens, extra)
                for r in range(rounds)
            ]

        start = time.perf_counter()
        per_client = await asyncio.gather(*(client(k) for k in range(streams)))
        seconds = time.perf_counter() - start
    results = [r for rs in per_client for r in rs]
    for r in results:
        r["wall"] = seconds
    return results


def measure_server(
    label: str, url: str, model: str, prompts: list[str], streams: int, rounds: int, max_tokens: int
) -> LoadResult:
    results = asyncio.run(_drive(url, model, prompts, streams, rounds, max_tokens))
    seconds = results[0]["wall"]
    tokens = sum(r["tokens"] for r in results)
    ttfts = sorted(r["times"][0] for r in results if r["times"])
    gaps = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    complete = all(r["tokens"] == max_tokens and r["reason"] == "length" for r in results)
    return LoadResult(
        label,
        streams,
        len(results),
        tokens,
        seconds,
        tokens / seconds,
        statistics.fmean(ttfts),
        ttfts[max(math.ceil(0.9 * len(ttfts)) - 1, 0)],
        statistics.fmean(gaps) if gaps else float("nan"),
        complete,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_vllm_bin() -> str:
    """The `vllm` command: .venv-vllm's (scripts/vllm_env.sh) when there is one, else PATH's."""
    local = Path(".venv-vllm") / "bin" / "vllm"
    return str(local) if local.is_file() else "vllm"


class ServerProcess:
    """`dsf serve MODEL` (or, with ``engine="vllm"``, `vllm serve MODEL`) in a subprocess
    on a free port: what a user runs."""

    def __init__(
        self,
        model: str,
        max_concurrency: int = 8,
        extra: list[str] | None = None,
        engine: str = "dsf",
        vllm_bin: str | None = None,
    ) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.engine = engine
        env = None
        if engine == "vllm":
            cmd = [vllm_bin or default_vllm_bin(), "serve", model, "--host", "127.0.0.1", "--port", str(self.port)]
            cmd += ["--max-num-seqs", str(max_concurrency), "--max-model-len", "1024", *(extra or [])]
            env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")}
            env = {k: v for k, v in env.items() if not k.startswith("TRITON_")}
        else:
            cmd = [sys.executable, "-m", "dsf_runtime.cli", "serve", model, "--port", str(self.port)]
            cmd += ["--max-concurrency", str(max_concurrency), "--max-model-len", "1024", *(extra or [])]
        self.log: list[str] = []
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        except FileNotFoundError:
            raise RuntimeError(f"{cmd[0]} not found (for vLLM: bash scripts/vllm_env.sh, or --vllm-bin)") from None
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line.rstrip())

    def wait_ready(self, timeout: float = 900.0) -> "ServerProcess":
        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.engine} serve exited: " + "\n".join(self.log[-5:]))
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.engine} serve did not become ready")

    def served_name(self) -> str:
        import httpx

        return httpx.get(self.url + "/v1/models").json()["data"][0]["id"]

    def backend(self) -> str:
        if self.engine == "vllm":
            return "vllm " + ("dsf plugin" if any("quantization=dsf" in line for line in self.log) else "dense")
        return next((line.split("backend ", 1)[1].split(";")[0] for line in self.log if "backend " in line), "?")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_serving_bench(
    servers: list[Server],
    external: list[tuple[str, str, str]],
    out_dir: Path,
    streams=STREAMS,
    rounds: int = 2,
    max_tokens: int = 64,
    engines_model: str | None = None,
    engine_tokens: int = 32,
    append: bool = False,
    vllm_bin: str | None = None,
) -> dict:
    """servers: (label, model for `dsf serve`, its extra arguments); external: (label, base URL, model name).
    ``append`` keeps the servers (and engines) of an earlier serving.json that this run does not
    measure: servers that cannot share the machine's memory are measured one run at a time."""
    from dsf_runtime.benchmarks.results_io import environment, markdown_table, write_results

    payload: dict = {
        "environment": environment(),
        "max_tokens": max_tokens,
        "rounds": rounds,
        "servers": [],
        "engines": [],
    }
    if engines_model:
        from dsf_runtime.checkpoint import backend_summary, load_any

        model, tokenizer = load_any(engines_model)
        print(
            f"engines on {engines_model} (backend {backend_summary(model)}), {engine_tokens} tokens per stream:",
            flush=True,
        )
        payload["engines"] = compare_engines(model, tokenizer, streams, engine_tokens)
        payload["engines_model"] = engines_model
        payload["engines_backend"] = backend_summary(model)
        del model
    rows: list[LoadResult] = []
    backends: dict[str, str] = {}
    for label, model_arg, extra, engine in (Server(*s) for s in servers):
        proc = ServerProcess(model_arg, max_concurrency=max(streams), extra=extra, engine=engine, vllm_bin=vllm_bin)
        try:
            proc.wait_ready()
            name = proc.served_name()
            prompts = bench_prompts(max(streams) * rounds)
            for n in streams:
                rows.append(measure_server(label, proc.url, name, prompts, n, rounds, max_tokens))
                print(
                    f"  {label} x{n}: {rows[-1].tok_s:.1f} tok/s, ttft {rows[-1].ttft_mean_s:.3f} s, "
                    f"itl {rows[-1].itl_mean_s * 1000:.1f} ms, complete={rows[-1].complete}",
                    flush=True,
                )
            backends[label] = proc.backend() + (f" ({' '.join(extra)})" if extra else "")
        finally:
            proc.stop()
    failures: list[dict] = []
    for label, url, name in external:
        prompts = bench_prompts(max(streams) * rounds)
        for n in streams:
            try:
                rows.append(measure_server(label, url, name, prompts, n, rounds, max_tokens))
            except Exception as exc:  # a peer that breaks under load is a result, not a crash of the bench
                failures.append({"server": label, "streams": n, "error": f"{type(exc).__name__}: {exc}"[:300]})
                print(f"  {label} x{n}: FAILED {failures[-1]['error']}", flush=True)
                continue
            print(
                f"  {label} x{n}: {rows[-1].tok_s:.1f} tok/s, ttft {rows[-1].ttft_mean_s:.3f} s, "
                f"complete={rows[-1].complete}",
                flush=True,
            )
    payload["servers"] = [asdict(r) for r in rows]
    payload["backends"] = backends
    payload["failures"] = failures
    previous_path = out_dir / "serving.json"
    if append and previous_path.is_file():
        previous = json.loads(previous_path.read_text())
        measured = {r.server for r in rows}
        payload["servers"] = [r for r in previous.get("servers", []) if r["server"] not in measured] + payload[
            "servers"
        ]
        payload["backends"] = {**previous.get("backends", {}), **backends}
        if not payload["engines"]:
            for key in ("engines", "engines_model", "engines_backend"):
                if key in previous:
                    payload[key] = previous[key]
    for label in {r["server"] for r in payload["servers"]}:
        single = next((r["tok_s"] for r in payload["servers"] if r["server"] == label and r["streams"] == 1), None)
        for r in payload["servers"]:
            if r["server"] == label and single:
                r["scaling_vs_1"] = r["tok_s"] / single
    table = markdown_table(
        payload["servers"],
        [
            ("server", "server", "s"),
            ("streams", "streams", "d"),
            ("tok_s", "aggregate tok/s", ".1f"),
            ("scaling_vs_1", "x vs 1 stream", ".2f"),
            ("ttft_mean_s", "TTFT mean s", ".3f"),
            ("ttft_p90_s", "TTFT p90 s", ".3f"),
            ("itl_mean_s", "ITL mean s", ".4f"),
            ("complete", "complete", ""),
        ],
    )
    if payload["engines"]:
        table += (
            "\n\nEngines without HTTP ("
            + str(payload.get("engines_backend"))
            + "):\n\n"
            + markdown_table(
                [r for r in payload["engines"] if "tok_s" in r],
                [("engine", "engine", "s"), ("streams", "streams", "d"), ("tok_s", "aggregate tok/s", ".1f")],
            )
        )
    write_results(out_dir, "serving", payload, table)
    _plot(payload, out_dir / "serving.png")
    print(table)
    return payload


def _plot(payload: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in sorted({r["server"] for r in payload["servers"]}):
        pts = [(r["streams"], r["tok_s"]) for r in payload["servers"] if r["server"] == label]
        ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xlabel("concurrent streaming clients")
    ax.set_ylabel("aggregate output tokens/s")
    ax.set_title(f"Serving, {payload['max_tokens']} tokens per request")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
