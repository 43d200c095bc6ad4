"""Bad artifacts and a hostile machine: each problem is one line naming the file, exit status 2,
and nothing half-written (no published output, no staging folder left behind)."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.__main__ import main
from stages import artifacts
from stages.common import read_npz
from tests.conftest import REPO, cli_env, run_stages, write_params


@pytest.fixture
def proj(tiny_copy) -> Path:
    """A copy of the session's tiny run (every stage run)."""
    return tiny_copy


def _run(root: Path, stage: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["run", stage, "--no-prefect", "--params", str(root / "params.yaml"), "--root", str(root)])
    return rc, err.getvalue()


def _snapshot(root: Path) -> dict[str, float]:
    """Every file under the project with its modification time (what a failed stage must not touch)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _fails_cleanly(root: Path, stage: str, *expected: str) -> str:
    before = _snapshot(root)
    rc, err = _run(root, stage)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(errors) == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in errors[0], errors[0]
    assert _snapshot(root) == before, "a failed stage changed files"
    assert not (root / ".dkgm" / "staging").exists() or not any((root / ".dkgm" / "staging").iterdir())
    return errors[0]


PREP = Path(artifacts.PREPARED)
KDE = Path(artifacts.KDE_SAMPLES)


def _truncate(path: Path, keep: float = 0.5) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


@pytest.mark.parametrize("damage, says", [
    ("truncate_npy", ["prepared data", "data.npy is corrupt or truncated"]),
    ("float64", ["data.npy has dtype float64, expected uint8"]),
    ("shape", ["data.npy holds items of shape (1, 28, 28), but its metadata says (1, 32, 32)"]),
    ("fewer_rows", ["data.npy has 799 items but its manifest lists 800"]),
    ("truncate_parquet", ["manifest.parquet is corrupt or truncated"]),
    ("garbage_parquet", ["manifest.parquet is corrupt or truncated"]),
    ("bad_json", ["meta.json is not valid JSON"]),
    ("missing_npy", ["prepared data not found", "data.npy"]),
])
def test_a_damaged_prepared_dataset_is_named_in_one_line(proj, damage, says):
    npy, man, meta = proj / PREP / "data.npy", proj / PREP / "manifest.parquet", proj / PREP / "meta.json"
    x = np.load(npy)
    if damage == "truncate_npy":
        _truncate(npy)
    elif damage == "float64":
        np.save(npy, x.astype(np.float64))
    elif damage == "shape":
        np.save(npy, x[:, :, 2:30, 2:30].copy())
    elif damage == "fewer_rows":
        np.save(npy, x[:-1])
    elif damage == "truncate_parquet":
        _truncate(man)
    elif damage == "garbage_parquet":
        man.write_bytes(b"PAR1" + os.urandom(200) + b"PAR1")
    elif damage == "bad_json":
        meta.write_text('{"kind": "images", ')
    elif damage == "missing_npy":
        npy.unlink()
    line = _fails_cleanly(proj, "fit_kde", *says)
    assert str(proj) in line  # the full path, so the user finds the file


@pytest.mark.parametrize("damage, says", [
    ("nan", ["KDE samples", "1 item(s) hold NaN or Inf, the first at index 3"]),
    ("inf", ["KDE samples", "2 item(s) hold NaN or Inf, the first at index 0"]),
    ("count", ["samples.npy has 39 items but its manifest lists 40"]),
    ("meta_n", ["lists 40 samples but", "meta.json says 41"]),
    ("int16", ["has dtype int16, expected uint8 or float32"]),
    ("pickled", ["samples.npy is corrupt or truncated"]),
])
def test_bad_samples_stop_refine_in_one_line(proj, damage, says):
    shutil.rmtree(proj / artifacts.REFINED)  # as before refine's first run: a failure must publish nothing
    npy, meta = proj / KDE / "samples.npy", proj / KDE / "meta.json"
    x = np.load(npy)
    if damage == "nan":
        x[3, 0, 5, 5] = np.nan
        np.save(npy, x)
    elif damage == "inf":
        x[0, 0, 0, 0], x[7, 0, 1, 1] = np.inf, -np.inf
        np.save(npy, x)
    elif damage == "count":
        np.save(npy, x[:-1])
    elif damage == "meta_n":
        m = json.loads(meta.read_text())
        meta.write_text(json.dumps({**m, "n": m["n"] + 1}))
    elif damage == "int16":
        np.save(npy, x.astype(np.int16))
    elif damage == "pickled":  # an object array: np.load(allow_pickle=False) refuses it
        np.save(npy, np.array([{"a": 1}] * len(x), dtype=object), allow_pickle=True)
    _fails_cleanly(proj, "refine", *says)
    assert not (proj / artifacts.REFINED).exists()


def test_a_missing_artifact_from_an_earlier_stage_is_named(proj):
    (proj / artifacts.BANDWIDTH).unlink()
    _fails_cleanly(proj, "sample_kde", "stage sample_kde: input not found", artifacts.BANDWIDTH)


def test_corrupt_reference_features_are_named(tmp_path):
    path = tmp_path / "features.npz"
    np.savez(path, train_rows=np.arange(5), test_rows=np.arange(3))
    assert set(read_npz(path, "reference features")) == {"train_rows", "test_rows"}
    _truncate(path, 0.6)
    from dkgm.errors import DKGMError

    with pytest.raises(DKGMError, match=r"reference features .*features.npz is corrupt or truncated"):
        read_npz(path, "reference features")


def test_to_uint8_refuses_nan_instead_of_painting_it_black():
    from dkgm.data import to_uint8
    from dkgm.errors import DKGMError

    x = np.zeros((3, 1, 4, 4), np.float32)
    assert (to_uint8(x) == 128).all()
    x[1, 0, 2, 2] = np.nan
    with pytest.raises(DKGMError, match="1 image"):
        to_uint8(x)


@pytest.mark.parametrize("code, says", [(errno.ENOSPC, "No space left on device (free some space)"),
                                        (errno.EACCES, "Permission denied (check the folder's permissions)"),
                                        (errno.EROFS, "Read-only file system")])
def test_a_full_disk_or_unwritable_folder_is_one_line_and_publishes_nothing(proj, monkeypatch, code, says):
    """Reserving the samples file's space fails as the kernel would fail it (ENOSPC: the disk is
    full; EACCES/EROFS: the folder cannot be written)."""
    real = os.posix_fallocate

    def failing(fd, offset, length):
        if length > 10_000:  # the samples file, not a small one
            raise OSError(code, os.strerror(code))
        return real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", failing)
    line = _fails_cleanly(proj, "sample_kde", "stage sample_kde: cannot write", "samples.npy", says)
    assert "nothing was published" in line


def test_a_real_write_limit_is_one_line(proj):
    """A real failing write, not a simulated one: the file-size limit (RLIMIT_FSIZE, with SIGXFSZ
    ignored) makes the kernel refuse the KDE samples with EFBIG, as a full disk refuses with ENOSPC."""
    before = _snapshot(proj)
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
            "from pipeline.__main__ import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "run", "sample_kde", "--no-prefect"], cwd=proj,
                       env=cli_env(PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(REPO)), capture_output=True, text=True,
                       timeout=300, check=False)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "File too large" in errors[0] and "stage sample_kde: cannot write" in errors[0]
    assert _snapshot(proj) == before
    assert not (proj / ".dkgm" / "staging").exists() or not any((proj / ".dkgm" / "staging").iterdir())


def test_a_manifest_that_lists_rows_outside_the_data_is_named(proj):
    man = proj / PREP / "manifest.parquet"
    df = pd.read_parquet(man)
    df.loc[0, "index"] = 10_000
    df.to_parquet(man, index=False)
    _fails_cleanly(proj, "fit_kde", "lists rows outside data.npy")
