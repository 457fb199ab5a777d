"""shared.data: split syntax, datasets (ImageFolder, torchvision CIFAR, digits, real CIFAR-10 JPEGs),
train/val overlap, unreadable images, transforms, samplers and both loaders."""
from __future__ import annotations

import os
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from shared import data
from shared.config import create_parser
from shared.data import DataError, parse_split, split_indices

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_TAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def make_args(*argv):
    return create_parser().parse_args(list(argv))


def indices_of(text, num_samples):
    return split_indices(parse_split(text), num_samples, text)


# ----------------------------------------------------------------------------------------------
# split syntax
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("train", ("train", None, None, None)),
    ("validation", ("validation", None, None, None)),
    ("train[:0.9]-20", ("train", None, "0.9", 20)),
    ("train[0.9:]-20", ("train", "0.9", None, 20)),
    ("train[:500]", ("train", None, "500", None)),
    ("train[10:20]-3", ("train", "10", "20", 3)),
    ("train[.25:1.]", ("train", ".25", "1.", None)),
    ("train-7", ("train", None, None, 7)),
    (" test[:]-0 ", ("test", None, None, 0)),
])
def test_parse_split(text, expected):
    spec = parse_split(text)
    assert (spec.base, spec.start, spec.stop, spec.seed) == expected


@pytest.mark.parametrize("text", [
    "", "train[", "train[:0.9", "train[0.9]", "train[:-1]", "train[:1.5]", "train[a:b]", "train[:0.9]-x",
    "train[:0.9]-", "tr ain", "train[:0.9]-1-2", "train[1e3:]", "train[0.9:]20",
])
def test_malformed_splits_name_the_value(text):
    with pytest.raises(DataError, match=re.escape(repr(text))):
        parse_split(text)


def test_non_string_split():
    with pytest.raises(DataError, match="42"):
        parse_split(42)


@pytest.mark.parametrize("num_samples", [50000, 1001, 10, 7])
@pytest.mark.parametrize("fraction", ["0.9", "0.1", "0.33", "0.5", ".7"])
def test_complementary_fractions_partition_the_split(num_samples, fraction):
    cut = round(float(fraction) * 100) * num_samples // 100  # floor(f * n) in integers
    if cut == 0:  # 10% of 7 samples: an empty training subset is an error
        with pytest.raises(DataError, match="empty"):
            indices_of(f"train[:{fraction}]-20", num_samples)
        return
    first = indices_of(f"train[:{fraction}]-20", num_samples)
    second = indices_of(f"train[{fraction}:]-20", num_samples)
    assert len(first) == cut and len(second) == num_samples - cut
    assert not set(first) & set(second)
    assert sorted(first + second) == list(range(num_samples))


def test_exact_decimal_cut():
    # float: 0.9 * 50000 = 45000.00000000001 and 0.7 * 10 = 6.999999999999999; the cut must be exact.
    assert len(indices_of("train[:0.9]-1", 50000)) == 45000
    assert len(indices_of("train[:0.7]-1", 10)) == 7
    assert len(indices_of("train[:0.29]-1", 100)) == 29  # 0.29 * 100 = 28.999999999999996 in float


def test_seeds():
    same = indices_of("train[:0.1]-5", 1000), indices_of("train[:0.1]-5", 1000)
    assert same[0] == same[1]
    other = indices_of("train[:0.1]-6", 1000)
    assert set(other) != set(same[0])
    # Without a seed the order is the dataset's; a seed alone shuffles the whole split.
    assert indices_of("train[:0.1]", 1000) == list(range(100))
    assert indices_of("train[100:200]", 1000) == list(range(100, 200))
    shuffled = indices_of("train-3", 1000)
    assert sorted(shuffled) == list(range(1000)) and shuffled != list(range(1000))


def test_counts_and_bounds():
    assert len(indices_of("train[:500]", 2560)) == 500
    assert len(indices_of("train[:500]-1", 2560)) == 500
    assert indices_of("train[:2560]-0", 2560) == indices_of("train-0", 2560)
    with pytest.raises(DataError, match=r"'train\[:2561\]'.*2561 samples asked for.*only 2560"):
        indices_of("train[:2561]", 2560)
    with pytest.raises(DataError, match="2561"):
        indices_of("train[2561:]", 2560)


@pytest.mark.parametrize("text", ["train[0.5:0.5]-1", "train[20:10]", "train[:0.001]-1", "train[1.0:]", "train[:0]"])
def test_empty_subsets_raise(text):
    with pytest.raises(DataError, match=re.escape(repr(text)) + ".*empty"):
        indices_of(text, 100)


# ----------------------------------------------------------------------------------------------
# train/val overlap (digits: the embedded dataset)
# ----------------------------------------------------------------------------------------------

def digits_args(train_split, val_split, *more):
    return make_args("--dataset", "digits", "--train-split", train_split, "--val-split", val_split, *more)


@pytest.mark.parametrize("train_split,val_split", [
    ("train[:0.9]-1", "train[0.85:]-1"),    # a shifted cut
    ("train[:0.9]-1", "train[0.9:]-2"),     # different seeds
    ("train[:0.9]-1", "train"),             # a subset and the whole split
    ("train", "train[0.9:]-1"),
    ("test[:0.5]-3", "validation"),         # two names of one split
    ("train[:100]", "train[50:150]"),
])
def test_overlapping_splits_are_refused(train_split, val_split):
    with pytest.raises(DataError, match="overlap"):
        data.create_datasets(digits_args(train_split, val_split))


def test_complementary_splits_and_full_splits_are_accepted():
    kind, train, evaluation, classes = data.create_datasets(digits_args("train[:0.9]-4", "train[0.9:]-4"))
    assert kind == "digits" and classes == 10
    assert len(train) == 1350 and len(evaluation) == 150
    assert not set(train.indices) & set(evaluation.indices)
    _, train, evaluation, _ = data.create_datasets(digits_args("train", "test"))
    assert (len(train), len(evaluation)) == (1500, 297)
    _, train, evaluation, _ = data.create_datasets(digits_args("train", "train"))  # explicit: allowed
    assert len(train) == len(evaluation) == 1500


def test_digits_dataset():
    dataset = data.DigitsDataset("train")
    image, label = dataset[0]
    assert image.size == (16, 16) and image.mode == "L" and 0 <= label < 10
    assert set(dataset.targets) == set(range(10))
    test = data.DigitsDataset("test")
    both = np.concatenate([dataset.data, test.data]).reshape(1797, -1)
    assert len({row.tobytes() for row in both}) > 1700  # the splits are two parts of one set
    with pytest.raises(DataError, match="'valid'"):
        data.DigitsDataset("valid")


def test_unknown_dataset_suggests():
    with pytest.raises(DataError, match="did you mean 'torch/cifar10'"):
        data.create_datasets(make_args("--dataset", "torch/cifar1O"))
    with pytest.raises(DataError, match="--data-dir"):
        data.create_datasets(make_args("--dataset", ""))


# ----------------------------------------------------------------------------------------------
# ImageFolder
# ----------------------------------------------------------------------------------------------

def write_images(folder, count, size=32, fmt="png", seed=0):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.{fmt}")


@pytest.fixture
def folder(tmp_path):
    """train/{ant,bee,cat} with 6 PNG + 2 JPEG images each, val/ with 3 per class; 32x32."""
    root = tmp_path / "images"
    for number, name in enumerate(("cat", "ant", "bee")):
        write_images(root / "train" / name, 6, seed=number)
        write_images(root / "train" / name / "jpeg", 0)  # a sub-folder: ImageFolder recurses
        write_images(root / "train" / name, 2, fmt="jpg", seed=10 + number)
        write_images(root / "val" / name, 3, fmt="jpeg", seed=20 + number)
    return root


def test_image_folder_classes_and_labels(folder):
    kind, train, evaluation, classes = data.create_datasets(
        make_args("--data-dir", str(folder), "--val-split", "validation"))
    assert kind == "imagefolder" and classes == 3
    assert train.classes == ["ant", "bee", "cat"] and len(train) == 24 and len(evaluation) == 9
    for path, label in train.samples:
        assert Path(path).parent.name == train.classes[label]
    image, label = train[0]
    assert image.size == (32, 32) and image.mode == "RGB" and label == 0
    # A seeded subset of a folder split.
    _, train, evaluation, _ = data.create_datasets(
        make_args("--dataset", "imagefolder", "--data-dir", str(folder), "--train-split", "train[:0.75]-1",
                  "--val-split", "train[0.75:]-1"))
    assert (len(train), len(evaluation)) == (18, 6)


def test_image_folder_errors(folder, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.create_datasets(make_args("--data-dir", str(tmp_path / "nowhere")))
    with pytest.raises(DataError, match=r"no folder 'test'.*train, val"):
        data.create_datasets(make_args("--data-dir", str(folder), "--val-split", "test"))
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    with pytest.raises(DataError, match="class folder"):
        data.create_datasets(make_args("--data-dir", str(empty)))
    (folder / "train" / "dog").mkdir()  # a class folder without images
    (folder / "train" / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="dog"):
        data.create_datasets(make_args("--data-dir", str(folder)))


def test_read_image_names_a_corrupt_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match="broken.jpg"):
        data.read_image(str(bad))
    write_images(tmp_path / "ok", 1)
    image = data.read_image(str(tmp_path / "ok" / "000.png"))
    assert image.mode == "RGB" and image.size == (32, 32)


def loader_args(root, *more):
    return make_args("--data-dir", str(root), "-b", "4", "--workers", "0", "--seed", "3", *more)


def test_corrupt_image_skipped_with_a_count_or_refused_when_strict(folder):
    (folder / "train" / "bee" / "zzz.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    for loader in ("auto", "off"):  # both loaders: left out and counted, naming the file
        loaders = data.create_loaders(loader_args(folder, "--fast-loader", loader), torch.device("cpu"))
        assert loaders.train_size == 24 and "1 unreadable (e.g. " in loaders.description
        assert "zzz.png" in loaders.description
        with pytest.raises(DataError, match="zzz.png"):
            data.create_loaders(loader_args(folder, "--data-strict", "--fast-loader", loader), torch.device("cpu"))


def test_a_corrupt_first_image_is_skipped_too(folder):
    (folder / "train" / "ant" / "000.png").write_bytes(b"garbage")  # the first sample of the split
    loaders = data.create_loaders(loader_args(folder), torch.device("cpu"))
    assert loaders.config.input_size == (3, 32, 32) and loaders.train_size == 23
    for split in ("train", "val"):  # nothing readable at all: an error naming a file
        for path in (folder / split).rglob("*.*"):
            path.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"unreadable or corrupt image '[^']*000\.(png|jpg)': "):
        data.create_loaders(loader_args(folder), torch.device("cpu"))


def test_folder_loaders_fast_and_torch_agree(folder):
    """Evaluation (no augmentation) gives the same batches from both loaders; training shapes match."""
    fast = data.create_loaders(loader_args(folder), torch.device("cpu"))
    slow = data.create_loaders(loader_args(folder, "--fast-loader", "off"), torch.device("cpu"))
    assert fast.train.kind == "DeviceImageLoader" and slow.train.kind.startswith("DataLoader")
    assert fast.config.recipe == "cifar" and fast.config.crop_padding == 4 and fast.config.hflip == 0.5
    assert fast.config.input_size == (3, 32, 32)
    for (a, b), (c, d) in zip(fast.eval.batches(), slow.eval.batches(), strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-5)
        assert torch.equal(b, d)
    for loaders in (fast, slow):
        loaders.train.set_epoch(1)
        batches = list(loaders.train.batches())
        assert len(batches) == len(loaders.train) == 6
        assert all(x.shape == (4, 3, 32, 32) and y.shape == (4,) for x, y in batches)
        assert sorted(torch.cat([y for _, y in batches]).tolist()) == [0] * 8 + [1] * 8 + [2] * 8
        # Resuming at batch 2 gives the rest of the same epoch.
        rest = list(loaders.train.batches(2))
        assert all(torch.equal(x, z) for (x, _), (z, _) in zip(batches[2:], rest, strict=True))


def test_torch_loader_batches_do_not_depend_on_the_worker_count(folder):
    batches = []
    for workers in ("0", "1"):
        loaders = data.create_loaders(loader_args(folder, "--fast-loader", "off", "--workers", workers),
                                      torch.device("cpu"))
        loaders.train.set_epoch(2)
        batches.append(list(loaders.train.batches()))
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(*batches, strict=True))


def test_fast_loader_auto_falls_back_and_on_refuses(folder):
    loaders = data.create_loaders(loader_args(folder, "--hflip", "0.3"), torch.device("cpu"))
    assert loaders.train.kind.startswith("DataLoader") and "fast loader off: --hflip 0.3" in loaders.description
    with pytest.raises(DataError, match="--fast-loader on cannot be used"):
        data.create_loaders(loader_args(folder, "--hflip", "0.3", "--fast-loader", "on"), torch.device("cpu"))


def test_large_images_use_the_imagenet_recipe(tmp_path):
    write_images(tmp_path / "big" / "train" / "a", 2, size=80)
    write_images(tmp_path / "big" / "val" / "a", 2, size=80)
    args = make_args("--data-dir", str(tmp_path / "big"), "-b", "2")
    kind, train, _, classes = data.create_datasets(args)
    config = data.resolve_data_config(args, kind, train, classes)
    assert config.recipe == "imagenet" and config.input_size == (3, 224, 224) and config.crop_padding == 0
    assert data._fast_loader_reason(config, args, train) is not None
    with pytest.raises(DataError, match="--fast-loader on"):
        data.create_loaders(make_args("--data-dir", str(tmp_path / "big"), "-b", "2", "--fast-loader", "on"),
                            torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# transforms and samplers
# ----------------------------------------------------------------------------------------------

def test_cifar_recipe_transforms():
    from shared.augment import PadCropFlip

    config = data.DataConfig((3, 32, 32), (0.5,) * 3, (0.25,) * 3, "cifar", 4, 0.5, 10)
    assert data.create_transform(config, True, make_args()) == PadCropFlip(padding=4, hflip=0.5)
    evaluation = data.create_transform(config, False, make_args())
    assert evaluation == PadCropFlip(padding=0, hflip=0.0)
    image = data.DigitsDataset("test")[0][0]
    assert torch.equal(evaluation(image, None), torch.from_numpy(np.array(image))[None])  # uint8, unchanged


def test_digits_config_and_flags():
    args = digits_args("train", "test")
    kind, train, _, classes = data.create_datasets(args)
    config = data.resolve_data_config(args, kind, train, classes)
    assert config.input_size == (1, 16, 16) and config.crop_padding == 2 and config.hflip == 0.0
    assert (config.mean, config.std) == data.NORMALIZATION["digits"] == ((0.3053,), (0.3759,))
    no_aug = make_args("--dataset", "digits", "--no-aug")
    config = data.resolve_data_config(no_aug, kind, train, classes)
    assert config.crop_padding == 0 and config.hflip == 0.0
    for flags, words in [(("--hflip", "1.5"), "--hflip"), (("--std", "0.1", "0"), "--std"),
                         (("--mean", "0.1", "0.2"), "--mean has 2 values"),
                         (("--input-size", "3", "16", "16"), "channels")]:
        with pytest.raises(DataError, match=words):
            data.resolve_data_config(make_args("--dataset", "digits", *flags), kind, train, classes)


def test_augmented_dataset_is_seeded_per_sample():
    dataset = data.DigitsDataset("train")
    config = data.DataConfig((1, 16, 16), (0.5,), (0.25,), "cifar", 2, 0.5, 10)
    augmented = data.AugmentedDataset(dataset, data.create_transform(config, True, make_args()), seed=1)
    first = [augmented[i][0] for i in (5, 6, 7)]
    torch.manual_seed(123)  # the global RNG state does not matter...
    again = [augmented[i][0] for i in (7, 6, 5)][::-1]  # ...nor the visiting order
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    state = torch.random.get_rng_state()
    augmented[0]
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's stream is untouched
    assert torch.equal(augmented[5][0], augmented[0, 5][0])  # a plain index is epoch 0
    epochs = [augmented[epoch, 5][0] for epoch in range(8)]
    assert any(not torch.equal(epochs[0], other) for other in epochs[1:])


def test_epoch_sampler_sharding():
    def indices(sampler, epoch=0):
        keys = list(sampler)  # AugmentedDataset's keys: (epoch, index)
        assert {key_epoch for key_epoch, _ in keys} == {epoch}
        return [index for _, index in keys]

    samplers = [data.EpochSampler(103, shuffle=True, seed=2, rank=r, world_size=4) for r in range(4)]
    shards = [indices(s) for s in samplers]
    assert all(len(s) == 25 for s in shards)
    assert len(set().union(*map(set, shards))) == 100
    samplers[0].set_epoch(1)
    assert indices(samplers[0], epoch=1) != shards[0]
    chunks = [indices(data.EpochSampler(103, shuffle=False, seed=2, rank=r, world_size=4)) for r in range(4)]
    assert sum(chunks, []) == list(range(103)) and [len(c) for c in chunks] == [26, 26, 26, 25]


def test_batch_size_larger_than_the_split():
    with pytest.raises(DataError, match="lower --batch-size"):
        data.create_loaders(digits_args("train[:10]", "test", "-b", "32"), torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# torchvision CIFAR files, built here (no download)
# ----------------------------------------------------------------------------------------------

def write_cifar(root, hundred=False, per_batch=20, test=30):
    """torchvision's file layout with tiny batches; pixel (0, 0, red) of image k holds k % 256."""
    rng = np.random.default_rng(0)
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    label_key = "fine_labels" if hundred else "labels"
    classes = 100 if hundred else 10
    counter = 0

    def batch(count):
        nonlocal counter
        pixels = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        pixels[:, 0] = (np.arange(counter, counter + count) % 256).astype(np.uint8)
        counter += count
        return {"data": pixels, label_key: [int(v) for v in rng.integers(0, classes, count)]}

    names = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    for name in names:
        with open(folder / name, "wb") as handle:
            pickle.dump(batch(per_batch * (5 if hundred else 1)), handle)
    with open(folder / "test" if hundred else folder / "test_batch", "wb") as handle:
        pickle.dump(batch(test), handle)
    meta = ({"fine_label_names": [f"class{i}" for i in range(100)]} if hundred
            else {"label_names": CIFAR10_CLASSES})
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as handle:
        pickle.dump(meta, handle)
    return root


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision checks each file's md5 against the real CIFAR's; here only that the file exists."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


@pytest.mark.parametrize("hundred", [False, True])
def test_torchvision_cifar(tmp_path, no_md5, hundred):
    name = "torch/cifar100" if hundred else "torch/cifar10"
    root = write_cifar(tmp_path / "cifar", hundred=hundred)
    args = make_args("--dataset", name, "--data-dir", str(root), "--train-split", "train[:0.9]-7",
                     "--val-split", "train[0.9:]-7", "-b", "8")
    kind, train, evaluation, classes = data.create_datasets(args)
    assert classes == (100 if hundred else 10) and (len(train), len(evaluation)) == (90, 10)
    base = train.dataset
    assert base.data.shape == (100, 32, 32, 3) and (hundred or base.classes == CIFAR10_CLASSES)
    from shared.fast_loader import decode_to_uint8

    images, labels = decode_to_uint8(train)
    assert images.shape == (90, 3, 32, 32)
    assert images[:, 0, 0, 0].tolist() == [i % 256 for i in train.indices]
    assert labels.tolist() == [base.targets[i] for i in train.indices]
    config = data.resolve_data_config(args, kind, train, classes)
    assert (config.mean, config.std) == data.NORMALIZATION[name]
    assert config.recipe == "cifar" and config.crop_padding == 4
    loaders = data.create_loaders(args, torch.device("cpu"))
    assert loaders.train.kind == "DeviceImageLoader" and len(loaders.train) == 90 // 8
    # The test split under its aliases.
    for alias in ("test", "validation", "val"):
        _, _, evaluation, _ = data.create_datasets(make_args("--dataset", name, "--data-dir", str(root),
                                                             "--val-split", alias))
        assert len(evaluation) == 30 and not evaluation.train


def test_torchvision_cifar_fast_and_torch_loaders_agree(tmp_path, no_md5):
    root = write_cifar(tmp_path / "cifar")
    common = ("--dataset", "torch/cifar10", "--data-dir", str(root), "-b", "8", "--workers", "0")
    fast = data.create_loaders(make_args(*common), torch.device("cpu"))
    slow = data.create_loaders(make_args(*common, "--fast-loader", "off"), torch.device("cpu"))
    for (a, b), (c, d) in zip(fast.eval.batches(), slow.eval.batches(), strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-5)
        assert torch.equal(b, d)


def test_torchvision_cifar_missing(tmp_path, no_md5):
    with pytest.raises(DataError, match="--dataset-download"):
        data.create_datasets(make_args("--dataset", "torch/cifar10", "--data-dir", str(tmp_path)))
    with pytest.raises(DataError, match="needs --data-dir"):
        data.create_datasets(make_args("--dataset", "torch/cifar10"))
    root = write_cifar(tmp_path / "cifar")
    with pytest.raises(DataError, match="'extra'"):
        data.create_datasets(make_args("--dataset", "torch/cifar10", "--data-dir", str(root), "--val-split", "extra"))


# ----------------------------------------------------------------------------------------------
# real CIFAR-10 (JPEG folders beside the checkout; skipped when absent)
# ----------------------------------------------------------------------------------------------

PER_CLASS = 30


@pytest.fixture(scope="module")
def real_cifar(tmp_path_factory):
    if not CIFAR10_TAR.is_file():
        pytest.skip(f"{CIFAR10_TAR} is absent")
    root = tmp_path_factory.mktemp("cifar10-jpeg")
    counts: dict = {}
    with tarfile.open(CIFAR10_TAR, "r|gz") as archive:  # a stream: stop once test/ is done
        for member in archive:
            parts = Path(member.name).parts
            if parts[0] != "test":
                if counts:
                    break
                continue
            if not member.isfile() or len(parts) != 3 or counts.get(parts[1], 0) >= PER_CLASS:
                continue
            counts[parts[1]] = counts.get(parts[1], 0) + 1
            archive.extract(member, root, filter="data")
    assert sorted(counts) == CIFAR10_CLASSES and set(counts.values()) == {PER_CLASS}
    return root


def test_real_cifar10_jpegs(real_cifar):
    args = make_args("--data-dir", str(real_cifar), "--train-split", "test[:0.9]-0", "--val-split",
                     "test[0.9:]-0", "-b", "16")
    kind, train, evaluation, classes = data.create_datasets(args)
    base = train.dataset
    assert kind == "imagefolder" and classes == 10 and base.classes == CIFAR10_CLASSES
    assert (len(train), len(evaluation)) == (270, 30)
    assert [label for _, label in base.samples] == sorted(label for _, label in base.samples)
    for path, label in base.samples:
        assert Path(path).parent.name == CIFAR10_CLASSES[label]
    from shared.fast_loader import decode_to_uint8

    images, labels = decode_to_uint8(base, num_workers=2)
    assert images.shape == (300, 3, 32, 32) and labels.bincount().tolist() == [PER_CLASS] * 10
    mean = images.float().mean(dim=(0, 2, 3)) / 255
    # The README's test-split means are 0.494, 0.485, 0.450; per-image means spread by about 0.12,
    # so the standard error over 300 images is about 0.007: 0.05 is over 7 standard errors.
    assert torch.allclose(mean, torch.tensor([0.4941, 0.4851, 0.4504]), atol=0.05)
    loaders = data.create_loaders(args, torch.device("cpu"))
    assert loaders.config.recipe == "cifar" and loaders.config.input_size == (3, 32, 32)
    assert loaders.train.kind == "DeviceImageLoader" and len(loaders.train) == 270 // 16
    x, y = next(iter(loaders.train.batches()))
    assert x.shape == (16, 3, 32, 32) and y.max() < 10


# ----------------------------------------------------------------------------------------------
# no silent change to the data: class sets, odd image files (issue 10)
# ----------------------------------------------------------------------------------------------

def test_splits_with_different_classes_are_refused(folder):
    (folder / "val" / "cat").rename(folder / "val" / "dog")  # 'cat' only in train, 'dog' only in val
    with pytest.raises(DataError, match=r"different classes.*only in the training split: 'cat'; "
                                        r"only in the evaluation split: 'dog'"):
        data.create_datasets(make_args("--data-dir", str(folder)))
    (folder / "val" / "dog").rename(folder / "val" / "cat")  # negative control: the same classes again
    assert data.create_datasets(make_args("--data-dir", str(folder)))[3] == 3


def test_read_image_reads_16_bit_grayscale_correctly(tmp_path):
    from PIL import Image

    values = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(values).save(tmp_path / "gray16.png")
    with Image.open(tmp_path / "gray16.png") as raw:
        assert raw.mode.startswith("I")  # really a 16-bit file
        assert np.asarray(raw.convert("RGB")).max() == 255 and (np.asarray(raw.convert("RGB")) == 255).mean() > 0.9
    pixels = np.asarray(data.read_image(str(tmp_path / "gray16.png")))
    expected = np.round(values / 257).astype(np.uint8)
    assert pixels.shape == (32, 32, 3) and all(np.array_equal(pixels[..., c], expected) for c in range(3))


def add_odd_images(root: Path) -> None:
    """Real odd files in a 32x32 folder: each kind is one a loader could read wrongly, twice or not at all."""
    from PIL import Image

    (root / "train" / "ant" / "empty.png").write_bytes(b"")
    os.symlink(root / "train" / "bee" / "000.png", root / "train" / "bee" / "link.png")  # a sample twice
    os.symlink(root / "train" / "nowhere.png", root / "train" / "cat" / "dangling.png")
    write_images(root / "big", 1, size=40)
    (root / "big" / "000.png").rename(root / "train" / "cat" / "big.png")  # another size
    whole = (root / "train" / "cat" / "000.png").read_bytes()
    (root / "train" / "cat" / "truncated.png").write_bytes(whole[:len(whole) // 2])  # valid header
    os.symlink(root / "train" / "ant" / "001.png", root / "val" / "ant" / "from-train.png")  # train in val
    rng = np.random.default_rng(7)  # read correctly: 16-bit grayscale, palette, RGBA
    Image.fromarray(rng.integers(0, 65536, (32, 32), dtype=np.uint16)).save(root / "train" / "ant" / "g16.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).convert("P").save(root / "train" / "bee" / "p.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)).save(root / "train" / "cat" / "rgba.png")


@pytest.mark.parametrize("loader", ["auto", "off"])
def test_odd_images_are_left_out_and_counted_the_same_by_both_loaders(folder, loader):
    add_odd_images(folder)
    loaders = data.create_loaders(loader_args(folder, "--fast-loader", loader), torch.device("cpu"))
    assert (loaders.train.kind == "DeviceImageLoader") == (loader == "auto")
    # 24 good + 3 read correctly (16-bit, palette, RGBA); empty, link, dangling, big, truncated left out
    assert (loaders.train_size, loaders.eval_size) == (27, 9)
    text = loaders.description
    for cause in ("1 empty file", "2 read twice", "1 other size"):
        assert cause in text, text
    assert "2 unreadable" in text  # the dangling link and the truncated file: one screen for both
    loaders.train.set_epoch(0)
    labels = torch.cat([y for _, y in loaders.train.batches()])
    assert len(labels) == 27 // 4 * 4  # every batch decodes: nothing unreadable is left in the DataLoader


def test_both_loaders_evaluate_the_same_odd_folder(folder):
    add_odd_images(folder)
    fast = data.create_loaders(loader_args(folder), torch.device("cpu"))
    slow = data.create_loaders(loader_args(folder, "--fast-loader", "off"), torch.device("cpu"))
    for (a, b), (c, d) in zip(fast.eval.batches(), slow.eval.batches(), strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-5)
        assert torch.equal(b, d)


@pytest.mark.parametrize("loader", ["auto", "off"])
def test_odd_images_are_an_error_under_data_strict(folder, loader):
    add_odd_images(folder)
    with pytest.raises(DataError, match=r"empty file \(e.g. '[^']*empty.png'\).*--data-strict"):
        data.create_loaders(loader_args(folder, "--fast-loader", loader, "--data-strict"), torch.device("cpu"))


def test_one_folder_as_both_splits_is_not_read_twice(folder):
    """Training and evaluating on the same folder is an explicit choice: the same path is not a duplicate."""
    loaders = data.create_loaders(loader_args(folder, "--val-split", "train", "--fast-loader", "off"),
                                  torch.device("cpu"))
    assert (loaders.train_size, loaders.eval_size) == (24, 24) and "left out" not in loaders.description
