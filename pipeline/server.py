"""One local Prefect server for a whole run: `python -m pipeline serve -- dvc repro`.

Without a server every stage process starts Prefect's temporary one (about 10 s each on 2 cores).
`serve` starts `prefect server start` once, on loopback and a free port, waits until its health
endpoint answers, runs the command with PREFECT_API_URL pointing at it (so every stage reports its
flow run there, and the runs can be looked at in the UI while the server is up), and stops the
server when the command ends, also when it fails or is interrupted. The server's database is the
project's (`prefect.toml`: home `.prefect/`), so the runs stay listed for a later server.

Nothing is started when PREFECT_API_URL is already set (a server of the user's own, or a work
pool's) or when DKGM_NO_PREFECT=1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from dkgm.errors import DKGMError

HOST = "127.0.0.1"  # loopback only: nothing outside this machine can reach the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:  # loopback only (HOST)
            return r.status == 200
    except OSError:
        return False


def _prefect_exe() -> str:
    exe = Path(sys.executable).parent / "prefect"
    found = str(exe) if exe.is_file() else shutil.which("prefect")
    if found is None:
        raise DKGMError("serve: the `prefect` command is not installed in this environment (`make setup` installs it)")
    return found


def start_server(root: Path, timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """Start the server; return (process, API URL) once it answers."""
    port = free_port()
    url = f"http://{HOST}:{port}/api"
    log_path = root / ".prefect" / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([_prefect_exe(), "server", "start", "--host", HOST, "--port", str(port),
                                 "--no-scheduler", "--no-late-runs", "--analytics-off"],
                                cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not _healthy(url):
        if proc.poll() is not None:
            tail = " | ".join(log_path.read_text().strip().splitlines()[-3:])
            raise DKGMError(f"serve: the Prefect server exited ({proc.returncode}) before it answered: {tail} "
                            f"(log: {log_path})")
        if time.monotonic() > deadline:
            stop_server(proc)
            raise DKGMError(f"serve: the Prefect server did not answer within {timeout:.0f} s (log: {log_path})")
        time.sleep(0.25)
    return proc, url


def stop_server(proc: subprocess.Popen, grace: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its workers
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_with_server(cmd: list[str], root: Path) -> int:
    """Run `cmd` with one Prefect server up for its whole duration; its exit status."""
    if not cmd:
        raise DKGMError("serve needs a command after --, e.g. `python -m pipeline serve -- dvc repro`")
    if os.environ.get("PREFECT_API_URL") or os.environ.get("DKGM_NO_PREFECT", "") not in ("", "0"):
        return subprocess.call(cmd)
    t0 = time.perf_counter()
    proc, url = start_server(root)
    print(f"serve: Prefect server at {url.removesuffix('/api')} (started in {time.perf_counter() - t0:.1f} s; "
          f"log .prefect/server.log); running: {' '.join(cmd)}", file=sys.stderr)
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return subprocess.call(cmd, env={**os.environ, "PREFECT_API_URL": url})
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_server(proc)
        print("serve: Prefect server stopped", file=sys.stderr)
