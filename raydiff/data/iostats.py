"""A pyarrow filesystem that counts the bytes read through it: how the data benchmarks and tests measure read
amplification (bytes read per epoch ÷ the split's bytes) on a real source, in any process.

Each process appends ``<bytes>\\t<path>`` lines to its own file under ``sink`` when a file it read is closed, so
Ray tasks on any node of a local cluster report without a coordinator; ``bytes_read(sink)`` sums them.
"""

from __future__ import annotations

import os
import threading

import pyarrow as pa
import pyarrow.fs as pafs


class _CountingFile:
    """A file-like over a pyarrow file that counts what is read from it."""

    def __init__(self, inner, path: str, sink: str) -> None:
        self.inner, self.path, self.sink, self.count = inner, path, sink, 0
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read() if n is None or n < 0 else self.inner.read(n)
        self.count += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.inner.seek(pos, whence)

    def tell(self) -> int:
        return self.inner.tell()

    def size(self) -> int:
        return self.inner.size()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.inner.seekable()

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.inner.close()
            _record(self.sink, self.count, self.path)

    def __del__(self) -> None:  # readers that drop a file without closing it (pyarrow datasets) still count
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to record into
            pass


_LOCK = threading.Lock()


def _record(sink: str, count: int, path: str) -> None:
    os.makedirs(sink, exist_ok=True)
    with _LOCK, open(os.path.join(sink, f"reads-{os.getpid()}.tsv"), "a") as f:
        f.write(f"{count}\t{path}\n")


def bytes_read(sink: str) -> int:
    """Bytes read through every CountingHandler writing to ``sink`` so far (files closed)."""
    if not os.path.isdir(sink):
        return 0
    total = 0
    for name in os.listdir(sink):
        with open(os.path.join(sink, name)) as f:
            total += sum(int(line.split("\t", 1)[0]) for line in f if line.strip())
    return total


def reset(sink: str) -> None:
    for name in os.listdir(sink) if os.path.isdir(sink) else []:
        os.remove(os.path.join(sink, name))


class CountingHandler(pafs.FileSystemHandler):
    """Delegates to ``base``; reads are counted into ``sink`` (a local directory every process can write)."""

    def __init__(self, base: pafs.FileSystem, sink: str) -> None:
        self.base, self.sink = base, sink

    def __reduce__(self):
        return CountingHandler, (self.base, self.sink)

    def __eq__(self, other) -> bool:
        return isinstance(other, CountingHandler) and other.sink == self.sink and other.base.equals(self.base)

    def __ne__(self, other) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return "counting+" + self.base.type_name

    def normalize_path(self, path: str) -> str:
        return self.base.normalize_path(path)

    def get_file_info(self, paths):
        return self.base.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.base.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.base.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.base.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.base.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.base.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self.base.delete_file(path)

    def move(self, src, dest):
        self.base.move(src, dest)

    def copy_file(self, src, dest):
        self.base.copy_file(src, dest)

    def open_input_stream(self, path):
        return pa.PythonFile(_CountingFile(self.base.open_input_stream(path), path, self.sink), mode="r")

    def open_input_file(self, path):
        return pa.PythonFile(_CountingFile(self.base.open_input_file(path), path, self.sink), mode="r")

    def open_output_stream(self, path, metadata):
        return self.base.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.base.open_append_stream(path, metadata=metadata)


def counting_filesystem(base: pafs.FileSystem, sink: str) -> pafs.FileSystem:
    return pafs.PyFileSystem(CountingHandler(base, sink))
