"""Kernel-held file locks: who writes an output, and who unpacks a data folder.

A lock is an advisory flock on a lock file, held by an open descriptor for as long as the owner works. The kernel
releases it when the process ends, however it ends (SIGKILL and a SLURM time limit included), so a lock file
that nobody holds is left over and is taken over at once; its text (pid and host) only names the owner in
messages. The owner removes the lock file before it lets go, and a process that locked a file which was removed
meanwhile locks the new one instead: two processes never both hold one path's lock.

What this assumes of the filesystem: flock that is coherent between the processes that share the folder. On one
machine every local filesystem has it. Between nodes: NFSv4 (and NFSv3 with lockd), where Linux maps flock onto
NFS byte-range locks; Lustre mounted with `-o flock`. Where flock is refused (Lustre's `noflock`, some FUSE
mounts) taking a lock fails with a one-line error rather than risk two writers; Lustre's `-o localflock` keeps
locks per node, which cannot be detected from here: do not share such a folder between nodes' runs."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path

from .errors import UserError

_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open descriptor is still the file at path (its owner may have removed it meanwhile)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


def lock_file(path: Path, *, wait: bool) -> int | None:
    """Hold the flock of the lock file at path (created if absent): its descriptor, with this process named in the
    file; or None when another process holds it and wait is False (wait=True waits for it)."""
    for _ in range(1000):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise UserError(f"cannot write to {path.parent} ({err.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            if err.errno in _UNSUPPORTED:
                raise UserError(f"cannot lock {path}: its filesystem refuses file locks ({err.strerror}); write "
                                "to a local, NFSv4 or flock-mounted Lustre folder") from None
            raise UserError(f"cannot lock {path} ({err.strerror})") from None
        if _same_file(fd, path):
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
            return fd
        os.close(fd)  # its owner removed it after we opened it: lock the file there now
    raise UserError(f"cannot lock {path}: other processes keep replacing it")


def owner_of(path: Path) -> str:
    """Who holds a lock file, as its owner wrote it ("pid P on host H"), for messages."""
    try:
        return path.read_text(errors="replace").strip() or "owner unknown"
    except OSError:
        return "owner unknown"


def unlock_file(path: Path, fd: int) -> None:
    """Remove the lock file, then let go of its lock (in this order: a waiter then sees the file gone)."""
    path.unlink(missing_ok=True)
    os.close(fd)


@contextlib.contextmanager
def exclusive(path: Path):
    """Hold path's lock for the duration, waiting for any other holder first."""
    fd = lock_file(path, wait=True)
    try:
        yield
    finally:
        unlock_file(path, fd)
