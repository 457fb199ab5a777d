"""nodo's compiled channels_last kernel (``nodo/csrc/channels_last_sums.cpp``, ``nodo.functional.cpu_sums``).

* Its sums against float64 sums of the same values, within the rounding bound of its summation.
* The layers call it on channels_last CPU input, and only there; ``portable_kernels()`` skips it.
* Building, for real, in fresh processes and cache folders: built once then reused; built by several
  processes at once without a lock; a missing or failing compiler gives one warning and the torch-op
  path with the same results; ``NODO_CPU_KERNEL=0`` builds nothing.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import nodo
from conftest import needs_compiler
from nodo.functional import cpu_sums, kernels

ROOT = Path(__file__).resolve().parents[1]
BLOCK_ROWS = 64  # kBlockRows in the kernel: rows summed in the input's dtype before a float64 total

# (B, L, C): odd channel counts, a partial block, a long sample, one value per sample, no values,
# no samples, no channels
SHAPES = [(1, 1, 1), (3, 70, 5), (5, 129, 67), (2, 4096, 3), (4, 0, 3), (0, 5, 3), (2, 5, 0)]


def _exact_sums(terms: torch.Tensor) -> torch.Tensor:
    """``(B, L, C)`` float64 terms -> their ``(B, C)`` sums over ``L``, each correctly rounded (``math.fsum``)."""
    batch_size, _, channels = terms.shape
    sums = [[math.fsum(column) for column in sample] for sample in terms.transpose(1, 2).tolist()]
    return torch.tensor(sums, dtype=torch.float64).reshape(batch_size, channels)


@needs_compiler
@pytest.mark.parametrize("with_grad", [False, True], ids=["moments", "grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sums_are_within_the_rounding_bound_of_their_summation(shape, dtype, with_grad):
    """Against the correctly rounded sums (``math.fsum``) of the same terms formed in float64: for
    float32 input within float64's rounding of the exact terms (2^-29 of float32's); for float64
    input from the same ``u`` as the kernel's, each product rounded once (the kernel's product once
    or, fused, not at all). Per output, each term is formed with at most 3 roundings (``u = x - k``,
    then ``u * u`` or ``g * u``); a block of at most 64 terms is summed in the input's dtype (at
    most 63 more on any term), the blocks' sums in float64 (one more per block for float64 input),
    and the result is rounded once (float32), or the reference is (float64). So with unit
    roundoff ``r``: ``|error| <= (3 + 63 + blocks) r sum|terms| + r |sum|``."""
    generator = torch.Generator().manual_seed(0)
    rows = (torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 3).to(dtype)
    grad = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) if with_grad else None
    center = (rows[:, :1].mean((0, 1)) if rows[:, :1].numel() else torch.zeros(shape[2], dtype=dtype)).contiguous()
    got = cpu_sums.channels_last_sums(rows, center, grad)
    assert got is not None, cpu_sums.kernel_status()
    centered = rows.double() - center.double()
    factor = centered if grad is None else grad.double()
    terms = factor * centered
    roundoff = torch.finfo(dtype).eps / 2
    blocks = math.ceil(shape[1] / BLOCK_ROWS)
    for result, exact, magnitude in ((got[0], _exact_sums(terms), terms.abs().sum(1)),
                                     (got[1], _exact_sums(factor), factor.abs().sum(1))):
        assert result.dtype == dtype and result.shape == (shape[0], shape[2])
        bound = (3 + BLOCK_ROWS - 1 + blocks) * roundoff * magnitude + roundoff * exact.abs()
        assert bool(((result.double() - exact).abs() <= bound).all()), (result.double() - exact).abs().max()


@needs_compiler
@pytest.mark.parametrize("with_grad", [False, True], ids=["moments", "grad"])
def test_a_view_into_a_larger_tensor_gives_the_sums_of_its_own_values(with_grad):
    """Contiguous views that start inside their storage (a slice of samples): the kernel reads from
    the view's first value (``data_ptr()`` with the offset), so the sums equal a copy's, bit for bit."""
    generator = torch.Generator().manual_seed(0)
    rows, grad = (torch.randn(5, 70, 6, generator=generator) for _ in range(2))
    center = torch.randn(2, 6, generator=generator)[1]
    view = (rows[2:4], center, grad[1:3] if with_grad else None)
    assert all(t.storage_offset() > 0 and t.is_contiguous() for t in view if t is not None)
    got = cpu_sums.channels_last_sums(*view)
    expected = cpu_sums.channels_last_sums(*(None if t is None else t.clone() for t in view))
    assert got is not None, cpu_sums.kernel_status()
    for result, reference in zip(got, expected):
        assert torch.equal(result, reference)


def test_declines_what_it_does_not_apply_to():
    """Other dtypes, layouts and shapes get ``None`` (the caller's torch-op path), not a wrong answer."""
    rows, center = torch.zeros(2, 3, 4), torch.zeros(4)
    declined = {
        "float16": (rows.half(), center.half(), None),
        "not contiguous": (rows.transpose(0, 1), center, None),
        "center of another length": (rows, torch.zeros(3), None),
        "grad of another shape": (rows, center, torch.zeros(2, 3, 5)),
        "grad of another dtype": (rows, center, rows.double()),
        "two dims": (rows[0], center, None),
        "meta device": (rows.to("meta"), center.to("meta"), None),  # no memory behind data_ptr()
        "mkldnn layout": (rows.to_mkldnn(), center, None),  # is_contiguous() yet no data_ptr()
    }
    for name, arguments in declined.items():
        assert cpu_sums.channels_last_sums(*arguments) is None, name
    with kernels.portable_kernels():
        assert cpu_sums.channels_last_sums(rows, center) is None


LAYERS = {
    "gni": lambda: nodo.GhostNoiseBatchNorm2d(4, 4, generator=torch.Generator().manual_seed(0)),
    "gbn": lambda: nodo.GhostBatchNorm2d(4, 4),  # instead of batch norm's kernels per ghost batch
    "xbn": lambda: nodo.ExclusiveBatchNorm2d(4, 4),
    "en-eval": lambda: nodo.EvalNorm2d(4, 4).eval(),
}
CALLS = {"gni": 2, "gbn": 2, "xbn": 2, "en-eval": 1}  # forward sums, and backward sums where there is a backward


@needs_compiler
@pytest.mark.parametrize("name", list(LAYERS))
def test_layers_take_the_kernel_on_channels_last_cpu_input_only(name, monkeypatch):
    # built and checked before counting: that check's own calls would count (this test run first, alone
    # or on an xdist worker)
    assert cpu_sums.available(), cpu_sums.kernel_status()
    calls = []
    call = cpu_sums._call
    monkeypatch.setattr(cpu_sums, "_call", lambda *args: calls.append(1) or call(*args))
    x = torch.randn(8, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    for layout, expected in ((torch.contiguous_format, 0), (torch.channels_last, CALLS[name])):
        calls.clear()
        layer = LAYERS[name]()
        inputs = x.contiguous(memory_format=layout).requires_grad_()
        with torch.set_grad_enabled(layer.training):
            output = layer(inputs)
            if layer.training:
                output.square().sum().backward()
        assert len(calls) == expected, f"{name} on {layout}: {len(calls)} kernel calls"


def _no_home(cls):
    raise RuntimeError("Could not determine home directory.")  # as Path.home() without HOME or a passwd entry


@pytest.mark.parametrize("cause", ["no source file", "no home folder"])
def test_a_library_path_that_cannot_be_formed_gives_the_torch_op_path(cause, monkeypatch, tmp_path):
    """The kernel's source missing from an install, or no home folder for the default cache (a container
    run as a user without one): one warning and ``None``, as for a failed build, not an error from the layer."""
    monkeypatch.setattr(cpu_sums, "_status", None)  # not tried yet in this process (restored after)
    monkeypatch.setattr(cpu_sums, "_kernel", None)
    if cause == "no source file":
        monkeypatch.setattr(cpu_sums, "_SOURCE", tmp_path / "missing.cpp")
    else:
        monkeypatch.delenv(cpu_sums.CACHE_DIR, raising=False)
        monkeypatch.setattr(Path, "home", classmethod(_no_home))
    rows, center = torch.zeros(2, 3, 4), torch.zeros(4)
    with pytest.warns(RuntimeWarning, match="channels_last CPU kernel is unavailable"):
        assert cpu_sums.channels_last_sums(rows, center) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert cpu_sums.channels_last_sums(rows, center) is None
    assert cpu_sums.kernel_status().startswith("unavailable (")


# --- building, in fresh processes -------------------------------------------------------------

SCRIPT = """
import warnings, torch, nodo
from nodo.functional import cpu_sums, kernels
warnings.simplefilter("always")  # a second warning would show: the layer must warn once
x = torch.randn(6, 4, 5, 5, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=torch.channels_last)
def run():
    layer = nodo.GhostNoiseBatchNorm2d(4, 3, generator=torch.Generator().manual_seed(0))
    inputs = x.clone().requires_grad_()
    output = layer(inputs)
    output.square().sum().backward()
    return output, inputs.grad
first, second = run(), run()
with kernels.portable_kernels():
    portable = run()
for got, want in zip(first + second, portable + portable):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
print("STATUS", cpu_sums.kernel_status())
"""


def _run(cache: Path, script: str = SCRIPT, **environment) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if key not in (cpu_sums.SWITCH, "CXX")}
    env.update({cpu_sums.CACHE_DIR: str(cache), "PYTHONPATH": str(ROOT), **environment})
    return subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(process, marker: str = "STATUS ") -> tuple[str, str]:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, f"exit status {process.returncode}: {stderr}"
    status = [line for line in stdout.splitlines() if line.startswith(marker)]
    return status[0][len(marker):], stderr


def _files(cache: Path) -> list[str]:
    return sorted(path.name for path in cache.iterdir()) if cache.exists() else []


UNTRIED_SCRIPT = """
import torch, nodo
from nodo.functional import cpu_sums
layers = [lambda: nodo.GhostNoiseBatchNorm2d(4, 4, generator=torch.Generator().manual_seed(0)),
          lambda: nodo.GhostBatchNorm2d(4, 4), lambda: nodo.ExclusiveBatchNorm2d(4, 4)]
x = torch.randn(8, 4, 5, 5, generator=torch.Generator().manual_seed(0))
inputs = [x, x.bfloat16().contiguous(memory_format=torch.channels_last)]
for make in layers:
    for input in inputs:
        make().to(input.dtype)(input.clone().requires_grad_()).float().square().sum().backward()
        nodo.EvalNorm2d(4, 4).to(input.dtype).eval()(input)
print("STATUS", cpu_sums._status)
"""


def test_input_it_does_not_apply_to_never_tries_a_build(tmp_path):
    """Contiguous float32 and channels_last bfloat16 input through every layer, forward and backward,
    in a fresh process: the kernel is never built, loaded or warned about (``_status`` untried)."""
    cache = tmp_path / "cache"
    status, stderr = _finish(_run(cache, script=UNTRIED_SCRIPT, CXX="false"))
    assert status == "None" and "RuntimeWarning" not in stderr and not cache.exists(), stderr


FAKE_SCRIPT = """
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from nodo.functional import cpu_sums
assert cpu_sums.available(), cpu_sums.kernel_status()
with FakeTensorMode():  # CPU tensors by their device, with a null data_ptr()
    rows, center = torch.randn(2, 3, 4), torch.zeros(4)
    print("RESULT", cpu_sums.channels_last_sums(rows, center))
"""


@needs_compiler
def test_declines_fake_tensors():
    """A FakeTensor (shape propagation in eager mode, outside torch.compile) gets ``None``, not its
    null pointer passed to the C function; in a fresh process, which that would crash."""
    assert cpu_sums.available(), cpu_sums.kernel_status()
    stdout, _ = _finish(_run(cpu_sums.library_path().parent, script=FAKE_SCRIPT), marker="RESULT ")
    assert stdout == "None"


@needs_compiler
def test_built_once_by_concurrent_processes_then_reused_without_a_compiler(tmp_path):
    """Three processes start on an empty cache folder at once: each builds or finds the library, no
    lock, and one library is left with no temporary files. A later process with a compiler that
    always fails loads that library (it does not rebuild)."""
    cache = tmp_path / "cache"
    statuses = [_finish(process)[0] for process in [_run(cache) for _ in range(3)]]
    library = _files(cache)
    assert len(library) == 1 and library[0].startswith("channels_last_sums-") and library[0].endswith(".so"), library
    assert statuses == [f"loaded from {cache / library[0]}"] * 3
    assert (cache / library[0]).stat().st_mode & 0o555 == 0o555, "a cache folder may be shared: readable by all"
    status, stderr = _finish(_run(cache, CXX="false"))
    assert status == f"loaded from {cache / library[0]}" and "RuntimeWarning" not in stderr
    assert _files(cache) == library


@needs_compiler
def test_a_compiler_command_with_arguments_builds(tmp_path):
    """``CXX="env c++"`` (as ``CXX="ccache g++"``) is a command with arguments, not one file name."""
    cache = tmp_path / "cache"
    status, stderr = _finish(_run(cache, CXX=f"env {cpu_sums.compiler()[0]}"))
    assert status.startswith(f"loaded from {cache}") and "RuntimeWarning" not in stderr


@needs_compiler
def test_a_cached_library_the_loader_rejects_is_built_again(tmp_path, monkeypatch):
    """A truncated library (a full disk, a copy gone wrong) is replaced by a new build, with no warning."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(cpu_sums.CACHE_DIR, str(cache))
    path = cpu_sums.library_path()  # the name the child process computes too (same source and torch)
    cache.mkdir()
    path.write_bytes(b"\x7fELF truncated")
    status, stderr = _finish(_run(cache))
    assert status == f"loaded from {path}" and "RuntimeWarning" not in stderr
    assert path.stat().st_size > 1000 and _files(cache) == [path.name]


@pytest.mark.parametrize("compiler", ["false", "/nonexistent/c++"], ids=["failing", "missing"])
def test_without_a_working_compiler_one_warning_and_the_same_results(tmp_path, compiler):
    cache = tmp_path / "cache"
    status, stderr = _finish(_run(cache, CXX=compiler))
    assert status.startswith("unavailable (")
    assert stderr.count("RuntimeWarning: nodo: its channels_last CPU kernel is unavailable") == 1, stderr
    assert f"Set {cpu_sums.SWITCH}=0" in stderr
    assert _files(cache) == []  # no library, no temporary file left behind


def test_switched_off_it_builds_nothing_and_says_nothing(tmp_path):
    cache = tmp_path / "cache"
    status, stderr = _finish(_run(cache, **{cpu_sums.SWITCH: "0"}))
    assert status == f"disabled by {cpu_sums.SWITCH}=0" and "RuntimeWarning" not in stderr
    assert _files(cache) == []


def test_the_library_name_changes_with_the_torch_build(monkeypatch):
    """A cache folder shared by nodes or venvs never hands one torch a library built for another."""
    before = cpu_sums.library_path()
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    assert cpu_sums.library_path() != before and cpu_sums.library_path().parent == before.parent
