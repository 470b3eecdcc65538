"""The rendezvous port: one that two jobs on the same node cannot both pick.

Jobs of different users can share a node (and its rendezvous host), so a fixed 29500 collides. The driver
starts from a port derived from the job id (spread over 20000-31999, below Linux's ephemeral range, so the
kernel does not hand it to some client meanwhile) and takes the first one that it can both **lock** — an
``flock`` on ``/tmp/keizoku-ports/PORT.lock``, held for the whole job by the driver process — and **bind**
(so a port held by any other program is skipped too). A second keizoku job on the node cannot take a port
whose lock the first still holds, whatever its job id; the lock goes away with the driver, even on SIGKILL.

Standard library only, Python >= 3.8 (see ``driver``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import zlib
from typing import Optional, Tuple

PORT_LOW, PORT_SPAN = 20000, 12000
DEFAULT_LOCK_DIR = "/tmp/keizoku-ports"  # node-local; KEIZOKU_PORT_LOCK_DIR overrides


class PortError(RuntimeError):
    pass


def first_candidate(job_id: str) -> int:
    return PORT_LOW + zlib.crc32(job_id.encode()) % PORT_SPAN


def pick_port(job_id: str, lock_dir: Optional[str] = None, tries: int = 200) -> Tuple[int, int]:
    """(port, lock fd). Keep the fd open for as long as the port is in use; closing it frees the port."""
    lock_dir = lock_dir or os.environ.get("KEIZOKU_PORT_LOCK_DIR") or DEFAULT_LOCK_DIR
    os.makedirs(lock_dir, exist_ok=True)
    try:
        os.chmod(lock_dir, 0o1777)  # shared by every user's jobs on the node, like /tmp
    except OSError:
        pass  # another user's directory: it is already shared
    start = first_candidate(job_id) - PORT_LOW
    for i in range(tries):
        port = PORT_LOW + (start + i) % PORT_SPAN
        fd = _lock(os.path.join(lock_dir, f"{port}.lock"))
        if fd is None:
            continue
        if _bindable(port):
            return port, fd
        os.close(fd)
    raise PortError(f"no free rendezvous port among {tries} tried from {PORT_LOW + start} "
                    f"(locks in {lock_dir})")


def _lock(path: str) -> Optional[int]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)  # another user's lock file: flock works on a read-only fd too
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def _bindable(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not block a listener
        s.bind(("", port))
        return True
    except OSError:
        return False
    finally:
        s.close()
