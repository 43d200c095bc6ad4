"""The standard image datasets (Fashion-MNIST IDX files, CIFAR-10 pickles, image folders) on small
fixtures written here in the real file formats, plus the Debian package's Fashion-MNIST when present."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import socket
import stat
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dkgm import data as ds
from dkgm.errors import DKGMError
from stages import prepare

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")

# ----------------------------------------------------------------------------- fixtures: IDX


def idx_bytes(arr: np.ndarray) -> bytes:
    """An IDX file of uint8 values: 0x0000, type 0x08, ndim, big-endian sizes, the values."""
    arr = np.asarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def fashion_pattern(n: int, offset: int = 0) -> np.ndarray:
    k, r, c = np.meshgrid(np.arange(n) + offset, np.arange(28), np.arange(28), indexing="ij")
    return ((k * 37 + r * 5 + c * 3) % 251 + 1).astype(np.uint8)  # 1..251: never the padding value 0


def write_fashion(folder: Path, n_train: int = 5, n_test: int = 3, gz: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The four Fashion-MNIST files (the train pair gzipped when gz, the test pair always raw)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = fashion_pattern(n_train + n_test)
    labels = (np.arange(n_train + n_test) * 3 % 10).astype(np.uint8)
    parts = {"train-images-idx3-ubyte": images[:n_train], "train-labels-idx1-ubyte": labels[:n_train],
             "t10k-images-idx3-ubyte": images[n_train:], "t10k-labels-idx1-ubyte": labels[n_train:]}
    for name, arr in parts.items():
        raw = idx_bytes(arr)
        if gz and name.startswith("train"):
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return images, labels.astype(np.int64)


def fake_dpkg(bin_dir: Path, script: str) -> None:
    """A `dpkg` on PATH that answers only `dpkg -L dataset-fashion-mnist`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "dpkg"
    exe.write_text('#!/bin/sh\n[ "$1" = "-L" ] && [ "$2" = "dataset-fashion-mnist" ] || exit 2\n' + script)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection or torchvision download fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("something tried the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(ds, "download_fashion_mnist", refuse)
    monkeypatch.setattr(ds, "download_cifar10", refuse)


# ----------------------------------------------------------------------------- Fashion-MNIST


def test_idx_files_have_the_real_magic_numbers_and_round_trip():
    labels = idx_bytes(np.arange(7))
    images = idx_bytes(fashion_pattern(2))
    assert int.from_bytes(images[:4], "big") == 2051 and int.from_bytes(labels[:4], "big") == 2049
    np.testing.assert_array_equal(ds.parse_idx(images, "x"), fashion_pattern(2))
    np.testing.assert_array_equal(ds.parse_idx(gzip.compress(labels), "x"), np.arange(7))
    # other value types: big-endian int32
    be = bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 2) + struct.pack(">2i", -5, 70000)
    np.testing.assert_array_equal(ds.parse_idx(be, "x"), [-5, 70000])


def test_fashion_mnist_pool_is_train_then_test_and_pads_at_the_centre(tmp_path):
    images, labels = write_fashion(tmp_path / "fm")
    got = ds.load_fashion_mnist(tmp_path / "fm")
    assert got.images.shape == (8, 1, 28, 28) and got.images.dtype == np.uint8
    np.testing.assert_array_equal(got.images[:, 0], images)  # exact, train (gz) first, then test (raw)
    np.testing.assert_array_equal(got.labels, labels)
    assert got.info["pools"] == {"train": 5, "test": 3} and len(got.info["source_files"]) == 4

    for size, top in ((32, 2), (33, 2)):
        cfg = prepare.PrepareParams(dataset="fashion_mnist", path=str(tmp_path / "fm"), image_size=size)
        items, lab, meta = prepare.build(cfg, tmp_path)
        assert items.shape == (8, 1, size, size)
        np.testing.assert_array_equal(items[:, 0, top : top + 28, top : top + 28], images)
        assert items.sum(dtype=np.int64) == images.sum(dtype=np.int64)  # the border is all zeros
        np.testing.assert_array_equal(lab, labels)
        assert meta["channels"] == 1 and meta["shape"] == [1, size, size] and meta["source"] == str(tmp_path / "fm")
        assert meta["source_via"] == "prepare.path" and len(meta["source_sha256"]) == 64 and meta["n_source"] == 8


def test_relative_path_is_taken_from_the_project_root(tmp_path):
    write_fashion(tmp_path / "sets" / "fm")
    items, _, meta = prepare.build(prepare.PrepareParams(dataset="fashion_mnist", path="sets/fm"), tmp_path)
    assert len(items) == 8 and meta["source"] == "sets/fm"


def test_truncated_or_malformed_idx_files_are_named(tmp_path):
    write_fashion(tmp_path / "fm")
    raw = (tmp_path / "fm" / "t10k-images-idx3-ubyte").read_bytes()
    (tmp_path / "fm" / "t10k-images-idx3-ubyte").write_bytes(raw[:-100])
    with pytest.raises(DKGMError, match=r"t10k-images-idx3-ubyte: truncated: the header says 3x28x28") as e:
        ds.load_fashion_mnist(tmp_path / "fm")
    assert "\n" not in str(e.value)
    gz = tmp_path / "fm" / "train-labels-idx1-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-6])  # a cut gzip stream
    with pytest.raises(DKGMError, match="train-labels-idx1-ubyte.gz"):
        ds.read_idx(gz)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x12\x34\x08\x01" + b"\0" * 10)
    with pytest.raises(DKGMError, match=r"bad: not an IDX file"):
        ds.read_idx(bad)
    bad.write_bytes(idx_bytes(np.arange(4)) + b"x")
    with pytest.raises(DKGMError, match="trailing bytes"):
        ds.read_idx(bad)


def test_dpkg_discovery_takes_the_folder_the_package_lists(tmp_path, monkeypatch):
    write_fashion(tmp_path / "share" / "fashion-mnist")
    listed = ["/.", str(tmp_path / "share"), str(tmp_path / "share" / "fashion-mnist"),
              *(str(p) for p in sorted((tmp_path / "share" / "fashion-mnist").iterdir())),
              "/usr/share/doc/dataset-fashion-mnist/copyright"]
    fake_dpkg(tmp_path / "bin", "".join(f"echo '{line}'\n" for line in listed))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert ds.fashion_mnist_dir_from_dpkg() == tmp_path / "share" / "fashion-mnist"
    items, _, meta = prepare.build(prepare.PrepareParams(dataset="fashion_mnist"), tmp_path)
    assert len(items) == 8 and meta["source_via"] == "dpkg -L dataset-fashion-mnist"


def test_without_the_package_the_error_says_how_to_install_it(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no dpkg at all
    with pytest.raises(DKGMError, match="dpkg not found") as e:
        prepare.build(prepare.PrepareParams(dataset="fashion_mnist"), tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("apt-get update", "apt-get install dataset-fashion-mnist", "prepare.path", "allow_download"):
        assert part in msg
    fake_dpkg(tmp_path / "bin", "echo \"dpkg-query: package 'dataset-fashion-mnist' is not installed\" >&2; exit 1\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(DKGMError, match="package dataset-fashion-mnist is not installed.*apt-get install"):
        prepare.build(prepare.PrepareParams(dataset="fashion_mnist"), tmp_path)
    assert not (tmp_path / "data").exists()  # nothing downloaded, no download folder made


def test_missing_local_files_never_download_by_default(tmp_path, no_network):
    (tmp_path / "empty").mkdir()
    cases = [
        (prepare.PrepareParams(dataset="fashion_mnist", path="empty"), "does not hold the four Fashion-MNIST"),
        (prepare.PrepareParams(dataset="fashion_mnist", path="nope"), "prepare.path: .*nope does not exist"),
        (prepare.PrepareParams(dataset="cifar10", path="empty"), "holds no CIFAR-10 python version"),
        (prepare.PrepareParams(dataset="cifar10", path="nope"), "prepare.path: .*nope does not exist"),
    ]
    for cfg, fragment in cases:
        with pytest.raises(DKGMError, match=fragment) as e:
            prepare.build(cfg, tmp_path)
        assert "prepare.allow_download: true" in str(e.value) and "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["empty"] and not os.listdir(tmp_path / "empty")


def test_allow_download_fetches_only_when_nothing_is_local(tmp_path, monkeypatch):
    calls = []

    def fake_fashion(dest):
        calls.append(Path(dest))
        write_fashion(Path(dest))
        return Path(dest)

    def fake_cifar(dest):
        calls.append(Path(dest))
        return write_cifar_tar(Path(dest))[0]

    monkeypatch.setattr(ds, "download_fashion_mnist", fake_fashion)
    monkeypatch.setattr(ds, "download_cifar10", fake_cifar)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no dpkg: nothing local
    cfg = prepare.PrepareParams(dataset="fashion_mnist", allow_download=True)
    items, _, meta = prepare.build(cfg, tmp_path)
    assert calls == [tmp_path / "data" / "downloads" / "fashion-mnist"] and len(items) == 8
    assert meta["source_via"] == "download (prepare.allow_download)"
    prepare.build(cfg, tmp_path)  # the earlier download is found again
    assert len(calls) == 1
    items, _, _ = prepare.build(prepare.PrepareParams(dataset="cifar10", path="c10", allow_download=True), tmp_path)
    assert calls[-1] == tmp_path / "c10" and len(items) == 12
    write_fashion(tmp_path / "local")  # local files win over the download
    prepare.build(prepare.PrepareParams(dataset="fashion_mnist", path="local", allow_download=True), tmp_path)
    assert len(calls) == 2


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_debian_fashion_mnist_is_found_and_complete():
    folder = ds.fashion_mnist_dir_from_dpkg()
    assert folder == DEBIAN_FASHION
    got = ds.load_fashion_mnist(folder)
    assert got.images.shape == (70000, 1, 28, 28) and got.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(got.labels), [7000] * 10)  # 6,000 + 1,000 of each class
    np.testing.assert_array_equal(got.labels[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])  # the published first labels
    assert got.images[:60000].mean() / 255 == pytest.approx(0.2860, abs=5e-4)  # the published training mean


# ----------------------------------------------------------------------------- CIFAR-10

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def cifar_row(rgb: tuple[int, int, int]) -> np.ndarray:
    """One row of b"data": the 1024 red values, then the green, then the blue."""
    return np.concatenate([np.full(1024, v, np.uint8) for v in rgb])


def cifar_batches(per_batch: int = 2) -> dict[str, dict]:
    """Six batches; in each, image 0 is red, image 1 a spatial pattern; labels run on across batches."""
    batches = {}
    for b, name in enumerate(ds.CIFAR_BATCHES):
        rows = [cifar_row(COLOURS["red"])]
        y, x = np.mgrid[:32, :32]
        rows.append(np.concatenate([(y * 7 + x + b).ravel() % 256, (x * 5).ravel(), (y * 3).ravel()]).astype(np.uint8))
        rows += [cifar_row(COLOURS["blue"])] * (per_batch - 2)
        batches[name] = {b"batch_label": f"batch {name}".encode(), b"labels": [(b * per_batch + i) % 10
                                                                              for i in range(per_batch)],
                         b"data": np.stack(rows), b"filenames": [f"img{i}.png".encode() for i in range(per_batch)]}
    return batches


def write_cifar_folder(parent: Path, protocol: int = pickle.DEFAULT_PROTOCOL, **swap: bytes) -> Path:
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, batch in cifar_batches().items():
        (folder / name).write_bytes(swap.get(name) or pickle.dumps(batch, protocol=protocol))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in ds.CIFAR_CLASSES]}))
    return folder


def write_cifar_tar(parent: Path, skip: str = "") -> tuple[Path, dict]:
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / "cifar-10-python.tar.gz"
    batches = cifar_batches()
    with tarfile.open(path, "w:gz") as tar:
        members = {"readme.html": b"<html></html>", "batches.meta": b"\x80\x04N."}
        members.update({name: pickle.dumps(b) for name, b in batches.items() if name != skip})
        for name, raw in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path, batches


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_cifar_batches_keep_channel_order_and_label_order(tmp_path, protocol):
    folder = write_cifar_folder(tmp_path, protocol=protocol)
    got = ds.load_cifar10(folder)
    assert got.images.shape == (12, 3, 32, 32) and got.images.dtype == np.uint8
    red = got.images[0]
    assert (red[0] == 255).all() and (red[1:] == 0).all()  # the red image is red: R plane first
    y, x = np.mgrid[:32, :32]
    np.testing.assert_array_equal(got.images[1], np.stack([(y * 7 + x) % 256, x * 5, y * 3]))  # row-major planes
    np.testing.assert_array_equal(got.images[11, 0], (y * 7 + x + 5) % 256)  # test_batch's pattern is last
    np.testing.assert_array_equal(got.labels, np.arange(12) % 10)  # data_batch_1..5, then test_batch
    assert got.info["pools"] == {"train": 10, "test": 2}


def test_cifar_tar_is_read_in_memory_and_matches_the_folder(tmp_path):
    tar, _ = write_cifar_tar(tmp_path / "t")
    before = sorted(p.name for p in (tmp_path / "t").rglob("*"))
    from_tar = ds.load_cifar10(tar)
    assert sorted(p.name for p in (tmp_path / "t").rglob("*")) == before  # nothing extracted
    from_dir = ds.load_cifar10(write_cifar_folder(tmp_path / "d"))
    np.testing.assert_array_equal(from_tar.images, from_dir.images)
    np.testing.assert_array_equal(from_tar.labels, from_dir.labels)
    assert from_tar.info["source_sha256"] == from_dir.info["source_sha256"]  # same data, same identity
    # prepare.path may name the archive, the batches folder or a folder holding either
    assert ds.find_cifar10(tmp_path / "t") == tar and ds.find_cifar10(tmp_path / "d") == tmp_path / "d" / ds.CIFAR_FOLDER

    items, _, meta = prepare.build(prepare.PrepareParams(dataset="cifar10", path=str(tar)), tmp_path)
    assert items.shape == (12, 3, 32, 32) and meta["channels"] == 3 and meta["shape"] == [3, 32, 32]
    assert meta["source"] == str(tar) and meta["classes"][0] == "airplane" and meta["n_source"] == 12
    big, _, meta64 = prepare.build(prepare.PrepareParams(dataset="cifar10", path=str(tar), image_size=64), tmp_path)
    assert big.shape == (12, 3, 64, 64) and meta64["shape"] == [3, 64, 64] and "bicubic" in meta64["preprocessing"]
    assert (big[0, 0] >= 254).all() and (big[0, 1:] <= 1).all()  # still red after the resize


def test_cifar_archive_problems_are_named(tmp_path):
    tar, _ = write_cifar_tar(tmp_path / "a", skip="data_batch_3")
    with pytest.raises(DKGMError, match=r"cifar-10-python.tar.gz has no cifar-10-batches-py/data_batch_3"):
        ds.load_cifar10(tar)
    cut = tmp_path / "cut.tar.gz"
    whole = write_cifar_tar(tmp_path / "b")[0].read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DKGMError, match="cut.tar.gz") as e:
        ds.load_cifar10(cut)
    assert "\n" not in str(e.value)
    folder = write_cifar_folder(tmp_path / "c")
    (folder / "test_batch").unlink()
    with pytest.raises(DKGMError, match=r"test_batch is missing"):
        ds.load_cifar10(folder)


class _RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickles_are_refused_without_running_anything(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"data": _RunsACommand(marker), b"labels": []})
    folder = write_cifar_folder(tmp_path / "c", data_batch_2=evil)
    with pytest.raises(DKGMError, match=r"data_batch_2: refused to unpickle the global (posix|nt|os)\.system"):
        ds.load_cifar10(folder)
    assert not marker.exists()
    pickle.loads(evil)  # the same bytes through plain pickle do run the command: the fixture is real
    assert marker.exists()
    marker.unlink()

    for payload, refused in (
        (pickle.dumps(eval), "builtins.eval"),  # a builtin that is no container
        (b"\x80\x02cbuiltins\ngetattr\nq\x00.", "builtins.getattr"),
        (b"csubprocess\ncheck_call\n(S'touch " + str(marker).encode() + b"'\ntR.", "subprocess.check_call"),
    ):
        with pytest.raises(DKGMError, match=f"refused to unpickle the global {refused}"):
            ds.safe_unpickle(payload, "x")
    assert not marker.exists()
    with pytest.raises(DKGMError, match="object array"):
        ds.safe_unpickle(pickle.dumps({b"data": np.array([1, "a"], dtype=object)}), "x")
    with pytest.raises(DKGMError, match="x: not a readable pickle"):
        ds.safe_unpickle(b"\x80\x04garbage", "x")
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for protocol in (3, 4, 5):
        np.testing.assert_array_equal(ds.safe_unpickle(pickle.dumps(arr, protocol=protocol), "x"), arr)


# ----------------------------------------------------------------------------- image folders


def thirds(w: int, h: int, colours: tuple, horizontal: bool = True) -> Image.Image:
    """An image cut into three equal bands of the given colours (left to right, or top to bottom)."""
    arr = np.zeros((h, w, 3), np.uint8)
    n = w if horizontal else h
    for i, c in enumerate(colours):
        sl = slice(i * n // 3, (i + 1) * n // 3)
        if horizontal:
            arr[:, sl] = c
        else:
            arr[sl] = c
    return Image.fromarray(arr)


def jpeg(colour: tuple, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


R, G, B = COLOURS["red"], COLOURS["green"], COLOURS["blue"]
FOLDER = {  # relative name -> bytes; sorted: a_wide, b_tall, c/grey, c/photo, d_rgba (upper-case .PNG)
    "a_wide.png": png(thirds(60, 20, (R, G, B))),
    "b_tall.png": png(thirds(21, 63, (B, R, G), horizontal=False)),
    "c/grey.png": png(Image.new("L", (30, 30), 77)),
    "c/photo.jpeg": jpeg((200, 100, 50), (40, 30)),
    "d_rgba.PNG": png(Image.new("RGBA", (16, 16), (10, 20, 30, 0))),
    "notes.txt": b"not an image",
    ".hidden.png": b"skipped",
}


def write_folder(root: Path, files: dict[str, bytes], reverse: bool = False) -> Path:
    for name in sorted(files, reverse=reverse):  # the order the files are created in must not matter
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(files[name])
    return root


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name in reversed(list(files)):
            zf.writestr(name, files[name])
    return path


def test_image_folder_centre_crops_converts_to_rgb_and_keeps_sorted_order(tmp_path):
    got = ds.load_image_folder(write_folder(tmp_path / "f", FOLDER), 16)
    assert got.images.shape == (5, 3, 16, 16) and got.images.dtype == np.uint8
    assert got.info["files_found"] == 5 and got.info["files_used"] == 5
    wide, tall, grey, photo, rgba = got.images
    assert (wide.transpose(1, 2, 0) == G).all()  # the centre third of a wide image, exactly
    assert (tall.transpose(1, 2, 0) == R).all()  # the middle of a tall one (63 -> 21 rows at 21..41)
    assert (grey == 77).all()  # grey replicated to three channels
    assert np.abs(photo.reshape(3, -1).mean(1) - (200, 100, 50)).max() < 3  # JPEG: close, not exact
    assert (rgba.transpose(1, 2, 0) == (10, 20, 30)).all()
    np.testing.assert_array_equal(got.labels, -1)  # files not all in class subfolders


def test_image_folder_order_is_deterministic_and_the_zip_matches(tmp_path):
    a = ds.load_image_folder(write_folder(tmp_path / "a", FOLDER), 24, workers=1)
    b = ds.load_image_folder(write_folder(tmp_path / "b", FOLDER, reverse=True), 24, workers=8)
    z = ds.load_image_folder(write_zip(tmp_path / "f.zip", FOLDER), 24)
    for other in (b, z):
        np.testing.assert_array_equal(a.images, other.images)
        assert a.info["source_sha256"] == other.info["source_sha256"]  # names + bytes, not the container
    write_folder(tmp_path / "c", {**FOLDER, "a_wide.png": png(thirds(60, 20, (R, B, B)))})
    assert ds.load_image_folder(tmp_path / "c", 24).info["source_sha256"] != a.info["source_sha256"]


def test_a_corrupt_file_is_named(tmp_path):
    files = {**FOLDER, "c/bad.png": b"\x89PNG\r\n\x1a\n" + os.urandom(64),
             "e_cut.jpg": jpeg((1, 2, 3), (64, 64))[:300]}
    for name in ("c/bad.png", "e_cut.jpg"):
        broken = {k: v for k, v in files.items() if k in FOLDER or k == name}
        folder = write_folder(tmp_path / name.replace("/", "_"), broken)
        with pytest.raises(DKGMError, match=f"cannot decode {folder / name}") as e:
            ds.load_image_folder(folder, 16, workers=4)
        assert "\n" not in str(e.value)
        archive = write_zip(tmp_path / f"{name.replace('/', '_')}.zip", broken)
        with pytest.raises(DKGMError, match=f"cannot decode {archive}!{name}"):
            ds.load_image_folder(archive, 16)


def test_limit_picks_file_names_before_decoding(tmp_path, monkeypatch):
    files = {f"img{i:02d}.png": png(Image.new("RGB", (8 + i, 8), (i, 2 * i, 3 * i))) for i in range(30)}
    folder = write_folder(tmp_path / "f", files)
    full = ds.load_image_folder(folder, 8)
    decoded = []
    real = ds.decode_image
    monkeypatch.setattr(ds, "decode_image", lambda raw, size, name: decoded.append(name) or real(raw, size, name))
    part = ds.load_image_folder(folder, 8, limit=10, seed=3)
    assert len(decoded) == 10 and part.info["files_used"] == 10 and part.info["files_found"] == 30
    # the same rows the generic prepare.limit rule would keep after decoding everything
    np.testing.assert_array_equal(part.images, full.images[ds.subset_rows(30, 10, 3)])
    decoded.clear()
    items, _, meta = prepare.build(prepare.PrepareParams(dataset="image_folder", path=str(folder), limit=12, seed=3,
                                                         image_size=32), tmp_path)
    assert len(decoded) == 12 and items.shape == (12, 3, 32, 32) and meta["n_source"] == 30
    assert meta["channels"] == 3 and meta["files_used"] == 12


def test_class_subfolders_give_labels(tmp_path):
    img = png(Image.new("RGB", (4, 4)))
    assert ds.folder_classes(["train/dog/1.png", "train/cat/2.png", "train/cat/3.png"])[0].tolist() == [1, 0, 0]
    assert ds.folder_classes(["dog/1.png", "cat/x/2.png"])[1] == ["cat", "dog"]
    assert ds.folder_classes(["a.png", "cat/2.png"])[0].tolist() == [-1, -1]  # a file outside any class
    assert ds.folder_classes(["celeba/1.jpg", "celeba/2.jpg"])[0].tolist() == [-1, -1]  # one folder: no classes
    folder = write_folder(tmp_path / "f", {"train/dog/1.png": img, "train/cat/2.png": img, "train/cat/3.png": img})
    got = ds.load_image_folder(folder, 28)
    assert got.labels.tolist() == [0, 0, 1] and got.info["classes"] == ["cat", "dog"]


def test_empty_or_missing_sources_say_so(tmp_path):
    (tmp_path / "empty").mkdir()
    write_folder(tmp_path / "txt", {"a.txt": b"x", ".hidden.png": b"x"})
    for name in ("empty", "txt"):
        with pytest.raises(DKGMError, match=f"no JPEG or PNG files .* in {tmp_path / name}$"):
            prepare.build(prepare.PrepareParams(dataset="image_folder", path=name), tmp_path)
    with pytest.raises(DKGMError, match=r"^prepare.path: .*nowhere does not exist"):
        prepare.build(prepare.PrepareParams(dataset="image_folder", path="nowhere"), tmp_path)
    (tmp_path / "not.zip").write_bytes(b"PK not really")
    with pytest.raises(DKGMError, match="not.zip is neither a folder nor a readable .zip"):
        prepare.build(prepare.PrepareParams(dataset="image_folder", path="not.zip"), tmp_path)


def test_params_schema_requires_a_path_where_one_is_needed():
    from pipeline.params import ParamsError, validate

    for dataset in ("cifar10", "image_folder"):
        with pytest.raises(ParamsError, match=f"prepare.path: dataset {dataset} needs prepare.path"):
            validate({"prepare": {"dataset": dataset}})
    with pytest.raises(ParamsError, match="prepare.path: must be a path or null"):
        validate({"prepare": {"dataset": "fashion_mnist", "path": " "}})
    with pytest.raises(ParamsError, match="prepare.dataset: .*fashion_mnist"):
        validate({"prepare": {"dataset": "celeba"}})
    assert validate({"prepare": {"dataset": "fashion_mnist"}}).prepare.allow_download is False
    assert validate({"prepare": {"dataset": "cifar10", "path": "x", "allow_download": True}}).prepare.path == "x"


def test_prepare_stage_writes_grey_and_colour_artifacts(tmp_path):
    write_fashion(tmp_path / "fm", n_train=40, n_test=10)
    metrics = prepare.run(prepare.PrepareParams(dataset="fashion_mnist", path="fm"), tmp_path)
    data = np.load(tmp_path / "data" / "prepared" / "data.npy")
    assert data.shape == (50, 1, 32, 32) and metrics["n_items"] == 50 and metrics["n_train"] == 40
    folder = write_folder(tmp_path / "imgs", {f"{i}.png": png(Image.new("RGB", (20, 10), (i, 0, 0))) for i in range(20)})
    prepare.run(prepare.PrepareParams(dataset="image_folder", path=str(folder), image_size=28), tmp_path)
    assert np.load(tmp_path / "data" / "prepared" / "data.npy").shape == (20, 3, 28, 28)
    assert (tmp_path / prepare.PREVIEW).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pixel_mean_of_large_sets_needs_no_float_copy(monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (50, 3, 8, 8), dtype=np.uint8)
    small = prepare.pixel_mean(images)
    monkeypatch.setattr(prepare, "BIG", 0)
    assert prepare.pixel_mean(images) == pytest.approx(small, abs=1e-6)
    assert prepare.pixel_mean(images) == pytest.approx(images.astype(np.float64).mean() / 127.5 - 1, abs=1e-12)
