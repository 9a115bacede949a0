"""Tests for workers.core.data: every reader is fed small files written here in the real on-disk
format (IDX, CIFAR pickle, SVHN .mat), so no network and no shared data are needed."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from workers.core.data import (
    DATASETS,
    DataFormatError,
    DataNotFound,
    DatasetInfo,
    augment_batch,
    data_root,
    dataset_info,
    load_split,
    read_idx,
)
from workers.core.registry import RegistryError


@pytest.fixture(autouse=True)
def _no_download_no_env(monkeypatch):
    # Never touch the network, and don't let the caller's environment pick the data folders.
    monkeypatch.setenv("CERTREPRO_DOWNLOAD", "0")
    for var in ("CERTREPRO_DATA", "CERTREPRO_HOME", "CERTREPRO_MNIST_IDX"):
        monkeypatch.delenv(var, raising=False)


# ---------------------------------------------------------------------------------------------
# File writers in the real formats


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """IDX: 0x0000, type code 0x08 (ubyte), ndim; big-endian uint32 dims; the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def make_mnist_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def write_mnist_set(folder: Path, prefix: str, images, labels, gz: bool) -> None:
    write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)


# ---------------------------------------------------------------------------------------------
# Registry, info, errors, roots


def test_registered_names_and_infos():
    for name in ("digits", "digits-8x8", "mnist", "mnist-idx", "cifar10", "svhn", "toy2d"):
        assert name in DATASETS
        info = dataset_info(name)
        assert isinstance(info, DatasetInfo) and info.name == name
    assert dataset_info("mnist").input_shape == (1, 28, 28)
    assert dataset_info("mnist").mean is None and dataset_info("mnist").translate == 0
    cifar = dataset_info("cifar10")
    assert cifar.input_shape == (3, 32, 32) and cifar.translate == 4 and cifar.flip
    assert len(cifar.mean) == len(cifar.std) == 3
    svhn = dataset_info("svhn")
    assert svhn.translate == 4 and not svhn.flip
    assert dataset_info("toy2d").input_shape == (2,) and dataset_info("toy2d").num_classes == 2


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        load_split("no-such-data", "train")
    assert isinstance(err.value, RegistryError)
    assert "digits" in str(err.value) and "mnist" in str(err.value)
    with pytest.raises(RegistryError):
        dataset_info("no-such-data")


def test_bad_split_lists_allowed_splits():
    with pytest.raises(ValueError) as err:
        load_split("digits", "validation")
    assert "train" in str(err.value) and "test" in str(err.value)


def test_data_root_resolution(monkeypatch, tmp_path):
    assert data_root(tmp_path / "x") == tmp_path / "x"
    assert data_root() == Path(".certrepro") / "data"
    monkeypatch.setenv("CERTREPRO_HOME", str(tmp_path / "home"))
    assert data_root() == tmp_path / "home" / "data"
    monkeypatch.setenv("CERTREPRO_DATA", str(tmp_path / "data"))
    assert data_root() == tmp_path / "data"
    assert data_root(tmp_path / "given") == tmp_path / "given"


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_range_labels_and_split():
    x_train, y_train = load_split("digits", "train")
    x_test, y_test = load_split("digits", "test")
    assert x_train.shape == (1437, 1, 28, 28) and x_test.shape == (360, 1, 28, 28)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert y_train.shape == (1437,) and y_test.shape == (360,)
    for x in (x_train, x_test):
        assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.9
    assert set(y_train.tolist()) == set(range(10)) == set(y_test.tolist())

    again_x, again_y = load_split("digits", "train")
    assert torch.equal(again_x, x_train) and torch.equal(again_y, y_train)


def test_digits_split_is_a_partition():
    # The 8x8 originals are distinct enough to identify rows: train and test together are all 1797.
    x_train, _ = load_split("digits-8x8", "train")
    x_test, _ = load_split("digits-8x8", "test")
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    from sklearn.datasets import load_digits

    every = torch.tensor(load_digits().images, dtype=torch.float32).reshape(-1, 64) / 16
    joined = torch.cat([x_train, x_test]).reshape(-1, 64)
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(joined) == key(every)


def test_digits_matches_8x8_split_and_cache_is_safe():
    _, y28 = load_split("digits", "test")
    _, y8 = load_split("digits-8x8", "test")
    assert torch.equal(y28, y8)  # the same split for both resolutions
    x, y = load_split("digits", "test")
    x.fill_(7.0)
    y.fill_(3)
    x2, y2 = load_split("digits", "test")
    assert x2.max() <= 1 and not torch.equal(y2, y)


# ---------------------------------------------------------------------------------------------
# mnist and mnist-idx from IDX files


@pytest.mark.parametrize("layout", ["mnist", "MNIST/raw", "."])
@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_idx_in_every_layout(tmp_path, layout, gz):
    train_images, train_labels = make_mnist_set(6, seed=1)
    test_images, test_labels = make_mnist_set(4, seed=2)
    folder = tmp_path / layout
    write_mnist_set(folder, "train", train_images, train_labels, gz)
    write_mnist_set(folder, "t10k", test_images, test_labels, gz)

    x, y = load_split("mnist", "train", tmp_path)
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.allclose(x[:, 0] * 255, torch.from_numpy(train_images).float(), atol=1e-3)
    assert y.tolist() == train_labels.tolist()
    x, y = load_split("mnist", "test", tmp_path)
    assert x.shape == (4, 1, 28, 28) and y.tolist() == test_labels.tolist()


def test_mnist_uses_data_root_env(tmp_path, monkeypatch):
    images, labels = make_mnist_set(3, seed=3)
    write_mnist_set(tmp_path / "mnist", "t10k", images, labels, gz=True)
    monkeypatch.setenv("CERTREPRO_DATA", str(tmp_path))
    assert load_split("mnist", "test")[1].tolist() == labels.tolist()


def test_mnist_idx_with_both_sets(tmp_path):
    train_images, train_labels = make_mnist_set(6, seed=4)
    test_images, test_labels = make_mnist_set(4, seed=5)
    write_mnist_set(tmp_path, "train", train_images, train_labels, gz=False)
    write_mnist_set(tmp_path, "t10k", test_images, test_labels, gz=True)
    assert load_split("mnist-idx", "train", tmp_path)[1].tolist() == train_labels.tolist()
    assert load_split("mnist-idx", "test", tmp_path)[1].tolist() == test_labels.tolist()


def test_mnist_idx_splits_a_lone_t10k_set(tmp_path, monkeypatch):
    images, labels = make_mnist_set(50, seed=6)
    images[:, 0, 0] = np.arange(50)  # tag each image with its index, to track where it went
    write_mnist_set(tmp_path, "t10k", images, labels, gz=True)

    x_train, y_train = load_split("mnist-idx", "train", tmp_path)
    x_test, y_test = load_split("mnist-idx", "test", tmp_path)
    assert x_train.shape == (40, 1, 28, 28) and x_test.shape == (10, 1, 28, 28)
    train_ids = (x_train[:, 0, 0, 0] * 255).round().long().tolist()
    test_ids = (x_test[:, 0, 0, 0] * 255).round().long().tolist()
    assert sorted(train_ids + test_ids) == list(range(50))  # disjoint and covering
    assert y_train.tolist() == labels[train_ids].tolist()
    assert y_test.tolist() == labels[test_ids].tolist()

    # Deterministic, and the folder may come from CERTREPRO_MNIST_IDX instead of root.
    monkeypatch.setenv("CERTREPRO_MNIST_IDX", str(tmp_path))
    torch.manual_seed(123)  # the split must not depend on the global RNG
    x_again, _ = load_split("mnist-idx", "train")
    assert torch.equal(x_again, x_train)


def test_mnist_idx_without_folder_or_files(tmp_path):
    with pytest.raises(DataNotFound, match="CERTREPRO_MNIST_IDX"):
        load_split("mnist-idx", "train")
    with pytest.raises(DataNotFound) as err:
        load_split("mnist-idx", "train", tmp_path)
    assert str(tmp_path) in str(err.value)


def test_corrupt_idx_is_a_clear_error(tmp_path):
    images, labels = make_mnist_set(4, seed=7)
    write_mnist_set(tmp_path / "mnist", "train", images, labels, gz=False)
    bad = tmp_path / "mnist" / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x12\x34\x08\x03" + bad.read_bytes()[4:])
    with pytest.raises(DataFormatError, match="magic") as err:
        load_split("mnist", "train", tmp_path)
    assert isinstance(err.value, ValueError) and str(bad) in str(err.value)

    truncated = tmp_path / "short-idx"
    truncated.write_bytes(write_idx(tmp_path / "ok-idx", images).read_bytes()[:-5])
    with pytest.raises(DataFormatError, match="bytes"):
        read_idx(truncated)


def test_idx_reader_handles_wider_types(tmp_path):
    values = (np.arange(6).reshape(2, 3) - 2).astype(">i4")
    path = tmp_path / "ints-idx"
    path.write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 3) + values.tobytes())
    read = read_idx(path)
    assert read.tolist() == values.tolist()
    assert torch.from_numpy(read).tolist() == values.tolist()  # native byte order, torch-ready


def test_missing_data_lists_where_it_looked(tmp_path):
    with pytest.raises(DataNotFound) as err:
        load_split("mnist", "train", tmp_path)
    message = str(err.value)
    for folder in (tmp_path / "mnist", tmp_path / "MNIST" / "raw", tmp_path):
        assert str(folder) in message
    assert "torchvision" in message and "CERTREPRO_DATA" in message
    assert isinstance(err.value, FileNotFoundError)

    with pytest.raises(DataNotFound, match="cifar-10-batches-py"):
        load_split("cifar10", "test", tmp_path)
    with pytest.raises(DataNotFound) as err:
        load_split("svhn", "test", tmp_path)
    assert str(tmp_path / "svhn") in str(err.value) and "test_32x32.mat" in str(err.value)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 and SVHN


def write_cifar_batch(path: Path, data: np.ndarray, labels: list[int]) -> None:
    # Same shape as the official files: a dict with byte-string keys, data (N, 3072) uint8.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"test", b"data": data, b"labels": labels}, f, protocol=2)


def test_cifar10_reads_pickled_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    rng = np.random.default_rng(8)
    batches = [rng.integers(0, 256, (3, 3072), dtype=np.uint8) for _ in range(5)]
    for i, data in enumerate(batches, start=1):
        write_cifar_batch(folder / f"data_batch_{i}", data, [i, i, i])
    # Distinctive pixels: red plane all 10, green 20, blue 30, except one marked red pixel.
    test_data = np.repeat(np.array([10] * 1024 + [20] * 1024 + [30] * 1024, np.uint8)[None], 2, 0)
    test_data[1, 5 * 32 + 7] = 255  # red channel, row 5, column 7
    write_cifar_batch(folder / "test_batch", test_data, [4, 9])

    x, y = load_split("cifar10", "train", tmp_path)
    assert x.shape == (15, 3, 32, 32) and y.tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]
    assert torch.allclose(x.reshape(15, -1) * 255, torch.from_numpy(np.concatenate(batches)).float(), atol=1e-3)

    x, y = load_split("cifar10", "test", tmp_path)
    assert y.tolist() == [4, 9]
    pixels = (x * 255).round()
    assert pixels[0, 0].unique().tolist() == [10.0]
    assert pixels[0, 1].unique().tolist() == [20.0] and pixels[0, 2].unique().tolist() == [30.0]
    assert pixels[1, 0, 5, 7] == 255 and pixels[1, 0].sum() == 10 * 1023 + 255


def test_cifar_refuses_code_in_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"

    class Evil:
        def __reduce__(self):
            return (print, ("this should never run",))

    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DataFormatError, match="refusing"):
        load_split("cifar10", "test", tmp_path)


@pytest.mark.parametrize("subfolder", ["svhn", "."])
def test_svhn_reads_mat_files(tmp_path, subfolder):
    n = 3
    # X is (H, W, C, N); value = 100*n + 30*c + h (row) + (w is column: only column 0 differs).
    h, w, c, k = np.meshgrid(np.arange(32), np.arange(32), np.arange(3), np.arange(n), indexing="ij")
    X = (100 * k + 30 * c + h + 2 * (w == 0)).astype(np.uint8)
    y = np.array([[10], [3], [1]], dtype=np.uint8)
    (tmp_path / subfolder).mkdir(exist_ok=True)
    scipy.io.savemat(tmp_path / subfolder / "train_32x32.mat", {"X": X, "y": y})

    x, labels = load_split("svhn", "train", tmp_path)
    assert x.shape == (3, 3, 32, 32) and labels.tolist() == [0, 3, 1]
    pixels = (x * 255).round().long()
    assert pixels[2, 1, 4, 5] == 100 * 2 + 30 * 1 + 4
    assert pixels[1, 2, 31, 0] == 100 + 60 + 31 + 2  # the last index is the column
    assert torch.equal(pixels.permute(2, 3, 1, 0), torch.from_numpy(X).long())


# ---------------------------------------------------------------------------------------------
# toy2d


def test_toy2d():
    x, y = load_split("toy2d", "train")
    assert x.shape == (13, 2) and y.shape == (13,)
    assert int(y.sum()) == 5 and set(y.tolist()) == {0, 1}
    assert x.min() >= 0 and x.max() <= 1
    gaps = (x[:, None, :] - x[None, :, :]).abs().amax(-1) + torch.eye(13) * 10
    assert gaps.min() >= 0.08
    x_test, y_test = load_split("toy2d", "test")
    assert torch.equal(x, x_test) and torch.equal(y, y_test)
    torch.manual_seed(99)
    assert torch.equal(load_split("toy2d", "train")[0], x)


# ---------------------------------------------------------------------------------------------
# augment_batch


def test_augment_noop_returns_input():
    x = torch.rand(4, 3, 8, 8)
    assert augment_batch(x, 0, False, torch.Generator().manual_seed(0)) is x


def test_augment_is_reproducible_and_keeps_shape():
    x = torch.rand(16, 3, 10, 10)
    a = augment_batch(x, 3, True, torch.Generator().manual_seed(5))
    b = augment_batch(x, 3, True, torch.Generator().manual_seed(5))
    c = augment_batch(x, 3, True, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_translate_moves_a_bright_pixel():
    n, t = 64, 2
    x = torch.zeros(n, 1, 9, 9)
    x[:, 0, 4, 4] = 1.0
    out = augment_batch(x, t, False, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    shifts = set()
    for image in out[:, 0]:
        assert image.sum() == 1 and image.max() == 1  # a shifted copy: one pixel, nothing else
        r, c = (image == 1).nonzero()[0].tolist()
        assert abs(r - 4) <= t and abs(c - 4) <= t
        shifts.add((r - 4, c - 4))
    assert len(shifts) > 5  # per-example shifts, not one shift for the whole batch


def test_translate_content_is_shifted_copy_with_zero_fill():
    x = torch.arange(1, 26, dtype=torch.float32).reshape(1, 1, 5, 5)
    out = augment_batch(x.repeat(32, 1, 1, 1), 1, False, torch.Generator().manual_seed(1))
    for image in out[:, 0]:
        matches = [
            (dr, dc)
            for dr in (-1, 0, 1)
            for dc in (-1, 0, 1)
            if torch.equal(image, torch.roll(x[0, 0], (dr, dc), (0, 1)) * _mask(dr, dc))
        ]
        assert len(matches) == 1


def _mask(dr: int, dc: int) -> torch.Tensor:
    """1 where a (dr, dc) shift of a 5x5 image keeps content, 0 where zero padding comes in."""
    m = torch.ones(5, 5)
    if dr > 0:
        m[:dr] = 0
    if dr < 0:
        m[dr:] = 0
    if dc > 0:
        m[:, :dc] = 0
    if dc < 0:
        m[:, dc:] = 0
    return m


def test_flip_only():
    x = torch.rand(64, 2, 4, 6)
    out = augment_batch(x, 0, True, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54


def test_augment_with_global_rng_when_no_generator():
    x = torch.rand(4, 1, 6, 6)
    assert augment_batch(x, 1, True, None).shape == x.shape
