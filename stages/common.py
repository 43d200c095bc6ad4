"""What every stage shares: atomic outputs, writers and readers of small files, progress, logging (figures: dkgm.figures).

Outputs are staged: a stage writes each output under .dkgm/staging/ and only when the whole
stage succeeded are they renamed into place (os.replace, same filesystem). A crash or a bad
input therefore leaves no half-written artifact, and the previous complete one untouched.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from dkgm import atomic
from dkgm.errors import DKGMError, one_line

log = logging.getLogger("dkgm")
STAGING = ".dkgm/staging"  # outputs are written here first, then renamed into place


# ----------------------------------------------------------------------------- atomic outputs


JOURNAL = "publish.json"  # in a staging folder: the outputs to rename into place, written once all are complete


class StagedOutputs:
    """Hand out temporary paths for a stage's outputs and publish them all on success, as one set.

    Publishing writes a journal (the list of outputs, fsynced) before the first rename: a run killed
    between two renames leaves its journal, and the next stage to start (recover_staging) completes
    the renames, so the outputs are never a mix of two runs once any stage runs again. A run killed
    before the journal leaves the old outputs untouched and its staging folder is removed."""

    def __init__(self, root: Path, stage: str):
        self.root = Path(root)
        self.dir = self.root / STAGING / f"{stage}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._pending: dict[Path, Path] = {}
        recover_staging(self.root)

    def path(self, rel: str) -> Path:
        """Where to write the output that will end up at root/rel (parent folders created)."""
        tmp = self.dir / rel
        tmp.parent.mkdir(parents=True, exist_ok=True)
        self._pending[self.root / rel] = tmp
        return tmp

    def publish(self) -> None:
        for final, tmp in self._pending.items():
            if not tmp.exists():
                raise RuntimeError(f"stage declared output {final} but did not write it")
        for tmp in self._pending.values():
            atomic.fsync_tree(tmp)
        rels = [str(final.relative_to(self.root)) for final in self._pending]
        atomic.write_atomic(self.dir / JOURNAL, lambda t: t.write_text(json.dumps(rels)))  # the commit point
        _complete(self.root, self.dir, rels)
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        staging = self.root / STAGING
        if staging.is_dir() and not any(staging.iterdir()):
            try:
                staging.rmdir()
            except OSError:  # another stage's process staged something meanwhile
                pass


def _complete(root: Path, folder: Path, rels: list[str]) -> None:
    """Rename every staged output of a journal that is still in `folder` into place (the ones
    already renamed are gone from it), and remove the old folders a killed rename left aside."""
    for rel in rels:
        tmp, final = folder / rel, root / rel
        if tmp.exists() or tmp.is_symlink():
            atomic.replace(tmp, final)
        for aside in final.parent.glob(f".{final.name}.old-*") if final.parent.is_dir() else ():
            shutil.rmtree(aside, ignore_errors=True)


def recover_staging(root: Path) -> list[str]:
    """Finish or undo what killed runs left in the staging folder (their process is gone): a folder
    with a journal had all its outputs complete, so its renames are completed (roll forward); one
    without is removed (the old outputs were never touched). Returns what was done, one line each."""
    staging = Path(root) / STAGING
    done: list[str] = []
    if not staging.is_dir():
        return done
    for d in sorted(staging.iterdir()):
        name, _, _hex = d.name.rpartition("-")  # <stage>-<pid>-<hex>
        stage_name, _, pid = name.rpartition("-")
        if not d.is_dir() or not pid.isdigit() or atomic.pid_alive(int(pid)):
            continue
        journal = d / JOURNAL
        rels = None
        if journal.is_file():
            try:
                rels = json.loads(journal.read_text())
            except (OSError, ValueError):  # a journal cut short is no commit: nothing was renamed yet
                rels = None
        if isinstance(rels, list):
            _complete(Path(root), d, rels)
            done.append(f"{stage_name}: completed the publishing of {len(rels)} outputs that a killed run began")
        else:
            done.append(f"{stage_name}: removed {d.relative_to(root)}, left by a run that did not finish")
        shutil.rmtree(d, ignore_errors=True)
        log.info("%s", done[-1])
    if not any(staging.iterdir()):
        try:
            staging.rmdir()
        except OSError:
            pass
    return done


@contextmanager
def staged_outputs(root: Path, stage: str) -> Iterator[StagedOutputs]:
    out = StagedOutputs(root, stage)
    try:
        yield out
    except BaseException:
        out.discard()
        raise
    out.publish()


# ----------------------------------------------------------------------------- writers


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=True) + "\n")


def write_metrics(outs: StagedOutputs, rel: str, metrics: dict[str, Any]) -> None:
    """A stage's metrics as two staged files: the results (`rel`, what `dvc metrics diff` compares)
    and, beside it, its timings (seconds, throughputs, device, precision: stages.contract.is_timing),
    so that two identical runs have identical metrics files."""
    from stages.contract import is_timing, timings_path

    metrics = {**metrics, **peak_memory()}
    write_json(outs.path(rel), {k: v for k, v in metrics.items() if not is_timing(k)})
    write_json(outs.path(timings_path(rel)), {k: v for k, v in metrics.items() if is_timing(k)})


def peak_memory() -> dict[str, float]:
    """The process's peak resident memory so far (MiB; each stage runs in its own process), and the
    peak GPU memory torch allocated when CUDA was used. Timings, not results: they vary between
    identical runs."""
    import resource

    peak = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    torch = sys.modules.get("torch")  # a stage that never imported torch used no GPU (and pays nothing to say so)
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_gpu_mib"] = max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**20
    return peak


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise DKGMError(f"{what} not found: {path} (run the stage that produces it first, or `dvc repro`)")


def read_json(path: Path, what: str) -> dict[str, Any]:
    _require_file(path, what)
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DKGMError(f"{what} {path} is not valid JSON ({one_line(exc)}): re-run the stage that wrote it") from None
    if not isinstance(value, dict):
        raise DKGMError(f"{what} {path}: expected a JSON object, found {type(value).__name__}")
    return value


def read_npy(path: Path, what: str, *, dtypes: tuple[str, ...] = (), shape: tuple[int, ...] | None = None,
             count: int | None = None, mmap: bool = False) -> np.ndarray:
    """An .npy artifact, checked: it parses in full (a truncated file is named, not a traceback), its
    dtype is one of `dtypes`, its item shape is `shape`, it holds `count` items, and a float array
    holds no NaN or Inf (checked in blocks, so a memory-mapped array is never read whole)."""
    _require_file(path, what)
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DKGMError(f"{what} {path} is corrupt or truncated ({one_line(exc)}): re-run the stage that wrote it") from None
    if not isinstance(arr, np.ndarray) or arr.ndim < 1:
        raise DKGMError(f"{what} {path}: expected an array of items, found {type(arr).__name__}")
    if dtypes and arr.dtype.name not in dtypes:
        raise DKGMError(f"{what} {path} has dtype {arr.dtype.name}, expected {' or '.join(dtypes)}")
    if shape is not None and tuple(arr.shape[1:]) != tuple(shape):
        raise DKGMError(f"{what} {path} holds items of shape {tuple(arr.shape[1:])}, but its metadata says "
                        f"{tuple(shape)}")
    if count is not None and len(arr) != count:
        raise DKGMError(f"{what} {path} has {len(arr)} items but its manifest lists {count}: re-run the stage "
                        "that wrote it")
    if arr.dtype.kind == "f":
        check_finite(arr, f"{what} {path}")
    return arr


def open_npy(path: Path, dtype: Any, shape: tuple[int, ...]) -> np.memmap:
    """A new .npy file of `shape`, memory-mapped for writing in batches, with its disk space
    reserved first: a full disk is an ENOSPC error here (one line), not a SIGBUS crash when a page
    of a sparse file is written back later."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):  # filesystems without it
            del arr
            raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        os.close(fd)
    return arr


def check_finite(arr: np.ndarray, what: str, block: int = 4096) -> None:
    """Raise one line naming the first item with a NaN or Inf (in blocks of items: no full copy)."""
    for start in range(0, len(arr), block):
        ok = np.isfinite(arr[start:start + block]).reshape(min(block, len(arr) - start), -1).all(axis=1)
        if not ok.all():
            first = start + int(np.argmin(ok))
            bad = int((~np.isfinite(arr[start:])).reshape(len(arr) - start, -1).any(axis=1).sum())
            raise DKGMError(f"{what}: {bad} item(s) hold NaN or Inf, the first at index {first}")


def read_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    """Every array of an .npz artifact, read in full (a truncated or corrupt archive is one line)."""
    import zipfile

    _require_file(path, what)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DKGMError(f"{what} {path} is corrupt or truncated ({one_line(exc)}): re-run the stage that wrote it") from None


def write_parquet(path: Path, columns: dict[str, Any]) -> None:
    import pandas as pd

    pd.DataFrame(columns).to_parquet(path, index=False)


def read_parquet(path: Path, what: str):
    import pandas as pd
    import pyarrow as pa

    _require_file(path, what)
    try:
        return pd.read_parquet(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DKGMError(f"{what} {path} is corrupt or truncated ({one_line(exc)}): re-run the stage that wrote it") from None


# ----------------------------------------------------------------------------- progress


class Progress:
    """A tqdm bar on a terminal; otherwise one log line per `every` seconds (and at the end)."""

    def __init__(self, desc: str, total: int, every: float = 10.0):
        self.desc, self.total, self.every = desc, total, every
        self._bar = None
        self._start = self._last = time.monotonic()
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
        self._done = 0
        self._first: tuple[int, float] | None = None

    def __call__(self, done: int, total: int | None = None, info: str = "") -> None:
        """Report `done` of `total`; `info` (e.g. "loss 0.18") is shown beside the rate."""
        if total is not None:
            self.total = total
        now = time.monotonic()
        if self._first is None:  # the rate counts from the first report (a resumed run starts late)
            self._first = (done, now)
        if self._bar is not None:
            self._bar.total = self.total
            if info:
                self._bar.set_postfix_str(info, refresh=False)
            self._bar.update(done - self._done)
        elif now - self._last >= self.every or done >= self.total:
            first_done, first_time = self._first
            rate = (done - first_done) / (now - first_time) if now > first_time and done > first_done else 0.0
            eta = f"{(self.total - done) / rate:.0f}s" if rate > 0 else "?"
            extra = f", {info}" if info else ""
            log.info("%s: %d/%d (%.1f/s, eta %s%s)", self.desc, done, self.total, rate, eta, extra)
            self._last = now
        self._done = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
