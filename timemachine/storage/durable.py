"""Small blocking helpers for files that must survive a crash whole."""

from __future__ import annotations

import os


def fsync_path(path: str) -> None:
    """fsync a file or a directory by name (a directory: to make renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old file or the new one.

    Write a temporary file, fsync it, rename it over ``path``, fsync the directory.
    """
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def read_if_exists(path: str) -> bytes | None:
    """The bytes of the file at ``path``, or None when there is none."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
