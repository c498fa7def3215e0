"""Where stages read and write: a local path or a URI (file://, s3://, gs://, ...), through pyarrow.fs.

A location is a plain string. A local path stays a path and a `file://` URI becomes its local path, so
local runs keep working with ordinary files; any other URI stays a URI and is served by the pyarrow
filesystem of its scheme (credentials and region come from the usual environment, e.g. AWS_* or
GOOGLE_APPLICATION_CREDENTIALS; options such as `?region=` or `?endpoint_override=` ride on the URI).
Writes are atomic: a reader sees a file whole or not at all (locally a temporary file is renamed into
place; an object-store object appears only when its upload completes). No Ray here.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dreamdiff.errors import DreamdiffError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
REMOTE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def scheme(location: str | Path) -> str | None:
    """The URI scheme of `location` ('s3', 'file', ...), or None for a plain path."""
    match = _SCHEME.match(str(location))
    return match.group(1).lower() if match else None


def is_remote(location: str | Path) -> bool:
    """True for a URI that is not file:// (an object store or HDFS)."""
    return scheme(location) not in (None, "file")


def normalise(location: str | Path) -> str:
    """A file:// URI as its local path; anything else unchanged, as a string."""
    text = str(location)
    if scheme(text) == "file":
        return pafs.FileSystem.from_uri(text)[1]
    return text


def absolute(location: str | Path) -> str:
    """A local location made absolute (workers and jobs may run elsewhere); a remote URI unchanged."""
    text = normalise(location)
    return text if is_remote(text) else str(Path(text).resolve())


def join(location: str | Path, *parts: str) -> str:
    """`location`/part/...: paths through pathlib; URIs keep their scheme, bucket and ?options."""
    text = normalise(location)
    if not is_remote(text):
        return str(Path(text).joinpath(*parts))
    base, _, query = text.partition("?")
    joined = "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return f"{joined}?{query}" if query else joined


def parent(location: str | Path) -> str:
    """The folder holding `location` (a URI keeps its ?options)."""
    text = normalise(location)
    if not is_remote(text):
        return str(Path(text).parent)
    base, _, query = text.partition("?")
    folder = base.rstrip("/").rsplit("/", 1)[0]
    return f"{folder}?{query}" if query else folder


@functools.lru_cache(maxsize=16)
def _remote_filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """One filesystem per scheme://authority?options (S3 looks its bucket's region up once, not per file)."""
    try:
        return pafs.FileSystem.from_uri(root)
    except (pa.ArrowException, ValueError, OSError) as err:
        raise DreamdiffError(f"storage: cannot open {root} ({err})") from None


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem that serves `location`, and the path within it."""
    text = normalise(location)
    if not is_remote(text):
        return pafs.LocalFileSystem(), str(Path(text).resolve())
    parts = urlsplit(text)
    root = f"{parts.scheme}://{parts.netloc}" + (f"?{parts.query}" if parts.query else "")
    fs, root_path = _remote_filesystem(root)
    path = parts.path.strip("/")
    return fs, (f"{root_path.rstrip('/')}/{path}" if path else root_path)


def exists(location: str | Path) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str | Path) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def size(location: str | Path) -> int:
    fs, path = resolve(location)
    return fs.get_file_info(path).size


def read_bytes(location: str | Path) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode()


def makedirs(location: str | Path) -> None:
    fs, path = resolve(location)
    fs.create_dir(path, recursive=True)


def remove_tree(location: str | Path) -> None:
    """Delete a folder and everything below it; a missing one is fine."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


#: the temporary name `atomic_write` gives a file while it is written (`name`: the file's own name)
ATOMIC_TEMP = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{12}\.tmp$")


def sha256_of(*paths: str | Path) -> str:
    """The sha256 (hex) of the local files' bytes, one after the other, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp_path), then rename the finished file over the local `path` (same folder, same filesystem):
    a killed writer never leaves a partial file under the real name."""
    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{Path(path).name}.{uuid.uuid4().hex[:12]}.tmp"  # created by `write`: the usual permissions
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _parent_dirs(fs: pafs.FileSystem, path: str) -> None:
    """Hierarchical filesystems (HDFS) need the folder first; object stores take it as a no-op marker."""
    folder = path.rstrip("/").rsplit("/", 1)[0]
    if folder and folder != path:
        fs.create_dir(folder, recursive=True)


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write a whole file atomically."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
        return
    _parent_dirs(fs, path)
    with fs.open_output_stream(path) as f:  # an object is visible only once its upload completes
        f.write(data)


def write_text(location: str | Path, text: str) -> None:
    write_bytes(location, text.encode())


def write_parquet(table: pa.Table, location: str | Path, **options: Any) -> int:
    """Write `table` as one Parquet file, atomically; returns its size in bytes."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        atomic_write(path, lambda tmp: pq.write_table(table, tmp, **options))
    else:
        _parent_dirs(fs, path)
        pq.write_table(table, path, filesystem=fs, **options)
    return fs.get_file_info(path).size


def read_parquet(location: str | Path, columns: list[str] | None = None) -> pa.Table:
    fs, path = resolve(location)
    return pq.read_table(path, columns=columns, filesystem=fs)


def parquet_rows(locations: list[str]) -> list[int]:
    """Row counts of Parquet files, from their footers (read in parallel: object stores are slow per request)."""

    def rows(location: str) -> int:
        fs, path = resolve(location)
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata.num_rows

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(rows, locations))


def find(location: str | Path, filename: str) -> list[str]:
    """Locations of every file called `filename` below `location`, sorted; none if it does not exist."""
    fs, base = resolve(location)
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    found = []
    for info in fs.get_file_info(selector):
        if info.type == pafs.FileType.File and info.base_name == filename:
            found.append(join(location, info.path[len(base) :].lstrip("/")))
    return sorted(found, key=lambda location: location.split("/"))  # folder by folder, as pathlib sorts


def copy_tree(source: str | Path, destination: str | Path) -> None:
    """Copy a folder's files to another location (e.g. a local staging folder up to an object store)."""
    src_fs, src = resolve(source)
    dst_fs, dst = resolve(destination)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)


def require_local(location: str | None, field: str) -> str | None:
    """`location` as a local path; a remote URI fails naming `field` (for code that needs real files)."""
    if location is None:
        return None
    if is_remote(location):
        raise DreamdiffError(f"{field}: must be a local or shared-filesystem path here, got the URI {location}")
    return normalise(location)


class LocalStaging:
    """A local folder standing in for a run folder: the folder itself when local, else a temporary one whose
    files `sync()` copies up. For writers that need real files (plots, appends to a log, safetensors)."""

    def __init__(self, location: str | Path, pull: tuple[str, ...] = ()) -> None:
        self.location = absolute(location)
        self.remote = is_remote(self.location)
        self.path = Path(tempfile.mkdtemp(prefix="dreamdiff-staging-")) if self.remote else Path(self.location)
        self.path.mkdir(parents=True, exist_ok=True)
        for name in pull if self.remote else ():  # files this run continues (e.g. a metrics log)
            if is_file(join(self.location, name)):
                (self.path / name).write_bytes(read_bytes(join(self.location, name)))

    def sync(self) -> None:
        if self.remote:
            copy_tree(self.path, self.location)

    def close(self) -> None:
        self.sync()
        if self.remote:
            shutil.rmtree(self.path, ignore_errors=True)
