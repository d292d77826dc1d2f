import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from actprune import data


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    (
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
        if compress
        else path.write_bytes(raw)
    )


def make_idx_folder(folder: Path, n_train=20, n_test=10, compress=True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            folder / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), compress
        )
        write_idx(folder / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), compress)
    return folder


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_folder(tmp_path, compress):
    ds = data.load("mnist", make_idx_folder(tmp_path / "m", compress=compress))
    assert len(ds.train) == 20 and len(ds.test) == 10 and ds.image_shape == (1, 28, 28)
    x, y = ds.train.batch(torch.tensor([0, 3]))
    assert x.shape == (2, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_truncated_idx_is_reported(tmp_path):
    folder = make_idx_folder(tmp_path / "m", compress=False)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(data.DataError, match="truncated"):
        data.load("mnist", folder)


def test_fashion_mnist_folder_with_wrong_files_fails_checksum(tmp_path):
    with pytest.raises(data.DataError, match="checksum"):
        data.load("fashion-mnist", make_idx_folder(tmp_path / "f"))


def test_fashion_mnist_folder_with_missing_file(tmp_path):
    folder = make_idx_folder(tmp_path / "f")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DataError, match="no t10k-labels-idx1-ubyte"):
        data.load("fashion-mnist", folder)


def test_fashion_mnist_not_found_names_all_three_ways(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(data.DataError) as err:
        data.load_fashion_mnist(None, download=False)
    msg = str(err.value)
    assert "--data-dir" in msg and "dataset-fashion-mnist" in msg and "download" in msg
    assert "\n" not in msg


@pytest.mark.skipif(not data.DEBIAN_FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist absent")
def test_real_fashion_mnist_passes_checksums():
    ds = data.load("fashion-mnist")
    assert len(ds.train) == 60000 and len(ds.test) == 10000
    assert ds.train.labels.bincount().tolist() == [6000] * 10


def make_cifar10(folder: Path, per_batch=6) -> Path:
    root = folder / "cifar-10-batches-py"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
            b"batch_label": name.encode(),
        }
        (root / name).write_bytes(pickle.dumps(batch))
    return folder


def test_cifar10_pickle_folder(tmp_path):
    ds = data.load("cifar10", make_cifar10(tmp_path))
    assert len(ds.train) == 30 and len(ds.test) == 6 and ds.num_classes == 10
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    assert torch.equal(ds.train.images[0], torch.from_numpy(raw[b"data"][0].reshape(3, 32, 32)))
    x, _ = ds.train.batch(torch.arange(4))
    assert x.shape == (4, 3, 32, 32)


def test_cifar100_pickle_folder(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 8), ("test", 4)):
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": rng.integers(0, 100, n).tolist(),
            b"coarse_labels": rng.integers(0, 20, n).tolist(),
        }
        (root / name).write_bytes(pickle.dumps(batch))
    ds = data.load("cifar100", tmp_path)
    assert (len(ds.train), len(ds.test), ds.num_classes) == (8, 4, 100)


def test_cifar_missing_and_corrupt(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(data.DataError, match="data_batch_3"):
        data.load("cifar10", tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(data.DataError, match="missing CIFAR file"):
        data.load("cifar10", tmp_path)


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    ds = data.load("imagefolder", tmp_path, image_size=16)
    assert ds.num_classes == 2 and len(ds.train) == 6 and len(ds.test) == 4
    x, y = ds.train.batch(torch.tensor([0, 5]))
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [0, 1]


def test_image_folder_layout_errors(tmp_path):
    with pytest.raises(data.DataError, match="train/<class>"):
        data.load("imagefolder", tmp_path)


def test_synthetic_and_unknown():
    ds = data.load("synthetic", image_size=16)
    assert ds.image_shape == (3, 16, 16) and len(ds.train) == 1024
    with pytest.raises(data.DataError, match="unknown dataset 'imagenet'"):
        data.load("imagenet")
    with pytest.raises(data.DataError, match="needs --data-dir"):
        data.load("cifar10")
