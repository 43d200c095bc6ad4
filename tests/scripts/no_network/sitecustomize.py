"""Loaded by every Python process whose PYTHONPATH starts with this folder: sockets may connect
to loopback and Unix sockets only (a local Prefect server is fine, the internet is not). Each
refused attempt is appended to $DKGM_NET_LOG (so a test sees attempts even where the caller
swallows the error) and raises OSError(ENETUNREACH)."""

import errno
import ipaddress
import os
import socket
import traceback

_real_connect, _real_connect_ex = socket.socket.connect, socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


def _local(host) -> bool:
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _refuse(what: str) -> OSError:
    log = os.environ.get("DKGM_NET_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {what}\n{''.join(traceback.format_stack(limit=8))}\n")
    return OSError(errno.ENETUNREACH, f"network blocked by the test: {what}")


def _check(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
        raise _refuse(f"connect {address!r}")


def connect(self, address):
    _check(self, address)
    return _real_connect(self, address)


def connect_ex(self, address):
    _check(self, address)
    return _real_connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if not _local(host if not isinstance(host, bytes) else host.decode()):
        raise socket.gaierror(socket.EAI_NONAME, str(_refuse(f"resolve {host!r}")))
    return _real_getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
