"""train.py's GPU-training options, run for real on the CPU: float16 autocast with a GradScaler (overflow
steps counted, not failures; a real NaN still stops; --nonfinite skip and the scaler agree), bfloat16
autocast, --torchcompile with every noise layer, --channels-last, --model-ema, and --grad-accum-steps.

Runs are tiny (cifar_resnet20 on 8x8 digits, a few updates) and in-process (train.main).
"""
from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
from pathlib import Path

import pytest
import torch

import train

BASE = ["--dataset", "digits", "--model", "cifar_resnet20", "-b", "64", "--lr", "0.1", "--epochs", "1",
        "--warmup-epochs", "0", "-j", "0", "--train-split", "train[:640]-0", "--val-split", "test[:64]",
        "--log-interval", "1", "--checkpoint-hist", "0", "--smoothing", "0", "--device", "cpu"]
UPDATES = 10  # 640 images at -b 64
# GradScaler's defaults: halve the scale on an overflow step, double it after 2000 clean steps (never here)
INIT_SCALE = 2.0 ** 18  # float16 gradients overflow at 2**18-2**22 here (measured), not at 2**12


def run(tmp_path: Path, name: str, *extra: str) -> tuple:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train.main([*BASE, "--output", str(tmp_path), "--experiment", name, *extra])
    return code, out.getvalue(), err.getvalue(), tmp_path / name


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pth.tar", map_location="cpu", weights_only=False)


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def summary(run_dir: Path) -> list:
    with open(run_dir / "summary.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def big_scale(monkeypatch):
    """A GradScaler starting at 2**18: float16 gradients overflow on the first updates, until halving
    brings the scale low enough; the final scale then tells how many steps overflowed."""
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=INIT_SCALE))


def poison_output(monkeypatch, site: str, steps: set) -> None:
    """The training forward pass number n (from 1) in ``steps`` makes ``site``'s output NaN."""
    build = train.build_model
    count = [0]

    def build_poisoned(*args, **kwargs):
        model = build(*args, **kwargs)

        def hook(module, _inputs, output):
            if module.training:
                count[0] += 1
                if count[0] in steps:
                    return output * float("nan")
            return None

        model.get_submodule(site).register_forward_hook(hook)
        return model

    monkeypatch.setattr(train, "build_model", build_poisoned)


FP16 = ["--amp", "--amp-dtype", "float16", "--train-split", "train[:384]-0"]  # 6 updates (float16 on a CPU is slow)
FP16_UPDATES = 6


@pytest.mark.slow
def test_fp16_overflow_steps_are_counted_and_not_failures(tmp_path, big_scale):
    code, out, err, run_dir = run(tmp_path, "fp16", "--norm", "gni16", *FP16)
    assert code == 0, err
    scale = checkpoint(run_dir)["amp_scaler"]["scale"]
    overflows = results(run_dir)["amp_overflow_steps"]
    # every overflow halved the scale once, nothing else changed it
    assert scale == INIT_SCALE * 0.5 ** overflows
    assert 1 <= overflows < FP16_UPDATES, "the start scale should overflow some, not all, updates"
    assert summary(run_dir)[0]["amp_overflow_steps"] == str(overflows)
    assert results(run_dir)["status"] == "finished" and "non-finite" not in out + err
    weights = checkpoint(run_dir)["state_dict"]
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


@pytest.mark.slow
def test_fp16_real_nan_still_stops_the_run(tmp_path, monkeypatch):
    poison_output(monkeypatch, "layer2.0.conv1", {4})
    code, out, err, run_dir = run(tmp_path, "nan", "--norm", "bn", *FP16)
    assert code == 3, err
    assert f"epoch 0, step 4 of {FP16_UPDATES}" in err and "first non-finite site" in err
    assert results(run_dir)["status"] == "failed"


@pytest.mark.slow
def test_fp16_nan_in_an_earlier_micro_batch_stops_the_run(tmp_path, monkeypatch):
    """With accumulation the NaN loss of the first micro-batch of an update (forward pass 3 of 6, the
    second update's first) is a failure too, not an overflow step: its gradients are NaN, the last
    micro-batch's loss is finite."""
    poison_output(monkeypatch, "layer2.0.conv1", {3})
    code, out, err, run_dir = run(tmp_path, "nan-accum", "--norm", "bn", *FP16, "--grad-accum-steps", "2")
    assert code == 3, err
    assert f"epoch 0, step 4 of {FP16_UPDATES}" in err and "non-finite loss (nan)" in err
    assert results(run_dir)["status"] == "failed"


@pytest.mark.slow
def test_fp16_nonfinite_skip_and_the_scaler_skip_the_same_updates(tmp_path, monkeypatch, big_scale):
    """A NaN loss under --nonfinite skip: our skip (counted as skipped) and the scaler's (its scale
    halves) hit the same update; overflow steps stay the scaler's alone (not counted as skipped)."""
    poison_output(monkeypatch, "layer1.0.conv1", {6})
    code, out, err, run_dir = run(tmp_path, "skip", "--norm", "gni16", *FP16, "--nonfinite", "skip")
    assert code == 0, err
    row = summary(run_dir)[0]
    overflows = int(row["amp_overflow_steps"])
    assert row["skipped_updates"] == "1" and out.count("update skipped") == 1
    assert f"epoch 0, step 6 of {FP16_UPDATES}" in out
    assert 1 <= overflows < 5
    assert checkpoint(run_dir)["amp_scaler"]["scale"] == INIT_SCALE * 0.5 ** (overflows + 1)


def test_bf16_autocast_runs_the_model_in_bfloat16_without_a_scaler(tmp_path, monkeypatch):
    seen = []
    build = train.build_model

    def build_watched(*args, **kwargs):
        model = build(*args, **kwargs)
        model.get_submodule("layer1.0.conv1").register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        return model

    monkeypatch.setattr(train, "build_model", build_watched)
    code, out, err, run_dir = run(tmp_path, "bf16", "--norm", "gni16", "--amp", "--amp-dtype", "bfloat16")
    assert code == 0, err
    assert set(seen) == {torch.bfloat16} and len(seen) > UPDATES  # training and evaluation
    assert checkpoint(run_dir)["amp_scaler"] is None and results(run_dir)["amp_overflow_steps"] == 0
    assert "amp_overflow_steps" not in summary(run_dir)[0]


def test_channels_last_reaches_the_layers(tmp_path, monkeypatch):
    layouts = []
    build = train.build_model

    def build_watched(*args, **kwargs):
        model = build(*args, **kwargs)
        model.get_submodule("layer2.0.bn1").register_forward_hook(
            lambda m, i, o: layouts.append(i[0].is_contiguous(memory_format=torch.channels_last)))
        return model

    monkeypatch.setattr(train, "build_model", build_watched)
    code, out, err, run_dir = run(tmp_path, "cl", "--norm", "gni16", "--channels-last")
    assert code == 0, err
    assert layouts and all(layouts)
    assert results(run_dir)["status"] == "finished"


@pytest.mark.parametrize("decay, follows", [(0.0, "last update"), (1.0, "first update")])
def test_model_ema_decay_0_is_the_model_and_decay_1_the_first_update(tmp_path, monkeypatch, decay, follows):
    """EMA (timm ModelEmaV3): ema <- d * ema + (1 - d) * model after each update, with d = 0 at the first
    update (a copy) and d = --model-ema-decay after it; the two ends of d are exact."""
    import timm.utils

    after_first = {}
    update = timm.utils.ModelEmaV3.update

    def recording_update(self, model, step=None):
        if step == 1:
            after_first.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return update(self, model, step=step)

    monkeypatch.setattr(timm.utils.ModelEmaV3, "update", recording_update)
    code, out, err, run_dir = run(tmp_path, "ema", "--norm", "gni16", "--model-ema", "--model-ema-decay", str(decay))
    assert code == 0, err
    saved = checkpoint(run_dir)
    expected = saved["state_dict"] if follows == "last update" else after_first
    ema = {key.removeprefix("module."): value for key, value in saved["state_dict_ema"].items()}
    assert ema.keys() == expected.keys()
    for key, value in ema.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    # the model moved on after the first update, so the two cases are different claims
    assert not torch.equal(saved["state_dict"]["stem.conv.weight"], after_first["stem.conv.weight"])
    assert summary(run_dir)[0]["ema_eval_top1"] != ""


def test_grad_accum_steps_k_equals_one_batch_k_times_larger_without_batch_norm(tmp_path):
    """For a model without batch statistics (norm none), the gradient of the mean loss over a batch of
    k*B equals the mean of the k micro-batch gradients (each loss / k, summed): the same updates.
    GBN and GNI differ by design: their ghost batches are drawn inside each micro-batch of B samples.
    Two updates (the second with momentum): float32 sums in another order differ by a few ulps; later
    updates of this deep net without normalization amplify that (measured: 3e-8 after 2, 5e-5 after 4)."""
    common = ["--norm", "none", "--lr", "0.02", "--train-split", "train[:128]-0"]
    # one thread: a multi-threaded conv backward splits its reduction by batch size, which alone moves the
    # result by ~1e-5 relative (measured with 2 threads), more than the accumulation itself
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        big_state, accumulated_state, small = _accumulation_runs(tmp_path, common)
    finally:
        torch.set_num_threads(threads)
    assert big_state["num_updates"] == accumulated_state["num_updates"] == 2
    for key, value in big_state["state_dict"].items():
        torch.testing.assert_close(accumulated_state["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    # negative control: the same micro-batches without accumulation take 16 smaller steps
    assert not torch.allclose(checkpoint(small)["state_dict"]["stem.conv.weight"], big_state["state_dict"]["stem.conv.weight"],
                              rtol=1e-5, atol=1e-6)


def _accumulation_runs(tmp_path: Path, common: list) -> tuple:
    """(big batch checkpoint, accumulated checkpoint, run dir of the small steps without accumulation)."""
    code, _, err, big = run(tmp_path, "big", *common, "-b", "64")
    assert code == 0, err
    code, _, err, accumulated = run(tmp_path, "accum", *common, "-b", "16", "--grad-accum-steps", "4")
    assert code == 0, err
    code, _, err, small = run(tmp_path, "small", *common, "-b", "16")
    assert code == 0, err
    return checkpoint(big), checkpoint(accumulated), small


@pytest.mark.slow
@pytest.mark.parametrize("name, norm, layers", [
    ("gni4", "gni4", {"GhostNoiseBatchNorm2d"}),
    ("gbn16-gnir4", '["gbn16", "gnir4"]', {"GhostBatchNorm2dThen", "GhostNoiseInjector"}),
    ("xbn16-nat4", '["xbn16", "nat4"]', {"ExclusiveBatchNorm2d", "NoisyAffine"}),
], ids=["gni4", "gbn16-gnir4", "xbn16-nat4"])
def test_torchcompile_trains_with_every_noise_layer(tmp_path, monkeypatch, name, norm, layers):
    """Fused GNI; GBN followed by the unfused ghost noise injector; XBN followed by NoisyAffine. (Dynamo
    on the CPU with the eager backend; the layers' own tests compile them whole with aot_eager.)"""
    import torch._dynamo

    built = set()
    build = train.build_model

    def build_recorded(*args, **kwargs):
        model = build(*args, **kwargs)
        built.update(type(module).__name__ for module in model.modules())
        return model

    monkeypatch.setattr(train, "build_model", build_recorded)
    torch._dynamo.reset()
    code, out, err, run_dir = run(tmp_path, name, "--norm", norm, "--torchcompile", "eager",
                                  "--train-split", "train[:128]-0", "-b", "32")
    torch._dynamo.reset()
    assert code == 0, err
    assert layers <= built, built
    assert results(run_dir)["status"] == "finished" and checkpoint(run_dir)["num_updates"] == 4
    weights = checkpoint(run_dir)["state_dict"]
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


@pytest.mark.parametrize("probe_result, expected", [(True, {}), (False, {"dynamic": False})])
def test_fused_gni_compiles_statically_where_the_probe_fails(monkeypatch, probe_result, expected):
    """The probe decides for a model with fused GNI; one without compiles as before, unprobed."""
    import nodo

    calls = []
    monkeypatch.setattr(train, "fused_gni_compiles_dynamic",
                        lambda: calls.append("probe") or probe_result)
    monkeypatch.setattr(torch, "compile", lambda model, backend, **kwargs: kwargs)
    gni = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3),
                              nodo.GhostNoiseBatchNorm2d(4, ghost_batch_size=2))
    assert train.compile_model(gni, "eager") == expected and calls == ["probe"]
    bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    assert train.compile_model(bn, "eager") == {} and calls == ["probe"]


@pytest.mark.slow
def test_the_compile_probe_leaves_the_global_random_stream_alone():
    """A compiled GNI run draws the same initialization and data order as an eager one."""
    before = torch.random.get_rng_state()
    assert isinstance(train.fused_gni_compiles_dynamic(), bool)
    assert torch.equal(torch.random.get_rng_state(), before)
