"""Files replaced whole: a reader (or a resume after a kill) sees the old content or the new, never half of it.

Torch-free on purpose: ``mlgcn compare`` and the packer use it without importing torch.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def replaced_atomically(path: Path, mode: str = "w", tmp: Path | None = None) -> Iterator[IO]:
    """A file handle on a temporary file beside ``path`` (``tmp``, or a hidden per-process name) that is flushed to
    disk and renamed over ``path`` when the block ends; on an error ``path`` is untouched and the temporary file
    removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp or path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())  # the rename must not reach the disk before the data does
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_file(path: Path) -> None:
    """Flush a closed file's data to disk (what a library wrote through a handle of its own)."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path``, then every directory from the deepest up: what other code wrote there
    (a library's checkpoint files) is on disk before ``path`` is published by a rename."""
    directories = [path]
    for entry in sorted(path.rglob("*")):
        if entry.is_dir():
            directories.append(entry)
        elif entry.is_file():
            fsync_file(entry)
    for directory in sorted(directories, key=lambda d: len(d.parts), reverse=True):
        fsync_directory(directory)


def fsync_directory(path: Path) -> None:
    """Make the files created and renamed in ``path`` durable: on POSIX a rename reaches the disk with its
    directory, so a crash right after ``os.replace`` could otherwise leave the old name."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        # Some filesystems (certain network and FUSE ones) refuse fsync on a directory: they persist renames by
        # their own rules, and nothing better can be done here.
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str, tmp: Path | None = None) -> None:
    with replaced_atomically(path, "w", tmp) as fh:
        fh.write(text)
