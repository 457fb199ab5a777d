"""shared.fast_loader: DeviceImageLoader (augmentation distribution and exactness, epochs, ranks, eval,
argument errors) and decode_to_uint8 (datasets, Subsets, folders, a corrupt file)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from shared.fast_loader import DeviceImageLoader, decode_to_uint8

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# mean 0, std 1/255: the loader's scale is 1 up to float32 rounding (the std is held in float32) and its
# shift 0, so batches hold the raw pixel values to within 255 * 2^-24; rounding recovers them exactly.
IDENTITY = dict(mean=(0.0, 0.0), std=(1 / 255, 1 / 255))
PAD = 4
GRID = 2 * PAD + 1  # offsets 0..8 in each direction: a 9 x 9 grid
# Chi-square acceptance level of every goodness-of-fit test here: with the fixed seeds the tests are
# deterministic, and a correct sampler fails a test at this level with probability 1e-3 over seeds.
QUANTILE = 0.999


def make_loader(images, labels=None, batch_size=16, **options):
    if labels is None:
        labels = torch.arange(len(images), dtype=torch.int64)
    defaults = dict(train=True, mean=CIFAR_MEAN, std=CIFAR_STD, crop_padding=PAD, hflip=True,
                    drop_last=False, device="cpu", seed=0)
    defaults.update(options)
    return DeviceImageLoader(images, labels, batch_size, **defaults)


def random_images(count, channels=3, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, channels, size, size), dtype=torch.uint8, generator=generator)


def coordinate_image(size=32):
    """A 2-channel image whose pixel (y, x) holds x + 1 (channel 0) and y + 1 (channel 1); padding is 0."""
    grid = torch.arange(1, size + 1, dtype=torch.uint8)
    return torch.stack([grid.expand(size, size), grid[:, None].expand(size, size)])


def decode_offsets(batch):
    """(dy, dx, flip) of every image of a batch of coordinate images (values, not normalized).

    Output pixel (16, 16) is always inside the source image (|offset - PAD| <= 4). Without a flip it shows
    source x = 16 + dx - PAD; with one, output column 16 is crop column 15, source x = 15 + dx - PAD.
    The flip shows as decreasing x along a row.
    """
    x = batch[:, 0, 16, 16].round().long() - 1
    y = batch[:, 1, 16, 16].round().long() - 1
    flip = batch[:, 0, 16, 17] < batch[:, 0, 16, 16]
    dx = torch.where(flip, x - 15 + PAD, x - 16 + PAD)
    dy = y - 16 + PAD
    return dy, dx, flip


def chi_square(counts, expected):
    counts = np.asarray(counts, dtype=np.float64)
    return float(((counts - expected) ** 2 / expected).sum())


# ----------------------------------------------------------------------------------------------
# augmentation distribution
# ----------------------------------------------------------------------------------------------

SAMPLES = 8100  # 50 expected per (dy, dx, flip) cell of 162, 100 per (dy, dx) cell of 81


@pytest.fixture(scope="module")
def fast_offsets():
    images = coordinate_image().expand(SAMPLES, -1, -1, -1).contiguous()
    loader = make_loader(images, batch_size=2048, seed=1234, **IDENTITY)
    loader.set_epoch(0)
    batches = [images_ for images_, _ in loader]
    return decode_offsets(torch.cat(batches)), loader


@pytest.fixture(scope="module")
def torchvision_offsets():
    from PIL import Image
    from torchvision import transforms

    image = coordinate_image()
    # A 3-channel PIL image (channel 2 unused) carrying the coordinate planes.
    pil = Image.fromarray(torch.cat([image, image[:1]]).permute(1, 2, 0).numpy(), mode="RGB")
    pipeline = transforms.Compose([transforms.RandomCrop(32, padding=PAD), transforms.RandomHorizontalFlip(),
                                   transforms.PILToTensor()])
    torch.manual_seed(4321)
    batch = torch.stack([pipeline(pil)[:2] for _ in range(SAMPLES)]).float()
    return decode_offsets(batch)


def test_decoded_offsets_match_the_loaders_own_draws(fast_offsets):
    (dy, dx, flip), loader = fast_offsets
    rows, cols, flips = loader.epoch_augmentation(0)
    assert torch.equal(dy, rows) and torch.equal(dx, cols) and torch.equal(flip, flips)


@pytest.mark.parametrize("source", ["fast", "torchvision"])
def test_crop_offsets_uniform_on_the_9x9_grid_and_fair_flip(source, fast_offsets, torchvision_offsets):
    dy, dx, flip = fast_offsets[0] if source == "fast" else torchvision_offsets
    assert int(dy.min()) >= 0 and int(dy.max()) <= 2 * PAD and int(dx.min()) >= 0 and int(dx.max()) <= 2 * PAD
    # Offsets: 81 cells, uniform under H0, chi-square with 80 degrees of freedom.
    cells = torch.bincount(dy * GRID + dx, minlength=GRID * GRID).numpy()
    assert chi_square(cells, SAMPLES / GRID ** 2) < stats.chi2.ppf(QUANTILE, GRID ** 2 - 1)
    # Joint with the flip: 162 cells, uniform if offsets and flip are independent and the flip is fair.
    joint = torch.bincount((dy * GRID + dx) * 2 + flip.long(), minlength=2 * GRID * GRID).numpy()
    assert chi_square(joint, SAMPLES / (2 * GRID ** 2)) < stats.chi2.ppf(QUANTILE, 2 * GRID ** 2 - 1)
    # The flip alone: Binomial(8100, 1/2), sd 45; a two-sided z test at level 1e-3 (|z| < 3.29).
    z = (int(flip.sum()) - SAMPLES / 2) / (SAMPLES / 4) ** 0.5
    assert abs(z) < stats.norm.ppf(1 - (1 - QUANTILE) / 2)


def test_fast_and_torchvision_offsets_have_the_same_distribution(fast_offsets, torchvision_offsets):
    """Two-sample chi-square homogeneity test on the 162 (dy, dx, flip) cells: 161 degrees of freedom."""
    def cells(offsets):
        dy, dx, flip = offsets
        return torch.bincount((dy * GRID + dx) * 2 + flip.long(), minlength=2 * GRID * GRID).numpy()

    table = np.stack([cells(fast_offsets[0]), cells(torchvision_offsets)]).astype(np.float64)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    assert statistic < stats.chi2.ppf(QUANTILE, table.shape[1] - 1)


def test_a_biased_sampler_fails_the_offset_test():
    """The test can fail: offsets from {0..7} (one value short) give a huge statistic."""
    generator = torch.Generator().manual_seed(0)
    dy = torch.randint(0, 2 * PAD, (SAMPLES,), generator=generator)
    dx = torch.randint(0, 2 * PAD, (SAMPLES,), generator=generator)
    cells = torch.bincount(dy * GRID + dx, minlength=GRID * GRID).numpy()
    assert chi_square(cells, SAMPLES / GRID ** 2) > stats.chi2.ppf(QUANTILE, GRID ** 2 - 1)


def test_each_sample_equals_torchvisions_functional_crop_and_flip():
    from PIL import Image
    from torchvision.transforms import functional as F

    images = random_images(64, seed=3)
    loader = make_loader(images, batch_size=64, seed=7)
    loader_raw = make_loader(images, batch_size=64, seed=7, mean=(0, 0, 0), std=(1 / 255,) * 3)
    (batch, targets), = list(loader)
    (raw, _), = list(loader_raw)
    rows, cols, flips = loader.epoch_augmentation()
    assert flips.any() and not flips.all()
    for position in range(64):
        index = int(targets[position])
        pil = Image.fromarray(images[index].permute(1, 2, 0).numpy(), mode="RGB")
        crop = F.crop(F.pad(pil, PAD), int(rows[position]), int(cols[position]), 32, 32)
        if flips[position]:
            crop = F.hflip(crop)
        # The uint8 crop is identical...
        assert torch.equal(raw[position].round(), F.pil_to_tensor(crop).float())
        # ...and the normalized values agree to float32 rounding.
        expected = F.normalize(F.to_tensor(crop), CIFAR_MEAN, CIFAR_STD)
        torch.testing.assert_close(batch[position], expected, rtol=0, atol=1e-5)


def test_padding_becomes_normalized_zero():
    images = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    loader = make_loader(images, batch_size=1, seed=0)
    for epoch in range(30):  # find an epoch whose crop shows padding (offset 0 in some direction)
        loader.set_epoch(epoch)
        rows, cols, _ = loader.epoch_augmentation()
        if int(rows[0]) == 0:
            break
    else:
        pytest.fail("no epoch with row offset 0 among 30")
    (batch, _), = list(loader)
    padded = torch.tensor([(0 - m) / s for m, s in zip(CIFAR_MEAN, CIFAR_STD)])
    torch.testing.assert_close(batch[0, :, :PAD, :], padded.view(3, 1, 1).expand(3, PAD, 32), rtol=0, atol=1e-5)


def test_no_flip_and_no_crop_options():
    images = coordinate_image().expand(500, -1, -1, -1).contiguous()
    no_flip = torch.cat([b for b, _ in make_loader(images, batch_size=100, hflip=False, **IDENTITY)])
    assert not decode_offsets(no_flip)[2].any()
    no_crop = torch.cat([b for b, _ in make_loader(images, batch_size=100, crop_padding=0, hflip=False,
                                                    **IDENTITY)])
    assert torch.equal(no_crop.round(), images.float())


# ----------------------------------------------------------------------------------------------
# epochs, ranks, eval
# ----------------------------------------------------------------------------------------------

def batches_of(loader, epoch):
    loader.set_epoch(epoch)
    return [(images.clone(), targets.clone()) for images, targets in loader]


def same_batches(first, second):
    return len(first) == len(second) and all(torch.equal(a, c) and torch.equal(b, d)
                                             for (a, b), (c, d) in zip(first, second))


def test_epoch_determinism():
    images = random_images(100)
    first, second = make_loader(images, seed=5), make_loader(images, seed=5)
    assert same_batches(batches_of(first, 3), batches_of(second, 3))
    assert same_batches(batches_of(first, 3), batches_of(first, 3))  # iterating twice repeats the epoch
    assert not same_batches(batches_of(first, 3), batches_of(first, 4))
    assert not same_batches(batches_of(first, 3), batches_of(make_loader(images, seed=6), 3))
    # Different epochs differ in order and in augmentation.
    assert not torch.equal(first.epoch_indices(3), first.epoch_indices(4))
    assert not torch.equal(first.epoch_augmentation(3)[0], first.epoch_augmentation(4)[0])


def test_train_epoch_visits_every_sample_once_and_drop_last():
    images = random_images(100)
    loader = make_loader(images, batch_size=16, drop_last=False)
    targets = torch.cat([t for _, t in batches_of(loader, 1)])
    assert sorted(targets.tolist()) == list(range(100))
    loader = make_loader(images, batch_size=16, drop_last=True)
    sizes = [len(t) for _, t in batches_of(loader, 1)]
    assert sizes == [16] * 6 and len(loader) == 6


@pytest.mark.parametrize("num_samples,world_size", [(100, 3), (64, 4), (7, 7)])
def test_ddp_rank_sharding(num_samples, world_size):
    images = random_images(num_samples)
    loaders = [make_loader(images, batch_size=5, rank=r, world_size=world_size, seed=11) for r in range(world_size)]
    shards = [torch.cat([t for _, t in batches_of(loader, 2)]).tolist() for loader in loaders]
    per_rank = num_samples // world_size
    assert all(len(shard) == per_rank for shard in shards)
    assert len({len(loader) for loader in loaders}) == 1  # ranks stay in step
    union = set().union(*map(set, shards))
    assert len(union) == per_rank * world_size  # disjoint
    assert union <= set(range(num_samples)) and num_samples - len(union) < world_size
    # Another epoch gives other shards (a new shared permutation), still disjoint.
    again = [torch.cat([t for _, t in batches_of(loader, 3)]).tolist() for loader in loaders]
    assert again != shards and len(set().union(*map(set, again))) == per_rank * world_size


def test_eval_mode_covers_everything_once_in_order():
    images = random_images(53)
    loader = make_loader(images, batch_size=10, train=False, crop_padding=0, hflip=False)
    batches = batches_of(loader, 4)
    assert [len(t) for _, t in batches] == [10, 10, 10, 10, 10, 3] and len(loader) == 6
    assert torch.equal(torch.cat([t for _, t in batches]), torch.arange(53))
    expected = (images.float() / 255 - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(torch.cat([b for b, _ in batches]), expected, rtol=0, atol=1e-5)
    assert same_batches(batches, batches_of(loader, 9))  # the epoch does not matter in eval mode
    # Ranks get contiguous chunks, sizes differing by at most one, that concatenate to the dataset.
    chunks = [torch.cat([t for _, t in batches_of(make_loader(images, batch_size=4, train=False, rank=r,
                                                              world_size=4), 0)]) for r in range(4)]
    assert [len(c) for c in chunks] == [14, 13, 13, 13]
    assert torch.equal(torch.cat(chunks), torch.arange(53))


def test_eval_targets_are_copies():
    images = random_images(8)
    loader = make_loader(images, batch_size=8, train=False)
    (_, targets), = list(loader)
    targets.fill_(99)
    (_, again), = list(loader)
    assert torch.equal(again, torch.arange(8))


def test_single_channel_and_non_square_images():
    images = random_images(20, channels=1, size=16)[:, :, :, :12].contiguous()
    loader = make_loader(images, batch_size=20, mean=(0.5,), std=(0.25,), crop_padding=2, seed=1)
    (batch, _), = list(loader)
    assert batch.shape == (20, 1, 16, 12)


@pytest.mark.parametrize("change,error,words", [
    (dict(images=torch.zeros(4, 3, 8, 8)), TypeError, r"got \(4, 3, 8, 8\) torch.float32"),
    (dict(images=torch.zeros(4, 8, 8, dtype=torch.uint8)), TypeError, r"got \(4, 8, 8\) torch.uint8"),
    (dict(labels=torch.zeros(4, dtype=torch.int32)), TypeError, r"\(4,\) torch.int32"),
    (dict(labels=torch.zeros(5, dtype=torch.int64)), TypeError, r"one entry per image.*\(5,\) torch.int64"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(batch_size=2.0), TypeError, "batch_size"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=True), TypeError, "seed"),
    (dict(rank=2, world_size=2), ValueError, "rank"),
    (dict(world_size=5), ValueError, "world_size=5"),
    (dict(train=False, drop_last=True), ValueError, "drop_last"),
    (dict(crop_padding=-1), ValueError, "crop_padding"),
    (dict(hflip=1), TypeError, "hflip"),
])
def test_bad_arguments(change, error, words):
    # (mean and std come from shared.data, which checks --mean/--std: tests/test_data.py)
    options = dict(images=random_images(4, size=8), labels=torch.zeros(4, dtype=torch.int64))
    options.update(change)
    with pytest.raises(error, match=words):
        make_loader(**options)


def test_bad_epoch():
    loader = make_loader(random_images(4, size=8))
    with pytest.raises(ValueError, match="epoch"):
        loader.set_epoch(-1)
    with pytest.raises(TypeError, match="epoch"):
        loader.set_epoch(1.5)


# ----------------------------------------------------------------------------------------------
# decode_to_uint8
# ----------------------------------------------------------------------------------------------

class PilDataset(torch.utils.data.Dataset):
    def __init__(self, arrays, transform=None):
        self.arrays, self.transform = arrays, transform

    def __len__(self):
        return len(self.arrays)

    def __getitem__(self, index):
        from PIL import Image
        return Image.fromarray(self.arrays[index]), index % 3


def test_decode_generic_dataset_and_nested_subsets():
    arrays = [np.full((6, 5, 3), i, dtype=np.uint8) for i in range(10)]
    dataset = PilDataset(arrays)
    images, labels = decode_to_uint8(dataset)
    assert images.shape == (10, 3, 6, 5) and images.dtype == torch.uint8
    assert torch.equal(images[:, 0, 0, 0], torch.arange(10, dtype=torch.uint8))
    assert labels.tolist() == [i % 3 for i in range(10)]
    nested = torch.utils.data.Subset(torch.utils.data.Subset(dataset, [9, 7, 5, 3, 1]), [4, 0, 2])
    images, labels = decode_to_uint8(nested)
    assert images[:, 0, 0, 0].tolist() == [1, 9, 5] and labels.tolist() == [1, 0, 2]


def test_decode_refuses_transformed_and_mixed_datasets():
    dataset = PilDataset([np.zeros((4, 4, 3), np.uint8)], transform=lambda x: x)
    with pytest.raises(ValueError, match="transform"):
        decode_to_uint8(dataset)
    mixed = PilDataset([np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)])
    with pytest.raises(RuntimeError, match=r"\[3, 4, 4\] at entry 0 and \[3, 5, 4\] at entry 1"):
        decode_to_uint8(mixed)  # torch.stack names the samples whose sizes differ
    with pytest.raises(RuntimeError, match="non-empty"):
        decode_to_uint8(PilDataset([]))
    with pytest.raises(ValueError, match="max_workers"):
        decode_to_uint8(PilDataset([np.zeros((4, 4, 3), np.uint8)]), num_workers=0)


def write_folder(root, classes=("ant", "bee", "cat"), per_class=4, size=32):
    from PIL import Image

    rng = np.random.default_rng(0)
    for number, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            array = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / name / f"{i}.png")
    return root


def test_decode_folder_decodes_every_file_and_names_a_corrupt_one(tmp_path):
    from torchvision import datasets

    from shared.data import DataError, read_image

    root = write_folder(tmp_path / "train")
    dataset = datasets.ImageFolder(str(root), loader=read_image)
    images, labels = decode_to_uint8(dataset, num_workers=2)
    assert images.shape == (12, 3, 32, 32) and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    first = np.array(read_image(dataset.samples[5][0]))
    assert torch.equal(images[5], torch.from_numpy(first).permute(2, 0, 1))
    # shared.data's screen leaves such files out first; one that slips through is an error naming it
    (root / "bee" / "9.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="9.png"):
        decode_to_uint8(datasets.ImageFolder(str(root), loader=read_image), num_workers=2)
