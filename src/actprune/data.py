"""Image classification data, held as uint8 tensors or read lazily from an image folder.

Datasets: ``fashion-mnist`` (the default, real data), ``mnist`` (IDX files), ``cifar10`` /
``cifar100`` (the standard python-pickle folders), ``imagefolder`` (``root/train/<class>/*`` and
``root/test/<class>/*`` or ``root/val/<class>/*``) and ``synthetic`` (random images of a given
shape, for memory and speed runs). Nothing is fetched from a dataset hub at run time; only
Fashion-MNIST is downloaded, from its official release files, checksum-verified.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import struct
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# MD5 of the official .gz release files, and of the decompressed IDX bytes (the latter also
# matches re-compressed copies such as Debian's dataset-fashion-mnist).
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte": (
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    ),
    "train-labels-idx1-ubyte": (
        "25c81989df183df01b3e8a0aad5dffbe",
        "9018921c3c673c538a1fc5bad174d6f9",
    ),
    "t10k-images-idx3-ubyte": (
        "bef4ecab320f06d8554ea6380940ec79",
        "8181f5470baa50b63fa0f6fddb340f0a",
    ),
    "t10k-labels-idx1-ubyte": (
        "bb300cfdad3c16e7a12a480ee83fd310",
        "15d484375f8d13e6eb1aabb0c3f46965",
    ),
}
# Per-channel mean/std used to normalise each dataset (computed on its training split).
NORMALISATION = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class DataError(ValueError):
    """A dataset cannot be found or read; the message is one line meant for the user."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "actprune"


@dataclass
class Split:
    """One split: images [N, C, H, W] (uint8 in memory, or paths for an image folder) + labels."""

    labels: torch.Tensor  # int64 [N]
    images: torch.Tensor | None = None  # uint8 [N, C, H, W]
    paths: list[Path] | None = None
    image_size: int | None = None  # resize target for paths
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def __len__(self) -> int:
        return self.labels.numel()

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images normalised per channel, and labels, for the given sample indices."""
        if self.images is not None:
            raw = self.images[index]
        else:
            raw = torch.stack([_load_image(self.paths[i], self.image_size) for i in index.tolist()])
        x = raw.float().div_(255)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std, self.labels[index]


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    source: str  # where it was read from, for the record


# --- IDX (MNIST, Fashion-MNIST) -----------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path} is corrupt: {err}") from err
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated: its header promises {ndim} dimensions")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, found {data.size} values")
    return data.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    return None


def _verify_md5(path: Path, stem: str) -> None:
    known = FASHION_MNIST_MD5[stem]
    data = path.read_bytes()
    if hashlib.md5(data).hexdigest() in known:
        return
    try:
        content = gzip.decompress(data) if path.suffix == ".gz" else data
    except (OSError, EOFError) as err:
        raise DataError(f"{path} is corrupt: {err}") from err
    if hashlib.md5(content).hexdigest() not in known:
        raise DataError(f"{path} fails its checksum (corrupt or not the official file)")


def _load_idx_folder(name: str, folder: Path) -> Dataset:
    paths = {}
    for key, stem in IDX_FILES.items():
        path = _find_idx(folder, stem)
        if path is None:
            raise DataError(f"{folder} has no {stem}[.gz] ({name} needs the four IDX files)")
        paths[key] = path
    if name == "fashion-mnist":
        for key, stem in IDX_FILES.items():
            _verify_md5(paths[key], stem)
    arrays = {k: torch.from_numpy(_read_idx(p).copy()) for k, p in paths.items()}
    for key, array in arrays.items():
        want = 3 if key.endswith("images") else 1
        if array.dim() != want:
            raise DataError(
                f"{paths[key]} holds a {array.dim()}-D array; {key.replace('_', ' ')} are {want}-D"
            )
    for split in ("train", "test"):
        if arrays[f"{split}_images"].shape[0] != arrays[f"{split}_labels"].shape[0]:
            raise DataError(f"{folder}: {split} images and labels differ in count")
    mean, std = NORMALISATION[name]
    train = Split(
        arrays["train_labels"].long(), arrays["train_images"].unsqueeze(1), mean=mean, std=std
    )
    test = Split(
        arrays["test_labels"].long(), arrays["test_images"].unsqueeze(1), mean=mean, std=std
    )
    h, w = train.images.shape[2:]
    return Dataset(name, train, test, 10, (1, h, w), str(folder))


def _download_fashion_mnist(cache: Path) -> Path:
    target = cache / "fashion-mnist"
    target.mkdir(parents=True, exist_ok=True)
    for stem in IDX_FILES.values():
        dest = target / f"{stem}.gz"
        if dest.is_file():
            continue
        with tempfile.NamedTemporaryFile(dir=target, delete=False) as tmp:
            with urllib.request.urlopen(f"{FASHION_MNIST_URL}{stem}.gz", timeout=60) as resp:
                shutil.copyfileobj(resp, tmp)
        _verify_md5(Path(tmp.name), stem)
        os.replace(tmp.name, dest)
    return target


def load_fashion_mnist(data_dir: Path | None = None, download: bool = True) -> Dataset:
    """Fashion-MNIST from ``data_dir``, else Debian's package folder, else the download cache."""
    if data_dir is not None:
        return _load_idx_folder("fashion-mnist", Path(data_dir))
    if _find_idx(DEBIAN_FASHION_MNIST, IDX_FILES["train_images"]):
        return _load_idx_folder("fashion-mnist", DEBIAN_FASHION_MNIST)
    cache = default_cache_dir() / "fashion-mnist"
    if _find_idx(cache, IDX_FILES["train_images"]) or download:
        try:
            return _load_idx_folder("fashion-mnist", _download_fashion_mnist(default_cache_dir()))
        except OSError as err:
            reason = err
    else:
        reason = "download disabled"
    raise DataError(
        "Fashion-MNIST not found: pass --data-dir DIR with the four IDX files, or "
        f"`apt-get install dataset-fashion-mnist` ({DEBIAN_FASHION_MNIST}), or allow the download "
        f"to {cache} ({reason})"
    )


# --- CIFAR (python pickle folders) --------------------------------------------------------------


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds: dicts, lists, bytes, numbers and numpy arrays.

    Any other global a pickle names (a function, a class with a side effect) is refused, so a file
    someone hands you cannot run code when it is read."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name} (not CIFAR data)")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"missing CIFAR file {path}")
    try:
        with path.open("rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise DataError(f"{path} is not a CIFAR pickle: {err}") from err
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR pickle: it holds a {type(batch).__name__}")
    return batch


def _cifar_split(batches: list[dict], label_key: bytes, path: Path) -> tuple[torch.Tensor, ...]:
    try:
        data = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([np.asarray(b[label_key]) for b in batches])
    except (KeyError, ValueError) as err:
        raise DataError(f"{path}: unexpected CIFAR batch layout ({err})") from err
    return torch.from_numpy(data.copy()), torch.from_numpy(labels.astype(np.int64))


def load_cifar(name: str, data_dir: Path) -> Dataset:
    """CIFAR-10 (``cifar-10-batches-py``) or CIFAR-100 (``cifar-100-python``) under data_dir."""
    data_dir = Path(data_dir)
    if name == "cifar10":
        folder = data_dir / "cifar-10-batches-py"
        folder = folder if folder.is_dir() else data_dir
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test_files, key, classes = [folder / "test_batch"], b"labels", 10
    else:
        folder = data_dir / "cifar-100-python"
        folder = folder if folder.is_dir() else data_dir
        train_files, test_files, key, classes = (
            [folder / "train"],
            [folder / "test"],
            b"fine_labels",
            100,
        )
    train = _cifar_split([_unpickle(p) for p in train_files], key, folder)
    test = _cifar_split([_unpickle(p) for p in test_files], key, folder)
    mean, std = NORMALISATION[name]
    return Dataset(
        name,
        Split(train[1], train[0], mean=mean, std=std),
        Split(test[1], test[0], mean=mean, std=std),
        classes,
        (3, 32, 32),
        str(folder),
    )


# --- image folder -------------------------------------------------------------------------------

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def _load_image(path: Path, size: int) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((size, size), Image.BILINEAR)
            return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # UnidentifiedImageError
        raise DataError(f"cannot read image {path}: {err}") from err


def load_image_folder(data_dir: Path, image_size: int) -> Dataset:
    """``data_dir/train/<class>/*`` and ``data_dir/{test,val}/<class>/*``, resized to image_size."""
    data_dir = Path(data_dir)
    train_dir = data_dir / "train"
    test_dir = next((data_dir / d for d in ("test", "val") if (data_dir / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(f"{data_dir} needs train/<class>/ and test/<class>/ (or val/) folders")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{train_dir} has no class folders")

    def split(folder: Path) -> Split:
        paths, labels = [], []
        for label, cls in enumerate(classes):
            files = sorted(
                p for p in (folder / cls).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES
            )
            paths += files
            labels += [label] * len(files)
        if not paths:
            raise DataError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return Split(torch.tensor(labels), paths=paths, image_size=image_size)

    return Dataset(
        "imagefolder",
        split(train_dir),
        split(test_dir),
        len(classes),
        (3, image_size, image_size),
        str(data_dir),
    )


# --- synthetic ----------------------------------------------------------------------------------


def synthetic(
    image_shape: tuple[int, int, int],
    num_classes: int = 10,
    train_size: int = 1024,
    test_size: int = 256,
    seed: int = 0,
) -> Dataset:
    """Random uint8 images with random labels: for memory and speed runs, not accuracy."""
    gen = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        images = torch.randint(0, 256, (n, *image_shape), generator=gen, dtype=torch.uint8)
        return Split(torch.randint(0, num_classes, (n,), generator=gen), images)

    return Dataset(
        "synthetic", split(train_size), split(test_size), num_classes, image_shape, "random"
    )


def load(
    name: str, data_dir: Path | None = None, image_size: int | None = None, download: bool = True
) -> Dataset:
    """Load a dataset by name (see the module docstring); DataError with a one-line reason."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir, download)
    if name == "synthetic":
        size = image_size or 224
        return synthetic((3, size, size))
    if data_dir is None:
        raise DataError(f"dataset {name} needs --data-dir (nothing is downloaded for it)")
    if not Path(data_dir).is_dir():
        raise DataError(f"data folder {data_dir} does not exist")
    if name == "mnist":
        return _load_idx_folder("mnist", Path(data_dir))
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, Path(data_dir))
    return load_image_folder(Path(data_dir), image_size or 224)
