"""Decode benchmark (llama-bench style): prompt processing (pp) and token generation
(tg) tokens/s with batch-1 greedy decoding through the runner that `dsf generate` and
`dsf serve` use (a static KV cache), for dense fp32, dense bf16 and DSF, on
SmolLM2-135M and on a stack of LLaMA-7B-shaped decoder layers with random factors at
DSF densities (speed at the shapes that matter, without 7B weights); optionally
llama.cpp on the embedded model's GGUF as the external reference."""

from __future__ import annotations

import copy
import gc
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dsf_runtime.checkpoint import backend_summary
from dsf_runtime.kernels import dense_cpu


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5 calls the KV cache argument ``cache``; 4.x ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def decode_once(
    model: nn.Module, ids: torch.Tensor, gen_tokens: int, runner=None, sync=lambda: None
) -> tuple[float, float]:
    """Seconds to process the prompt ``ids`` [1, prompt], then to generate ``gen_tokens``
    greedily, one token per step, through the runner and KV cache that `dsf generate`
    and `dsf serve` decode with (dsf_runtime.runner): a new one, or ``runner`` (slot 0
    is overwritten). ``sync`` waits for the device before each clock reading (CUDA)."""
    from dsf_runtime.runner import ModelRunner

    prompt = ids[0].tolist()
    runner = runner or ModelRunner(model, slots=1, max_len=len(prompt) + gen_tokens)
    sync()
    t0 = time.perf_counter()
    logits = runner.prefill(0, prompt)
    sync()
    t1 = time.perf_counter()
    for i in range(gen_tokens):
        logits = runner.decode([int(logits.argmax(-1).reshape(-1)[0])], [len(prompt) + i])
    sync()
    return t1 - t0, time.perf_counter() - t1


def bench_prompt(vocab: int, prompt_tokens: int) -> torch.Tensor:
    """The benchmark's prompt: [1, prompt_tokens] ids drawn from ``vocab`` (seeded)."""
    return torch.randint(3, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))


def time_decodes(
    models: list[nn.Module],
    prompt_tokens: int = 64,
    gen_tokens: int = 32,
    vocab: int | None = None,
    repeats: int = 3,
    external: Callable[[list[int]], dict] | None = None,
) -> list[dict]:
    """Median pp and tg tokens/s of each model over ``repeats`` runs after one warm-up,
    the models taking turns run by run (the first one alternating) so that the machine's
    drift in speed lands on all of them alike instead of on whichever ran last.
    ``external`` (prompt ids -> pp and tg tokens/s of one run, e.g. llama.cpp in its own
    process, warmed up there) takes its turn among them in every timed round (as the last
    subject, so first in reversed rounds); its medians are the last entry."""
    ids = bench_prompt(vocab or models[0].config.vocab_size, prompt_tokens)
    subjects = len(models) + (external is not None)
    pps: list[list[float]] = [[] for _ in range(subjects)]
    tgs: list[list[float]] = [[] for _ in range(subjects)]
    for r in range(repeats + 1):
        order = range(subjects) if r % 2 == 0 else reversed(range(subjects))
        for m in order:
            if m == len(models):
                if r:
                    res = external(ids[0].tolist())
                    pps[m].append(res["pp_tok_s"])
                    tgs[m].append(res["tg_tok_s"])
                continue
            pp_s, tg_s = decode_once(models[m], ids, gen_tokens)
            if r:
                pps[m].append(prompt_tokens / pp_s)
                tgs[m].append(gen_tokens / tg_s)
    return [{"pp_tok_s": statistics.median(p), "tg_tok_s": statistics.median(t)} for p, t in zip(pps, tgs)]


def llama7b_stack(num_layers: int = 4, vocab: int = 2048, seed: int = 0) -> nn.Module:
    """A LLaMA model with LLaMA-7B's layer shapes, a few layers and a small vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=num_layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def random_factors(model: nn.Module, sparsity: float = 0.5) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random DSF factor pairs (DSF's shapes and nonzero budget) for every decoder linear."""
    from dsf_runtime.benchmarks.storage import random_dsf_pair
    from dsf_runtime.models import compressible_linears

    factors = {}
    for i, name in enumerate(compressible_linears(model)):
        lin = model.get_submodule(name)
        factors[name] = random_dsf_pair(lin.out_features, lin.in_features, sparsity, seed=i)
    return factors


def dsf_stack(model: nn.Module, sparsity: float = 0.5, value_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every decoder linear by random DSF factors (bitmap; values in ``value_dtype``,
    by default what a new checkpoint stores)."""
    from dsf_runtime.checkpoint import DEFAULT_VALUE_DTYPE, VALUE_DTYPES
    from dsf_runtime.patch import replace_with_factors

    replace_with_factors(
        model, random_factors(model, sparsity), "bitmap", value_dtype or VALUE_DTYPES[DEFAULT_VALUE_DTYPE]
    )
    return model


def write_llama7b_stack(
    work_dir: str | Path, num_layers: int = 4, sparsity: float = 0.5, tokenizer=None
) -> tuple[Path, Path]:
    """A LLaMA-7B-shaped stack saved twice from the same random weights: a dense model
    directory and a DSF checkpoint of random factors (what `dsf serve` loads for the
    serving benchmark's ``llama7b-stack``; its text is random, its speed is the point).
    The tokenizer (default: the embedded model's) and its vocabulary make prompts real
    text. Reused when ``work_dir`` already holds them for these settings."""
    from transformers import AutoTokenizer

    from dsf_runtime.converters.pack import write_packed
    from dsf_runtime.models import resolve_model_dir

    work = Path(work_dir)
    dense_dir, dsf_dir, stamp = work / "dense", work / "dsf", work / "stack.json"
    made = {"num_layers": num_layers, "sparsity": sparsity, "hidden_size": 4096, "intermediate_size": 11008}
    if stamp.is_file() and json.loads(stamp.read_text()) == made:
        return dense_dir, dsf_dir
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m"))
    print(f"writing a {num_layers}-layer LLaMA-7B-shaped stack (dense and DSF {sparsity:.0%}) to {work}", flush=True)
    model = llama7b_stack(num_layers, vocab=len(tokenizer))
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    shutil.rmtree(work, ignore_errors=True)
    model.save_pretrained(dense_dir)
    tokenizer.save_pretrained(dense_dir)
    write_packed(
        model, tokenizer, random_factors(model, sparsity), dsf_dir, sparsity=sparsity, factorization={"random": True}
    )
    stamp.write_text(json.dumps(made))
    return dense_dir, dsf_dir


LLAMA_CPP = "llama.cpp Q4_1"


def _llama_cpp_runs(dense: str, python: str, gen_tokens: int) -> tuple[Callable[[list[int]], dict], dict]:
    """llama.cpp on the embedded model's own GGUF (4-bit Q4_1) at this process's thread
    count, one timed run per call (a time_decodes ``external``), and the row it fills."""
    from dsf_runtime.benchmarks.llamacpp import time_llama_cpp
    from dsf_runtime.errors import ConfigError
    from dsf_runtime.models import EMBEDDED, embedded_gguf

    if dense not in EMBEDDED:
        raise ConfigError(f"--external llama.cpp runs the embedded model's GGUF; --dense is {dense!r}")
    threads = torch.get_num_threads()
    row = {"model": dense, "variant": LLAMA_CPP}

    def run(ids: list[int]) -> dict:
        res = time_llama_cpp(str(embedded_gguf(dense)), ids, gen_tokens, threads, python or None, repeats=1)
        row["backend"] = f"llama.cpp (llama-cpp-python {res['version']}, {threads} threads)"
        return res

    return run, row


def run_decode_bench(
    checkpoint: str | None,
    dense: str = "smollm2-135m",
    stack_layers: int = 4,
    out_dir: str = "benchmarks/results",
    gen_tokens: int = 32,
    prompt_tokens: int = 64,
    llama_cpp: str | None = None,
) -> dict:
    """``llama_cpp``: a Python interpreter with llama-cpp-python (or "" for this one) to time
    llama.cpp on the embedded model's GGUF beside SmolLM2 (with --checkpoint of it only)."""
    from dsf_runtime.benchmarks.results_io import environment, markdown_table, write_results
    from dsf_runtime.checkpoint import load_model
    from dsf_runtime.models import load_dense

    rows: list[dict] = []

    def record(subject: str, variants: dict[str, nn.Module], external=None) -> None:
        """Time the variants of one model (and an external run, its row) in turns and add their rows."""
        run, row = external or (None, None)
        results = time_decodes(list(variants.values()), prompt_tokens, gen_tokens, external=run)
        timed = [
            {"model": subject, "variant": variant, "backend": backend_summary(model), **res}
            | {"output_layer": dense_cpu.output_form(model.lm_head)}
            for (variant, model), res in zip(variants.items(), results)
        ]
        if external is not None:
            timed.append({**row, **results[-1]})
        for r in timed:
            print(f"{subject} {r['variant']}: pp {r['pp_tok_s']:.1f} tok/s, tg {r['tg_tok_s']:.2f} tok/s", flush=True)
        rows.extend(timed)

    if checkpoint:
        model, _ = load_dense(dense)
        variants = {"dense fp32": model, "dense bf16": copy.deepcopy(model).to(torch.bfloat16)}
        variants["DSF"], _ = load_model(checkpoint, with_tokenizer=False)
        variants["DSF (torch-csr)"], _ = load_model(checkpoint, with_tokenizer=False, backend="torch-csr")
        external = _llama_cpp_runs(dense, llama_cpp, gen_tokens) if llama_cpp is not None else None
        record(dense, variants, external)
        del model, variants
        gc.collect()
    if stack_layers:
        subject = f"LLaMA-7B shapes x{stack_layers} layers"
        model = llama7b_stack(stack_layers)
        variants = {"dense fp32": model, "dense bf16": copy.deepcopy(model).to(torch.bfloat16)}
        variants["DSF"] = dsf_stack(copy.deepcopy(model))
        gc.collect()
        # fp16 values in the fp32 model (--value-dtype float16): the bytes of the default bf16
        # values, 3 more mantissa bits, widened by vcvtph2ps on AVX2
        variants["DSF fp16 values"] = dsf_stack(copy.deepcopy(model), value_dtype=torch.float16)
        gc.collect()
        # a bf16 model: bf16 values and activations (the AVX512_BF16 path where the CPU has it)
        variants["DSF bf16"] = dsf_stack(copy.deepcopy(model), value_dtype=torch.bfloat16).to(torch.bfloat16)
        gc.collect()
        record(subject, variants)
        del model, variants
        gc.collect()
    for subject in dict.fromkeys(r["model"] for r in rows):
        base = next(r for r in rows if r["model"] == subject and r["variant"] == "dense fp32")
        for r in rows:
            if r["model"] == subject:
                r["tg_vs_fp32"] = r["tg_tok_s"] / base["tg_tok_s"]
        for key, variant in (("tg_vs_bf16", "dense bf16"), ("tg_vs_llama_cpp", LLAMA_CPP)):
            ref = next((r for r in rows if r["model"] == subject and r["variant"] == variant), None)
            for r in rows:
                if r["model"] == subject and ref:
                    r[key] = r["tg_tok_s"] / ref["tg_tok_s"]
    payload = {
        "benchmark": "decode",
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "environment": environment(),
        "rows": rows,
    }
    table = markdown_table(
        rows,
        [
            ("model", "model", ""),
            ("variant", "variant", ""),
            ("backend", "backend", ""),
            ("output_layer", "output layer", ""),
            ("pp_tok_s", f"pp{prompt_tokens} tok/s", ".1f"),
            ("tg_tok_s", f"tg{gen_tokens} tok/s", ".2f"),
            ("tg_vs_fp32", "tg x fp32", ".2f"),
            ("tg_vs_bf16", "tg x bf16", ".2f"),
            *([("tg_vs_llama_cpp", "tg x llama.cpp", ".2f")] if any("tg_vs_llama_cpp" in r for r in rows) else []),
        ],
    )
    paths = write_results(Path(out_dir), "decode", payload, table)
    payload["files"] = {k: str(v) for k, v in paths.items()}
    payload["table"] = table
    return payload
