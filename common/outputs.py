"""Output files: claimed before any work, written atomically, never silently overwritten.

A checkpoint's path is claimed by a lock file beside it (.NAME.safetensors.lock, holding the owner's pid) from
check_writable until its sidecar is written; each file appears whole (a temporary file renamed over it)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable
from typing import Iterable


from .errors import UserError


def sidecar_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


_held_locks: set[Path] = set()  # lock files this process created and has not yet released


def release_claims() -> None:
    """Remove the lock files this process still holds (a run that ended before saving): cli.run_main calls it on
    every exit path, torchrun's os._exit included."""
    while _held_locks:
        _held_locks.pop().unlink(missing_ok=True)


def release_claim(path: Path) -> None:
    """Remove the lock of a finished output."""
    lock = lock_path(path)
    lock.unlink(missing_ok=True)
    _held_locks.discard(lock)


def _claim(path: Path) -> None:
    """Take path's lock file, or fail if a live process holds it; a dead process's lock is taken over.

    The lock appears with its owner's pid already in it (a hard link of a finished temp file: create-or-fail)."""
    lock = lock_path(path)
    mine = lock.with_name(f"{lock.name}.{os.getpid()}")
    try:
        mine.write_text(str(os.getpid()))
        for _ in range(2):
            try:
                os.link(mine, lock)
            except FileExistsError:
                try:
                    pid = int(lock.read_text())
                except (OSError, ValueError):
                    pid = 0
                if pid == os.getpid():
                    return
                if pid and _alive(pid):
                    raise UserError(f"{path} is being written by another run (pid {pid}); wait for it or "
                                    "choose another --out") from None
                lock.unlink(missing_ok=True)  # left by a run that died: take it over
                continue
            _held_locks.add(lock)
            return
    except OSError as err:
        raise UserError(f"cannot write to {path.parent} ({err.strerror})") from None
    finally:
        mine.unlink(missing_ok=True)
    raise UserError(f"cannot claim {path}: another run keeps taking its lock {lock}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def finished(path: str | Path) -> bool:
    """A checkpoint is finished when its weights and its sidecar (written last) are both there."""
    return Path(path).is_file() and sidecar_path(path).is_file()


def _check_output(path: Path, overwrite: bool, companions: tuple[Path, ...] = ()) -> None:
    """An output checked before any work: no folder or device in its place, its folder created and writable, and
    neither it nor its companion files there unless overwrite."""
    if path.exists() and not path.is_file():
        raise UserError(f"output {path} exists and is not a regular file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the output folder {path.parent} ({err.strerror})") from None
    if not overwrite and any(p.exists() for p in (path, *companions)):
        raise UserError(f"{path} exists; pass --overwrite to replace it")
    if not os.access(path.parent, os.W_OK):
        raise UserError(f"cannot write to {path.parent}")


def check_output_files(paths: Iterable[str | Path | None], overwrite: bool) -> list[Path]:
    """Report files (JSON, markdown, CSV) checked before any work: distinct, absent unless overwrite, writable."""
    paths = [Path(p) for p in paths if p]
    if len(set(paths)) < len(paths):
        raise UserError(f"two outputs name the same file ({', '.join(map(str, paths))})")
    for path in paths:
        _check_output(path, overwrite)
    return paths


def check_writable(path: str | Path, overwrite: bool) -> Path:
    """Claim an output before any work: a .safetensors name in a writable folder, nothing there yet (unless
    overwrite: even the leftovers of a killed run are kept until asked), and no other live run writing it."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"output {path} must end in .safetensors")
    _check_output(path, overwrite, companions=(sidecar_path(path),))
    _claim(path)
    return path


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) to a temporary file beside path, then rename it over path: readers never see half a file.
    The file gets the mode open() would give it (safetensors creates its files readable by their owner only)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb"):  # the kernel applies the umask (and any default ACL) to a new file: read it back
            pass
        mode = os.stat(tmp).st_mode & 0o777
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_png(fig, path: Path) -> None:
    """Write a matplotlib figure as a PNG (atomically, creating its folder) and close it."""
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_text(path: Path, text: str) -> None:
    """Write text to path atomically, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(text))
