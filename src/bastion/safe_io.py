"""Reading files that someone else supplied (adapters, model paths), without hanging.

A path can name a device (/dev/zero never ends), a FIFO (blocks until a writer comes) or
a socket; reading one from a server thread would wedge it, and SIGTERM could no longer
stop the process. Everything that reads untrusted paths opens them through here.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def open_regular(path: Path | str, max_bytes: int | None = None):
    """Open a regular file for reading, or raise OSError: a device, FIFO or socket (or a
    symlink to one) must never be read, because /dev/zero never ends and a FIFO without
    a writer blocks forever. O_NONBLOCK makes opening a FIFO return at once, and the type
    is checked on the opened descriptor, so a file swapped after a stat() cannot slip by."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a device, FIFO or socket)", str(path))
        if max_bytes is not None and st.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"{st.st_size} bytes is over the limit of {max_bytes}", str(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: Path | str, max_bytes: int) -> bytes:
    """A whole regular file of at most max_bytes (OSError otherwise)."""
    with open_regular(path, max_bytes) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # it grew since the check
        raise OSError(errno.EFBIG, f"over the limit of {max_bytes} bytes", str(path))
    return data
