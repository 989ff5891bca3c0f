"""Small file helpers over local paths and s3:// / gs:// URIs (pyarrow filesystems), for run-directory files."""

from __future__ import annotations

import os

import pyarrow.fs as pafs

from raydiff.config import is_uri


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if is_uri(base) else os.path.join(base, *parts)


def exists(path: str) -> bool:
    fs, p = _fs(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def makedirs(path: str) -> None:
    fs, p = _fs(path)
    fs.create_dir(p, recursive=True)


def read_text(path: str) -> str:
    fs, p = _fs(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def write_text(path: str, text: str) -> None:
    """Write a whole small file; on object stores the object is replaced at once."""
    write_bytes(path, text.encode())


def upload_dir(local_dir: str, dest: str) -> None:
    """Copy a local directory tree to `dest` (local or URI)."""
    fs, p = _fs(dest)
    fs.create_dir(p, recursive=True)
    pafs.copy_files(local_dir, p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole small binary file (e.g. a sample grid PNG), creating parent directories."""
    fs, p = _fs(path)
    parent = p.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(data)


def is_local(path: str) -> bool:
    return not is_uri(path)


def download_dir(src: str, local_dir: str) -> str:
    """Copy a directory tree (local or URI) to `local_dir`; returns `local_dir`."""
    fs, p = _fs(src)
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(p, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir
