r"""Per-sample sums of channels_last CPU activations by nodo's own compiled kernel, built on first use.

Every nodo norm that needs per-(sample, channel) sums (GNI for its noise, XBN for the exclusion,
EvalNorm for the blend) reads them from the activation (:mod:`nodo.functional.statistics`). On a
channels_last activation torch has no op that takes them in one pass: each sample is an ``(L, C)``
matrix summed down its columns, and torch's reductions need ``u = x - k`` or ``g * u`` written
out first, which costs 1.7x batch norm's single read (measured on this project's 2-core CPU). The
loop in ``nodo/csrc/channels_last_sums.cpp`` reads each row once into ``C`` accumulators; measured
there, 1.03 ms against ``torch.batch_norm_update_stats``' 1.65 ms for the forward sums of a
128 x 64 x 32 x 32 batch, and 1.97 ms against ``native_batch_norm_backward``'s 1.91 for the backward.

How it is built, and what happens when it cannot be:

* On the first call that needs it, with the C++ compiler ``$CXX`` (default ``c++``) against the
  running torch's headers and libraries, into ``$NODO_CACHE_DIR`` (default ``~/.cache/nodo``) as
  ``channels_last_sums-<key>.so``. The key hashes the source, the compiler's arguments, the torch
  build, the machine type and the C library, so a change to any of them builds a new library, and
  a folder shared by cluster nodes or virtual environments never hands one a library built for
  another torch or system image. A build takes about a second.
* The library is written under a temporary name and renamed into place, so processes building at
  once (ranks of one job, tests in parallel) need no lock, and a build killed halfway leaves no
  library behind to load.
* Loaded with :mod:`ctypes` and checked once against float64 torch sums on small tensors; the
  entry point is a C function of pointers, called only on tensors checked here.
* If there is no compiler (or no kernel source, or no home folder for the default cache), the
  build or load fails, or the check disagrees, a warning names the reason once, and the layers
  take their torch-op path: the same results to float rounding, at the speed the README's
  Performance section reports for it. ``NODO_CPU_KERNEL=0`` skips the build
  (no warning); :func:`nodo.functional.kernels.portable_kernels` skips the kernel too.

OpenMP: the kernel runs on torch's intra-op threads (``at::parallel_for``, compiled with
``-fopenmp``). torch's Linux wheels ship GNU OpenMP as ``libgomp.so.1``, so the loader gives the
library the runtime torch already loaded. A torch built with another OpenMP runtime (LLVM's or
Intel's, as in some conda builds) gets GNU OpenMP loaded beside it: the same results, with a
second thread pool.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from nodo.functional import kernels

__all__ = ["channels_last_sums", "available", "kernel_status", "library_path", "compiler", "SWITCH", "CACHE_DIR"]

SWITCH = "NODO_CPU_KERNEL"  # "0": never build or load the kernel
CACHE_DIR = "NODO_CACHE_DIR"  # where built libraries are kept (default ~/.cache/nodo)

_SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "channels_last_sums.cpp"
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1}
_BUILD_SECONDS = 300

_lock = threading.Lock()
_kernel = None  # the loaded C function, once loaded
_status: Optional[str] = None  # why there is no kernel, or where it was loaded from


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR) or Path.home() / ".cache" / "nodo").expanduser()


def compiler() -> list[str]:
    """The compiler command: ``$CXX`` split as a shell would (``ccache g++`` works), default ``c++``."""
    return shlex.split(os.environ.get("CXX", "")) or ["c++"]


def _compiler_arguments(output: Path) -> list[str]:
    torch_dir = Path(torch.__file__).resolve().parent
    return ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}", f"-I{torch_dir / 'include'}",
            str(_SOURCE), "-o", str(output), f"-L{torch_dir / 'lib'}", f"-Wl,-rpath,{torch_dir / 'lib'}",
            "-lc10", "-ltorch_cpu"]


def library_path() -> Path:
    """Where the kernel built for this source, these arguments, torch build, machine type and C
    library is kept (not the compiler: any that builds it builds the same kernel)."""
    identity = [_SOURCE.read_text(), " ".join(_compiler_arguments(Path("OUT"))), torch.__version__,
                str(torch.version.git_version), platform.machine(), platform.system(), " ".join(platform.libc_ver())]
    key = hashlib.sha256("\0".join(identity).encode()).hexdigest()[:16]
    return _cache_dir() / f"channels_last_sums-{key}.so"


def _build(target: Path) -> None:
    """Compiles the kernel into ``target``: into a temporary file in its folder, renamed into place
    (readable by all, as an installed library: a cache folder may be shared)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        command = compiler()
        done = subprocess.run(command + _compiler_arguments(Path(temporary)), capture_output=True, text=True,
                              timeout=_BUILD_SECONDS)
        if done.returncode != 0:
            last_lines = " | ".join(done.stderr.strip().splitlines()[-3:])
            failure = f"{shlex.join(command)} exited with {done.returncode}"
            raise RuntimeError(failure + (f": {last_lines}" if last_lines else ""))
        os.chmod(temporary, 0o755)  # mkstemp made it 0600
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _load(path: Path):
    function = ctypes.CDLL(str(path)).nodo_channels_last_sums
    function.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3
    function.restype = ctypes.c_int
    return function


def _call(function, input_rows: Tensor, center: Tensor, grad_rows: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    batch_size, _, channels = input_rows.shape
    dot = input_rows.new_empty((batch_size, channels))
    total = input_rows.new_empty((batch_size, channels))
    code = function(_DTYPE_CODES[input_rows.dtype], input_rows.data_ptr(),
                    None if grad_rows is None else grad_rows.data_ptr(), center.data_ptr(), dot.data_ptr(),
                    total.data_ptr(), *input_rows.shape)
    if code != 0:
        raise RuntimeError(f"nodo_channels_last_sums returned {code} for dtype {input_rows.dtype}")
    return dot, total


def _torch_sums(input_rows: Tensor, center: Tensor, grad_rows: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    centered = input_rows.double() - center.double()
    factor = centered if grad_rows is None else grad_rows.double()
    return (factor * centered).sum(1), factor.sum(1)


def _agrees(function) -> bool:
    """The kernel against float64 torch sums, with and without ``grad``, on odd sizes of both dtypes."""
    generator = torch.Generator().manual_seed(0)
    for dtype in _DTYPE_CODES:
        rows, grad = (torch.randn(3, 70, 5, generator=generator, dtype=dtype) for _ in range(2))
        center = torch.randn(5, generator=generator, dtype=dtype)
        for factor in (None, grad):
            got = _call(function, rows, center, factor)
            expected = _torch_sums(rows, center, factor)
            if not all(torch.allclose(g.double(), e, rtol=1e-5, atol=1e-4) for g, e in zip(got, expected)):
                return False
    return True


def _load_or_build(path: Path):
    """The kernel from ``path``, built first where there is none; a library there that the loader
    rejects (truncated by a full disk, written by something else) is built again once."""
    if path.exists():
        try:
            return _load(path)
        except OSError:
            pass
    _build(path)
    return _load(path)


def _kernel_or_none():
    """The loaded kernel, building it first if needed; ``None`` (with a warning, once) where it cannot be."""
    global _kernel, _status
    if _status is not None:
        return _kernel
    with _lock:
        if _status is not None:
            return _kernel
        if os.environ.get(SWITCH, "1") == "0":
            _status = f"disabled by {SWITCH}=0"
            return None
        try:
            path = library_path()  # reads the source and may need the home folder: can fail too
            function = _load_or_build(path)
            if not _agrees(function):
                raise RuntimeError(f"{path} disagrees with torch's sums")
        except Exception as error:  # no source, cache folder or compiler, a failed build or load: torch ops
            _status = f"unavailable ({error})"
            warnings.warn(f"nodo: its channels_last CPU kernel is {_status}; channels_last CPU norm layers "
                          f"use torch ops instead (same results, slower). Set {SWITCH}=0 to skip the build.",
                          RuntimeWarning, stacklevel=3)
            return None
        _kernel, _status = function, f"loaded from {path}"
        return _kernel


def available() -> bool:
    """Whether :func:`channels_last_sums` runs the kernel on the tensors it applies to (building it
    first if that has not been tried): not under ``portable_kernels()``, ``torch.compile`` or the switch."""
    return not (kernels.portable_only() or torch.compiler.is_compiling()) and _kernel_or_none() is not None


def kernel_status() -> str:
    """Where the kernel was loaded from, or why it is not used (building it if it has not been tried)."""
    _kernel_or_none()
    return _status


def _applies(input_rows: Tensor, center: Tensor, grad_rows: Optional[Tensor]) -> bool:
    # the tensors, shapes, dtypes, device and layout the C function assumes: it reads raw pointers.
    # Plain strided tensors only: a subclass (FakeTensor: a CPU device and a null data_ptr()) or an
    # mkldnn tensor may have no memory of that layout behind data_ptr().
    tensors = [input_rows, center] + ([] if grad_rows is None else [grad_rows])
    if not all(type(t) is torch.Tensor and t.layout == torch.strided for t in tensors):
        return False
    if input_rows.dim() != 3 or input_rows.dtype not in _DTYPE_CODES or center.shape != input_rows.shape[2:]:
        return False
    if grad_rows is not None and grad_rows.shape != input_rows.shape:
        return False
    return all(t.device.type == "cpu" and t.dtype == input_rows.dtype and t.is_contiguous() for t in tensors)


def channels_last_sums(input_rows: Tensor, center: Tensor,
                       grad_rows: Optional[Tensor] = None) -> Optional[tuple[Tensor, Tensor]]:
    """Per-(sample, channel) sums of ``(B, L, C)`` rows, ``u = input - center``, by the compiled kernel:
    ``(sum grad * u, sum grad)``, or ``(sum u^2, sum u)`` without ``grad_rows``; each ``(B, C)``.

    ``input_rows`` (and ``grad_rows``) contiguous float32/float64 CPU tensors, the ``(B, L, C)``
    view of a channels_last activation; ``center`` ``(C,)`` of their dtype. ``None`` where the
    kernel does not apply (another device, dtype or layout, a tensor subclass, or under
    ``torch.compile``), is disabled, or could not be built; the caller then takes its torch-op path.
    """
    if kernels.portable_only() or torch.compiler.is_compiling() or not _applies(input_rows, center, grad_rows):
        return None
    function = _kernel_or_none()
    return None if function is None else _call(function, input_rows, center, grad_rows)
