"""Paths that may be URIs (``file:///…``, ``s3://…``): run directories and logs go through pyarrow.fs,
so the same code writes to a local disk or to storage shared by a cluster."""

from __future__ import annotations

import os

import pyarrow.fs as pafs


def resolve(path_or_uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if "://" in path_or_uri:
        return pafs.FileSystem.from_uri(path_or_uri)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path_or_uri))


def absolute(path_or_uri: str) -> str:
    """A relative local path made absolute (against the working directory); a URI, an absolute path or one from
    ``~`` unchanged: a setting that names a file means that file in every process, whatever its working directory."""
    if "://" in path_or_uri or path_or_uri.startswith("~") or os.path.isabs(path_or_uri):
        return path_or_uri
    return os.path.abspath(path_or_uri)


def local_path(path_or_uri: str) -> str | None:
    """The path on this machine's file system of a local path or a ``file://`` URI; None for any other URI."""
    if "://" not in path_or_uri:
        return os.path.abspath(os.path.expanduser(path_or_uri))
    return path_or_uri[len("file://"):] if path_or_uri.startswith("file://") else None


def join(base: str, *parts: str) -> str:
    """Join path parts onto a path or URI."""
    return "/".join([base.rstrip("/"), *parts]) if "://" in base else os.path.join(base, *parts)


def makedirs(path_or_uri: str) -> None:
    fs, path = resolve(path_or_uri)
    fs.create_dir(path, recursive=True)


def write_text(path_or_uri: str, text: str) -> None:
    fs, path = resolve(path_or_uri)
    with fs.open_output_stream(path) as out:
        out.write(text.encode())


def read_text(path_or_uri: str) -> str:
    fs, path = resolve(path_or_uri)
    with fs.open_input_stream(path) as src:
        return src.read().decode()


def exists(path_or_uri: str) -> bool:
    fs, path = resolve(path_or_uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_bytes(path_or_uri: str, blob: bytes) -> None:
    fs, path = resolve(path_or_uri)
    with fs.open_output_stream(path) as out:
        out.write(blob)


def listdir(path_or_uri: str) -> list[str]:
    """Names of the entries directly inside a directory (empty if it does not exist), sorted."""
    fs, path = resolve(path_or_uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    return sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(path)))


def remove_tree(path_or_uri: str) -> None:
    """Delete a directory and everything in it (nothing if it does not exist)."""
    fs, path = resolve(path_or_uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def remove(path_or_uri: str) -> None:
    """Delete a file (nothing if it does not exist)."""
    fs, path = resolve(path_or_uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)
