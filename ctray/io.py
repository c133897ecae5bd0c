"""Run-directory I/O for local paths and ``s3://`` / ``gs://`` URIs (pyarrow filesystems, credentials
from the environment)."""

from __future__ import annotations

import io
import json
import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def is_remote(path: str) -> bool:
    return "://" in path


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


def _fs(path: str) -> tuple[Any, str]:
    from pyarrow import fs as pafs

    if is_remote(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def makedirs(path: str) -> None:
    fs, p = _fs(path)
    fs.create_dir(p, recursive=True)


def exists(path: str) -> bool:
    from pyarrow import fs as pafs

    fs, p = _fs(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def write_bytes(path: str, data: bytes) -> None:
    fs, p = _fs(path)
    parent = p.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(data)


def read_bytes(path: str) -> bytes:
    fs, p = _fs(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_json(path: str, obj: Any) -> None:
    write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path).decode())


def write_parquet(path: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(path, buf.getvalue())


def read_parquet(path: str) -> pa.Table:
    return pq.read_table(io.BytesIO(read_bytes(path)))


def remove(path: str) -> None:
    """Delete one file (local or object)."""
    fs, p = _fs(path)
    fs.delete_file(p)
