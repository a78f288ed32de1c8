"""Output files: claimed before any work, written atomically, never silently overwritten.

An output is claimed before any work through a kernel-held lock on a lock file beside it (.NAME.lock; locks.py
says what that assumes of the filesystem), until it is written or the process ends; each file appears whole (a
temporary file renamed over it), and a write that fails leaves nothing."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Iterable

from .errors import UserError
from .locks import lock_file, owner_of, unlock_file


def sidecar_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


# Outputs this process has claimed and not yet released: output path (resolved) -> (lock file, its descriptor).
_held_locks: dict[Path, tuple[Path, int]] = {}


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the output folder {folder} ({err.strerror})") from None


def claim_file(path: str | Path, *, what: str | None = None,
               hint: str = "wait for it or choose another --out") -> None:
    """Hold path's lock (locks.lock_file; its folder created) until release_claim, or fail at once if another
    process holds it; a lock file that nobody holds, left by a killed run, is taken over. Claiming an output this
    process holds is a no-op."""
    path = Path(path)
    key = path.resolve()
    if key in _held_locks:
        return
    _make_folder(path.parent)
    lock = lock_path(path)
    fd = lock_file(lock, wait=False)
    if fd is None:
        raise UserError(f"{what or path} is being written by another run ({owner_of(lock)}); {hint}")
    _held_locks[key] = (lock, fd)


def release_claim(path: str | Path) -> None:
    """Let go of a written output's lock (its lock file removed)."""
    held = _held_locks.pop(Path(path).resolve(), None)
    if held:
        unlock_file(*held)


def release_claims() -> None:
    """Let go of every lock this process still holds (a run that ended before writing): cli.run_main calls it on
    every exit path, torchrun's os._exit included."""
    while _held_locks:
        unlock_file(*_held_locks.popitem()[1])


def finished(path: str | Path) -> bool:
    """A checkpoint is finished when its weights and its sidecar (written last) are both there."""
    return Path(path).is_file() and sidecar_path(path).is_file()


def _check_output(path: Path, overwrite: bool, companions: tuple[Path, ...] = ()) -> None:
    """An output checked before any work: no folder or device in its place, its folder created and writable, and
    neither it nor its companion files there unless overwrite."""
    if path.exists() and not path.is_file():
        raise UserError(f"output {path} exists and is not a regular file")
    _make_folder(path.parent)
    if not overwrite and any(p.exists() for p in (path, *companions)):
        raise UserError(f"{path} exists; pass --overwrite to replace it")
    if not os.access(path.parent, os.W_OK):
        raise UserError(f"cannot write to {path.parent}")


def check_output_files(paths: Iterable[str | Path | None], overwrite: bool) -> list[Path]:
    """Report files (JSON, markdown, CSV, PNG) checked and claimed before any work: distinct, absent unless
    overwrite, writable, and no other live run writing them (write_text and save_png release each)."""
    paths = [Path(p) for p in paths if p]
    if len(set(paths)) < len(paths):
        raise UserError(f"two outputs name the same file ({', '.join(map(str, paths))})")
    for path in paths:
        _check_output(path, overwrite)
        claim_file(path)
    return paths


def check_writable(path: str | Path, overwrite: bool) -> Path:
    """Claim an output before any work: a .safetensors name in a writable folder, nothing there yet (unless
    overwrite: even the leftovers of a killed run are kept until asked), and no other live run writing it."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"output {path} must end in .safetensors")
    _check_output(path, overwrite, companions=(sidecar_path(path),))
    claim_file(path)
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
    except OSError as err:  # a full disk, a file-size limit, a folder made read-only meanwhile
        raise UserError(f"cannot write {path} ({err.strerror or err}); nothing was written there") from None
    finally:
        tmp.unlink(missing_ok=True)


def save_png(fig, path: Path) -> None:
    """Write a matplotlib figure as a PNG (atomically, creating its folder) and close it."""
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    release_claim(path)


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
    release_claim(path)
