"""Image classification data for OFB search and finetuning.

Every kind yields torch Datasets of ``(float CxHxW normalised tensor, int label)`` with a train and a val
split. The small grayscale sets (digits, Fashion-MNIST) are resized once into an in-memory uint8 cache and
repeated to 3 channels on access, so CPU training never pays for per-sample resizing and timm ViTs apply
unchanged. ImageNet-style folders go through torchvision's ImageFolder with timm's transforms.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.data import create_transform
from timm.data.random_erasing import RandomErasing
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.datasets import ImageFolder

from ofbdeploy.errors import OfbError

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist/"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "val_images": "t10k-images-idx3-ubyte.gz",
    "val_labels": "t10k-labels-idx1-ubyte.gz",
}
SYNTHETIC_CLASSES = 10
SYNTHETIC_SIZES = (512, 128)  # train, val when limit_train / limit_val are None
_RESIZE_CHUNK = 4096  # images per interpolate call, bounds the float working memory


class DataError(OfbError, ValueError):
    """Bad data configuration or a malformed / missing dataset file."""


@dataclass(frozen=True)
class DataSpec:
    """What the pipeline asks for: which dataset, at what size, with which training augmentation.

    ``limit_train`` / ``limit_val`` cap the split sizes with a class-balanced subset (for ``synthetic``
    they are the sizes). ``val_fraction`` only applies to kinds without a fixed val split (digits).
    """

    kind: str
    root: str | None = None
    img_size: int = 32
    val_fraction: float = 0.2
    seed: int = 0
    limit_train: int | None = None
    limit_val: int | None = None
    hflip: float = 0.0
    crop_padding: int = 0
    random_erasing: float = 0.0
    randaugment: str | None = None

    def __post_init__(self) -> None:
        if self.img_size < 1:
            raise DataError(f"img_size: expected a positive int, got {self.img_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise DataError(f"val_fraction: expected a value in (0, 1), got {self.val_fraction}")
        for name in ("limit_train", "limit_val"):
            limit = getattr(self, name)
            if limit is not None and limit < 1:
                raise DataError(f"{name}: expected a positive int or None, got {limit}")
        for name in ("hflip", "random_erasing"):
            prob = getattr(self, name)
            if not 0.0 <= prob <= 1.0:
                raise DataError(f"{name}: expected a probability in [0, 1], got {prob}")
        if self.crop_padding < 0:
            raise DataError(f"crop_padding: expected an int >= 0, got {self.crop_padding}")


@dataclass(frozen=True)
class _RawSplit:
    """Uint8 images (N, C, h, w) and int64 labels for both splits, before resizing and normalising."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    num_classes: int


class TensorAugment:
    """Cheap per-sample tensor augmentation for in-memory sets: flip, pad-and-crop, random erasing."""

    def __init__(self, hflip: float, crop_padding: int, random_erasing: float) -> None:
        self.hflip = hflip
        self.crop_padding = crop_padding
        # 'pixel' mode fills with N(0, 1) noise, which matches the statistics of normalised inputs.
        self.erase = (
            RandomErasing(probability=random_erasing, mode="pixel", device="cpu") if random_erasing else None
        )

    def __call__(self, x: Tensor) -> Tensor:
        """Return an augmented copy; the cached source tensor is never written."""
        if self.hflip and torch.rand(()) < self.hflip:
            x = x.flip(-1)
        if self.crop_padding:
            pad = self.crop_padding
            height, width = x.shape[-2:]
            top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            x = F.pad(x, (pad, pad, pad, pad))[:, top : top + height, left : left + width]
        if self.erase is not None:
            x = self.erase(x.clone())
        return x


class InMemoryImages(Dataset):
    """Resized uint8 images held in memory, normalised (and repeated to 3 channels) per sample.

    Keeping uint8 rather than float keeps Fashion-MNIST at 224 px within a few GB.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: Tensor,
        std: Tensor,
        augment: TensorAugment | None = None,
    ) -> None:
        self.images = images
        self.targets = labels
        self.mean = mean
        self.std = std
        self.augment = augment

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x = (self.images[index].float().div_(255.0) - self.mean) / self.std
        if x.shape[0] == 1:
            x = x.repeat(3, 1, 1)
        if self.augment is not None:
            x = self.augment(x)
        return x, int(self.targets[index])


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read a gzip'd uint8 IDX file (Fashion-MNIST / MNIST format) with ``ndim`` dimensions."""
    try:
        with gzip.open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc})") from None
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header, expected {header} bytes, got {len(data)}")
    magic = int.from_bytes(data[:4], "big")
    if magic != 0x800 + ndim:
        raise DataError(
            f"{path}: bad IDX magic {magic:#010x}, expected {0x800 + ndim:#010x} (uint8, {ndim}-d)"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise DataError(f"{path}: IDX dims {dims} need {expected} bytes of data, found {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _load_digits(spec: DataSpec) -> _RawSplit:
    """scikit-learn's 8x8 digits with a seeded stratified train/val split."""
    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=spec.val_fraction, stratify=labels, random_state=spec.seed
    )
    return _RawSplit(images[train_idx], labels[train_idx], images[val_idx], labels[val_idx], 10)


def _load_fashion_mnist(spec: DataSpec) -> _RawSplit:
    """The four original Fashion-MNIST IDX files; the official 10k test set serves as val."""
    root = Path(spec.root or FASHION_MNIST_ROOT)
    if not root.is_dir():
        raise DataError(
            f"fashion_mnist root {root}: directory not found "
            "(install the Debian package dataset-fashion-mnist or pass root=)"
        )
    arrays = {
        name: read_idx(root / fname, 3 if "images" in name else 1)
        for name, fname in FASHION_MNIST_FILES.items()
    }
    for split in ("train", "val"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(f"fashion_mnist {root}: {split} has {n_img} images but {n_lab} labels")
    return _RawSplit(
        arrays["train_images"][:, None],
        arrays["train_labels"].astype(np.int64),
        arrays["val_images"][:, None],
        arrays["val_labels"].astype(np.int64),
        10,
    )


def _load_synthetic(spec: DataSpec) -> _RawSplit:
    """Class prototypes plus noise: learnable, seeded, instant. For unit tests only."""
    rng = np.random.default_rng(spec.seed)
    prototypes = rng.uniform(0.0, 1.0, size=(SYNTHETIC_CLASSES, 3, 8, 8))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.permutation(np.arange(n) % SYNTHETIC_CLASSES).astype(np.int64)
        noisy = prototypes[labels] + rng.normal(0.0, 0.15, size=(n, 3, 8, 8))
        return np.rint(np.clip(noisy, 0.0, 1.0) * 255.0).astype(np.uint8), labels

    train_x, train_y = draw(spec.limit_train or SYNTHETIC_SIZES[0])
    val_x, val_y = draw(spec.limit_val or SYNTHETIC_SIZES[1])
    return _RawSplit(train_x, train_y, val_x, val_y, SYNTHETIC_CLASSES)


def balanced_indices(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of at most ``limit`` samples, round-robin over classes in a seeded random order."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    order = np.random.default_rng(seed).permutation(len(labels))
    rank = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        members = order[labels[order] == cls]
        rank[members] = np.arange(len(members))
    return np.sort(np.lexsort((labels, rank))[:limit])


def _resize(images: np.ndarray, size: int) -> Tensor:
    """Bilinear resize to ``size`` once, up front, back to uint8 to keep the cache small."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.shape[-2:] == (size, size):
        return x
    chunks = [
        F.interpolate(c.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        .round_()
        .clamp_(0, 255)
        .to(torch.uint8)
        for c in x.split(_RESIZE_CHUNK)
    ]
    return torch.cat(chunks)


def _channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean/std in [0, 1] units, shaped (C, 1, 1), accumulated in float64 chunk by chunk."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in images.split(_RESIZE_CHUNK):
        c = chunk.double().div_(255.0)
        total += c.sum(dim=(0, 2, 3))
        squares += c.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return mean.float().view(-1, 1, 1), std.float().view(-1, 1, 1)


def _from_raw(spec: DataSpec, raw: _RawSplit) -> tuple[Dataset, Dataset, int]:
    """Subset, resize, normalise with train statistics and attach the train augmentation."""
    if spec.randaugment is not None:
        raise DataError(f"randaugment: only supported for kind 'imagefolder', not {spec.kind!r}")
    train_idx = balanced_indices(raw.train_y, spec.limit_train, spec.seed)
    val_idx = balanced_indices(raw.val_y, spec.limit_val, spec.seed)
    train_x = _resize(raw.train_x[train_idx], spec.img_size)
    val_x = _resize(raw.val_x[val_idx], spec.img_size)
    mean, std = _channel_stats(train_x)
    augment = None
    if spec.hflip or spec.crop_padding or spec.random_erasing:
        augment = TensorAugment(spec.hflip, spec.crop_padding, spec.random_erasing)
    train = InMemoryImages(train_x, torch.from_numpy(raw.train_y[train_idx]), mean, std, augment)
    val = InMemoryImages(val_x, torch.from_numpy(raw.val_y[val_idx]), mean, std)
    return train, val, raw.num_classes


def _image_folder(path: Path, transform: Callable) -> ImageFolder:
    """ImageFolder with its missing-dir / empty-class errors turned into DataError."""
    if not path.is_dir():
        raise DataError(
            f"imagefolder: {path} is missing, expected root/train/<class>/* and root/val/<class>/*"
        )
    try:
        return ImageFolder(str(path), transform=transform)
    except FileNotFoundError as exc:
        raise DataError(f"imagefolder {path}: {exc}") from None


def _build_imagefolder(spec: DataSpec) -> tuple[Dataset, Dataset, int]:
    """ImageNet-style tree with timm train (RRC, flip, RandAugment, erasing) and eval transforms.

    Normalisation is timm's ImageNet mean/std (create_transform's default), matching pretrained ViTs.
    """
    if spec.root is None:
        raise DataError("root: kind 'imagefolder' needs root=<dir holding train/ and val/>")
    root = Path(spec.root)
    if not root.is_dir():
        raise DataError(f"root {root}: directory not found")
    train_tf = create_transform(
        spec.img_size,
        is_training=True,
        hflip=spec.hflip,
        color_jitter=None,
        auto_augment=spec.randaugment,
        interpolation="bicubic",
        re_prob=spec.random_erasing,
        re_mode="pixel",
    )
    eval_tf = create_transform(spec.img_size, is_training=False, interpolation="bicubic")
    train = _image_folder(root / "train", train_tf)
    val = _image_folder(root / "val", eval_tf)
    if train.classes != val.classes:
        raise DataError(
            f"imagefolder {root}: train/ and val/ class lists differ "
            f"(only in train: {sorted(set(train.classes) - set(val.classes))}, "
            f"only in val: {sorted(set(val.classes) - set(train.classes))})"
        )
    train_idx = balanced_indices(np.asarray(train.targets), spec.limit_train, spec.seed)
    val_idx = balanced_indices(np.asarray(val.targets), spec.limit_val, spec.seed)
    return Subset(train, train_idx.tolist()), Subset(val, val_idx.tolist()), len(train.classes)


Builder = Callable[[DataSpec], tuple[Dataset, Dataset, int]]


def _in_memory(load: Callable[[DataSpec], _RawSplit]) -> Builder:
    """Turn a raw loader into a builder sharing the resize / normalise / augment path."""

    def build(spec: DataSpec) -> tuple[Dataset, Dataset, int]:
        return _from_raw(spec, load(spec))

    return build


BUILDERS: dict[str, Builder] = {
    "digits": _in_memory(_load_digits),
    "fashion_mnist": _in_memory(_load_fashion_mnist),
    "imagefolder": _build_imagefolder,
    "synthetic": _in_memory(_load_synthetic),
}


def build_datasets(spec: DataSpec) -> tuple[Dataset, Dataset, int]:
    """Train set, val set and number of classes for ``spec``."""
    builder = BUILDERS.get(spec.kind)
    if builder is None:
        raise DataError(f"kind: unknown dataset kind {spec.kind!r}, expected one of {sorted(BUILDERS)}")
    return builder(spec)


def build_loader(
    ds: Dataset,
    *,
    batch_size: int,
    train: bool,
    workers: int = 0,
    seed: int = 0,
    distributed: bool = False,
    drop_last: bool | None = None,
) -> DataLoader:
    """DataLoader whose batch order is a function of ``seed`` alone (and the rank when distributed).

    Training shuffles and drops the ragged last batch by default. With ``distributed`` a
    DistributedSampler shards the data; the caller must call ``loader.sampler.set_epoch(epoch)``.
    """
    if batch_size < 1:
        raise DataError(f"batch_size: expected a positive int, got {batch_size}")
    if workers < 0:
        raise DataError(f"workers: expected an int >= 0, got {workers}")
    drop = train if drop_last is None else drop_last
    sampler = None
    rank = 0
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise DataError(
                "distributed: torch.distributed is not initialised (call init_process_group first)"
            )
        sampler = DistributedSampler(ds, shuffle=train, seed=seed, drop_last=drop)
        rank = dist.get_rank()
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop,
        generator=torch.Generator().manual_seed(seed + rank),  # also seeds worker RNGs for augmentation
        persistent_workers=workers > 0,
    )


def sample_batch(ds: Dataset, n: int) -> Tensor:
    """The first ``n`` images stacked (N, C, H, W); pass a val set to get un-augmented inputs."""
    if not 1 <= n <= len(ds):
        raise DataError(f"n: expected 1 <= n <= {len(ds)} (dataset size), got {n}")
    return torch.stack([ds[i][0] for i in range(n)])


def calibration_batch(train: Dataset, val: Dataset, n: int, seed: int) -> Tensor:
    """A seeded, class-balanced random sample of ``n`` training images through the eval transform (N, C, H, W).

    int8 calibration must see what inference sees: un-augmented images of every class. The first ``n``
    training images of a class-sorted folder would be one class, with training augmentation on top.
    The eval transform is the one ``val`` applies (the val split itself is left for measuring accuracy).
    """
    import copy

    if not 1 <= n <= len(train):
        raise DataError(f"calibration images: expected 1 <= n <= {len(train)} (training set size), got {n}")
    if isinstance(train, InMemoryImages):
        labels = train.targets.numpy()
        view: Dataset = InMemoryImages(train.images, train.targets, train.mean, train.std)
    elif isinstance(train, Subset) and isinstance(train.dataset, ImageFolder) and isinstance(val, Subset):
        labels = np.asarray(train.dataset.targets)[np.asarray(train.indices)]
        folder = copy.copy(train.dataset)
        folder.transform = val.dataset.transform
        view = Subset(folder, train.indices)
    else:
        raise DataError(f"calibration images: unsupported training set type {type(train).__name__}")
    return torch.stack([view[int(i)][0] for i in balanced_indices(labels, n, seed)])
