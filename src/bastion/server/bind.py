"""The listening socket, bound before the model loads.

`bastion serve` binds its address first: a port that is taken (or a host that is not
this machine's) then fails in a second with one line naming the flag to change, instead
of after the model has loaded. uvicorn is handed the bound socket, so it never binds on
its own: its bind failure used to end only the HTTP thread (a SystemExit there), leaving
the engine loop on the main thread running and the process deaf to SIGTERM.
"""

from __future__ import annotations

import errno
import socket


class BindError(OSError):
    """The server cannot listen where it was asked to; the message names the flag."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) as uvicorn would bind it (SO_REUSEADDR, IPv6 when
    the host has a colon), not yet listening; BindError says why it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        err = BindError(describe_bind_error(e, host, port))  # str() is the message alone
        err.errno = e.errno
        raise err from None
    sock.set_inheritable(True)
    return sock


def describe_bind_error(e: OSError, host: str, port: int) -> str:
    if isinstance(e, socket.gaierror):
        return f"--host {host!r} is not a known address ({e.strerror or e})"
    if e.errno == errno.EADDRINUSE:
        return f"port {port} is already in use (--port)"
    if e.errno == errno.EACCES:
        return f"port {port}: permission denied (--port; ports below 1024 need privileges)"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"--host {host}: not an address of this machine"
    return f"cannot listen on {host}:{port} (--host/--port): {e.strerror or e}"
