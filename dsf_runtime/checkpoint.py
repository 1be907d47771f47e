"""DSF checkpoints: a Hugging Face style directory, safetensors + JSON, never pickle.

    config.json        the model config plus quantization_config (quant_method "dsf",
                       version, format, value dtype, per-module shapes and nonzeros)
    model.safetensors  dense parts under their usual names; each compressed linear as
                       <module>.L.<tensor> and <module>.R.<tensor> in the stored format
    tokenizer files

Loading builds the model skeleton without allocating weights, swaps in DSFLinear
modules, and checks every tensor (name, shape, dtype, index ranges, offsets, finite
values) before anything runs on it. A dense W is never built.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from dsf_runtime.errors import CheckpointError, ConfigError, UnsupportedModelError
from dsf_runtime.formats import FORMATS, all_finite, get_format
from dsf_runtime.formats.values import DEFAULT_VALUE_DTYPE, VALUE_DTYPES, ValueDtypeName  # noqa: F401  (re-exported)
from dsf_runtime.kernels import warm_backends
from dsf_runtime.linear import DSFLinear
from dsf_runtime.patch import dsf_modules, set_backend, set_submodule

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3  # Hugging Face's convention: shards of a few GB plus an index
CONFIG_NAME = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# Stored values of new checkpoints. bfloat16: the bytes of float16, widened to fp32 by
# placement alone (no vcvtph2ps: 0.86-0.92x the batch-1 time of fp16 values on AVX2),
# fp32's exponent range (a factor value past float16's 65504 cannot overflow), and the
# same held-out perplexity on SmolLM2 as float16 (README, "Value dtype").
_ST_DTYPES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class ModuleEntry(BaseModel):
    """Shape and nonzero counts of one compressed linear."""

    model_config = ConfigDict(extra="forbid")

    out_features: int = Field(gt=0)
    in_features: int = Field(gt=0)
    rank: int | None = Field(gt=0, description="None: one sparse matrix L (out x in), no R")
    nnz_left: int = Field(ge=0)
    nnz_right: int = Field(ge=0)
    bias: bool = False
    extra_left: dict[str, int] = Field(default_factory=dict, description="format-specific counts, e.g. BSR nblocks")
    extra_right: dict[str, int] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _fits(self) -> "ModuleEntry":
        if self.rank is not None and self.rank > max(self.out_features, self.in_features):
            raise ValueError(f"rank {self.rank} exceeds the layer's larger dimension")
        left_cols = self.in_features if self.rank is None else self.rank
        right_size = 0 if self.rank is None else self.rank * self.in_features
        if self.nnz_left > self.out_features * left_cols or self.nnz_right > right_size:
            raise ValueError("nonzero count larger than the factor")
        return self


class DSFQuantConfig(BaseModel):
    """The ``quantization_config`` section of a DSF checkpoint's config.json."""

    model_config = ConfigDict(extra="forbid")

    quant_method: Literal["dsf"] = "dsf"
    version: int = CHECKPOINT_VERSION
    format: str = "bitmap"
    format_options: dict[str, int] = Field(default_factory=dict)
    value_dtype: ValueDtypeName = DEFAULT_VALUE_DTYPE  # int8: per-row fp32 scales
    sparsity: float = Field(gt=0.0, lt=1.0)
    method: str = "dsf"
    factorization: dict = Field(default_factory=dict)
    modules: dict[str, ModuleEntry]

    @field_validator("version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {v} is not supported (this dsf-runtime reads {CHECKPOINT_VERSION})")
        return v

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        if v not in FORMATS:
            raise ValueError(f"unknown format {v!r}; known: {', '.join(sorted(FORMATS))}")
        return v


def is_dsf_checkpoint(path: str | os.PathLike) -> bool:
    """True if ``path`` is a directory whose config.json declares quant_method "dsf"."""
    config = Path(path) / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        qc = json.loads(config.read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "dsf"


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without tied aliases (e.g. lm_head.weight tied to embeddings)."""
    unique = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k in unique}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(out_dir: str | os.PathLike) -> list[Path]:
    """Remove the hidden ``.OUT.tmp-PID`` directories that writers of ``out_dir`` killed
    mid-write left behind (their PID is gone); a running writer's directory is kept."""
    out = Path(out_dir)
    removed = []
    for tmp in sorted(out.parent.glob(glob.escape(f".{out.name}.tmp-") + "*")):
        pid = tmp.name.rsplit("-", 1)[-1]
        if tmp.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            log.warning("removing %s, left by a writer that was killed", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def save_checkpoint(
    model: nn.Module,
    tokenizer,
    out_dir: str | os.PathLike,
    quant: DSFQuantConfig,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write ``model`` (with DSFLinear modules) as a checkpoint directory, atomically.
    Tensors larger in total than ``max_shard_bytes`` go into numbered shards with a
    model.safetensors.index.json, as transformers does. ``extra_files`` (name -> text,
    e.g. the compression log) are written beside them."""

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not (overwrite and is_dsf_checkpoint(out)):
            raise ConfigError(
                f"{out} exists and is not empty; choose another directory (or --overwrite a DSF checkpoint)"
            )
    remove_stale_temporaries(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        config = model.config.to_dict()
        config["quantization_config"] = quant.model_dump()
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        state = {k: v.detach().to("cpu").contiguous() for k, v in _unique_state(model).items()}
        _write_shards(state, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # a crash before this line leaves only the hidden temporary directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_shards(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    metadata = {"format": "pt", "dsf_version": str(CHECKPOINT_VERSION)}
    sizes = {k: v.numel() * v.element_size() for k, v in state.items()}
    total = sum(sizes.values())
    if total <= max_shard_bytes:
        save_file(state, str(out / WEIGHTS_NAME), metadata=metadata)
        return
    shards: list[list[str]] = [[]]
    used = 0
    for key in state:  # keep the model's order; a tensor larger than a shard gets its own
        if shards[-1] and used + sizes[key] > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += sizes[key]
    weight_map = {}
    for i, keys in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k] for k in keys}, str(out / name), metadata=metadata)
        weight_map.update(dict.fromkeys(keys, name))
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def _weight_files(ckpt: Path) -> dict[Path, list[str] | None]:
    """Weight file -> the tensor names the index maps to it (None: a single file)."""
    index = ckpt / INDEX_NAME
    if not index.is_file():
        return {ckpt / WEIGHTS_NAME: None}
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert isinstance(weight_map, dict)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"{index} is not a valid safetensors index") from None
    files: dict[Path, list[str]] = {}
    for key, name in weight_map.items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
            raise CheckpointError(f"{index}: shard name {name!r} for {key} is not a plain file name")
        files.setdefault(ckpt / name, []).append(key)
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{ckpt} is missing {path.name} (listed in {INDEX_NAME})")
    return files


def read_quant_config(ckpt_dir: str | os.PathLike) -> tuple[dict, DSFQuantConfig]:
    """(model config dict without quantization_config, validated DSF section)."""
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt} is not a directory")
    if not (ckpt / CONFIG_NAME).is_file():
        raise CheckpointError(f"{ckpt} is missing {CONFIG_NAME}")
    if not (ckpt / WEIGHTS_NAME).is_file() and not (ckpt / INDEX_NAME).is_file():
        raise CheckpointError(f"{ckpt} is missing {WEIGHTS_NAME} (or {INDEX_NAME} with shards)")
    try:
        config = json.loads((ckpt / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{ckpt / CONFIG_NAME} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{ckpt / CONFIG_NAME} does not hold a JSON object")
    qc = config.pop("quantization_config", None)
    if not isinstance(qc, dict) or qc.get("quant_method") != "dsf":
        raise CheckpointError(
            f"{ckpt} is not a DSF checkpoint (config.json has no quantization_config with quant_method 'dsf')"
        )
    return config, parse_quant_config(qc, str(ckpt / CONFIG_NAME))


def parse_quant_config(qc: dict, where: str) -> DSFQuantConfig:
    """Validate a quantization_config dict; errors name the offending field."""
    try:
        return DSFQuantConfig.model_validate(qc)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise CheckpointError(f"{where}: quantization_config.{loc}: {first['msg']}") from None


def _no_init_weights():
    """transformers' switch that skips random initialisation (its home moved in 5.x)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered inside moves to the meta device as it is registered;
    buffers (rotary tables, computed in __init__ and not stored) stay real. Under
    no_init_weights a parameter is an uninitialised allocation that is freed at once."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _build_skeleton(config: dict, quant: DSFQuantConfig, dtype: torch.dtype) -> nn.Module:
    """The model with every weight on the meta device and DSF modules swapped in."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dsf_runtime.models import architecture_for

    model_type = config.get("model_type", "<missing>")
    architecture_for(model_type)
    try:
        hf_config = AutoConfig.for_model(**config)
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"config.json cannot be read as a {model_type} config: {exc}") from None
    with _parameters_on_meta(), _no_init_weights():  # meta parameters, no random init
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.tie_weights()  # tied aliases (lm_head -> embeddings) are stored once
    swap_in_dsf_modules(model, quant, dtype, CheckpointError)
    return model


def swap_in_dsf_modules(model: nn.Module, quant: DSFQuantConfig, dtype: torch.dtype, error=CheckpointError) -> None:
    """Replace each module named in ``quant`` by an empty DSFLinear on the meta device,
    after checking that it is a linear of the declared shape."""
    value_dtype = VALUE_DTYPES[quant.value_dtype]
    for name, entry in quant.modules.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise error(f"quantization_config names module {name!r}, which the model does not have") from None
        if not isinstance(linear, nn.Linear) or (linear.out_features, linear.in_features) != (
            entry.out_features,
            entry.in_features,
        ):
            raise error(f"{name}: declared {entry.out_features}x{entry.in_features} does not match the model")
        if (linear.bias is not None) != entry.bias:
            raise error(f"{name}: bias={entry.bias} does not match the model")
        try:
            with torch.device("meta"):
                module = DSFLinear(
                    entry.in_features,
                    entry.out_features,
                    entry.rank,
                    quant.format,
                    entry.nnz_left,
                    entry.nnz_right,
                    value_dtype,
                    entry.bias,
                    dtype,
                    entry.extra_left,
                    entry.extra_right,
                )
        except (ValueError, RuntimeError) as exc:
            raise error(f"{name}: cannot build the declared layout: {str(exc).splitlines()[0]}") from None
        set_submodule(model, name, module)


def _read_tensors(ckpt: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map exactly the expected tensors from the weight file(s), checking names, shapes
    and dtypes from each header before any data is touched (memory is bounded by the
    files, not by metadata)."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    files = _weight_files(ckpt)
    seen: set[str] = set()
    for path, mapped in files.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
                if mapped is not None and set(mapped) != keys:
                    raise CheckpointError(f"{path.name} does not hold the tensors {INDEX_NAME} lists for it")
                dupes = keys & seen
                if dupes:
                    raise CheckpointError(f"tensor {sorted(dupes)[0]} is stored twice")
                seen |= keys
                extra = sorted(keys - set(expected))
                if extra:
                    raise CheckpointError(
                        f"{path.name} has {len(extra)} unexpected tensors, e.g. {', '.join(extra[:3])}"
                    )
                for key in sorted(keys):
                    meta = expected[key]
                    sl = f.get_slice(key)
                    shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                    want = _ST_DTYPES.get(meta.dtype, str(meta.dtype))
                    if shape != tuple(meta.shape) or dtype != want:
                        raise CheckpointError(
                            f"tensor {key}: stored {dtype}{list(shape)}, expected {want}{list(meta.shape)}"
                        )
                views = _map_file(path)  # data only after every header check passed
                for key in keys:
                    state[key] = views[key] if key in views else f.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{path} is unreadable or truncated: {str(exc).splitlines()[0]}") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    return state


def _check_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """The loaded tensors are exactly the expected names, shapes and dtypes, whatever
    reader produced them (our files are also checked from their headers, before reading)."""
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    if extra:
        raise CheckpointError(f"the checkpoint has {len(extra)} unexpected tensors, e.g. {', '.join(extra[:3])}")
    for key, meta in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(meta.shape) or got.dtype != meta.dtype:
            raise CheckpointError(
                f"tensor {key}: stored {got.dtype}{list(got.shape)}, expected {meta.dtype}{list(meta.shape)}"
            )


_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


def _map_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of a private (copy-on-write) memory map:
    no copy at load, pages come from the page cache as they are first touched (as
    transformers does for dense checkpoints). Call after ``safe_open`` accepted the
    file, which checks that the header's offsets are contiguous, sized by dtype and
    shape, and covered by the file. Tensors whose offset is not aligned to their
    element size (or of a dtype torch cannot view) are left out: the caller reads them
    through safe_open."""
    import mmap
    import struct

    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # writable view, never written back
    base = 8 + header_len
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        dtype = _TORCH_DTYPES.get(meta["dtype"])
        start, end = meta["data_offsets"]
        if dtype is None or (base + start) % dtype.itemsize:
            continue
        count = (end - start) // dtype.itemsize
        flat = (
            torch.frombuffer(buf, dtype=dtype, count=count, offset=base + start)
            if count
            else torch.empty(0, dtype=dtype)
        )
        out[key] = flat.view(meta["shape"])
    return out


def validate_dsf_modules(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> None:
    """Check every DSF factor's content (index ranges, offsets, counts, finite values)
    before any kernel runs on it; ``state`` (name -> tensor) defaults to the model's."""
    state = state if state is not None else model.state_dict()
    checked: set[str] = set()
    for name, module in dsf_modules(model).items():
        for side in ("L", "R"):
            factor = getattr(module, side)
            if factor is None:
                continue
            prefix = f"{name}.{side}"
            tensors = {k: state[f"{prefix}.{k}"] for k, _ in factor.named_buffers()}
            checked.update(f"{prefix}.{k}" for k in tensors)
            try:
                get_format(factor.fmt).validate(tensors, factor.shape, factor.nnz)
            except ValueError as exc:
                raise CheckpointError(f"{prefix}: {exc}") from None
    for key, tensor in state.items():  # the dense parts (factor values were checked above)
        if key not in checked and not all_finite(tensor):
            raise CheckpointError(f"tensor {key} contains NaN or Inf")


def finish_loaded_model(model: nn.Module) -> None:
    """After transformers filled a skeleton (from_pretrained): nothing left on the meta
    device, every factor validated, every DSF module's backend prepared."""
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"tensors never loaded: {', '.join(leftover[:3])}")
    warm_backends()  # native kernels built now register their faster format checks
    validate_dsf_modules(model)
    for module in dsf_modules(model).values():
        module.prepare()


def load_model(
    ckpt_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    dtype: torch.dtype | None = None,
    with_tokenizer: bool = True,
):
    """Load a DSF checkpoint as (model, tokenizer) with DSFLinear modules on ``device``."""
    ckpt = Path(ckpt_dir)
    config, quant = read_quant_config(ckpt)
    return build_model(
        config, quant, lambda expected: _read_tensors(ckpt, expected), ckpt, device, backend, dtype, with_tokenizer
    )


def build_model(
    config: dict,
    quant: DSFQuantConfig,
    read_state: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    tokenizer_dir: Path,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    dtype: torch.dtype | None = None,
    with_tokenizer: bool = True,
):
    """(model, tokenizer) from a model config, its DSF metadata and ``read_state``, which maps
    the expected tensors (name -> meta tensor of the right shape and dtype) to loaded ones:
    our checkpoint files, or a reader of another format that produces our layout."""
    ckpt = tokenizer_dir
    tokenizer_job = None
    if with_tokenizer:
        if not any((ckpt / f).is_file() for f in TOKENIZER_FILES):
            raise CheckpointError(f"{ckpt} has no tokenizer files ({' or '.join(TOKENIZER_FILES)})")
        from concurrent.futures import ThreadPoolExecutor

        from transformers import AutoTokenizer

        # the tokenizer loads while tensors are read and validated (torch ops release the GIL)
        pool = ThreadPoolExecutor(1, thread_name_prefix="dsf-tokenizer")
        tokenizer_job = pool.submit(AutoTokenizer.from_pretrained, ckpt)
        pool.shutdown(wait=False)
    stored_dtype = {k: v for k, v in VALUE_DTYPES.items() if v.is_floating_point}.get(
        str(config.get("dtype") or config.get("torch_dtype") or "float32"), torch.float32
    )
    dtype = dtype or stored_dtype
    try:
        model = _build_skeleton(config, quant, stored_dtype)
    except UnsupportedModelError as exc:
        raise CheckpointError(f"{ckpt}: {exc}") from None
    expected = _unique_state(model)
    state = read_state(expected)
    _check_state(state, expected)
    warm_backends()  # native kernels built now register their faster format checks
    validate_dsf_modules(model, state)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if leftover:
        raise CheckpointError(f"tensors never loaded: {', '.join(leftover[:3])}")
    if dtype != stored_dtype:
        _cast_parameters(model, dtype)
    model = model.to(device).eval()
    set_backend(model, backend)
    for module in dsf_modules(model).values():
        module.prepare(dtype)  # choose and report the backend now, not at the first token
    return model, (tokenizer_job.result() if tokenizer_job is not None else None)


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Run a checkpoint in another float dtype: cast the dense parameters (embeddings,
    norms, lm_head, DSF biases) in place, so tied weights stay tied; the DSF factors
    keep their stored values (the kernels read them as they are)."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def backend_summary(model: nn.Module) -> str:
    """e.g. 'cpu-bitmap x210 (avx2; column index on 60 factors, 6.1 MiB)' or 'torch-csr
    x210' — the kernels the DSF modules really use, each described by the backend itself
    (the CPU kernel: its instruction path and the memory it built beyond the checkpoint)."""
    from dsf_runtime.kernels import BACKENDS

    counts: dict[str, int] = {}
    operands: dict[str, list] = {}
    for module in dsf_modules(model).values():
        counts[module.backend_name] = counts.get(module.backend_name, 0) + 1
        operands.setdefault(module.backend_name, []).extend(module.prepared_operands)
    parts = []
    for name, count in sorted(counts.items()):
        describe = getattr(BACKENDS.get(name), "describe", None)
        parts.append(f"{name} x{count}" + (f" ({describe(operands[name])})" if describe is not None else ""))
    return ", ".join(parts) or "none (dense model)"


def load_any(
    name_or_path: str | os.PathLike, device: str = "cpu", backend: str = "auto", dtype: torch.dtype | None = None
):
    """A DSF checkpoint (sparse) or a dense model directory / embedded name: (model, tokenizer).
    ``dtype``: the model's dtype (dense parts, activations, KV cache; a DSF checkpoint's
    factors keep their stored values); None: the checkpoint's own, float32 for dense models."""
    from dsf_runtime.models import load_dense

    if is_dsf_checkpoint(name_or_path):
        return load_model(name_or_path, device=device, backend=backend, dtype=dtype)
    from dsf_runtime.ct_reader import is_compressed_tensors, load_compressed_tensors

    if is_compressed_tensors(name_or_path):
        return load_compressed_tensors(name_or_path, device=device, backend=backend, dtype=dtype)
    path = Path(str(name_or_path))
    if path.is_dir() and not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"{path} is missing {CONFIG_NAME}: neither a DSF checkpoint nor a model directory")
    return load_dense(name_or_path, device=device, dtype=dtype or torch.float32)
