"""Image data sets for the vision students and teachers: read from disk, split, and batched.

A data set is read once into memory as ``uint8`` images ``[N, C, H, W]`` (Fashion-MNIST's
70,000 images are 55 MB), its official train and test sets side by side: row ``i`` of the
whole set is train image ``i`` for ``i < n_train`` and test image ``i - n_train`` after that.
A batch is a gather of rows, then (for training only) a random crop and flip drawn for the
whole batch at once, an optional resize and the per-channel normalization.

:class:`ImageData` speaks the data protocol of the training loop (``splits``, ``labels``,
``batch(rows)``, ``batches(...)``, ``num_batches(...)``, ``task``), the same as
:class:`features.batches.RatingsData`, so the one distillation loop serves images too.

Example::

    data = load_vision_data(VisionDataConfig(dataset="fashion_mnist", train_limit=5000))
    for batch in data.batches("train", 256, shuffle=True, seed=0, train=True):
        logits = model(batch.images)  # [B, 10]
"""

from __future__ import annotations

import gzip
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from recdistill.training.tasks import ClassificationTask

DATASETS: tuple[str, ...] = ("fashion_mnist", "cifar10", "cifar100", "image_folder")
SPLITS: tuple[str, ...] = ("train", "valid", "test")

#: Where Debian's ``dataset-fashion-mnist`` package puts the four gzipped IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FASHION_MNIST_HINT = (
    "apt-get install dataset-fashion-mnist (as root; `make setup` does it where it can), "
    "or set data.path to a folder holding the four IDX files"
)

CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
CIFAR_HINT = (
    "download the CIFAR python version ({cifar10} or {cifar100}), extract it and set data.path "
    "to the extracted folder (cifar-10-batches-py: data_batch_1..5, test_batch, batches.meta; "
    "cifar-100-python: train, test, meta) or to the folder holding it"
).format(**CIFAR_URLS)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# IDX header: two zero bytes, a dtype code, the number of dimensions; then one big-endian
# uint32 per dimension.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class DatasetDefaults:
    """What a data set uses when the config leaves it out.

    Fashion-MNIST is not flipped: every shoe in it (Sandal, Sneaker, Ankle boot) faces left, in
    train and test alike, so a flip only teaches an invariance the test never asks for; a
    2-pixel crop (7% of 28) is its augmentation. CIFAR takes the usual 4-pixel crop and flip.
    An image folder's size is the user's, so it is flipped but not cropped unless asked.
    """

    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    horizontal_flip: bool


DATASET_DEFAULTS = {
    "fashion_mnist": DatasetDefaults(1, (0.2860,), (0.3530,), crop_padding=2, horizontal_flip=False),
    "cifar10": DatasetDefaults(
        3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), crop_padding=4, horizontal_flip=True
    ),
    "cifar100": DatasetDefaults(
        3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), crop_padding=4, horizontal_flip=True
    ),
    # ImageNet statistics, the usual choice for photographs
    "image_folder": DatasetDefaults(
        3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), crop_padding=0, horizontal_flip=True
    ),
}


@dataclass
class AugmentConfig:
    """Training-time augmentation (the ``data.augment`` section); ``None``: the data set's default.

    Args:
        crop_padding: pad every side by this many zero pixels, then crop back to the original
            size at a random offset; 0 turns it off.
        horizontal_flip: mirror each image left-right with probability 1/2.
    """

    crop_padding: int | None = None
    horizontal_flip: bool | None = None

    def __post_init__(self) -> None:
        if self.crop_padding is not None and (
            isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int) or self.crop_padding < 0
        ):
            raise ValueError(f"data.augment.crop_padding must be an integer >= 0, got {self.crop_padding!r}")
        if self.horizontal_flip is not None and not isinstance(self.horizontal_flip, bool):
            raise ValueError(f"data.augment.horizontal_flip must be true or false, got {self.horizontal_flip!r}")


@dataclass
class VisionDataConfig:
    """Which image data set, how it is split, and how its batches are made (the ``data:``
    section of a vision job YAML).

    Args:
        dataset: ``"fashion_mnist"``, ``"cifar10"``, ``"cifar100"`` or ``"image_folder"``.
        path: where the data set is; ``None`` is Fashion-MNIST's Debian folder
            (``/usr/share/datasets/fashion-mnist``). CIFAR and image folders have no default.
        valid_fraction: the share of the official train set held out as ``valid``.
        seed: the seed of the validation carve-out and of ``train_limit``'s subsample.
        train_limit: keep at most this many (seeded, random) rows of ``train``, for quick runs.
        image_size: ``None`` keeps the native size; else batches are resized to
            ``image_size x image_size`` (bilinear, antialiased). Required for an image folder.
        mean: per-channel mean of pixels in ``[0, 1]``; ``None``: the data set's.
        std: per-channel standard deviation; ``None``: the data set's.
        augment: random crop and flip of training batches.

    Example::

        VisionDataConfig(dataset="cifar10", path="/data/cifar-10-batches-py", train_limit=5000)
    """

    dataset: Literal["fashion_mnist", "cifar10", "cifar100", "image_folder"] = "fashion_mnist"
    path: str | None = None
    valid_fraction: float = 0.1
    seed: int = 0
    train_limit: int | None = None
    image_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"data.dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if not 0 <= self.valid_fraction < 1:
            raise ValueError(f"data.valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if self.train_limit is not None and self.train_limit < 1:
            raise ValueError(f"data.train_limit must be at least 1 (or null for all), got {self.train_limit}")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"data.image_size must be at least 1 (or null for native), got {self.image_size}")
        if self.dataset == "image_folder" and self.image_size is None:
            raise ValueError("data.image_size is required for an image folder: its images differ in size")
        if self.path is None and self.dataset != "fashion_mnist":
            hint = CIFAR_HINT if self.dataset in CIFAR_FOLDERS else "root/train/<class>/*.png and root/val/<class>/*"
            raise ValueError(f"data.path is required for {self.dataset}: {hint}")
        channels = DATASET_DEFAULTS[self.dataset].channels
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and len(value) != channels:
                raise ValueError(f"data.{key} needs {channels} values (one per channel of {self.dataset}), got {value}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"data.std must be positive, got {self.std}")
        if isinstance(self.augment, dict):  # built from a plain mapping rather than pipelines.schema
            self.augment = AugmentConfig(**self.augment)

    @property
    def defaults(self) -> DatasetDefaults:
        return DATASET_DEFAULTS[self.dataset]


@dataclass
class ImageBatch:
    """One mini-batch of images.

    Attributes:
        images: ``[B, C, H, W]`` float32, normalized per channel.
        labels: ``[B]`` int64 class indices.
        rows: ``[B]`` int64 row ids in the whole data set (train rows first, then test).
        deterministic: ``False`` when the batch was augmented: the same rows would give other
            images next time, so teacher outputs cached by row must not stand in for them.
    """

    images: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor
    deterministic: bool = True

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> "ImageBatch":
        return ImageBatch(
            self.images.to(device), self.labels.to(device), self.rows.to(device), self.deterministic
        )

    def select_rows(self, positions: torch.Tensor) -> "ImageBatch":
        """The sub-batch at ``positions`` (``[b]`` int64 positions in this batch, not row ids)."""
        positions = positions.to(self.labels.device)
        return ImageBatch(
            self.images[positions], self.labels[positions], self.rows[positions], self.deterministic
        )


@dataclass
class ImageSet:
    """A data set as shipped: its official train and test sets, unsplit and unnormalized.

    Attributes:
        name: ``"fashion_mnist"``, ``"cifar10"``, ``"cifar100"`` or ``"image_folder"``.
        classes: class names in label order.
        train_images: ``[N, C, H, W]`` uint8.
        train_labels: ``[N]`` int64.
        test_images: ``[M, C, H, W]`` uint8.
        test_labels: ``[M]`` int64.
    """

    name: str
    classes: list[str]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


class ImageData:
    """All images of a data set in memory, with their splits; makes normalized batches.

    Args:
        images: ``[N, C, H, W]`` uint8, every split's rows.
        labels: ``[N]`` int64 class indices.
        classes: class names in label order.
        splits: ``[n]`` int64 row ids per split name (``train``, ``valid``, ``test``).
        mean: per-channel mean of pixels scaled to ``[0, 1]`` (``C`` values).
        std: per-channel standard deviation (``C`` values).
        image_size: resize batches to ``image_size x image_size``; ``None`` keeps the native size.
        crop_padding: random crop with this much zero padding in training batches (0: off).
        horizontal_flip: random left-right flip in training batches.
        name: the data set's name, for :meth:`summary`.

    Example::

        data = load_vision_data(VisionDataConfig())
        batch = data.batch(data.splits["valid"][:8])  # ImageBatch, images [8, 1, 28, 28]
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: list[str],
        splits: dict[str, torch.Tensor],
        mean: tuple[float, ...] | list[float],
        std: tuple[float, ...] | list[float],
        image_size: int | None = None,
        crop_padding: int = 0,
        horizontal_flip: bool = False,
        name: str = "images",
    ):
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be [N] = [{images.shape[0]}], got {tuple(labels.shape)}")
        channels = images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} values each, got {list(mean)} and {list(std)}")
        self.images = images
        self.labels = labels.long()
        self.classes = list(classes)
        self.splits = splits
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.image_size = image_size
        self.crop_padding = crop_padding
        self.horizontal_flip = horizontal_flip
        self.name = name

    @property
    def task(self) -> "ClassificationTask":
        """Cross-entropy and accuracy over :attr:`classes`."""
        from recdistill.training.tasks import ClassificationTask

        return ClassificationTask(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of a batch's images (after the resize, if any)."""
        channels, height, width = self.images.shape[1:]
        if self.image_size is not None:
            height = width = self.image_size
        return int(channels), int(height), int(width)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, rows: torch.Tensor, train: bool = False) -> ImageBatch:
        """The batch of the given row ids (``[B]`` int64); augmented only when ``train``.

        The crop offsets and flips come from torch's global generator, so a run under
        ``torch.manual_seed`` repeats.
        """
        images = self.images[rows].float().div_(255)  # [B, C, H, W] in [0, 1]
        augmented = train and (self.crop_padding > 0 or self.horizontal_flip)
        if train and self.crop_padding > 0:
            images = random_crop(images, self.crop_padding)
        if train and self.horizontal_flip:
            images = random_flip(images)
        if self.image_size is not None and images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear",
                align_corners=False, antialias=True,
            )  # fmt: skip
        images = (images - self.mean) / self.std
        return ImageBatch(images, self.labels[rows], rows, deterministic=not augmented)

    def batches(
        self,
        split: str,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        train: bool = False,
    ) -> Iterator[ImageBatch]:
        """Iterate over one split in batches (shuffled with ``seed`` when asked, in the same
        order as ``RatingsData.batches``); ``train`` augments them."""
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; expected one of {', '.join(self.splits)}")
        rows = self.splits[split]
        if shuffle:
            gen = torch.Generator().manual_seed(seed)
            rows = rows[torch.randperm(len(rows), generator=gen)]
        stop = len(rows) - batch_size + 1 if drop_last else len(rows)
        for start in range(0, max(stop, 0), batch_size):
            yield self.batch(rows[start : start + batch_size], train=train)

    def num_batches(self, split: str, batch_size: int) -> int:
        return -(-len(self.splits[split]) // batch_size)

    def transfer_set(self, count: int, policy: str = "mixup", seed: int = 0) -> "MixedImages":
        """``count`` images nobody labelled, for a committee to label: each a mix of two training
        images (:class:`MixedImages`), the images' counterpart of a ratings transfer set.

        Raises:
            ValueError: a policy other than ``mixup`` (``popularity`` and ``uniform`` draw
                (user, item) pairs), or a count below 1.
        """
        if policy != "mixup":
            raise ValueError(f"distill.transfer.policy: images take 'mixup', got {policy!r} (popularity and "
                             "uniform draw unrated (user, item) pairs of a ratings log)")  # fmt: skip
        return MixedImages(self, count, seed)

    def summary(self) -> dict[str, Any]:
        """Counts and shape of the data set (what a ``data summary`` command prints)."""
        return {
            "name": self.name,
            "images": len(self),
            "split_sizes": {name: len(rows) for name, rows in self.splits.items()},
            "classes": self.classes,
            "image_shape": list(self.image_shape),
        }


class MixedImages:
    """A transfer set of images ("function matching", Beyer et al., CVPR 2022): ``count`` mixes
    ``share * a + (1 - share) * b`` of two training images ``a``, ``b``, with ``share`` drawn
    from Beta(1, 1) (uniform), fixed per mix once for the seed. Each batch augments both images
    as a training batch is augmented (their own crops and flips, drawn fresh every time), then
    mixes them, so teachers and student see the same view; nobody labelled it.

    The labels are -100 (cross-entropy's ignore index: a term that read them is NaN, which the
    training loop refuses, naming it) and the rows are numbered after the data's
    (``row_offset = len(data)``), so a per-row teacher cache never mixes them with labelled rows.
    An augmented batch is not deterministic and is not cached.

    Args:
        data: the images, whose ``train`` split is mixed.
        count: how many mixes.
        seed: the seed of the draw of pairs and shares.

    Example::

        mixes = data.transfer_set(20_000, "mixup", seed=0)
        batch = mixes.batch(torch.arange(256))  # ImageBatch, labels -100
    """

    IGNORE = -100

    def __init__(self, data: ImageData, count: int, seed: int = 0):
        if count < 1:
            raise ValueError(f"distill.transfer.pairs: must be at least 1, got {count}")
        train = data.splits["train"]
        if len(train) < 2:
            raise ValueError(f"distill.transfer: mixup needs at least 2 training images, got {len(train)}")
        generator = torch.Generator().manual_seed(seed)
        first = torch.randint(len(train), (count,), generator=generator)
        other = (first + 1 + torch.randint(len(train) - 1, (count,), generator=generator)) % len(train)
        self.data = data
        self.first, self.second = train[first], train[other]  # [count] row ids, never the same image
        self.share = torch.rand(count, generator=generator)  # [count] in [0, 1)
        self.splits = {"train": torch.arange(count)}
        self.row_offset = len(data)

    def __len__(self) -> int:
        return int(self.share.shape[0])

    def batch(self, rows: torch.Tensor, train: bool = True) -> ImageBatch:
        """The mixes at positions ``rows`` (``[B]`` int64), each source image augmented first
        when ``train``."""
        a = self.data.batch(self.first[rows], train=train)
        b = self.data.batch(self.second[rows], train=train)
        share = self.share[rows].view(-1, 1, 1, 1)
        images = share * a.images + (1 - share) * b.images  # normalization is affine: mixing commutes
        labels = torch.full_like(a.labels, self.IGNORE)
        return ImageBatch(images, labels, rows + self.row_offset, deterministic=a.deterministic)


def random_crop(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Pad ``[B, C, H, W]`` images by ``padding`` zeros a side and cut each back to ``H x W``
    at its own random offset (one gather for the whole batch)."""
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (batch,))
    left = torch.randint(0, 2 * padding + 1, (batch,))
    ys = (top[:, None] + torch.arange(height))[:, None, :, None]  # [B, 1, H, 1]
    xs = (left[:, None] + torch.arange(width))[:, None, None, :]  # [B, 1, 1, W]
    return padded[torch.arange(batch)[:, None, None, None], torch.arange(channels)[None, :, None, None], ys, xs]


def random_flip(images: torch.Tensor) -> torch.Tensor:
    """Mirror each of ``[B, C, H, W]`` images left-right with probability 1/2."""
    flip = torch.rand(images.shape[0]) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def split_rows(
    n_train: int, n_test: int, valid_fraction: float, seed: int, train_limit: int | None = None
) -> dict[str, torch.Tensor]:
    """Row ids of ``train`` / ``valid`` / ``test`` (each sorted).

    ``valid`` is a seeded random ``valid_fraction`` of the official train rows ``0..n_train-1``,
    ``train`` the rest (at most ``train_limit`` of them, chosen by the same permutation), and
    ``test`` the official test rows ``n_train..n_train+n_test-1``.
    """
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    n_valid = round(n_train * valid_fraction)
    train = order[n_valid:]
    if train_limit is not None:
        train = train[:train_limit]
    return {
        "train": train.sort().values,
        "valid": order[:n_valid].sort().values,
        "test": torch.arange(n_train, n_train + n_test),
    }


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or plain, as an array of its shape and dtype.

    Raises:
        ValueError: naming the file, when it is not IDX (magic number, dtype code) or its data
            does not match the dimensions in its header (truncated or too long).
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # the gzip magic, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:  # a cut-off download ends mid-stream
            raise ValueError(f"{path}: truncated or corrupt gzip ({err})") from err
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise ValueError(f"{path}: wrong magic number {raw[:4].hex()}: not an IDX file")
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX dtype code 0x{code:02x}")
    if ndim < 1:
        raise ValueError(f"{path}: an IDX file needs at least one dimension, the header says 0")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated: the header needs {header} bytes, the file has {len(raw)}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[code])
    expected = math.prod(dims) * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        what = "truncated" if found < expected else "too long"
        raise ValueError(
            f"{path}: {what}: dimensions {list(dims)} need {expected} bytes of data, found {found}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def load_fashion_mnist(folder: str | Path | None = None) -> ImageSet:
    """Fashion-MNIST's 60,000 train and 10,000 test images (``[N, 1, 28, 28]``), 10 classes.

    Args:
        folder: holds the four IDX files, gzipped or not; ``None`` is Debian's
            ``/usr/share/datasets/fashion-mnist``.

    Raises:
        FileNotFoundError: a file is missing; the message says how to install the data set.
    """
    folder = Path(folder) if folder is not None else FASHION_MNIST_DIR
    arrays = {}
    for key, name in FASHION_MNIST_FILES.items():
        found = [folder / f"{name}.gz", folder / name]
        path = next((p for p in found if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(
                f"Fashion-MNIST not found: no {name}.gz or {name} in {folder}; to get it: {FASHION_MNIST_HINT}"
            )
        arrays[key] = read_idx(path)
    parts = {}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"Fashion-MNIST in {folder}: {part} images {images.shape} and labels {labels.shape} "
                "do not pair up as [N, H, W] and [N]"
            )
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise ValueError(f"Fashion-MNIST in {folder}: {part} label {labels.max()} is not a class (0..9)")
        parts[part] = (
            torch.from_numpy(images.astype(np.uint8)).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)),
        )
    return ImageSet("fashion_mnist", list(FASHION_MNIST_CLASSES), *parts["train"], *parts["test"])


def _unpickle(path: Path) -> dict[str, Any]:
    """A CIFAR pickle (written by Python 2: bytes keys) with ``str`` keys."""
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file {path} is missing; {CIFAR_HINT}")
    with path.open("rb") as f:
        content = pickle.load(f, encoding="bytes")  # the official files; pickle trusts its input
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}


def _cifar_part(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    content = _unpickle(path)
    images = np.asarray(content["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(content[label_key], dtype=np.int64)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def load_cifar(folder: str | Path) -> ImageSet:
    """CIFAR-10 or CIFAR-100 (fine labels) from its extracted python version, ``[N, 3, 32, 32]``.

    Args:
        folder: ``cifar-10-batches-py`` (``data_batch_1..5``, ``test_batch``, ``batches.meta``)
            or ``cifar-100-python`` (``train``, ``test``, ``meta``); which one is told by its files.

    Raises:
        FileNotFoundError: the folder holds neither; the message says where to download them.
    """
    folder = Path(folder)
    if (folder / "batches.meta").is_file():
        name, label_key, names_key = "cifar10", "labels", "label_names"
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test_file, meta_file = folder / "test_batch", folder / "batches.meta"
    elif (folder / "meta").is_file():
        name, label_key, names_key = "cifar100", "fine_labels", "fine_label_names"
        train_files, test_file, meta_file = [folder / "train"], folder / "test", folder / "meta"
    else:
        raise FileNotFoundError(f"no CIFAR data in {folder} (neither batches.meta nor meta); {CIFAR_HINT}")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in _unpickle(meta_file)[names_key]]
    train = [_cifar_part(path, label_key) for path in train_files]
    test_images, test_labels = _cifar_part(test_file, label_key)
    return ImageSet(
        name,
        classes,
        torch.from_numpy(np.concatenate([images for images, _ in train])),
        torch.from_numpy(np.concatenate([labels for _, labels in train])),
        torch.from_numpy(test_images),
        torch.from_numpy(test_labels),
    )


def _read_image(path: Path, image_size: int) -> np.ndarray:
    """``[3, S, S]`` uint8: the shorter side resized to ``S`` (bilinear), the centre cut out."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = image_size / min(image.size)
        width, height = max(image_size, round(image.width * scale)), max(image_size, round(image.height * scale))
        image = image.resize((width, height), Image.Resampling.BILINEAR)
        left, top = (width - image_size) // 2, (height - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def _read_class_folders(folder: Path, classes: list[str], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(_read_image(path, image_size))
                labels.append(label)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}/<class>/")
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


def load_image_folder(root: str | Path, image_size: int) -> ImageSet:
    """An ImageNet-style tree: ``root/train/<class>/*.{jpg,jpeg,png}`` and ``root/val/<class>/*``.

    Classes are the folder names under ``train``, sorted; every image becomes RGB
    ``[3, image_size, image_size]`` (shorter side resized, centre cut out).

    Raises:
        FileNotFoundError: ``train`` or ``val`` is missing or holds no images.
        ValueError: ``val`` has a class that ``train`` lacks.
    """
    root = Path(root)
    for part in ("train", "val"):
        if not (root / part).is_dir():
            raise FileNotFoundError(
                f"no {part} folder in {root}; an image folder is root/train/<class>/*.png and root/val/<class>/*"
            )
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    unknown = sorted({p.name for p in (root / "val").iterdir() if p.is_dir()} - set(classes))
    if unknown:
        raise ValueError(f"{root / 'val'}: classes {unknown} have no folder under {root / 'train'}")
    train_images, train_labels = _read_class_folders(root / "train", classes, image_size)
    test_images, test_labels = _read_class_folders(root / "val", classes, image_size)
    return ImageSet("image_folder", classes, train_images, train_labels, test_images, test_labels)


def _cifar_folder(path: Path, dataset: str) -> Path:
    """The extracted CIFAR folder: ``path`` itself or its ``cifar-10-batches-py`` /
    ``cifar-100-python`` child."""
    child = path / CIFAR_FOLDERS[dataset]
    return child if child.is_dir() else path


def load_image_set(config: VisionDataConfig) -> ImageSet:
    """The configured data set as shipped (official train and test)."""
    path = Path(config.path) if config.path is not None else None
    if config.dataset == "fashion_mnist":
        return load_fashion_mnist(path)
    if config.dataset in CIFAR_FOLDERS:
        image_set = load_cifar(_cifar_folder(path, config.dataset))
        if image_set.name != config.dataset:
            raise ValueError(f"data.path: {path} holds {image_set.name}, but data.dataset is {config.dataset}")
        return image_set
    return load_image_folder(path, config.image_size)


def load_vision_data(config: VisionDataConfig) -> ImageData:
    """Read, split and set up batching of the data set ``config`` names."""
    image_set = load_image_set(config)
    defaults = config.defaults
    augment = config.augment
    n_train = len(image_set.train_labels)
    return ImageData(
        images=torch.cat([image_set.train_images, image_set.test_images]),
        labels=torch.cat([image_set.train_labels, image_set.test_labels]),
        classes=image_set.classes,
        splits=split_rows(n_train, len(image_set.test_labels), config.valid_fraction, config.seed, config.train_limit),
        mean=config.mean if config.mean is not None else defaults.mean,
        std=config.std if config.std is not None else defaults.std,
        image_size=config.image_size,
        crop_padding=augment.crop_padding if augment.crop_padding is not None else defaults.crop_padding,
        horizontal_flip=augment.horizontal_flip if augment.horizontal_flip is not None else defaults.horizontal_flip,
        name=image_set.name,
    )


__all__ = [
    "AugmentConfig",
    "DATASETS",
    "DATASET_DEFAULTS",
    "ImageBatch",
    "ImageData",
    "ImageSet",
    "VisionDataConfig",
    "load_cifar",
    "load_fashion_mnist",
    "load_image_folder",
    "load_image_set",
    "load_vision_data",
    "read_idx",
    "random_crop",
    "random_flip",
    "split_rows",
]
