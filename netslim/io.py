"""Atomic file and directory writes: a crash never leaves a half-written output behind.

An existing output is refused unless the caller says overwrite; even then it is replaced only once the new
one is complete, and the old one (file or directory) is moved aside under a temporary name and removed, or
put back if the swap fails, so no stray copy is left either way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from netslim.errors import NetslimError


def refuse_existing(path: Path, overwrite: bool, what: str = "output") -> None:
    """One clear error for an output that exists and may not be replaced (checked before any work)."""
    path = Path(path)
    if path.exists() and not overwrite:
        kind = "directory" if path.is_dir() else "file"
        raise NetslimError(f"{what} {kind} {path} already exists; pass --overwrite to replace it")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def replace_path(new: Path, target: Path) -> None:
    """Move `new` onto `target`, whatever `target` is now (absent, a file or a directory), atomically when both
    are files; a replaced directory is moved aside first and deleted only after the swap succeeded."""
    new, target = Path(new), Path(target)
    if not target.exists() and not target.is_symlink():
        os.replace(new, target)
        return
    if new.is_file() and target.is_file():
        os.replace(new, target)  # atomic for files
        return
    aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old")) / "old"
    restored = True
    try:
        os.replace(target, aside)
        try:
            os.replace(new, target)
        except BaseException:
            restored = False
            os.replace(aside, target)  # put the old output back: nothing lost
            restored = True
            raise
    finally:
        if restored:  # (if even the way back failed, the old output stays aside rather than being deleted)
            _remove(aside)
            with contextlib.suppress(OSError):
                aside.parent.rmdir()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def atomic_dir(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; move it onto `target` only if the block succeeds.

    An existing target (directory or file) is refused unless `overwrite`, and even then replaced only at the
    very end; on any failure the temporary directory is removed and the target is as it was.
    """
    target = Path(target)
    refuse_existing(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    try:
        yield tmp
        replace_path(tmp, target)
    finally:
        _remove(tmp)
