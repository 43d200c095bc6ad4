"""Atomic file replacement: a reader sees the old file or the new one, never a partial one.

The one helper every writer in the project uses (training states, stage outputs, the compare and
ablation reports): write next to the target, fsync the data, rename over the target, fsync the
folder so that the rename itself survives a power cut.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename into it) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync a file, or every file and folder under a folder."""
    if path.is_dir():
        for sub, _, files in os.walk(path):
            for name in files:
                _fsync_file(Path(sub) / name)
            fsync_dir(Path(sub))
    else:
        _fsync_file(path)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (ours, or another user's)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temporary files that write_atomic calls killed mid-write left in `folder`
    (`.<name>.<pid>.<hex>.tmp` whose process is gone); returns what was removed."""
    removed = []
    if not Path(folder).is_dir():
        return removed
    for p in Path(folder).glob(".*.tmp"):
        parts = p.name.rsplit(".", 3)  # ['.<name>', '<pid>', '<hex>', 'tmp']
        if len(parts) == 4 and parts[1].isdigit() and not pid_alive(int(parts[1])):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def replace(tmp: Path, final: Path) -> None:
    """Move a finished file or folder `tmp` to `final` (same filesystem), replacing what is there.

    A file replaces a file in one atomic rename. A folder cannot be renamed over a non-empty one,
    so the old folder is first renamed aside, then removed: `final` is never a mix of both."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    final.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if final.is_dir() and not final.is_symlink():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    elif tmp.is_dir() and (final.exists() or final.is_symlink()):
        final.unlink()
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` to fill a temporary file beside `path`, then move it into place.

    On any exception the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
