"""The DataLoader path of shared.data at ImageNet recipe: seeded per-sample augmentation (shared.augment),
uint8 hand-over with normalization on the device (shared.prefetch), persistent workers, and train.py's
resume through it.

Images are small (80x70 JPEGs trained at 32x32) so that the file stays fast; the recipe is the same as
at 224 (the images need resizing).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import random
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.functional import pil_to_tensor

from shared import augment, data
from shared.config import create_parser
from shared.prefetch import DevicePrefetcher

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_args(*argv):
    return create_parser().parse_args(list(argv))


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> Path:
    """train/{a,b}: 10 JPEGs each, val/{a,b}: 3 each; 80 wide, 70 high."""
    from PIL import Image

    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for split, count in (("train", 10), ("val", 3)):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (70, 80, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return root


def folder_args(root: Path, workers: int, *more: str):
    return make_args("--data-dir", str(root), "-b", "4", "--workers", str(workers), "--seed", "5",
                     "--input-size", "3", "32", "32", "--fast-loader", "off", *more)


def epoch_batches(loader, epoch: int, start: int = 0) -> list:
    loader.set_epoch(epoch)
    return list(loader.batches(start))


def assert_same_batches(first: list, second: list) -> None:
    assert len(first) == len(second)
    for (images, targets), (other_images, other_targets) in zip(first, second):
        assert torch.equal(images, other_images) and torch.equal(targets, other_targets)


# ----------------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_same_samples_for_0_1_2_workers_across_epochs_and_after_a_mid_epoch_resume(jpegs):
    per_workers = {}
    for workers in (0, 1, 2):
        loaders = data.create_loaders(folder_args(jpegs, workers), torch.device("cpu"))
        assert loaders.config.recipe == "imagenet" and loaders.train.kind == f"DataLoader(workers={workers})"
        # epoch 3, then 4, then 3 again from the same (persistent) workers
        per_workers[workers] = [epoch_batches(loaders.train, epoch) for epoch in (3, 4, 3)]
        third, fourth, third_again = per_workers[workers]
        assert len(third) == len(loaders.train) == 5
        assert_same_batches(third, third_again)
        assert not torch.equal(third[0][0], fourth[0][0])  # a new epoch: a new order and new crops
        # a resume at batch 2: the rest of the same epoch, from this loader and from a new one
        assert_same_batches(epoch_batches(loaders.train, 3, start=2), third[2:])
        resumed = data.create_loaders(folder_args(jpegs, workers), torch.device("cpu"))
        assert_same_batches(epoch_batches(resumed.train, 3, start=2), third[2:])
        assert_same_batches(epoch_batches(loaders.eval, 0), epoch_batches(resumed.eval, 0))
    assert_same_batches(per_workers[0][0], per_workers[1][0])
    assert_same_batches(per_workers[0][0], per_workers[2][0])
    assert_same_batches(per_workers[0][1], per_workers[2][1])
    # another seed: other samples (a control: the equalities above are not trivially true)
    other = data.create_loaders(folder_args(jpegs, 0, "--seed", "6"), torch.device("cpu"))
    assert not torch.equal(epoch_batches(other.train, 3)[0][0], per_workers[0][0][0][0])


def test_persistent_workers_are_started_once_for_training_and_evaluation(jpegs):
    loaders = data.create_loaders(folder_args(jpegs, 1), torch.device("cpu"))
    process_ids = []
    for epoch in range(2):
        for loader in (loaders.train, loaders.eval):
            epoch_batches(loader, epoch)
            process_ids.append((id(loader.loader), [w.pid for w in loader.loader._iterator._workers]))
    assert process_ids[0] == process_ids[2] and process_ids[1] == process_ids[3]
    assert process_ids[0] != process_ids[1]


def _random_states() -> tuple:
    return (torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def _same_states(first: tuple, second: tuple) -> bool:
    return (torch.equal(first[0], second[0]) and first[1] == second[1] and np.array_equal(first[2], second[2])
            and all(torch.equal(a, b) for a, b in zip(first[3], second[3], strict=True)))


@pytest.mark.parametrize("flags", [(), ("--color-jitter", "0.4", "--interpolation", "random"),
                                   ("--input-size", "3", "70", "80")],  # the last: CIFAR recipe (no resize)
                         ids=["rrc+flip", "jitter+random-interpolation", "cifar-recipe"])
def test_no_global_or_device_generator_changes_while_a_batch_is_produced(jpegs, monkeypatch, flags):
    loaders = data.create_loaders(folder_args(jpegs, 0, *flags), torch.device("cpu"))

    def refuse(*_args, **_kwargs):
        raise AssertionError("a generator was reseeded while a batch was produced")

    for module, name in ((torch, "manual_seed"), (torch.random, "manual_seed"), (torch, "seed"),
                         (torch.cuda, "manual_seed"), (torch.cuda, "manual_seed_all"), (torch.cuda, "set_rng_state"),
                         (torch.cuda, "set_rng_state_all"), (torch.random, "fork_rng"), (random, "seed")):
        monkeypatch.setattr(module, name, refuse)
    before = _random_states()
    batches = epoch_batches(loaders.train, 1) + epoch_batches(loaders.eval, 0)
    assert batches and _same_states(before, _random_states())
    # control: a torchvision random transform does change the global state this test compares
    from torchvision import transforms

    transforms.RandomHorizontalFlip()(torch.zeros(1, 2, 2))
    assert not _same_states(before, _random_states())


# ----------------------------------------------------------------------------------------------
# uint8 hand-over, normalization on the device
# ----------------------------------------------------------------------------------------------

def test_workers_hand_over_collated_uint8(jpegs):
    loaders = data.create_loaders(folder_args(jpegs, 0), torch.device("cpu"))
    images, targets = next(iter(loaders.train.loader))  # what the workers send, before the device
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32) and targets.dtype == torch.int64
    normalized, _ = next(loaders.train.batches())
    assert normalized.dtype == torch.float32 and normalized.shape == (4, 3, 32, 32)


def _cpu_normalized(images: torch.Tensor) -> torch.Tensor:
    """Today's CPU path: torchvision ToTensor (x / 255) then Normalize ((x - mean) / std)."""
    from torchvision import transforms

    return transforms.Normalize(MEAN, STD)(images.float().div(255))


# |error| of either formula: a few float32 roundings (2**-24 relative) of terms up to 255 / (255 * 0.224)
ROUNDING = 8 * 2 ** -24 * (1 / min(STD))


def test_device_normalization_matches_cpu_to_tensor_normalize():
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[0, :, 0, :2] = torch.tensor([0, 255], dtype=torch.uint8)  # both extremes
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        prefetcher = DevicePrefetcher(MEAN, STD, device)
        targets = torch.arange(8)
        (out, out_targets), = list(prefetcher([(images, targets)]))
        assert out.device.type == device.type and out.dtype == torch.float32 and out_targets.device.type == device.type
        torch.testing.assert_close(out.cpu(), _cpu_normalized(images), rtol=0, atol=ROUNDING)
        # control: an error of one 8-bit step is far outside the tolerance
        assert (out.cpu() - _cpu_normalized(images + 1)).abs().max() > 100 * ROUNDING
    with pytest.raises(TypeError, match="uint8"):
        DevicePrefetcher(MEAN, STD, "cpu").normalize(images.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prefetcher_yields_every_batch_in_order_on_the_consumer_stream():
    prefetcher = DevicePrefetcher(MEAN, STD, torch.device("cuda"))
    batches = [(torch.full((2, 3, 4, 4), i, dtype=torch.uint8).pin_memory(), torch.tensor([i, i])) for i in range(5)]
    for i, (images, targets) in enumerate(prefetcher(batches)):
        torch.testing.assert_close(images.cpu(), _cpu_normalized(batches[i][0]), rtol=0, atol=ROUNDING)
        assert targets.tolist() == [i, i]


def test_evaluation_batches_equal_todays_cpu_pipeline(jpegs):
    """Evaluation has no randomness: timm's evaluation transform + ToTensor + Normalize on the CPU (what
    the loader did before) gives the same values as the uint8 path normalized on the device."""
    from timm.data import create_transform

    args = folder_args(jpegs, 0, "--mean", *map(str, MEAN), "--std", *map(str, STD))
    loaders = data.create_loaders(args, torch.device("cpu"))
    todays = create_transform((3, 32, 32), is_training=False, interpolation="bilinear", mean=MEAN, std=STD,
                              crop_pct=0.875)
    raw = loaders.eval.dataset.dataset
    expected = torch.stack([todays(raw[i][0]) for i in range(len(raw))])
    got = torch.cat([images for images, _ in epoch_batches(loaders.eval, 0)])
    torch.testing.assert_close(got, expected, rtol=0, atol=ROUNDING)


# ----------------------------------------------------------------------------------------------
# the seeded transforms
# ----------------------------------------------------------------------------------------------

def _gradient_image(width: int, height: int):
    """Pixel (x, y) = (x, y, (x + y) % 256): every crop position is visible in the values."""
    from PIL import Image

    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([x, y, (x + y) % 256], axis=-1).astype(np.uint8))


def test_resized_crop_samples_torchvision_distribution():
    """Area fraction ~ U(0.08, 0.5), log aspect ~ U(log 3/4, log 4/3), position uniform: means within 5
    standard errors (no crop of these scales can be refused on a 1000x1000 image: no fallback)."""
    rng, n = random.Random(0), 2000
    crops = [augment.sample_resized_crop(rng, 1000, 1000, (0.08, 0.5), (3 / 4, 4 / 3)) for _ in range(n)]
    areas = [w * h / 1e6 for _, _, w, h in crops]
    logs = [math.log(w / h) for _, _, w, h in crops]
    positions = [left / (1000 - w) for left, _, w, _ in crops if w < 1000]
    low, high = math.log(3 / 4), math.log(4 / 3)
    for values, mean, spread in ((areas, 0.29, 0.42), (logs, 0.0, high - low), (positions, 0.5, 1.0)):
        assert abs(statistics.fmean(values) - mean) < 5 * spread / math.sqrt(12 * len(values))
    assert all(0 <= left <= 1000 - w and 0 <= top <= 1000 - h for left, top, w, h in crops)
    # no try fits a 400x100 image at full scale: the whole height, cut to the ratio 4/3, centered
    assert augment.sample_resized_crop(random.Random(1), 400, 100, (1.0, 1.0), (3 / 4, 4 / 3)) == (133, 0, 133, 100)


@pytest.mark.parametrize("seed", range(4))
def test_resized_crop_flip_cuts_the_sampled_box(seed):
    image = _gradient_image(64, 48)
    # scale 1/3 of 64x48 at ratio 1 is a 32x32 crop: nearest resize to 32x32 copies it
    crop = augment.ResizedCropFlip((32, 32), scale=(1 / 3, 1 / 3), ratio=(1, 1), hflip=0.0, interpolation="nearest")
    left, top, width, height = augment.sample_resized_crop(random.Random(seed), 64, 48, (1 / 3, 1 / 3), (1, 1))
    expected = pil_to_tensor(image.crop((left, top, left + width, top + height)))
    assert torch.equal(crop(image, random.Random(seed)), expected)
    flipped = augment.ResizedCropFlip((32, 32), scale=(1 / 3, 1 / 3), ratio=(1, 1), hflip=1.0, interpolation="nearest")
    assert torch.equal(flipped(image, random.Random(seed)), expected.flip(-1))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_torch_resize_of_the_crop_is_within_a_few_levels_of_pil(interpolation):
    """torch's uint8 kernel against PIL's crop + resize (torchvision's PIL RandomResizedCrop): the same
    antialiased filter with other fixed-point rounding, so a few levels at most, under one on average."""
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (70, 80, 3), dtype=np.uint8)).resize((400, 350), Image.BICUBIC)
    for seed in range(4):
        transform = augment.ResizedCropFlip((56, 48), hflip=0.0, interpolation=interpolation)
        left, top, width, height = augment.sample_resized_crop(random.Random(seed), 400, 350, (0.08, 1.0),
                                                               (3 / 4, 4 / 3))
        reference = image.crop((left, top, left + width, top + height)).resize((48, 56), augment.pil_resample(
            interpolation))
        difference = (transform(image, random.Random(seed)).int() - pil_to_tensor(reference).int()).abs()
        assert difference.max() <= 4 and difference.float().mean() < 0.5


@pytest.mark.parametrize("seed", range(12))
def test_pad_crop_flip_equals_torchvision_pad_then_crop(seed):
    from torchvision.transforms import functional

    image = _gradient_image(16, 12)
    draws = random.Random(seed)  # the transform's draws, in its order: top, left, flip
    top, left, flip = draws.randint(0, 6), draws.randint(0, 6), draws.random() < 0.5
    expected = pil_to_tensor(functional.crop(functional.pad(image, 3), top, left, 12, 16))
    expected = expected.flip(-1) if flip else expected
    assert torch.equal(augment.PadCropFlip(3, 0.5)(image, random.Random(seed)), expected)


def test_no_aug_and_color_jitter_and_bad_flags():
    from timm.data.transforms_factory import transforms_noaug_train

    config = data.DataConfig((3, 24, 24), MEAN, STD, "imagenet", 0, 0.5, 2)
    image = _gradient_image(64, 48)
    no_aug = data.create_transform(config, True, make_args("--no-aug"))
    timm_no_aug = transforms_noaug_train((24, 24), use_prefetcher=True)
    assert torch.equal(no_aug(image, random.Random(0)), timm_no_aug(image))
    plain = data.create_transform(config, True, make_args())
    jittered = data.create_transform(config, True, make_args("--color-jitter", "0.4"))
    assert isinstance(jittered, augment.ResizedCropFlip) and jittered.color_jitter == 0.4
    assert not torch.equal(plain(image, random.Random(3)), jittered(image, random.Random(3)))
    with pytest.raises(data.DataError, match="--interpolation 'cubic' is not one of"):
        data.create_transform(dataclasses.replace(config, interpolation="cubic"), True, make_args())
    for flags, words in ((("--scale", "0.5", "0.1"), "--scale must be"), (("--ratio", "1"), "--ratio must be")):
        with pytest.raises(data.DataError, match=words):
            data.create_transform(config, True, make_args(*flags))


# ----------------------------------------------------------------------------------------------
# train.py through the DataLoader path
# ----------------------------------------------------------------------------------------------

def _load_train():
    spec = importlib.util.spec_from_file_location("train_under_test_loader", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_train_py_with_the_dataloader_resumes_mid_epoch_bit_identically(tmp_path, monkeypatch):
    train = _load_train()
    common = ["--dataset", "digits", "--train-split", "train[:128]-0", "--val-split", "test[:64]", "--model",
              "cifar_resnet20", "-b", "32", "--lr", "0.1", "--warmup-epochs", "0", "--epochs", "2", "--fast-loader", "off", "--workers", "1",
              "--hflip", "0.5", "--output", str(tmp_path), "--resume", "auto"]
    assert train.main(common + ["--experiment", "straight"]) == 0
    build_model = train.build_model

    def build_with_a_stop_at_step_3(*args, **kwargs):
        model = build_model(*args, **kwargs)
        count = [0]

        def hook(module, _inputs, _output):
            if module.training:
                count[0] += 1
                if count[0] == 3:
                    train._stop_signal.append(15)  # as the SIGTERM handler does
        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train, "build_model", build_with_a_stop_at_step_3)
    assert train.main(common + ["--experiment", "resumed"]) == train.PREEMPTED_EXIT_CODE
    saved = torch.load(tmp_path / "resumed" / "last.pth.tar", weights_only=True)
    assert (saved["epoch"], saved["batch"]) == (0, 3)
    monkeypatch.setattr(train, "build_model", build_model)
    assert train.main(common + ["--experiment", "resumed"]) == 0
    expected = torch.load(tmp_path / "straight" / "last.pth.tar", weights_only=True)["state_dict"]
    got = torch.load(tmp_path / "resumed" / "last.pth.tar", weights_only=True)["state_dict"]
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    def rows(name: str) -> list:  # summary.csv without its wall-clock column
        return [line.rsplit(",", 1)[0] for line in (tmp_path / name / "summary.csv").read_text().splitlines()]
    assert rows("straight") == rows("resumed") and len(rows("straight")) == 3


# ----------------------------------------------------------------------------------------------
# the bench's ImageNet-style rows
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_process_tree_cpu_time_counts_live_and_reaped_children():
    import subprocess
    import sys

    from bench.imagenet_loader import process_tree_cpu_seconds

    burn = ("import sys, time\nstart = time.process_time()\nwhile time.process_time() - start < 0.4: pass\n"
            "print('done', flush=True)\nsys.stdin.read()")
    before = process_tree_cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "done"
    alive = process_tree_cpu_seconds()
    child.communicate("")
    reaped = process_tree_cpu_seconds()
    assert alive - before >= 0.35  # the live child's 0.4 s (clock ticks of 10 ms)
    assert reaped >= alive - 0.02  # reaping moves its time to RUSAGE_CHILDREN, none is lost


@pytest.mark.slow
def test_bench_smoke_prints_the_imagenet_rows(capsys):
    from bench import __main__ as bench_main

    assert bench_main.main(["--smoke", "--device", "cpu", "--only", "imagenet", "--workers", "0"]) == 0
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| imagenet")]
    assert [row[1].split(" ")[0] for row in rows] == ["timm", "ours", "torchvision"] * 2
    assert [row[4] for row in rows] == ["img/s"] * 3 + ["cpu ms/img"] * 3
    assert rows[1][6] == ">=1" and rows[1][7] in ("PASS", "MISS") and rows[0][5] == rows[3][5] == "1.000"
    assert all(float(row[3]) > 0 and float(row[5]) > 0 for row in rows)


def test_train_py_dry_loader_times_the_data_path_alone(jpegs, tmp_path, capsys):
    train = _load_train()
    argv = ["--data-dir", str(jpegs), "-b", "4", "--workers", "0", "--input-size", "3", "32", "32",
            "--output", str(tmp_path), "--experiment", "dry"]
    assert train.main(argv + ["--dry-loader", "8"]) == 0  # 8 batches: more than one epoch of 5
    output = capsys.readouterr().out
    assert "dry loader: 28 images in" in output and "img/s per process (0 workers, batch 4, DataLoader" in output
    assert not (tmp_path / "dry").exists()  # no run directory, no model
    assert train.main(argv + ["--dry-loader", "1"]) == 2
    assert "--dry-loader must be at least 2" in capsys.readouterr().err


def test_random_erasing_fills_the_normalized_value_as_pixels_and_depends_on_the_sample_rng_only():
    import random as random_module

    from shared import augment

    mean, std = (0.5, 0.25, 0.75), (0.2, 0.2, 0.2)
    flat = torch.full((3, 40, 40), 7, dtype=torch.uint8)
    const = augment.RandomErasing(lambda image, rng: image.clone(), 1.0, "const", 1, mean, std)
    erased = const(flat, random_module.Random(3))
    changed = (erased != 7).any(0)
    assert changed.any() and not changed.all()
    # const = normalized 0 = the mean colour: 255 * mean rounded (128, 64, 191)
    assert erased[:, changed].unique(dim=1).tolist() == [[128], [64], [191]]
    pixel = augment.RandomErasing(lambda image, rng: image.clone(), 1.0, "pixel", 3, mean, std)
    state = torch.random.get_rng_state()
    first, again = pixel(flat, random_module.Random(5)), pixel(flat, random_module.Random(5))
    assert torch.equal(first, again) and not torch.equal(first, pixel(flat, random_module.Random(6)))
    assert torch.equal(state, torch.random.get_rng_state())  # no global generator was used
    never = augment.RandomErasing(lambda image, rng: image.clone(), 0.0, "pixel", 1, mean, std)
    assert torch.equal(never(flat, random_module.Random(5)), flat)
