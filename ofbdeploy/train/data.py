"""Image classification data for OFB search and finetuning.

Every kind yields torch Datasets of ``(float CxHxW normalised tensor, int label)`` with a train and a val
split. The small grayscale sets (digits, Fashion-MNIST) are resized once into an in-memory uint8 cache and
repeated to 3 channels on access, so CPU training never pays for per-sample resizing and timm ViTs apply
unchanged. ImageNet-style folders go through torchvision's ImageFolder with timm's transforms and timm's
prefetching loader (pinned memory, normalisation and random erasing on the device).
"""

from __future__ import annotations

import copy
import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageOps
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.loader import PrefetchLoader, fast_collate
from timm.data.random_erasing import RandomErasing
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
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
    """Bad data configuration or a malformed / missing dataset file.

    A loader worker's DataError comes back to the main process rebuilt from the worker's whole traceback
    (torch's ExceptionWrapper); only the worker's own message, which names the file, is kept.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str) and "Original Traceback" in args[0]:
            args = (args[0].strip().splitlines()[-1].split("DataError: ", 1)[-1],)
        super().__init__(*args)


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


def _posterize(img: Image.Image, bits_to_keep: int, **_kwargs) -> Image.Image:
    """timm's posterize, also for 0 bits kept (a black image): Pillow 13 refuses 0, and timm's increasing
    posterize reaches it at magnitude 10, which DeiT's ``rand-m9-mstd0.5-inc1`` draws now and then."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


for _name, _op in list(auto_augment.NAME_TO_OP.items()):
    if _op is auto_augment.posterize:
        auto_augment.NAME_TO_OP[_name] = _posterize


def read_image(path: str) -> Image.Image:
    """Decode one image file to RGB; a file that does not decode is named in a :class:`DataError`.

    A corrupt image stops the run rather than being skipped: skipping would change the data (and its
    order, so an exact resume) without anyone deciding it. Remove or replace the file and resume.
    """
    try:
        with open(path, "rb") as fh:
            image = Image.open(fh)
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: unreadable image ({exc}); remove or replace the file") from None


def _image_folder(path: Path, transform: Callable) -> ImageFolder:
    """ImageFolder with its missing-dir / empty-class errors turned into DataError."""
    if not path.is_dir():
        raise DataError(
            f"imagefolder: {path} is missing, expected root/train/<class>/* and root/val/<class>/*"
        )
    try:
        return ImageFolder(str(path), transform=transform, loader=read_image)
    except FileNotFoundError as exc:
        raise DataError(f"imagefolder {path}: {exc}") from None


class FolderImages(Dataset):
    """A subset of an ImageFolder whose samples are uint8 CxHxW tensors after timm's transforms.

    Normalisation (and random erasing, for training) happen on the device, a batch at a time, in the
    loader :func:`build_loader` builds for it; :meth:`normalise` does the same on the CPU for callers that
    take samples directly (:func:`sample_batch`).
    """

    def __init__(self, folder: ImageFolder, indices: np.ndarray, erasing: float = 0.0) -> None:
        self.folder, self.indices, self.erasing = folder, [int(i) for i in indices], erasing
        self.targets = torch.tensor([folder.targets[i] for i in self.indices])
        self.mean, self.std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.folder[self.indices[index]]

    def normalise(self, images: Tensor) -> Tensor:
        """uint8 (N, C, H, W) -> float normalised with the ImageNet mean/std (no erasing)."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1) * 255
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1) * 255
        return (images.float() - mean) / std


def _build_imagefolder(spec: DataSpec) -> tuple[Dataset, Dataset, int]:
    """ImageNet-style tree with timm's train (RRC, flip, RandAugment) and eval transforms, as timm trains.

    The transforms stop at uint8 tensors (timm's prefetcher convention): the loader normalises with timm's
    ImageNet mean/std and applies random erasing on the device, matching pretrained ViTs.
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
        use_prefetcher=True,
    )
    eval_tf = create_transform(spec.img_size, is_training=False, interpolation="bicubic", use_prefetcher=True)
    train = _image_folder(root / "train", train_tf)
    val = _image_folder(root / "val", eval_tf)
    if train.classes != val.classes:
        raise DataError(
            f"imagefolder {root}: train/ and val/ class lists differ "
            f"(only in train: {sorted(set(train.classes) - set(val.classes))}, "
            f"only in val: {sorted(set(val.classes) - set(train.classes))})"
        )
    if len(train.classes) < 2:
        raise DataError(f"imagefolder {root}: found {len(train.classes)} class ({', '.join(train.classes)}); "
                        "a classifier needs at least 2 class folders")
    train_idx = balanced_indices(np.asarray(train.targets), spec.limit_train, spec.seed)
    val_idx = balanced_indices(np.asarray(val.targets), spec.limit_val, spec.seed)
    return (FolderImages(train, train_idx, spec.random_erasing), FolderImages(val, val_idx),
            len(train.classes))


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
    train, val, num_classes = builder(spec)
    present = len(torch.unique(torch.as_tensor(train.targets)))
    if num_classes < 2 or present < 2:
        raise DataError(f"{spec.kind}: the training split holds {present} class(es); a classifier needs at least 2"
                        + (" (raise limit_train)" if spec.limit_train is not None else ""))
    return train, val, num_classes


class RepeatedAugSampler(RepeatAugSampler):
    """timm's repeated-augmentation sampler (DeiT's: each image ``repeats`` times per epoch, the copies on
    different ranks, an epoch as long as the dataset), with its shuffle tied to the run's seed as well."""

    def __init__(self, ds: Dataset, world: int, rank: int, repeats: int, seed: int) -> None:
        super().__init__(ds, num_replicas=world, rank=rank, shuffle=True, num_repeats=repeats)
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(self.seed * 100_003 + epoch)


class DeviceLoader(PrefetchLoader):
    """timm's prefetching loader (next batch copied to the device on a side stream, normalised and erased
    there) that also answers what the training loops ask of a DataLoader."""

    def __init__(self, loader: DataLoader, ds: FolderImages, device: torch.device, erasing: float) -> None:
        super().__init__(loader, mean=ds.mean, std=ds.std, device=device, re_prob=erasing, re_mode="pixel")

    @property
    def batch_size(self) -> int | None:
        return self.loader.batch_size

    @property
    def generator(self) -> torch.Generator | None:
        return self.loader.generator


def build_loader(
    ds: Dataset,
    *,
    batch_size: int,
    train: bool,
    workers: int = 0,
    seed: int = 0,
    distributed: bool = False,
    drop_last: bool | None = None,
    repeats: int = 1,
    device: torch.device | None = None,
):
    """Loader whose batch order is a function of ``seed`` alone (and the rank when distributed).

    Training shuffles and drops the ragged last batch by default. With ``distributed`` a
    DistributedSampler shards the data; ``repeats`` > 1 (training only) samples each image that many
    times per epoch through timm's repeated-augmentation sampler instead. The caller reseeds every epoch
    (:func:`ofbdeploy.train.checkpoint.seed_epoch`): worker processes start afresh each epoch from the
    loader's generator, so an epoch's augmentations do not depend on the epochs before it (exact resume
    with workers too). ImageFolder data comes through :class:`DeviceLoader` onto ``device``.
    """
    if batch_size < 1:
        raise DataError(f"batch_size: expected a positive int, got {batch_size}")
    if workers < 0:
        raise DataError(f"workers: expected an int >= 0, got {workers}")
    if repeats < 1:
        raise DataError(f"repeats: expected an int >= 1, got {repeats}")
    device = device or torch.device("cpu")
    drop = train if drop_last is None else drop_last
    sampler = None
    rank, world = 0, 1
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise DataError(
                "distributed: torch.distributed is not initialised (call init_process_group first)"
            )
        rank, world = dist.get_rank(), dist.get_world_size()
        sampler = DistributedSampler(ds, shuffle=train, seed=seed, drop_last=drop)
    if train and repeats > 1:
        sampler = RepeatedAugSampler(ds, world, rank, repeats, seed)
    on_device = isinstance(ds, FolderImages)
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop,
        generator=torch.Generator().manual_seed(seed + rank),  # also the base seed of worker RNGs
        pin_memory=device.type == "cuda",
        collate_fn=fast_collate if on_device else None,
    )
    if not on_device:
        return loader
    return DeviceLoader(loader, ds, device, ds.erasing if train else 0.0)


def sample_batch(ds: Dataset, n: int) -> Tensor:
    """The first ``n`` images stacked (N, C, H, W), normalised; pass a val set to get un-augmented inputs."""
    if not 1 <= n <= len(ds):
        raise DataError(f"n: expected 1 <= n <= {len(ds)} (dataset size), got {n}")
    images = torch.stack([ds[i][0] for i in range(n)])
    return ds.normalise(images) if isinstance(ds, FolderImages) else images


def calibration_batch(train: Dataset, val: Dataset, n: int, seed: int) -> Tensor:
    """A seeded, class-balanced random sample of ``n`` training images through the eval transform (N, C, H, W).

    int8 calibration must see what inference sees: un-augmented images of every class. The first ``n``
    training images of a class-sorted folder would be one class, with training augmentation on top.
    The eval transform is the one ``val`` applies (the val split itself is left for measuring accuracy).
    """
    if not 1 <= n <= len(train):
        raise DataError(f"calibration images: expected 1 <= n <= {len(train)} (training set size), got {n}")
    if isinstance(train, InMemoryImages):
        view: Dataset = InMemoryImages(train.images, train.targets, train.mean, train.std)
    elif isinstance(train, FolderImages) and isinstance(val, FolderImages):
        folder = copy.copy(train.folder)
        folder.transform = val.folder.transform
        view = FolderImages(folder, np.asarray(train.indices))
    else:
        raise DataError(f"calibration images: unsupported training set type {type(train).__name__}")
    picked = balanced_indices(train.targets.numpy(), n, seed)
    images = torch.stack([view[int(i)][0] for i in picked])
    return view.normalise(images) if isinstance(view, FolderImages) else images
