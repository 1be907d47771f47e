"""Build and load the CPU kernels' torch operator library (csrc/*.cpp).

The sources are compiled once per source text, torch version, compiler and operator
namespace by torch.utils.cpp_extension (ninja, one object per ISA file, in parallel)
into a fresh temporary directory, then moved atomically into the cache: concurrent
builds never see a half-written library, and a build killed midway leaves no lock
behind. The ops live in the ``dsf`` namespace (``torch.ops.dsf.bitmap_spmm`` and the
rest, see csrc/ops.cpp); another namespace builds a second copy that can be loaded
beside it (scripts/kernel_ab.py compares two sources that way). Fake (meta)
implementations are registered for the matmul ops so that torch.compile and
torch.export trace them without running them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
from importlib import resources
from pathlib import Path

import torch

from dsf_runtime import settings

log = logging.getLogger(__name__)

NAMESPACE = "dsf"
_LOCK = threading.Lock()
_LOADED: dict[str, Path] = {}  # namespace -> the library loaded for it in this process
_FAKES: set[str] = set()


class BuildError(RuntimeError):
    """The kernel library could not be built or loaded; the message says why."""


def csrc_dir() -> Path:
    """The directory of the kernel sources shipped with the package."""
    return Path(str(resources.files("dsf_runtime.kernels") / "csrc"))


def find_compiler() -> str | None:
    """The C++ compiler to build with: $CXX, else the first of c++, g++, clang++."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _sources(csrc: Path) -> list[Path]:
    return sorted(p for p in csrc.iterdir() if p.suffix in (".cpp", ".h"))


def library_path(csrc: Path, namespace: str, cxx: str) -> Path:
    """Where the cache keeps the build of ``csrc`` for ``namespace`` by ``cxx``."""
    digest = hashlib.sha256()
    for part in (namespace, cxx, torch.__version__):
        digest.update(part.encode() + b"\0")
    for src in _sources(csrc):
        digest.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    return settings.cache_dir() / "kernels" / f"{namespace}-ops-{digest.hexdigest()[:16]}.so"


def _compile(csrc: Path, namespace: str, target: Path) -> None:
    """Compile ``csrc`` into ``target`` and load it (cpp_extension loads what it builds)."""
    from torch.utils import cpp_extension

    target.parent.mkdir(parents=True, exist_ok=True)
    sources = [str(p) for p in _sources(csrc) if p.suffix == ".cpp"]
    log.info("compiling the CPU kernels (%d sources, once per version)", len(sources))
    with tempfile.TemporaryDirectory(dir=target.parent, prefix="build-") as tmp:
        try:
            built = cpp_extension.load(
                name=f"{namespace}_ops",
                sources=sources,
                build_directory=tmp,
                is_python_module=False,
                extra_cflags=["-O3", "-fopenmp", f"-DDSF_OP_NAMESPACE={namespace}"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except (RuntimeError, OSError, ImportError) as exc:
            text = str(exc).splitlines()
            # the compiler's first diagnostic, else the build tool's own error line
            lines = [line for line in text if "error:" in line] or [line for line in text if "error" in line.lower()]
            lines = lines or text
            raise BuildError(f"compiling the CPU kernels failed: {(lines or ['unknown error'])[0].strip()}") from None
        os.replace(built or Path(tmp) / f"{namespace}_ops.so", target)


def load(csrc: Path | None = None, namespace: str = NAMESPACE) -> Path:
    """Build (once, cached) and load the operator library of ``csrc`` (default: the
    package's) under ``namespace``. A namespace is loaded once per process: asking
    again returns the library already loaded. Raises BuildError with the reason."""
    csrc = csrc or csrc_dir()
    with _LOCK:
        if namespace in _LOADED:
            return _LOADED[namespace]
        cxx = find_compiler()
        if cxx is None:
            raise BuildError("no C++ compiler found (set CXX or install g++)")
        if not _ninja_available():
            raise BuildError("building the CPU kernels needs ninja (pip install ninja)")
        target = library_path(csrc, namespace, cxx)
        if target.exists():
            try:
                torch.ops.load_library(str(target))
            except OSError as exc:
                raise BuildError(f"loading the CPU kernels failed: {exc}") from None
        else:
            _compile(csrc, namespace, target)
        _LOADED[namespace] = target
        if namespace == NAMESPACE:
            _register_fakes(namespace)
        return target


def _ninja_available() -> bool:
    from torch.utils import cpp_extension

    return cpp_extension.is_ninja_available()


def ops(namespace: str = NAMESPACE):
    """``torch.ops.<namespace>``, the loaded library's operators."""
    return getattr(torch.ops, namespace)


def _register_fakes(namespace: str) -> None:
    if namespace in _FAKES:
        return

    @torch.library.register_fake(f"{namespace}::bitmap_spmm")
    def _spmm_fake(x, factor, cols, plan):  # (n, cols) -> (n, rows)
        return x.new_empty(x.shape[0], factor[1].shape[0] - 1)

    @torch.library.register_fake(f"{namespace}::bitmap_pair")
    def _pair_fake(x, right, right_cols, right_plan, left, left_cols, left_plan):  # (n, in) -> (n, out)
        return x.new_empty(x.shape[0], left[1].shape[0] - 1)

    @torch.library.register_fake(f"{namespace}::bitmap_pair_bound")
    def _pair_bound_fake(x, right, left, rows):  # (..., in) -> (..., rows)
        return x.new_empty(*x.shape[:-1], rows)

    @torch.library.register_fake(f"{namespace}::mlp_block_bound")
    def _mlp_block_fake(x, norm_weight, eps, handles):  # (..., hidden) -> (..., hidden)
        return torch.empty_like(x)

    @torch.library.register_fake(f"{namespace}::attn_inputs_bound")
    def _attn_inputs_fake(x, norm_weight, eps, handles, cos, sin, k_cache, v_cache, pos, heads, kv_heads):
        return x.new_empty(x.shape[0], heads, 1, k_cache.shape[-1])  # q (n, heads, 1, head_dim)

    @torch.library.register_fake(f"{namespace}::decode_layer_bound")
    def _decode_layer_fake(x, attn_norm, attn_eps, mlp_norm, mlp_eps, handles, cos, sin, k_cache, v_cache, *rest):
        return torch.empty_like(x)  # (n, 1, hidden)

    @torch.library.register_fake(f"{namespace}::attend_cached")
    def _attend_fake(q, k_cache, v_cache, pos, heads, kv_heads, scale, portable=False):
        return q.new_empty(q.shape[0], heads * q.shape[-1])  # (n, heads * head_dim)

    @torch.library.register_fake(f"{namespace}::dense_linear")
    def _dense_fake(x, weight, scales=None):  # (n, k) -> (n, rows)
        return x.new_empty(x.shape[0], weight.shape[0])

    _FAKES.add(namespace)
