"""Data sets: where their files live, how each on-disk format is read, and training augmentation.

Every data set is an object registered in `DATASETS` under its name. It carries a `DatasetInfo`
(shape, classes, the normalization and augmentation the papers use) and a `load(split, root)`
method. Adding a data set (say Tiny ImageNet) means writing one such object and registering it;
`load_split` itself never changes.

All loaders return pixels as float32 in [0, 1], shape (N, *input_shape), and labels as int64 (N,).
Normalization is *not* applied here: models apply `info.mean`/`info.std` themselves, so that
perturbation radii stay in pixel scale, as the papers state them.

The readers (IDX, CIFAR pickle, SVHN .mat) are written here rather than taken from torchvision,
which stays optional: it is imported only to download a missing data set.
"""
from __future__ import annotations

import functools
import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from workers.core.registry import Registry

SPLITS = ("train", "test")
SPLIT_SEED = 0  # for data sets that ship one pool of examples and get a fixed 80/20 split here


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    input_shape: tuple[int, ...]  # (C, H, W) for images, (2,) for toy2d
    num_classes: int
    mean: tuple[float, ...] | None  # per-channel normalization; None = no normalization
    std: tuple[float, ...] | None
    translate: int  # default training augmentation: max random translation in pixels (0 = off)
    flip: bool  # default training augmentation: random horizontal flips


class DataNotFound(FileNotFoundError):
    """A data set's files are not where we looked, and could not be downloaded."""


class DataFormatError(ValueError):
    """A data file exists but is not in the format it should be (corrupt, truncated, wrong file)."""


class Dataset:
    """Base of the registered data set objects: an `info` and a way to load one split.

    `root` is passed through as the caller gave it (possibly None): most data sets resolve it
    with `data_root`, but e.g. `mnist-idx` reads it as the folder of the files itself.
    """

    info: DatasetInfo

    def load(self, split: str, root: str | os.PathLike | None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


DATASETS: Registry[Dataset] = Registry("dataset")


# --------------------------------------------------------------------------------------------
# Public entry points


def dataset_info(name: str) -> DatasetInfo:
    return DATASETS.get(name).info


def load_split(
    name: str, split: str, root: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x float32 in [0,1], shape (N, *input_shape); y int64, shape (N,)) for one split."""
    dataset = DATASETS.get(name)  # unknown name -> RegistryError listing the known ones
    _check_split(split)
    x, y = dataset.load(split, root)
    x = x.to(torch.float32).contiguous()
    y = y.to(torch.int64).contiguous()
    # Catch a reader that disagrees with its own info here, not as a shape error deep in a model.
    if tuple(x.shape[1:]) != dataset.info.input_shape or y.shape != (x.shape[0],):
        raise DataFormatError(
            f"data set {name!r} ({split}) loaded as x{tuple(x.shape)}, y{tuple(y.shape)}; "
            f"expected x(N, {', '.join(map(str, dataset.info.input_shape))}) and y(N,)"
        )
    return x, y


def data_root(root: str | os.PathLike | None = None) -> Path:
    """root if given, else $CERTREPRO_DATA, else $CERTREPRO_HOME/data (home defaults to ./.certrepro)."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("CERTREPRO_DATA"):
        return Path(os.environ["CERTREPRO_DATA"]).expanduser()
    home = os.environ.get("CERTREPRO_HOME") or ".certrepro"
    return Path(home).expanduser() / "data"


def augment_batch(
    x: torch.Tensor, translate: int, flip: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """Random translation (zero pad by `translate`, random crop back) and random horizontal flips.

    x is (N, C, H, W). Random numbers are drawn on the CPU from `generator` and then moved to
    x's device, so the result depends only on the generator's state, whatever the device.
    """
    if translate < 0:
        raise ValueError(f"translate must be >= 0, got {translate}")
    if translate == 0 and not flip:
        return x
    if x.dim() != 4:
        raise ValueError(f"augment_batch expects images (N, C, H, W), got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    if translate > 0:
        # One offset per example in [0, 2*translate] into the padded image; translate = no shift.
        offsets = torch.randint(0, 2 * translate + 1, (n, 2), generator=generator).to(x.device)
        padded = F.pad(x, (translate, translate, translate, translate))
        rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # (N, H)
        cols = offsets[:, 1:2] + torch.arange(w, device=x.device)  # (N, W)
        batch = torch.arange(n, device=x.device)[:, None, None]
        # Advanced indices on dims 0, 2, 3 around a slice: the result comes out (N, H, W, C).
        x = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
    if flip:
        flip_mask = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip_mask[:, None, None, None], x.flip(-1), x)
    return x


# --------------------------------------------------------------------------------------------
# Small shared helpers


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")


def _fixed_split_indices(n: int, split: str) -> torch.Tensor:
    """Indices of `split` in a fixed 80/20 split of n examples (own seeded generator, so the
    global RNG neither affects nor is affected by it)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_train = n * 4 // 5  # 80%, in integers to avoid float rounding (1797 -> 1437, 10000 -> 8000)
    return perm[:n_train] if split == "train" else perm[n_train:]


def _download_allowed() -> bool:
    return os.environ.get("CERTREPRO_DOWNLOAD", "1") != "0"


def _try_download(fetch: Callable[[object], object]) -> str | None:
    """Run `fetch(torchvision.datasets)` if downloads are allowed; return why it did not work
    (None on success), for the DataNotFound message."""
    if not _download_allowed():
        return "download skipped because CERTREPRO_DOWNLOAD=0"
    try:
        import torchvision.datasets  # optional dependency, only ever needed here
    except ImportError:
        return "torchvision is not installed, so it could not be downloaded"
    try:
        fetch(torchvision.datasets)
    except Exception as exc:  # network, disk, checksum: all mean "still not there"
        return f"download via torchvision failed: {type(exc).__name__}: {exc}"
    return None


def _not_found(name: str, split: str, looked: list[Path], how: str, reason: str | None) -> DataNotFound:
    lines = [f"data set {name!r} ({split} split) not found. Looked in:"]
    lines += [f"  - {p}" for p in looked]
    lines.append(how)
    lines.append(
        "Or set CERTREPRO_DATA (or pass a root) to point at a folder that already holds the files."
    )
    if reason:
        lines.append(f"({reason})")
    return DataNotFound("\n".join(lines))


# --------------------------------------------------------------------------------------------
# Format readers


# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/, "IDX file format").
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped if its name ends in .gz) into a numpy array.

    Layout: magic = two zero bytes, a type code, the number of dimensions; then one big-endian
    uint32 per dimension; then the values, row-major, big-endian.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # e.g. a truncated or non-gzip ".gz"
        raise DataFormatError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFormatError(
            f"{path} is not an IDX file: bad magic number {raw[:4].hex() or '(empty)'} "
            "(expected 0000 then a type code 08/09/0b/0c/0d/0e and the number of dimensions)"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"IDX file {path} is truncated inside its header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataFormatError(
            f"IDX file {path} declares shape {dims} ({expected} bytes of data) "
            f"but holds {len(raw) - header} bytes"
        )
    values = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    # A native-endian, writable copy: torch.from_numpy rejects big-endian and read-only arrays.
    return values.astype(dtype.newbyteorder("="))


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches that only builds dicts, lists, bytes and numpy arrays.

    Pickle can run arbitrary code; a data file should not be able to. The module rename covers
    batches pickled under numpy 1 (numpy.core) loaded under numpy 2 (numpy._core) and back.
    """

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # protocol-2 pickles of bytes go through it
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        if module.startswith("numpy") and name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, any version
        return super().find_class(module, name)


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> (uint8 (N, 3, 32, 32), int64 (N,))."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the official batches were pickled by Python 2 with byte-string keys.
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise DataFormatError(f"cannot read CIFAR batch {path}: {exc}") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataFormatError(f"CIFAR batch {path} is not a dict with b'data' and b'labels'")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise DataFormatError(
            f"CIFAR batch {path}: data {data.shape} / labels {labels.shape}, "
            "expected (N, 3072) and (N,)"
        )
    # Each row is the red plane, then green, then blue, each 32x32 row-major: channel-first.
    return data.reshape(-1, 3, 32, 32), labels


def read_svhn_mat(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN cropped-digits .mat -> (uint8 (N, 3, 32, 32), int64 (N,) with digit 0 as 0)."""
    import scipy.io

    path = Path(path)
    try:
        mat = scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises several types for a file that is not a .mat
        raise DataFormatError(f"cannot read SVHN .mat file {path}: {exc}") from exc
    if "X" not in mat or "y" not in mat:
        raise DataFormatError(f"SVHN file {path} has no 'X' and 'y' variables")
    images, labels = mat["X"], np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3) or images.shape[3] != labels.shape[0]:
        raise DataFormatError(
            f"SVHN file {path}: X {images.shape} / y {mat['y'].shape}, expected (32, 32, 3, N) and (N, 1)"
        )
    labels[labels == 10] = 0  # SVHN stores the digit 0 as class 10 (MATLAB's 1-based labels)
    return np.ascontiguousarray(images.transpose(3, 2, 0, 1)), labels  # (H,W,C,N) -> (N,C,H,W)


def _to_pixels(images: np.ndarray, scale: float = 255.0) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32) / scale)


def _labels(labels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(labels.astype(np.int64))


# --------------------------------------------------------------------------------------------
# digits: the data set that needs no files (scikit-learn ships it)


@functools.lru_cache(maxsize=None)
def _digits_arrays(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (N, 1, size, size) in [0,1] and their labels. Cached: the resize is
    the slow part, and tests and training load it many times per process."""
    from sklearn.datasets import load_digits  # lazily: only this data set needs scikit-learn

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # values are 0..16
    if size != 8:
        # Upsampled to 28x28 so every MNIST architecture runs on it unchanged.
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(bunch.target, dtype=torch.int64)


class DigitsDataset(Dataset):
    def __init__(self, name: str, size: int):
        self.size = size
        self.info = DatasetInfo(name, (1, size, size), 10, None, None, translate=0, flip=False)

    def load(self, split, root):
        x, y = _digits_arrays(self.size)
        idx = _fixed_split_indices(len(y), split)
        return x[idx].clone(), y[idx].clone()  # fresh copies: callers can't corrupt the cache


DATASETS.add("digits", DigitsDataset("digits", 28))
DATASETS.add("digits-8x8", DigitsDataset("digits-8x8", 8))


# --------------------------------------------------------------------------------------------
# MNIST from IDX files

_MNIST_PREFIX = {"train": "train", "test": "t10k"}
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/ (mirror of yann.lecun.com/exdb/mnist/)"


def _find_file(folder: Path, stem: str) -> Path | None:
    """`stem` or `stem.gz` in folder (plain first: it is faster to read)."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _find_mnist_set(folder: Path, prefix: str) -> tuple[Path, Path] | None:
    images = _find_file(folder, f"{prefix}-images-idx3-ubyte")
    labels = _find_file(folder, f"{prefix}-labels-idx1-ubyte")
    return (images, labels) if images and labels else None


def _read_mnist_set(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataFormatError(f"{images_path}: images of shape {images.shape}, expected (N, 28, 28)")
    if labels.shape != (images.shape[0],):
        raise DataFormatError(
            f"{labels_path}: {labels.shape} labels for {images.shape[0]} images in {images_path}"
        )
    return _to_pixels(images[:, None]), _labels(labels)


def _mnist_how(folders: str) -> str:
    return (
        "To get it: put train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte "
        f"and t10k-labels-idx1-ubyte (IDX format, gzipped .gz or not) in {folders}; or install "
        "torchvision and leave CERTREPRO_DOWNLOAD unset so torchvision.datasets.MNIST downloads "
        f"them from {_MNIST_URL}."
    )


class MnistDataset(Dataset):
    """MNIST under the data root, in our layout, torchvision's, or loose in the root."""

    info = DatasetInfo("mnist", (1, 28, 28), 10, None, None, translate=0, flip=False)

    @staticmethod
    def folders(root: Path) -> list[Path]:
        return [root / "mnist", root / "MNIST" / "raw", root]

    def load(self, split, root):
        root = data_root(root)
        found = self._find(root, split)
        reason = None
        if found is None:
            # torchvision writes <root>/MNIST/raw/, which is one of the folders searched.
            reason = _try_download(lambda tvd: tvd.MNIST(str(root), train=split == "train", download=True))
            found = self._find(root, split)
        if found is None:
            raise _not_found(
                "mnist", split, self.folders(root),
                _mnist_how(f"{root / 'mnist'} (or {root / 'MNIST' / 'raw'})"), reason,
            )
        return _read_mnist_set(*found)

    def _find(self, root: Path, split: str) -> tuple[Path, Path] | None:
        for folder in self.folders(root):
            found = _find_mnist_set(folder, _MNIST_PREFIX[split])
            if found:
                return found
        return None


DATASETS.add("mnist", MnistDataset())


class MnistIdxDataset(Dataset):
    """MNIST-format IDX files in one given folder; never downloads.

    With both sets there, train/test are the usual ones. With only one set (e.g. just the 10k
    t10k files), that set gets the fixed 80/20 split, so training and testing stay disjoint.
    """

    info = DatasetInfo("mnist-idx", (1, 28, 28), 10, None, None, translate=0, flip=False)

    def load(self, split, root):
        if root is None:
            root = os.environ.get("CERTREPRO_MNIST_IDX") or None
        if root is None:
            raise DataNotFound(
                "data set 'mnist-idx' needs the folder that holds the IDX files: pass it as the "
                "root (data root) or set CERTREPRO_MNIST_IDX to it."
            )
        folder = Path(root).expanduser()
        train = _find_mnist_set(folder, "train")
        test = _find_mnist_set(folder, "t10k")
        if train and test:
            return _read_mnist_set(*(train if split == "train" else test))
        if train or test:
            x, y = _read_mnist_set(*(train or test))
            idx = _fixed_split_indices(len(y), split)
            return x[idx], y[idx]
        raise _not_found(
            "mnist-idx", split, [folder],
            "Put train-* and/or t10k-* images-idx3-ubyte and labels-idx1-ubyte files (IDX format, "
            "gzipped .gz or not) in that folder; with only one set it is split 80/20. "
            "This data set never downloads; use 'mnist' for that.",
            None,
        )


DATASETS.add("mnist-idx", MnistIdxDataset())


# --------------------------------------------------------------------------------------------
# CIFAR-10 from the python batches

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


class Cifar10Dataset(Dataset):
    # Normalization and augmentation (random translation by up to 4 px, flips) of the IBP paper.
    info = DatasetInfo(
        "cifar10", (3, 32, 32), 10,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), translate=4, flip=True,
    )

    @staticmethod
    def batch_names(split: str) -> list[str]:
        return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]

    def load(self, split, root):
        root = data_root(root)
        folder = root / "cifar-10-batches-py"
        reason = None
        if not self._complete(folder, split):
            reason = _try_download(lambda tvd: tvd.CIFAR10(str(root), train=split == "train", download=True))
        if not self._complete(folder, split):
            raise _not_found(
                "cifar10", split, [folder],
                f"To get it: unpack {_CIFAR_URL} (the python version) into {root}, giving "
                f"{folder}/data_batch_1..5 and test_batch (pickled dicts); or install torchvision "
                "and leave CERTREPRO_DOWNLOAD unset so torchvision.datasets.CIFAR10 downloads it.",
                reason,
            )
        parts = [read_cifar_batch(folder / name) for name in self.batch_names(split)]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        return _to_pixels(images), _labels(labels)

    def _complete(self, folder: Path, split: str) -> bool:
        return all((folder / name).is_file() for name in self.batch_names(split))


DATASETS.add("cifar10", Cifar10Dataset())


# --------------------------------------------------------------------------------------------
# SVHN from the cropped-digits .mat files

_SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"


class SvhnDataset(Dataset):
    # IBP paper: translations only (flipping a digit changes what it is).
    info = DatasetInfo(
        "svhn", (3, 32, 32), 10,
        mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970), translate=4, flip=False,
    )

    @staticmethod
    def folders(root: Path) -> list[Path]:
        return [root / "svhn", root]

    def load(self, split, root):
        root = data_root(root)
        filename = f"{split}_32x32.mat"
        found = self._find(root, filename)
        reason = None
        if found is None:
            # torchvision writes <root>/svhn/<split>_32x32.mat, the first folder searched.
            reason = _try_download(lambda tvd: tvd.SVHN(str(root / "svhn"), split=split, download=True))
            found = self._find(root, filename)
        if found is None:
            raise _not_found(
                "svhn", split, self.folders(root),
                f"To get it: download {filename} (cropped digits, MATLAB .mat) from {_SVHN_URL} "
                f"into {root / 'svhn'}; or install torchvision and leave CERTREPRO_DOWNLOAD unset so "
                "torchvision.datasets.SVHN downloads it.",
                reason,
            )
        images, labels = read_svhn_mat(found)
        return _to_pixels(images), _labels(labels)

    def _find(self, root: Path, filename: str) -> Path | None:
        for folder in self.folders(root):
            if (folder / filename).is_file():
                return folder / filename
        return None


DATASETS.add("svhn", SvhnDataset())


# --------------------------------------------------------------------------------------------
# toy2d: the IBP paper's 2-D example (Section 4.3)

TOY2D_POINTS = 13
TOY2D_POSITIVES = 5
TOY2D_MIN_LINF = 0.08
TOY2D_SEED = 0


@functools.lru_cache(maxsize=None)
def _toy2d_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """13 points uniform in [0,1]^2, every pair at least 0.08 apart in l_inf (rejection sampling
    from a fixed generator, so it is the same set every time); the first 5 are class 1."""
    generator = torch.Generator().manual_seed(TOY2D_SEED)
    points: list[torch.Tensor] = []
    while len(points) < TOY2D_POINTS:
        candidate = torch.rand(2, generator=generator)
        if all((candidate - p).abs().max() >= TOY2D_MIN_LINF for p in points):
            points.append(candidate)
    x = torch.stack(points)
    y = torch.zeros(TOY2D_POINTS, dtype=torch.int64)
    y[:TOY2D_POSITIVES] = 1  # points are i.i.d., so which ones are positive is arbitrary anyway
    return x, y


class Toy2dDataset(Dataset):
    info = DatasetInfo("toy2d", (2,), 2, None, None, translate=0, flip=False)

    def load(self, split, root):
        x, y = _toy2d_arrays()  # train and test are the same 13 points
        return x.clone(), y.clone()


DATASETS.add("toy2d", Toy2dDataset())


# --------------------------------------------------------------------------------------------
# Tiny ImageNet 200 from its standard folder layout (issue 5; BCP and Local-Lip use it)

_TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


class TinyImageNetDataset(Dataset):
    """`tiny-imagenet-200/`: `wnids.txt` (the 200 class ids), `train/<wnid>/images/*.JPEG`
    (500 per class) and `val/images/*.JPEG` labelled by `val/val_annotations.txt` (file, wnid,
    box); the papers report on the labelled validation set, which is this data set's "test"
    split. Labels are the positions of the wnids in sorted order (ImageFolder's convention).
    The normalization is Tiny ImageNet's per-channel mean and std; the papers' texts state no
    augmentation for it, so the CIFAR-10 one (4 px translation, flips) is the default here.
    Decoding the JPEGs needs Pillow, imported only here."""
    info = DatasetInfo(
        "tinyimagenet", (3, 64, 64), 200,
        mean=(0.4802, 0.4481, 0.3975), std=(0.2770, 0.2691, 0.2821), translate=4, flip=True,
    )

    @staticmethod
    def folders(root: Path) -> list[Path]:
        return [root / "tiny-imagenet-200", root]

    def load(self, split, root):
        root = data_root(root)
        folder = next((f for f in self.folders(root) if (f / "wnids.txt").is_file()), None)
        if folder is None:
            raise _not_found(
                "tinyimagenet", split, self.folders(root),
                f"To get it: unzip {_TINY_URL} into {root}, giving {root / 'tiny-imagenet-200'}"
                "/wnids.txt, train/<wnid>/images/*.JPEG and val/images/*.JPEG with "
                "val/val_annotations.txt. This data set is never downloaded automatically.",
                None,
            )
        return _read_tiny_imagenet(str(folder), split)


@functools.lru_cache(maxsize=2)
def _read_tiny_imagenet(folder: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from PIL import Image  # lazily: only this data set decodes JPEGs
    except ImportError:
        raise DataFormatError("reading Tiny ImageNet needs Pillow (pip install pillow)") from None
    root = Path(folder)
    wnids = sorted(line.strip() for line in (root / "wnids.txt").read_text().splitlines()
                   if line.strip())
    label_of = {wnid: i for i, wnid in enumerate(wnids)}
    files: list[tuple[Path, int]] = []
    if split == "train":
        for wnid in wnids:
            images = root / "train" / wnid / "images"
            files += [(path, label_of[wnid]) for path in sorted(images.glob("*.JPEG"))]
    else:
        annotations = root / "val" / "val_annotations.txt"
        if not annotations.is_file():
            raise DataFormatError(f"Tiny ImageNet: {annotations} is missing (labels of the "
                                  "validation images, the 'test' split)")
        for line in annotations.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 2:
                continue
            if parts[1] not in label_of:
                raise DataFormatError(f"Tiny ImageNet: {annotations} names class {parts[1]!r}, "
                                      "which wnids.txt does not list")
            files.append((root / "val" / "images" / parts[0], label_of[parts[1]]))
    if not files:
        raise DataFormatError(f"Tiny ImageNet: no {split} images found under {root}")
    images = np.empty((len(files), 64, 64, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(files):
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))  # a few of the JPEGs are grayscale
        if array.shape != (64, 64, 3):
            raise DataFormatError(f"Tiny ImageNet: {path} is {array.shape[1]}x{array.shape[0]}, "
                                  "expected 64x64")
        images[i] = array
    labels = np.array([label for _, label in files], dtype=np.int64)
    return _to_pixels(images.transpose(0, 3, 1, 2)), _labels(labels)


DATASETS.add("tinyimagenet", TinyImageNetDataset())
