"""Where artifacts live: a local path or an object-store URI (``s3://bucket/key``, ``gs://bucket/key``), read
and written through ``pyarrow.fs``, so every job can be given either.

Locations are plain strings. A local one is made absolute (``~`` expanded); a URI keeps its scheme and any
query (``s3://b/p?endpoint_override=host:9000&scheme=http``: pyarrow's options, for MinIO and the like), and
``join`` adds path parts before the query. Credentials and endpoints come from where pyarrow and Ray look:
the ``AWS_*`` environment variables (``AWS_ENDPOINT_URL`` included), the instance's role, ``gcloud``'s login.

**Atomic writes.** A reader must never see half a file: resume logic treats a file that exists as done.
- Local: written to a temporary name in the same folder, then renamed (``os.replace``). A killed writer leaves
  a ``.tmp-*`` file, which ``remove_temporaries`` clears.
- Object stores: rename is a copy plus a delete there, neither atomic nor cheap, so there is no temporary
  object. The whole file is made in memory first, then sent in one upload: an S3/GCS object appears only when
  its upload completes (a single PUT, or the completion call of a multipart upload), whole, or not at all. A
  writer killed mid-upload leaves no object (only an incomplete multipart upload, invisible to readers and
  removed by a bucket's abort-incomplete-uploads lifecycle rule). S3 and GCS give read-after-write and
  list-after-write consistency, so a resumed run sees every object a killed one completed.
  Note pyarrow's output streams complete the upload when closed, even after an error inside a ``with`` block:
  code here never streams into a final key; it always writes a complete buffer.

**Reading trees that libraries want on disk** (a token system's encoder folders, a checkpoint for
``safetensors``): ``local_copy`` downloads a folder once into a cache on the node (``MUSICLM_CACHE``, default
``~/.cache/musiclm/remote``), keyed by the URI, marked complete only after every file arrived.
"""
from __future__ import annotations

import fnmatch
import functools
import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

TEMP_PREFIX = ".tmp-"
_LOCAL_SCHEMES = ("", "file")


class StorageError(OSError):
    """A location cannot be read or written (no such bucket, no permission, not a folder)."""


def is_remote(loc: str | os.PathLike) -> bool:
    """True for a URI of a remote filesystem (``s3://``, ``gs://``, ...); a local path or ``file://`` is not."""
    s = str(loc)
    return "://" in s and urlsplit(s).scheme not in _LOCAL_SCHEMES


def location(loc: str | os.PathLike) -> str:
    """The canonical form: an absolute local path, or the URI as given (trailing slash dropped)."""
    s = str(loc)
    if s.startswith("file://"):
        s = urlsplit(s).path
    if not is_remote(s):
        return str(Path(s).expanduser().resolve())
    base, query = _split_query(s)
    return base.rstrip("/") + query


def join(loc: str | os.PathLike, *parts: str) -> str:
    """``loc`` with ``parts`` appended (before a URI's query)."""
    if not is_remote(loc):
        return str(Path(location(loc)).joinpath(*parts))
    base, query = _split_query(str(loc))
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)]) + query


def name(loc: str | os.PathLike) -> str:
    return _split_query(str(loc))[0].rstrip("/").rsplit("/", 1)[-1]


def parent(loc: str | os.PathLike) -> str:
    if not is_remote(loc):
        return str(Path(location(loc)).parent)
    base, query = _split_query(str(loc))
    return base.rstrip("/").rsplit("/", 1)[0] + query


def resolve(loc: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it (``bucket/key`` for object stores)."""
    s = location(loc)
    if not is_remote(s):
        return pafs.LocalFileSystem(), s
    base, query = _split_query(s)
    scheme, rest = base.split("://", 1)
    bucket = rest.split("/", 1)[0]
    fs = _filesystem(f"{scheme}://{bucket}{query}")
    return fs, rest.rstrip("/")


@functools.lru_cache(maxsize=16)
def _filesystem(root_uri: str) -> pafs.FileSystem:
    try:
        return pafs.FileSystem.from_uri(root_uri)[0]
    except (ValueError, OSError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise StorageError(f"cannot open {root_uri}: {e}") from None


def _split_query(s: str) -> tuple[str, str]:
    i = s.find("?")
    return (s, "") if i < 0 else (s[:i], s[i:])


def _info(loc) -> pafs.FileInfo:
    fs, path = resolve(loc)
    return fs.get_file_info(path)


def exists(loc) -> bool:
    return _info(loc).type != pafs.FileType.NotFound


def is_file(loc) -> bool:
    return _info(loc).type == pafs.FileType.File


def size(loc) -> int:
    return _info(loc).size


def read_bytes(loc) -> bytes:
    fs, path = resolve(loc)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        if _info(loc).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{loc} does not exist") from None
        raise StorageError(f"cannot read {loc}: {e}") from None


def read_text(loc) -> str:
    return read_bytes(loc).decode("utf-8")


def read_json(loc):
    return json.loads(read_text(loc))


def write_bytes(loc, data: bytes) -> None:
    """Write ``data`` to ``loc`` atomically (see the module's docstring), making parent folders as needed."""
    s = location(loc)
    if not is_remote(s):
        path = Path(s)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex}-{path.name}"
            try:
                tmp.write_bytes(data)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(f"cannot write {path}: {e.strerror or e}. Check that the folder is writable and "
                               f"its disk has room; files written before this one are intact.") from None
        return
    fs, path = resolve(s)
    try:
        stream = fs.open_output_stream(path)
        stream.write(data)  # into the stream's memory: the upload starts (or, when large, completes) at close
        stream.close()
    except OSError as e:
        raise StorageError(f"cannot write {s}: {e}. Check the bucket exists and the credentials may write to it; "
                           f"objects written before this one are intact.") from None


def write_text(loc, text: str) -> None:
    write_bytes(loc, text.encode("utf-8"))


def write_json(loc, data) -> None:
    write_text(loc, json.dumps(data, indent=2) + "\n")


def make_dirs(loc) -> None:
    """Make a local folder (object stores have no folders: nothing to do)."""
    if not is_remote(loc):
        Path(location(loc)).mkdir(parents=True, exist_ok=True)


def list_files(loc, pattern: str = "*", recursive: bool = False) -> list[str]:
    """Files directly in folder ``loc`` (or below it) whose name matches ``pattern``, sorted, as locations."""
    fs, path = resolve(loc)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    except NotADirectoryError:
        return []
    base = location(loc)
    return sorted(join(base, i.path[len(path):].lstrip("/")) for i in infos
                  if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, pattern))


def list_dirs(loc, pattern: str = "*") -> list[str]:
    """Sub-folders of ``loc`` whose name matches ``pattern``, sorted, as locations."""
    fs, path = resolve(loc)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except NotADirectoryError:
        return []
    return sorted(join(location(loc), i.base_name) for i in infos
                  if i.type == pafs.FileType.Directory and fnmatch.fnmatch(i.base_name, pattern))


def is_empty_dir(loc) -> bool:
    """No file or folder under ``loc`` (true when ``loc`` does not exist)."""
    fs, path = resolve(loc)
    try:
        return not fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except NotADirectoryError:
        return False


def delete(loc) -> None:
    fs, path = resolve(loc)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def remove_temporaries(loc) -> int:
    """Remove ``.tmp-*`` files a killed writer left directly in folder ``loc``; how many there were. Object stores
    never have any (nothing is written under a temporary name there)."""
    if is_remote(loc):
        return 0
    found = list(Path(location(loc)).glob(TEMP_PREFIX + "*"))
    for f in found:
        f.unlink(missing_ok=True)
    return len(found)


def upload_dir(local_dir: str | Path, loc: str) -> list[str]:
    """Copy every file under ``local_dir`` to ``loc`` (each write atomic); returns the locations written."""
    written = []
    for f in sorted(Path(local_dir).rglob("*")):
        if f.is_file():
            dest = join(loc, *f.relative_to(local_dir).parts)
            write_bytes(dest, f.read_bytes())
            written.append(dest)
    return written


def download_dir(loc: str, local_dir: str | Path, pattern: str = "*") -> list[Path]:
    """Copy the files under ``loc`` whose name matches ``pattern`` into ``local_dir``, keeping sub-folders."""
    fs, path = resolve(loc)
    out = []
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type != pafs.FileType.File or not fnmatch.fnmatch(info.base_name, pattern):
            continue
        dest = Path(local_dir, *info.path[len(path):].strip("/").split("/"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as src, open(dest, "wb") as f:
            shutil.copyfileobj(src, f, 1 << 22)
        out.append(dest)
    return out


def cache_root() -> Path:
    return Path(os.environ.get("MUSICLM_CACHE", "~/.cache/musiclm/remote")).expanduser()


def local_copy(loc: str | os.PathLike, files: tuple[str, ...] | None = None, version_file: str | None = None) -> Path:
    """A local folder with the contents of ``loc``: the folder itself when local, else a cached download (only
    ``files``, names directly in ``loc``, when given: a checkpoint's weights without its optimizer shards).
    ``version_file`` (a small file in ``loc``) keys the cache by its contents as well, so a folder changed since
    is fetched again. The cache entry is complete or absent: it is filled under a temporary name and renamed."""
    if not is_remote(loc):
        return Path(location(loc))
    s = location(loc)
    version = hashlib.sha256(read_bytes(join(s, version_file))).hexdigest() if version_file else ""
    key = hashlib.sha256((s + "\n" + ",".join(files or ()) + "\n" + version).encode()).hexdigest()[:24]
    dest = cache_root() / f"{name(s)}-{key}"
    if dest.is_dir():
        return dest
    if not exists(s):
        raise FileNotFoundError(f"{s} does not exist")
    tmp = dest.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}-{dest.name}")
    tmp.mkdir(parents=True)
    try:
        if files is None:
            download_dir(s, tmp)
        else:
            for f in files:
                if exists(join(s, f)):
                    (tmp / f).write_bytes(read_bytes(join(s, f)))
        try:
            tmp.rename(dest)
        except OSError:  # another process on this node finished the same copy first
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


PROCESS_TEMP_STALE_S = 3600.0  # a dead process's temporary folder untouched this long is removed


def process_tempdir(prefix: str) -> tempfile.TemporaryDirectory:
    """A local temporary folder of this process, named ``<prefix><host>-<pid>-…``, removed when closed. A process
    killed meanwhile (SIGKILL, the OOM killer, Tune stopping a trial) runs no cleanup and would leave the folder
    on its node's disk for good, so the same prefix's folders of dead processes go first
    (``sweep_process_tempdirs``)."""
    sweep_process_tempdirs(prefix)
    return tempfile.TemporaryDirectory(prefix=f"{prefix}{socket.gethostname()}-{os.getpid()}-")


def sweep_process_tempdirs(prefix: str, root: str | Path | None = None,
                           stale_s: float = PROCESS_TEMP_STALE_S) -> list[Path]:
    """Remove the ``process_tempdir`` folders of ``prefix`` whose process on this host no longer exists and that
    nothing was written into for ``stale_s`` seconds (a process of another PID namespace sharing the folder looks
    dead: the age keeps its work in progress); returns them."""
    removed, host = [], socket.gethostname()
    for d in Path(root or tempfile.gettempdir()).glob(f"{prefix}{host}-*"):
        pid = d.name[len(prefix) + len(host) + 1:].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            newest = max([d.stat().st_mtime] + [f.stat().st_mtime for f in d.rglob("*")])
        except OSError:  # going away meanwhile: its owner is cleaning it
            continue
        if time.time() - newest >= stale_s:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def parquet_bytes(table, **kwargs) -> bytes:
    """``table`` as a Parquet file in memory (to be written whole with ``write_bytes``)."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, **kwargs)
    return buf.getvalue()


def check_folder(loc, what: str) -> None:
    """Refuse, before any work, an output location that cannot be a folder: an existing file, or a path below one
    (``what`` names the option). A missing folder is fine: it is made when first written."""
    loc = location(loc)
    if is_file(loc):
        raise StorageError(f"{what} {loc} is a file: give a folder (a new one is created)")
    if not is_remote(loc):
        for parent in Path(loc).parents:
            if parent.exists():
                if not parent.is_dir():
                    raise StorageError(f"{what} {loc} lies below {parent}, which is a file: give another folder")
                break


def _unreadable_parquet(loc, e: Exception) -> StorageError:
    return StorageError(f"Parquet file {loc} cannot be read ({str(e).splitlines()[0][:200]}): it is truncated or "
                        f"corrupt. In a token dataset, delete it and run the same `musiclm preprocess` again: its "
                        f"tracks are made anew")


def read_parquet(loc, columns: list[str] | None = None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = resolve(loc)
    try:
        return pq.read_table(path, columns=columns, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise _unreadable_parquet(loc, e) from None


def filesystem_paths(locs: list[str]) -> tuple[pafs.FileSystem, list[str]]:
    """One filesystem and the paths inside it, for readers that take both (``ray.data.read_parquet``)."""
    resolved = [resolve(loc) for loc in locs]
    if len({type(fs).__name__ for fs, _ in resolved}) > 1:
        raise StorageError(f"files on different filesystems cannot be read together: {locs[:3]}")
    return (resolved[0][0] if resolved else pafs.LocalFileSystem()), [p for _, p in resolved]


def parquet_rows(loc) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = resolve(loc)
    with fs.open_input_file(path) as f:
        try:
            return pq.ParquetFile(f).metadata.num_rows
        except pa.ArrowInvalid as e:
            raise _unreadable_parquet(loc, e) from None


__all__ = ["StorageError", "check_folder", "is_remote", "location", "join", "name", "parent", "resolve", "exists", "is_file",
           "size", "read_bytes", "read_text", "read_json", "write_bytes", "write_text", "write_json",
           "make_dirs", "list_files", "list_dirs", "is_empty_dir", "delete", "remove_temporaries", "upload_dir",
           "download_dir", "local_copy", "process_tempdir", "sweep_process_tempdirs", "parquet_bytes", "read_parquet",
           "filesystem_paths", "parquet_rows"]
