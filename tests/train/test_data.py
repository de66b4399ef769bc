"""Tests for ofbdeploy.train.data: splits, IDX reading, folders, augmentation and loaders."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment
from timm.data.loader import PrefetchLoader

from ofbdeploy.train.checkpoint import seed_epoch
from ofbdeploy.train.data import (
    FASHION_MNIST_FILES,
    FASHION_MNIST_ROOT,
    DataError,
    DataSpec,
    balanced_indices,
    build_datasets,
    build_loader,
    read_idx,
    sample_batch,
)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip'd IDX file (big-endian magic and dims, then the bytes)."""
    header = (0x800 + array.ndim).to_bytes(4, "big") + np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def write_fashion_dir(root: Path, n_train: int = 40, n_val: int = 20) -> None:
    """Four tiny Fashion-MNIST-format files with 10 classes of 28x28 images."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        write_idx(root / FASHION_MNIST_FILES[f"{split}_images"], rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / FASHION_MNIST_FILES[f"{split}_labels"], np.arange(n) % 10)


def write_png_tree(root: Path, splits: dict[str, list[str]], per_class: int = 2) -> None:
    """root/<split>/<class>/<i>.png with small random RGB images."""
    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def digits() -> tuple:
    return build_datasets(DataSpec("digits", img_size=16, seed=3))


def test_digits_split_sizes_and_stratification(digits: tuple) -> None:
    train, val, num_classes = digits
    assert num_classes == 10
    assert (len(train), len(val)) == (1437, 360)
    val_counts = np.bincount(val.targets.numpy(), minlength=10)
    train_counts = np.bincount(train.targets.numpy(), minlength=10)
    expected = (train_counts + val_counts) * 0.2
    assert np.all(np.abs(val_counts - expected) <= 1)


def test_digits_split_is_deterministic(digits: tuple) -> None:
    train, val, _ = digits
    again_train, again_val, _ = build_datasets(DataSpec("digits", img_size=16, seed=3))
    assert torch.equal(train.images, again_train.images)
    assert torch.equal(val.targets, again_val.targets)
    other_train, _, _ = build_datasets(DataSpec("digits", img_size=16, seed=4))
    assert not torch.equal(train.targets, other_train.targets)


def test_digits_shape_dtype_and_normalisation(digits: tuple) -> None:
    train, val, _ = digits
    image, label = val[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert isinstance(label, int)
    batch = sample_batch(train, len(train))
    assert abs(batch.mean().item()) < 1e-3
    assert batch.std().item() == pytest.approx(1.0, abs=1e-2)
    assert torch.equal(batch[:, 0], batch[:, 2])  # grayscale repeated to 3 channels


def test_val_fraction_changes_split() -> None:
    train, val, _ = build_datasets(DataSpec("digits", img_size=8, val_fraction=0.5))
    assert abs(len(train) - len(val)) <= 1


def test_hflip_augmentation_flips_train_samples() -> None:
    plain, _, _ = build_datasets(DataSpec("digits", img_size=8))
    flipped, val, _ = build_datasets(DataSpec("digits", img_size=8, hflip=1.0))
    assert torch.equal(flipped[5][0], plain[5][0].flip(-1))
    assert val.augment is None


def test_crop_and_erasing_keep_shape_and_cache() -> None:
    spec = DataSpec(
        "synthetic", img_size=12, crop_padding=3, random_erasing=1.0, limit_train=20, limit_val=10
    )
    train, _, _ = build_datasets(spec)
    cache = train.images.clone()
    torch.manual_seed(0)
    outputs = torch.stack([train[0][0] for _ in range(8)])
    assert outputs.shape == (8, 3, 12, 12)
    assert not torch.equal(outputs[0], outputs[1])
    assert torch.equal(train.images, cache)


def test_synthetic_is_learnable_by_class_means() -> None:
    train, val, num_classes = build_datasets(DataSpec("synthetic", img_size=8, seed=1))
    x_train = sample_batch(train, len(train)).flatten(1)
    means = torch.stack([x_train[train.targets == c].mean(0) for c in range(num_classes)])
    predicted = torch.cdist(sample_batch(val, len(val)).flatten(1), means).argmin(1)
    assert (predicted == val.targets).float().mean().item() > 0.9


def test_balanced_indices_is_class_balanced_and_seeded() -> None:
    labels = np.repeat(np.arange(4), [50, 30, 10, 5])
    picked = balanced_indices(labels, 20, seed=0)
    assert np.array_equal(np.bincount(labels[picked]), [5, 5, 5, 5])
    assert np.array_equal(picked, balanced_indices(labels, 20, seed=0))
    assert not np.array_equal(picked, balanced_indices(labels, 20, seed=1))
    short = balanced_indices(labels, 30, seed=0)
    assert np.array_equal(np.bincount(labels[short]), [9, 8, 8, 5])


def test_idx_round_trip(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    write_idx(tmp_path / "img.gz", images)
    write_idx(tmp_path / "lab.gz", np.arange(5, dtype=np.uint8))
    assert np.array_equal(read_idx(tmp_path / "img.gz", 3), images)
    assert np.array_equal(read_idx(tmp_path / "lab.gz", 1), np.arange(5))


def test_idx_wrong_magic_names_file(tmp_path: Path) -> None:
    path = tmp_path / "labels.gz"
    write_idx(path, np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(DataError, match=r"labels\.gz.*magic"):
        read_idx(path, 1)


def test_idx_size_mismatch_and_not_gzip(tmp_path: Path) -> None:
    path = tmp_path / "short.gz"
    with gzip.open(path, "wb") as fh:
        fh.write((0x801).to_bytes(4, "big") + (10).to_bytes(4, "big") + bytes(3))
    with pytest.raises(DataError, match=r"short\.gz.*10 bytes.*found 3"):
        read_idx(path, 1)
    plain = tmp_path / "plain.gz"
    plain.write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"plain\.gz.*gzip"):
        read_idx(plain, 1)


def test_fashion_mnist_from_own_directory(tmp_path: Path) -> None:
    write_fashion_dir(tmp_path)
    spec = DataSpec("fashion_mnist", root=str(tmp_path), img_size=32, limit_train=20)
    train, val, num_classes = build_datasets(spec)
    assert (len(train), len(val), num_classes) == (20, 20, 10)
    assert np.array_equal(np.bincount(train.targets.numpy()), [2] * 10)
    assert train[0][0].shape == (3, 32, 32)


def test_fashion_mnist_missing_dir_and_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere.*directory not found"):
        build_datasets(DataSpec("fashion_mnist", root=str(tmp_path / "nowhere")))
    write_fashion_dir(tmp_path)
    (tmp_path / FASHION_MNIST_FILES["val_labels"]).unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: file not found"):
        build_datasets(DataSpec("fashion_mnist", root=str(tmp_path)))


def test_fashion_mnist_real_package() -> None:
    root = Path(FASHION_MNIST_ROOT)
    if not root.is_dir():
        pytest.skip(f"Debian package dataset-fashion-mnist not installed ({root.as_posix()} missing)")
    assert read_idx(root / FASHION_MNIST_FILES["train_labels"], 1).shape == (60000,)
    assert read_idx(root / FASHION_MNIST_FILES["val_images"], 3).shape == (10000, 28, 28)
    train, val, num_classes = build_datasets(DataSpec("fashion_mnist", limit_train=2000, limit_val=500))
    assert (len(train), len(val), num_classes) == (2000, 500, 10)
    assert np.array_equal(np.bincount(val.targets.numpy()), [50] * 10)
    assert abs(sample_batch(train, 2000).mean().item()) < 1e-3


def test_imagefolder_tree(tmp_path: Path) -> None:
    write_png_tree(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog"]}, per_class=3)
    spec = DataSpec("imagefolder", root=str(tmp_path), img_size=32, hflip=0.5, randaugment="rand-m9-mstd0.5")
    train, val, num_classes = build_datasets(spec)
    assert (len(train), len(val), num_classes) == (6, 6, 2)
    assert train[0][0].shape == (3, 32, 32)
    assert sample_batch(val, 4).shape == (4, 3, 32, 32)
    limited, _, _ = build_datasets(DataSpec("imagefolder", root=str(tmp_path), limit_train=2))
    assert sorted(limited[i][1] for i in range(len(limited))) == [0, 1]


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="root"):
        build_datasets(DataSpec("imagefolder"))
    write_png_tree(tmp_path, {"train": ["cat", "dog"]})
    with pytest.raises(DataError, match=r"val is missing"):
        build_datasets(DataSpec("imagefolder", root=str(tmp_path)))
    write_png_tree(tmp_path, {"val": ["cat", "emu"]})
    with pytest.raises(DataError, match=r"class lists differ.*\['dog'\].*\['emu'\]"):
        build_datasets(DataSpec("imagefolder", root=str(tmp_path)))


def test_imagefolder_batches_are_normalised_and_erased_on_the_device_by_timms_loader(tmp_path: Path) -> None:
    write_png_tree(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog"]}, per_class=4)
    train, val, _ = build_datasets(DataSpec("imagefolder", root=str(tmp_path), img_size=32, random_erasing=1.0))
    assert train[0][0].dtype == torch.uint8  # timm's prefetcher convention: the workers ship uint8
    loader = build_loader(train, batch_size=4, train=True)
    assert isinstance(loader, PrefetchLoader) and loader.random_erasing is not None and loader.batch_size == 4
    images, labels = next(iter(loader))
    assert images.dtype == torch.float32 and images.shape == (4, 3, 32, 32) and labels.shape == (4,)
    plain, _ = next(iter(build_loader(val, batch_size=8, train=False)))
    assert build_loader(val, batch_size=8, train=False).random_erasing is None
    assert torch.allclose(plain, sample_batch(val, 8), atol=1e-5)  # the same normalisation on either side


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.multiprocess)])
def test_a_corrupt_image_is_named_in_one_line(tmp_path: Path, workers: int) -> None:
    write_png_tree(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog"]}, per_class=2)
    bad = tmp_path / "train" / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    train, _, _ = build_datasets(DataSpec("imagefolder", root=str(tmp_path), img_size=32))
    with pytest.raises(DataError) as caught:
        list(build_loader(train, batch_size=5, train=False, workers=workers))
    assert str(caught.value).startswith(f"{bad}: unreadable image") and "\n" not in str(caught.value)


def test_deits_randaugment_survives_its_strongest_posterize() -> None:
    """Magnitude 10 of timm's increasing posterize keeps 0 bits, which Pillow 13 refuses on its own."""
    op = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    image = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    assert np.asarray(op(image)).max() == 0
    assert np.asarray(auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=5)(image)).max() == 192


def test_fewer_than_two_classes_are_refused(tmp_path: Path) -> None:
    write_png_tree(tmp_path, {"train": ["cat"], "val": ["cat"]})
    with pytest.raises(DataError, match=r"found 1 class \(cat\); a classifier needs at least 2"):
        build_datasets(DataSpec("imagefolder", root=str(tmp_path)))
    with pytest.raises(DataError, match=r"at least 2.*raise limit_train"):
        build_datasets(DataSpec("synthetic", limit_train=1))


def test_repeated_augmentation_shows_each_image_three_times() -> None:
    train, _, _ = build_datasets(DataSpec("synthetic", img_size=8, limit_train=24, limit_val=10))
    loader = build_loader(train, batch_size=6, train=True, repeats=3, seed=1)
    seed_epoch(1, 0, loader)
    images = torch.cat([x for x, _ in loader]).flatten(1)
    assert len(images) == 24  # an epoch is as long as the dataset: a third of it, three times each
    _, counts = torch.unique(images, dim=0, return_counts=True)
    assert counts.tolist() == [3] * 8
    seed_epoch(1, 1, loader)
    assert not torch.equal(torch.cat([x for x, _ in loader]).flatten(1), images)  # reshuffled per epoch


def test_randaugment_rejected_for_in_memory_sets() -> None:
    with pytest.raises(DataError, match="randaugment"):
        build_datasets(DataSpec("synthetic", randaugment="rand-m9"))


def label_order(loader: torch.utils.data.DataLoader) -> list[int]:
    return [label for _, labels in loader for label in labels.tolist()]


def test_loader_is_seeded_and_drops_last_for_training() -> None:
    train, val, _ = build_datasets(DataSpec("synthetic", img_size=8, limit_train=50, limit_val=30))
    first = label_order(build_loader(train, batch_size=8, train=True, seed=7))
    assert len(first) == 48
    assert first == label_order(build_loader(train, batch_size=8, train=True, seed=7))
    assert first != label_order(build_loader(train, batch_size=8, train=True, seed=8))
    assert label_order(build_loader(val, batch_size=8, train=False)) == val.targets.tolist()


def test_loader_errors() -> None:
    train, _, _ = build_datasets(DataSpec("synthetic", limit_train=10, limit_val=10))
    with pytest.raises(DataError, match="distributed"):
        build_loader(train, batch_size=4, train=True, distributed=True)
    with pytest.raises(DataError, match="batch_size"):
        build_loader(train, batch_size=0, train=True)
    with pytest.raises(DataError, match="n: expected"):
        sample_batch(train, 11)


def test_unknown_kind_lists_known_kinds() -> None:
    with pytest.raises(
        DataError, match=r"'cifar'.*\['digits', 'fashion_mnist', 'imagefolder', 'synthetic'\]"
    ):
        build_datasets(DataSpec("cifar"))


@pytest.mark.parametrize(
    ("field", "value"),
    [("img_size", 0), ("val_fraction", 1.0), ("limit_train", 0), ("hflip", 1.5), ("crop_padding", -1)],
)
def test_spec_validation_names_field(field: str, value: float) -> None:
    with pytest.raises(DataError, match=f"^{field}:"):
        DataSpec("digits", **{field: value})
