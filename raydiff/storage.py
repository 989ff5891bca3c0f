"""Small file helpers over local paths and s3:// / gs:// URIs (pyarrow filesystems), for run-directory files."""

from __future__ import annotations

import os

import pyarrow.fs as pafs

from raydiff.config import is_uri


def _s3_options() -> dict:
    """S3 settings from the usual AWS variables, resolved here so they travel inside the pickled filesystem.

    Ray tasks and actors started before these variables were set (a long-lived cluster) do not see them, and
    pyarrow only pickles settings passed explicitly.
    """
    env, opts = os.environ, {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, sep, host = endpoint.partition("://")
        if sep:
            opts.update(endpoint_override=host.rstrip("/"), scheme=scheme)
        else:
            opts.update(endpoint_override=endpoint)
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        opts.update(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"])
        if env.get("AWS_SESSION_TOKEN"):
            opts["session_token"] = env["AWS_SESSION_TOKEN"]
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        opts["region"] = region
    return opts


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or an s3:// / gs:// URI."""
    if path.startswith("s3://"):
        return pafs.S3FileSystem(**_s3_options()), path[len("s3://"):].rstrip("/")
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


_fs = filesystem

CLOUD_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_")


def cloud_env() -> dict[str, str]:
    """The object-store variables of this process, for Ray workers of a cluster started before they were set."""
    return {k: v for k, v in os.environ.items() if k.startswith(CLOUD_ENV_PREFIXES)}


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if is_uri(base) else os.path.join(base, *parts)


def exists(path: str) -> bool:
    fs, p = _fs(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def makedirs(path: str) -> None:
    fs, p = _fs(path)
    fs.create_dir(p, recursive=True)


def read_bytes(path: str) -> bytes:
    fs, p = _fs(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def write_text(path: str, text: str) -> None:
    """Write a whole small file; on object stores the object is replaced at once."""
    write_bytes(path, text.encode())


def upload_dir(local_dir: str, dest: str) -> None:
    """Copy a local directory tree to `dest` (local or URI)."""
    fs, p = _fs(dest)
    fs.create_dir(p, recursive=True)
    pafs.copy_files(local_dir, p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole small binary file (e.g. a sample grid PNG), creating parent directories.

    Readers never see half a file: a local file is written beside its place and renamed over it (a run killed
    mid-write keeps the old one); an object store publishes an object only when its upload completes.
    """
    fs, p = _fs(path)
    parent = p.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    target = f"{p}.partial-{os.getpid()}" if is_local(path) else p
    with fs.open_output_stream(target) as f:
        f.write(data)
    if target != p:
        fs.move(target, p)


def is_local(path: str) -> bool:
    return not is_uri(path)


def download_dir(src: str, local_dir: str) -> str:
    """Copy a directory tree (local or URI) to `local_dir`; returns `local_dir`."""
    fs, p = _fs(src)
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(p, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir
