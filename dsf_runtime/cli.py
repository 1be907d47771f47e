"""`dsf` command line: compress, generate, info, eval, compare, demo.

User errors (bad paths, unsupported models, out-of-range options, corrupt
checkpoints) print one line and exit with code 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from dsf_runtime.formats.values import DEFAULT_VALUE_DTYPE, MODEL_DTYPES, VALUE_DTYPES
from dsf_runtime.errors import ConfigError, DSFError

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_PROMPT = "It is a truth universally acknowledged, that"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's code too)
        self.exit(2, f"dsf: error: {message} (see dsf {self.prog.split()[-1]} --help)\n")


def _add_device(p: argparse.ArgumentParser, backend: bool = True) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    if backend:
        p.add_argument("--backend", default="auto", help="kernel backend for DSF layers (default: auto)")
        p.add_argument(
            "--dtype",
            choices=["auto", *MODEL_DTYPES],
            default="auto",
            help="dtype of the dense parts, activations and KV cache; DSF factors keep their stored values "
            "(default auto: a checkpoint's own, float32 for a dense model)",
        )


def _model_dtype(args):
    """The --dtype choice as a torch dtype; None for auto."""
    return None if args.dtype == "auto" else MODEL_DTYPES[args.dtype]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dsf", description="Compress LLaMA-family models with Double Sparse Factorization and run them sparsely."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log per-layer details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("compress", help="compress a dense model with DSF and save a checkpoint")
    p.add_argument("model", help=f"Hugging Face model directory or {DEFAULT_MODEL!r}")
    p.add_argument("out", help="output checkpoint directory (must not exist or be empty)")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of weights removed, in (0, 1) (default 0.5)")
    p.add_argument("--preset", default="fast", help="fast (demo) or paper (the paper's settings) (default: fast)")
    p.add_argument(
        "--calib", action="append", metavar="FILE", help="calibration text file(s) (default: bundled Austen novels)"
    )
    p.add_argument("--nsamples", type=int, help="calibration windows (preset default)")
    p.add_argument("--seqlen", type=int, help="tokens per calibration window (preset default)")
    p.add_argument(
        "--value-dtype",
        default=DEFAULT_VALUE_DTYPE,
        choices=list(VALUE_DTYPES),
        help="stored nonzero values (default bfloat16: float16's bytes, faster on AVX2-only CPUs, "
        "fp32's range; float16 keeps 3 more mantissa bits); int8: one signed byte per nonzero with a "
        "per-row scale (bitmap and csr formats)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing DSF checkpoint at OUT")
    p.add_argument(
        "--method",
        default="dsf",
        help="dsf (default), or a one-matrix baseline: sparsegpt, wanda, magnitude "
        "(n:m as e.g. sparsegpt:2:4); all at the same nonzero budget",
    )
    p.add_argument("--outer-iters", type=int, help="DSF alternating iterations (preset default)")
    p.add_argument("--no-finalize", action="store_true", help="DSF: skip the output-aware refit of L")
    p.add_argument(
        "--square-density", type=float, help="DSF: density of the square factor (default 0.16 square W, 0.25 otherwise)"
    )
    p.add_argument("--square-mask", choices=["adaptive", "random"], help="DSF: 'random' fixes a random mask (ablation)")
    p.add_argument("--fresh", action="store_true", help="ignore finished layers of an interrupted run and start over")
    p.add_argument(
        "--schedule",
        choices=["sequential", "parallel"],
        default="sequential",
        help="sequential (the paper's: each layer calibrated on the compressed layers before it) or parallel "
        "(every Gram from the dense model in one pass, all matrices at once; some quality cost, docs/distributed.md)",
    )
    p.add_argument("--workers", type=int, help="factorize on N local Ray workers (pip install 'dsf-runtime[ray]')")
    p.add_argument("--ray-address", help="factorize on an existing Ray cluster (e.g. ray://head:10001 or auto)")
    p.add_argument(
        "--cpus-per-task",
        type=int,
        help="CPUs each Ray task asks for and its torch threads (default 1); without Ray, "
        "the threads of each factorization (default: all cores; 1 gives a 1-CPU Ray run's factors bit for bit)",
    )
    _add_device(p, backend=False)

    p = sub.add_parser("pack", help="repack a checkpoint in another format, or pack external factor pairs")
    p.add_argument(
        "source",
        help="a DSF checkpoint, or a safetensors file of factors (<module>.L / <module>.R, "
        "or <module>.weight) made by any DSF implementation (needs --base)",
    )
    p.add_argument("out", help="output checkpoint directory")
    p.add_argument("--base", help="dense model the external factors belong to (directory or embedded name)")
    p.add_argument("--format", default="bitmap", help="bitmap (compact default), csr or bsr")
    p.add_argument("--block", type=int, help="block size for bsr (default 16)")
    p.add_argument(
        "--value-dtype",
        choices=list(VALUE_DTYPES),
        help="default: keep (repack) / bfloat16; int8: per-row scaled bytes (bitmap and csr formats)",
    )
    p.add_argument(
        "--transposed", action="store_true", help="external factors are stored as L^T (r x out), R^T (in x r)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing DSF checkpoint at OUT")

    p = sub.add_parser(
        "convert",
        help="a sparse model made elsewhere -> a DSF checkpoint: compressed-tensors sparse-bitmask / "
        "sparse-24-bitmask, or a pruned model stored dense (linears with enough zeros packed)",
    )
    p.add_argument("source", help="model directory (compressed-tensors checkpoint or dense safetensors with zeros)")
    p.add_argument("out", help="output checkpoint directory")
    p.add_argument(
        "--min-sparsity",
        type=float,
        default=0.3,
        help="pruned dense models: pack a linear when at least this fraction of its weights is zero (default 0.3)",
    )
    p.add_argument("--format", default="bitmap", help="storage format of the packed linears (default bitmap)")
    p.add_argument(
        "--value-dtype",
        choices=[n for n in VALUE_DTYPES if n != "int8"],
        help="pruned dense models: store values in this dtype (default: the model's own, lossless)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing DSF checkpoint at OUT")

    p = sub.add_parser(
        "export", help="a DSF checkpoint in another library's format (compressed-tensors sparse-bitmask)"
    )
    p.add_argument("checkpoint", help="DSF checkpoint directory")
    p.add_argument("out", help="output model directory")
    p.add_argument("--to", choices=["compressed-tensors"], default="compressed-tensors", help="target format")
    p.add_argument(
        "--keep-sparse",
        action="store_true",
        help="refuse instead of exporting DSF factor pairs as their dense product",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT")

    p = sub.add_parser("generate", help="complete a prompt with a DSF checkpoint or a dense model")
    p.add_argument("model", help="DSF checkpoint, model directory or embedded model name")
    p.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help="text to complete (default: Pride and Prejudice's first words)"
    )
    p.add_argument("--max-tokens", type=int, default=48, help="tokens to generate (default 48)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    _add_device(p)

    p = sub.add_parser(
        "info",
        help="per-layer shapes, factor densities and bytes of a checkpoint; every kernel "
        "backend and why it can or cannot run; the DSF_* settings",
    )
    p.add_argument("checkpoint", nargs="?", help="DSF checkpoint directory (without it: backends and settings only)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--formats", action="store_true", help="also compute the bytes of every storage format")
    p.add_argument("--settings", action="store_true", help="also list the DSF_* environment variables in force")

    p = sub.add_parser("eval", help="perplexity on held-out text (default: Pride and Prejudice)")
    p.add_argument("model", help="DSF checkpoint, model directory or embedded model name")
    p.add_argument("--text", action="append", metavar="FILE", help="evaluation text file(s)")
    p.add_argument("--window", type=int, default=1024, help="tokens per scored window (default 1024)")
    p.add_argument(
        "--stride", type=int, default=512, help="tokens between window starts; each token is scored once (default 512)"
    )
    p.add_argument("--max-tokens", type=int, default=16384, help="evaluate the first N tokens (0: all)")
    _add_device(p)

    p = sub.add_parser("compare", help="dense vs DSF side by side: perplexity, bytes, tokens/s, text")
    p.add_argument("dense", help="dense model directory or embedded model name")
    p.add_argument("checkpoint", help="DSF checkpoint")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text both models complete")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per model")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens for perplexity")
    _add_device(p)

    p = sub.add_parser("bench", help="benchmarks (quality: perplexity vs sparsity per method)")
    bench = p.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    q = bench.add_parser("quality", help="compress with each method at each sparsity and compare held-out perplexity")
    q.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"dense model (default: {DEFAULT_MODEL})")
    q.add_argument(
        "--methods", default="dsf,sparsegpt,wanda,magnitude", help="comma-separated (dense is always measured)"
    )
    q.add_argument("--sparsity", default="0.5", help="comma-separated, e.g. 0.5,0.6,0.7")
    q.add_argument("--preset", default="fast", help="fast or paper (default: fast)")
    q.add_argument("--nsamples", type=int, help="calibration windows (preset default)")
    q.add_argument("--seqlen", type=int, help="tokens per calibration window (preset default)")
    q.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens (0: the whole novel)")
    q.add_argument("--out", default=os.path.join("benchmarks", "results"), help="where JSON/markdown/PNG go")
    q.add_argument("--work-dir", default=os.path.join("out", "bench-quality"), help="checkpoints (reused when present)")

    q = bench.add_parser(
        "compress",
        help="compression wall time in-process vs Ray workers, both schedules' perplexity, "
        "and a simulation of LLaMA-2-7B/70B on 1-64 GPUs from measured DSF times",
    )
    q.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"dense model (default: {DEFAULT_MODEL})")
    q.add_argument("--preset", default="paper", help="fast or paper (default: paper)")
    q.add_argument("--workers", type=int, default=2, help="local Ray workers (default 2)")
    q.add_argument("--sides", default="576,1536,4096", help="square sides timed for the fit ('' to skip)")
    q.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens (0: the whole novel)")
    q.add_argument("--out", default=os.path.join("benchmarks", "results"), help="where JSON/markdown go")
    q.add_argument(
        "--work-dir", default=os.path.join("out", "bench-compress"), help="checkpoints (reused when present)"
    )

    q = bench.add_parser("storage", help="bytes per format (LLaMA-7B-shaped layer, a checkpoint) and load time/memory")
    q.add_argument("--checkpoint", help="DSF checkpoint to measure")
    q.add_argument("--dense", help="dense model to compare loading with (directory or embedded name)")
    q.add_argument("--sparsity", type=float, default=0.5, help="of the random DSF layer (default 0.5)")
    q.add_argument("--out", default=os.path.join("benchmarks", "results"), help="where JSON/markdown go")

    q = bench.add_parser(
        "layer", help="one layer: dense fp32/bf16 vs DSF on every CPU backend, weights rotated past the LLC"
    )
    q.add_argument("--shapes", default="all", help="'all', 'llama7b', 'smollm2' or comma-separated OUTxIN")
    q.add_argument("--batch", default="1,4,16", help="comma-separated batch sizes (default 1,4,16)")
    q.add_argument("--sparsity", type=float, default=0.5, help="of the random DSF factors (default 0.5)")
    q.add_argument("--out", default=os.path.join("benchmarks", "results"), help="where JSON/markdown/PNG go")

    q = bench.add_parser(
        "decode", help="pp/tg tokens/s: dense fp32, dense bf16, DSF (SmolLM2 and a LLaMA-7B-shaped stack)"
    )
    q.add_argument("--checkpoint", help="DSF checkpoint of --dense (omit to run only the LLaMA-7B-shaped stack)")
    q.add_argument("--dense", default=DEFAULT_MODEL, help=f"dense model of --checkpoint (default: {DEFAULT_MODEL})")
    q.add_argument("--stack-layers", type=int, default=4, help="LLaMA-7B-shaped layers (0: skip)")
    q.add_argument("--gen-tokens", type=int, default=32, help="tokens generated per run (tg; default 32)")
    q.add_argument("--prompt-tokens", type=int, default=64, help="prompt tokens per run (pp; default 64)")
    q.add_argument(
        "--external",
        choices=["llama.cpp"],
        help="also time llama.cpp on the embedded model's GGUF (Q4_1) through llama-cpp-python",
    )
    q.add_argument("--llama-cpp-python", metavar="PYTHON", help="the Python that has llama-cpp-python (default: this)")
    q.add_argument("--out", default=os.path.join("benchmarks", "results"), help="where JSON/markdown go")

    q = bench.add_parser(
        "gpu", help="CUDA: layer (cuBLAS vs cuSPARSE vs Triton bitmap), decode stack, converter s/layer"
    )
    q.add_argument("--parts", default="layer,decode,convert", help="comma-separated: layer, decode, convert, tune")
    q.add_argument("--shapes", default="all", help="'all', 'llama7b', 'smollm2' or comma-separated OUTxIN")
    q.add_argument("--batch", default="1,4,16", help="comma-separated batch sizes (default 1,4,16)")
    q.add_argument("--sparsity", type=float, default=0.5, help="of the random DSF factors (default 0.5)")
    q.add_argument("--stack-layers", type=int, default=8, help="LLaMA-7B-shaped decoder layers for decode")
    q.add_argument("--convert-layers", type=int, default=3, help="SmolLM2-shaped layers the converter is timed on")
    q.add_argument(
        "--dry-run",
        action="store_true",
        help="every part on the CPU in Triton's interpreter (TRITON_INTERPRET=1) with tiny shapes: "
        "checks the run before a GPU is lent (its times mean nothing)",
    )
    q.add_argument("--out", default=os.path.join("benchmarks", "results", "gpu"), help="where JSON/markdown go")

    q = bench.add_parser(
        "serving", help="1/4/8/16 streaming clients against `dsf serve` (DSF, dense fp32 and bf16) and other servers"
    )
    q.add_argument("--checkpoint", help="DSF checkpoint to serve")
    q.add_argument("--dense", default=DEFAULT_MODEL, help="dense model served for comparison ('' to skip)")
    q.add_argument("--streams", default="1,4,8,16", help="comma-separated concurrent clients (default 1,4,8,16)")
    q.add_argument("--max-tokens", type=int, default=64, help="tokens per request (EOS ignored)")
    q.add_argument(
        "--model",
        choices=["checkpoint", "llama7b-stack"],
        default="checkpoint",
        help="checkpoint: --checkpoint and --dense (fp32 and bf16); llama7b-stack: random LLaMA-7B-shaped layers, "
        "DSF and dense, written to --work-dir (default: checkpoint)",
    )
    q.add_argument("--stack-layers", type=int, default=4, help="decoder layers of llama7b-stack (default 4)")
    q.add_argument(
        "--work-dir",
        default=os.path.join("out", "bench-serving-stack"),
        help="where llama7b-stack (and, for --external vllm, an embedded dense model as a directory) is written",
    )
    q.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    q.add_argument(
        "--external",
        action="append",
        default=[],
        metavar="LABEL=URL=MODEL | vllm",
        help="another OpenAI-compatible server to measure, e.g. 'llama.cpp=http://127.0.0.1:8080=smollm2'; "
        "'vllm' starts `vllm serve` on the DSF checkpoint (through the dsf plugin) and on the dense model in bf16",
    )
    q.add_argument("--vllm-bin", help="the `vllm` command for --external vllm (default: .venv-vllm's, else PATH's)")
    q.add_argument("--engines", action="store_true", help="also compare generation loops without HTTP")
    q.add_argument("--append", action="store_true", help="merge into an existing serving.json instead of replacing it")
    q.add_argument("--out", default=os.path.join("benchmarks", "results"), help="where JSON/markdown go")

    q = bench.add_parser(
        "soak",
        help="hostile load on `dsf serve`: random parameters and cancellations, a huge "
        "prompt; counts 5xx, failures, stuck slots, RSS growth, /health latency",
    )
    q.add_argument("model", nargs="?", help="checkpoint or model to start `dsf serve` on (or give --url)")
    q.add_argument("--url", help="a server already running on this machine (loopback only)")
    q.add_argument("--served-model-name", help="with --url: the model name it serves (default: asked from it)")
    q.add_argument("--pid", type=int, help="with --url: the server's process id, to measure its memory")
    q.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    q.add_argument("--seconds", type=float, default=300.0, help="measured duration after warm-up (default 300)")
    q.add_argument("--warmup", type=float, default=10.0, help="seconds of the same load before RSS is first read")
    q.add_argument(
        "--huge-prompt-mb",
        type=float,
        default=8.0,
        help="size of the one huge prompt sent mid-run (0: none; default 8)",
    )
    q.add_argument("--out", default=os.path.join("benchmarks", "results"), help="where soak.json/.md go")

    q = bench.add_parser("report", help="write docs/results.md from the result files (JSON + markdown)")
    q.add_argument("--results", default=os.path.join("benchmarks", "results"), help="the result files' folder")
    q.add_argument("--out", default=os.path.join("docs", "results.md"), help="the page to write")
    q.add_argument(
        "--no-readme",
        dest="readme",
        action="store_false",
        help="leave the README's headline table (beside the docs folder) as it is",
    )

    p = sub.add_parser("serve", help="OpenAI-compatible server (completions, chat, streaming, /metrics)")
    p.add_argument("model", help="DSF checkpoint, model directory or embedded model name")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free port (printed at start)")
    p.add_argument("--max-concurrency", type=int, default=8, help="requests decoded together (KV-cache slots)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; more get 503")
    p.add_argument("--max-model-len", type=int, help="context per request (default: the model's, at most 2048)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set DSF_API_KEY)")
    p.add_argument("--served-model-name", help="the model name clients send (default: directory or embedded name)")
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=2 * 2**20,
        help="largest request body accepted; larger ones get 413 (default 2 MiB)",
    )
    p.add_argument(
        "--max-engine-restarts",
        type=int,
        default=5,
        help="restarts after failed engine steps allowed per minute before the server reports "
        "itself unhealthy (default 5)",
    )
    _add_device(p)

    p = sub.add_parser("demo", help="compress the embedded model, generate, and compare with dense")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"dense model (default: {DEFAULT_MODEL}, embedded)")
    p.add_argument("--out", default=os.path.join("out", "smollm2-135m-dsf50"), help="where the checkpoint goes")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of weights removed (default 0.5)")
    p.add_argument("--preset", default="fast", help="fast (default) or paper (the paper's settings, slower)")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens for the perplexity comparison")
    p.add_argument(
        "--reuse", action="store_true", help="reuse an existing checkpoint at --out instead of recompressing"
    )
    return parser


def _positive(value: int, flag: str) -> int:
    if value is None or value < 1:
        raise ConfigError(f"{flag} must be a positive integer, got {value}")
    return value


def cmd_compress(args) -> None:
    from dsf_runtime.converters.pipeline import make_job, run_compress

    overrides = {
        "outer_iters": args.outer_iters,
        "square_density": args.square_density,
        "square_mask": args.square_mask,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.no_finalize:
        overrides["finalize"] = False
    job = make_job(
        args.model,
        args.out,
        sparsity=args.sparsity,
        preset_name=args.preset,
        calib_files=args.calib,
        device=args.device,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        method=args.method,
        dsf_overrides=overrides,
        value_dtype=args.value_dtype,
        overwrite=args.overwrite,
        resume=not args.fresh,
        schedule=args.schedule,
        workers=args.workers,
        ray_address=args.ray_address,
        cpus_per_task=args.cpus_per_task,
    )
    out, result = run_compress(job)
    errs = [r.rel_error for r in result.reports]
    print(
        f"compressed {len(result.reports)} linears in {result.seconds:.0f}s "
        f"(mean weighted rel. error {sum(errs) / len(errs):.4f}); checkpoint: {out}"
    )
    if not result.executor.startswith("in-process"):
        from dsf_runtime.converters.calibrate import worker_summary

        print(f"{args.schedule} schedule on {result.executor}:")
        for line in worker_summary(result.reports):
            print("  " + line)


def cmd_pack(args) -> None:
    from dsf_runtime.checkpoint import is_dsf_checkpoint
    from dsf_runtime.converters.pack import pack_external, repack
    from dsf_runtime.formats import FORMATS

    if args.format not in FORMATS:
        raise ConfigError(f"unknown format {args.format!r}; choose from {', '.join(sorted(FORMATS))}")
    options = {}
    if args.block is not None:
        if args.format != "bsr" or args.block < 1:
            raise ConfigError("--block takes a positive size and only applies to --format bsr")
        options["block"] = args.block
    src = Path(args.source)
    if is_dsf_checkpoint(src):
        if args.base:
            raise ConfigError("--base is only for external factor files; the checkpoint already has its model")
        out = repack(src, args.out, args.format, args.value_dtype, overwrite=args.overwrite, **options)
    elif src.is_file():
        if not args.base:
            raise ConfigError("packing external factors needs --base MODEL (the dense model they belong to)")
        out = pack_external(
            src,
            args.base,
            args.out,
            args.format,
            args.value_dtype or DEFAULT_VALUE_DTYPE,
            transposed=args.transposed,
            overwrite=args.overwrite,
            **options,
        )
    else:
        raise ConfigError(f"{src} is neither a DSF checkpoint nor a safetensors file")
    print(f"wrote {out} (format {args.format})")


def cmd_generate(args) -> None:
    from dsf_runtime.checkpoint import backend_summary, load_any
    from dsf_runtime.generate import generate_text

    _positive(args.max_tokens, "--max-tokens")
    model, tokenizer = load_any(args.model, device=args.device, backend=args.backend, dtype=_model_dtype(args))
    gen = generate_text(model, tokenizer, args.prompt, args.max_tokens, chat=args.chat)
    print(
        f"[backend: {backend_summary(model)}; {gen.new_tokens} tokens, {gen.tokens_per_second:.1f} tok/s]",
        file=sys.stderr,
    )
    print(args.prompt + gen.text if not args.chat else gen.text)


def _print_backends(fmt: str | None, as_json: bool) -> list[dict]:
    """Every backend for ``fmt`` (every format when None) on this machine's devices, with its reason."""
    import torch

    from dsf_runtime.formats import FORMATS
    from dsf_runtime.kernels import backend_report

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = [
        {
            "format": f,
            "device": d,
            "backend": name,
            "priority": prio,
            "ok": ok,
            "reason": "runs only when asked for (--backend)" if ok and prio <= 0 else why,
        }
        for f in ([fmt] if fmt else sorted(FORMATS))
        for d in devices
        for name, prio, ok, why in backend_report(f, d)
    ]
    if not as_json:
        print("backends (best first; 'auto' takes the first that can run):")
        for r in rows:
            print(
                f"  {r['format']:7s} {r['device']:5s} {r['backend']:14s} {'yes' if r['ok'] else 'no ':3s} {r['reason']}"
            )
    return rows


def _print_settings(as_json: bool) -> list[dict]:
    from dsf_runtime import settings

    rows = settings.describe()
    if not as_json:
        print("settings (environment variables):")
        for r in rows:
            print(f"  {r['name']:24s} {r['value'] or '(unset)':10s} {r['help']}")
    return rows


def cmd_convert(args) -> None:
    from dsf_runtime.converters.convert import convert
    from dsf_runtime.formats import FORMATS

    if args.format not in FORMATS:
        raise ConfigError(f"unknown format {args.format!r}; choose from {', '.join(sorted(FORMATS))}")
    out, rows = convert(
        args.source, args.out, args.min_sparsity, args.format, overwrite=args.overwrite, value_dtype=args.value_dtype
    )
    print(f"{'module':44s} {'shape':>11s} {'zeros':>6s}  stored")
    for r in rows:
        shape = f"{r.shape[0]}x{r.shape[1]}"
        print(f"{r.name:44s} {shape:>11s} {r.sparsity:6.1%}  {'sparse' if r.packed else 'dense'}")
    print(f"{sum(r.packed for r in rows)} of {len(rows)} linears packed; checkpoint: {out}")


def cmd_export(args) -> None:
    from dsf_runtime.checkpoint import is_dsf_checkpoint
    from dsf_runtime.converters.export import export_compressed_tensors

    if not is_dsf_checkpoint(args.checkpoint):
        raise ConfigError(f"{args.checkpoint} is not a DSF checkpoint")
    out, notes = export_compressed_tensors(args.checkpoint, args.out, args.keep_sparse, args.overwrite)
    for note in notes:
        print(f"note: {note}")
    print(f"written: {out} (compressed-tensors sparse-bitmask)")


def cmd_info(args) -> None:
    from dsf_runtime.checkpoint import load_model, read_quant_config
    from dsf_runtime.report import format_bytes, layer_infos

    if args.checkpoint is None:
        payload = {"backends": _print_backends(None, args.json), "settings": _print_settings(args.json)}
        if args.json:
            print(json.dumps(payload, indent=2))
        return
    _, quant = read_quant_config(args.checkpoint)
    model, _ = load_model(args.checkpoint, with_tokenizer=False)
    rows = layer_infos(model)
    if args.json:
        payload = {
            "quantization_config": quant.model_dump(),
            "layers": [r.__dict__ for r in rows],
            "backends": _print_backends(quant.format, True),
        }
        if args.settings:
            payload["settings"] = _print_settings(True)
        print(json.dumps(payload, indent=2))
        return
    from dsf_runtime.checkpoint import backend_summary

    print(
        f"{args.checkpoint}: method={quant.method} format={quant.format} values={quant.value_dtype} "
        f"sparsity={quant.sparsity} version={quant.version}; CPU backend: {backend_summary(model)}"
    )
    print(
        f"{'module':44s} {'shape':>11s} {'rank':>5s} {'dens L':>7s} {'dens R':>7s} {'total':>6s} {'bytes':>10s} {'vs bf16':>7s}"
    )
    for r in rows:
        rank = "-" if r.rank is None else str(r.rank)
        right = "-" if r.density_right is None else f"{r.density_right:.3f}"
        print(
            f"{r.name:44s} {r.out_features:>5d}x{r.in_features:<5d} {rank:>5s} {r.density_left:7.3f} "
            f"{right:>7s} {r.total_density:6.3f} {format_bytes(r.nbytes):>10s} {r.nbytes / r.dense_bf16_bytes:7.2f}"
        )
    total = sum(r.nbytes for r in rows)
    dense = sum(r.dense_bf16_bytes for r in rows)
    density = sum(r.total_density * r.out_features * r.in_features for r in rows) / sum(
        r.out_features * r.in_features for r in rows
    )
    print(
        f"{len(rows)} compressed linears: total density {density:.3f}, {format_bytes(total)} "
        f"= {total / dense:.2f}x dense bf16 ({format_bytes(dense)}), {total / (2 * dense):.2f}x dense fp32"
    )
    if args.formats:
        from dsf_runtime.report import model_format_bytes

        sizes, dense_bf16 = model_format_bytes(model, VALUE_DTYPES[quant.value_dtype])
        for fmt, nbytes in sizes.items():
            mark = " (stored)" if fmt == quant.format else ""
            print(f"  as {fmt:7s} {format_bytes(nbytes):>10s} = {nbytes / dense_bf16:.3f}x dense bf16{mark}")
    log = Path(args.checkpoint) / "conversion_log.json"
    if log.is_file():  # written by dsf convert: what each linear of the source model became
        layers = json.loads(log.read_text()).get("layers", [])
        kept = [r for r in layers if not r.get("packed")]
        print(
            f"converted: {len(layers) - len(kept)} of {len(layers)} linears packed" + (kept and "; kept dense:" or "")
        )
        for r in kept:
            print(f"  {r['name']:44s} zeros {r['sparsity']:.1%} (below --min-sparsity)")
    _print_backends(quant.format, False)
    if args.settings:
        _print_settings(False)


def cmd_eval(args) -> None:
    from dsf_runtime.checkpoint import backend_summary, load_any
    from dsf_runtime.data import evaluation_text, tokenize
    from dsf_runtime.evaluate import perplexity

    if args.window < 2 or not 1 <= args.stride <= args.window:
        raise ConfigError("need --window >= 2 and 1 <= --stride <= --window")
    model, tokenizer = load_any(args.model, device=args.device, backend=args.backend, dtype=_model_dtype(args))
    ids = tokenize(tokenizer, evaluation_text(args.text))
    ppl = perplexity(model, ids, args.window, args.stride, args.max_tokens or None)
    n = min(ids.numel(), args.max_tokens or ids.numel())
    print(
        f"perplexity {ppl:.3f} on {n} tokens (window {args.window}, stride {args.stride}; backend: {backend_summary(model)})"
    )


def cmd_compare(args) -> None:
    from dsf_runtime.compare import compare, format_table

    rows = compare(
        args.dense,
        args.checkpoint,
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        eval_tokens=args.eval_tokens,
        device=args.device,
        backend=args.backend,
        dtype=_model_dtype(args),
    )
    print(format_table(rows))


def _float_list(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 < v < 1 for v in values):
        raise ConfigError(f"{flag} values must be in (0, 1), got {text!r}")
    return values


def _shapes(text: str) -> dict:
    from dsf_runtime.benchmarks.layer import SHAPES

    if text == "all":
        return SHAPES
    if text in ("llama7b", "smollm2"):
        return {k: v for k, v in SHAPES.items() if k.startswith(text)}
    shapes = {}
    for part in text.split(","):
        try:
            out_f, in_f = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--shapes takes 'all', 'llama7b', 'smollm2' or OUTxIN,... (got {part!r})") from None
        if out_f < 1 or in_f < 1:
            raise ConfigError(f"layer shape {part!r} must be positive")
        shapes[f"{out_f}x{in_f}"] = (out_f, in_f)
    return shapes


def _batches(text: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise ConfigError(f"--batch takes comma-separated integers, got {text!r}") from None
    if any(b < 1 for b in batches):
        raise ConfigError("--batch values must be positive")
    return batches


def cmd_bench(args) -> None:
    if args.bench == "decode":
        from dsf_runtime.benchmarks.decode import run_decode_bench
        from dsf_runtime.checkpoint import is_dsf_checkpoint

        if args.checkpoint and not is_dsf_checkpoint(args.checkpoint):
            raise ConfigError(f"{args.checkpoint} is not a DSF checkpoint")
        if args.stack_layers < 0 or args.gen_tokens < 1 or args.prompt_tokens < 1:
            raise ConfigError("--stack-layers must be >= 0, --gen-tokens and --prompt-tokens >= 1")
        if args.external and not args.checkpoint:
            raise ConfigError("--external llama.cpp runs beside the SmolLM2 rows: give --checkpoint too")
        payload = run_decode_bench(
            args.checkpoint,
            args.dense,
            args.stack_layers,
            args.out,
            args.gen_tokens,
            args.prompt_tokens,
            llama_cpp=(args.llama_cpp_python or "") if args.external else None,
        )
        print(payload["table"])
        print("written: " + ", ".join(payload["files"].values()))
        return
    if args.bench == "serving":
        from dsf_runtime.benchmarks.serving import (
            dense_model_dir,
            dsf_servers,
            run_serving_bench,
            stack_servers,
            vllm_servers,
        )
        from dsf_runtime.checkpoint import is_dsf_checkpoint

        streams = tuple(_positive(int(v), "--streams") for v in args.streams.split(","))
        _positive(args.max_tokens, "--max-tokens")
        _positive(args.rounds, "--rounds")
        if args.checkpoint and not is_dsf_checkpoint(args.checkpoint):
            raise ConfigError(f"{args.checkpoint} is not a DSF checkpoint")
        if args.model == "llama7b-stack":
            if args.checkpoint or args.engines:
                raise ConfigError("--model llama7b-stack serves its own random stack: drop --checkpoint and --engines")
            servers = stack_servers(args.work_dir, _positive(args.stack_layers, "--stack-layers"))
        else:
            servers = dsf_servers(args.checkpoint, args.dense)
        if "vllm" in args.external:
            if args.model == "llama7b-stack":
                servers += vllm_servers(servers[0].model, servers[-1].model)
            else:
                dense_dir = dense_model_dir(args.dense, args.work_dir) if args.dense else None
                servers += vllm_servers(args.checkpoint, dense_dir)
        external = []
        for spec in args.external:
            if spec == "vllm":
                continue
            parts = spec.split("=")
            if len(parts) != 3 or not all(parts):
                raise ConfigError(f"--external takes LABEL=URL=MODEL, got {spec!r}")
            external.append(tuple(parts))
        if not servers and not external:
            raise ConfigError("nothing to measure: give --checkpoint, --dense or --external")
        run_serving_bench(
            servers,
            external,
            Path(args.out),
            streams,
            args.rounds,
            args.max_tokens,
            engines_model=args.checkpoint if args.engines else None,
            append=args.append,
            vllm_bin=args.vllm_bin,
        )
        return
    if args.bench == "report":
        from dsf_runtime.benchmarks.report import write_headline, write_results_page

        if not Path(args.results).is_dir():
            raise ConfigError(f"{args.results} is not a folder of result files")
        print(f"written: {write_results_page(Path(args.results), Path(args.out))}")
        readme = Path(args.out).resolve().parent.parent / "README.md"
        if args.readme and readme.is_file():
            write_headline(readme, Path(args.results))
            print(f"written: the headline table of {readme.name}")
        return
    if args.bench == "soak":
        from dsf_runtime.benchmarks.soak import soak_command

        if (args.model is None) == (args.url is None):
            raise ConfigError("give a model to serve or the --url of a running server (one of them)")
        _positive(args.clients, "--clients")
        if args.seconds <= 0 or args.warmup < 0 or args.huge_prompt_mb < 0:
            raise ConfigError("--seconds must be > 0, --warmup and --huge-prompt-mb >= 0")
        report = soak_command(
            args.model,
            args.url,
            args.served_model_name,
            args.pid,
            Path(args.out),
            args.clients,
            args.seconds,
            args.warmup,
            int(args.huge_prompt_mb * 1e6),
        )
        if not report.ok():
            raise DSFError("the soak found problems (see the table above)")
        return
    if args.bench == "gpu":
        from dsf_runtime.benchmarks.gpu import run_gpu_bench

        parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
        unknown = set(parts) - {"layer", "decode", "convert", "tune"}
        if unknown or not parts:
            raise ConfigError(f"--parts takes layer, decode, convert, tune; got {args.parts!r}")
        _positive(args.stack_layers, "--stack-layers")
        _positive(args.convert_layers, "--convert-layers")
        payload = run_gpu_bench(
            args.out,
            _shapes(args.shapes),
            _batches(args.batch),
            _float_list(str(args.sparsity), "--sparsity")[0],
            args.stack_layers,
            args.convert_layers,
            parts,
            args.dry_run,
        )
        print("written: " + ", ".join(payload["files"].values()))
        return
    if args.bench == "layer":
        from dsf_runtime.benchmarks.layer import run_layer_bench

        batches = _batches(args.batch)
        sparsity = _float_list(str(args.sparsity), "--sparsity")[0]
        payload = run_layer_bench(_shapes(args.shapes), batches, args.out, sparsity)
        print(payload["table"])
        print("written: " + ", ".join(payload["files"].values()))
        return
    if args.bench == "compress":
        from dsf_runtime.benchmarks.compress import run_compress_bench
        from dsf_runtime.converters.workers import import_ray

        import_ray()  # a missing Ray is one clear error before an hour of work
        _positive(args.workers, "--workers")
        try:
            sides = [int(v) for v in args.sides.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--sides must be comma-separated integers, got {args.sides!r}") from None
        if any(n < 8 for n in sides):
            raise ConfigError("--sides must be integers >= 8")
        payload = run_compress_bench(
            args.model,
            preset_name=args.preset,
            workers=args.workers,
            sides=sides,
            out_dir=args.out,
            work_dir=args.work_dir,
            eval_tokens=args.eval_tokens,
        )
        print(payload["table"])
        print("written: " + ", ".join(payload["files"].values()))
        return
    if args.bench == "storage":
        from dsf_runtime.benchmarks.storage import run_storage_bench

        payload = run_storage_bench(
            args.checkpoint, args.dense, args.out, _float_list(str(args.sparsity), "--sparsity")[0]
        )
        print(payload["table"])
        print("written: " + ", ".join(payload["files"].values()))
        return
    from dsf_runtime.benchmarks.quality import run_quality_bench
    from dsf_runtime.converters.methods import make_method

    sparsities = _float_list(args.sparsity, "--sparsity")
    methods = [m.strip() for m in args.methods.split(",") if m.strip() and m.strip() != "dense"]
    for method in methods:
        make_method(method, sparsities[0])  # unknown names fail now, not after an hour
    payload = run_quality_bench(
        args.model,
        methods,
        sparsities,
        preset_name=args.preset,
        out_dir=args.out,
        work_dir=args.work_dir,
        eval_tokens=args.eval_tokens,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
    )
    print(payload["table"])
    print("written: " + ", ".join(payload["files"].values()))


def cmd_serve(args) -> None:
    from dsf_runtime.serve.server import serve

    _positive(args.max_concurrency, "--max-concurrency")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be 0..65535 (0: any free port), got {args.port}")
    if args.max_queue < 0:
        raise ConfigError("--max-queue must be >= 0")
    if args.max_model_len is not None:
        _positive(args.max_model_len, "--max-model-len")
    _positive(args.max_request_bytes, "--max-request-bytes")
    if args.max_engine_restarts < 0:
        raise ConfigError("--max-engine-restarts must be >= 0")
    serve(
        args.model,
        args.host,
        args.port,
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        log_level="info" if args.verbose else "warning",
        max_request_bytes=args.max_request_bytes,
        device=args.device,
        backend=args.backend,
        dtype=_model_dtype(args),
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        max_model_len=args.max_model_len,
        max_restarts=args.max_engine_restarts,
    )


def cmd_demo(args) -> None:
    from dsf_runtime.checkpoint import is_dsf_checkpoint
    from dsf_runtime.compare import compare, format_table
    from dsf_runtime.converters.pipeline import make_job, run_compress

    out = Path(args.out)
    if args.reuse and is_dsf_checkpoint(out):
        print(f"[1/2] reusing the DSF checkpoint at {out}")
    else:
        print(f"[1/2] compressing {args.model} with DSF at sparsity {args.sparsity} (preset {args.preset}) -> {out}")
        job = make_job(args.model, out, sparsity=args.sparsity, preset_name=args.preset, overwrite=True)
        _, result = run_compress(job)
        print(f"      {len(result.reports)} linears factorized in {result.seconds:.0f}s")
    print("[2/2] loading it back sparse, generating, and comparing with dense")
    rows = compare(args.model, out, prompt=DEFAULT_PROMPT, max_tokens=32, eval_tokens=args.eval_tokens)
    print(format_table(rows))


COMMANDS = {
    "compress": cmd_compress,
    "pack": cmd_pack,
    "generate": cmd_generate,
    "info": cmd_info,
    "convert": cmd_convert,
    "export": cmd_export,
    "eval": cmd_eval,
    "compare": cmd_compare,
    "serve": cmd_serve,
    "demo": cmd_demo,
    "bench": cmd_bench,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        if not args.verbose:
            hf_logging.set_verbosity_error()
        COMMANDS[args.command](args)
    except DSFError as exc:
        print(f"dsf: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dsf: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
