"""`data.paths` -> the sorted list of data files, on local disk, S3 or HDFS (through pyarrow.fs).

Each entry is a file, a directory (every file under it, recursively, hidden files and names
starting with "_" skipped, as Spark and Hive write `_SUCCESS` and `.crc` files), or a glob
(`*`, `?`, `[...]` inside one path component, e.g. `s3://bucket/criteo/day_*/part-*.parquet`):

    "/data/day_0.tsv"                    one local file
    "file:///data/criteo"                every file under the folder
    "s3://bucket/criteo/day_*/*.parquet" every object matching, component by component

The files of one entry are sorted by path; entries keep their order. A missing file, a directory
with no file or a glob that matches nothing is an error naming the entry, raised before any
row is read, so a typo fails the job at start rather than after hours of training.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from ps.snapshot.storage import StorageConfig, StorageError, open_uri

_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class DataFile:
    """One data file: its filesystem, its path inside it, the name to show, and its size."""

    fs: pafs.FileSystem
    path: str
    name: str  # the URI or local path, for messages
    size: int  # bytes


def expand_paths(
    entries: Sequence[str], storage: StorageConfig | None = None, field: str = "data.paths"
) -> list[DataFile]:
    """Every file the entries name, in order (see the module doc); errors name `field` and the entry."""
    files: list[DataFile] = []
    named_by: dict[tuple[str, str], int] = {}  # (filesystem, path) -> the index of the entry that named it
    for index, entry in enumerate(entries):
        found = _expand_one(str(entry), storage, field)
        if not found:
            what = "glob matches no file" if _has_glob(str(entry)) else "directory holds no file"
            raise FileNotFoundError(f"{field}: {entry}: the {what}")
        for data_file in found:
            first = named_by.setdefault(_identity(data_file), index)
            if first != index:
                # Read twice an epoch, its rows would weigh double: a folder and a file in it, two globs.
                raise ValueError(
                    f"{field}[{index}]: {entry}: names {data_file.name}, which {field}[{first}] names already"
                )
        files.extend(found)
    return files


def files_digest(files: Sequence[DataFile]) -> str:
    """A sha256 of the files, in order: each one's path under the folder all of them share, and
    its size. A reader's position holds indices into this list (and TSV byte ranges cut from the
    sizes), so a position from another list (a file a glob matches now or no longer, one renamed,
    one grown) would point at other rows. The shared folder is left out so that a position still
    fits the same files moved or copied elsewhere (another mount, S3 to local disk)."""
    parts = [f.path.split("/") for f in files]
    shared = len(parts[0]) - 1 if parts else 0  # components of the folder every file is under
    for other in parts[1:]:
        shared = min(shared, len(other) - 1)
        shared = next((i for i in range(shared) if other[i] != parts[0][i]), shared)
    digest = hashlib.sha256()
    for data_file, path in zip(files, parts, strict=True):
        digest.update(f"{'/'.join(path[shared:])}\t{data_file.size}\n".encode())
    return digest.hexdigest()


def check_held_out(paths: Sequence[str], eval_paths: Sequence[str], storage: StorageConfig | None = None) -> None:
    """ValueError naming the file when eval_paths (data.eval_paths) names a file paths (data.paths)
    names too: the evaluation would score rows the model trains on, and its AUC say nothing of
    held-out data. FileNotFoundError naming the field where an entry names no file."""
    trained = {_identity(f) for f in expand_paths(paths, storage, "data.paths")}
    for index, entry in enumerate(eval_paths):
        for held_out in expand_paths([entry], storage, "data.eval_paths"):
            if _identity(held_out) in trained:
                raise ValueError(
                    f"data.eval_paths[{index}]: {entry}: names {held_out.name}, which data.paths trains on; held-out "
                    "files must not be training files (the evaluation would score rows the model saw)"
                )


def _identity(data_file: DataFile) -> tuple[str, str]:
    """What tells two entries' files apart: the filesystem and the path, a local one with its
    symbolic links resolved (a link to a training file passed as held-out, a review found)."""
    if isinstance(data_file.fs, pafs.LocalFileSystem):
        return "local", os.path.realpath(data_file.path)
    return data_file.fs.type_name, data_file.path


def open_input(data_file: DataFile) -> pa.NativeFile:
    """A random-access handle on the file; OSError names the file."""
    try:
        return data_file.fs.open_input_file(data_file.path)
    except (OSError, pa.ArrowException) as exc:
        raise OSError(f"{data_file.name}: cannot open for reading: {exc}") from exc


def _has_glob(text: str) -> bool:
    return any(c in text for c in _GLOB_CHARS)


def _expand_one(entry: str, storage: StorageConfig | None, field: str) -> list[DataFile]:
    scheme_end = entry.find("://")
    prefix = entry[: scheme_end + 3] if scheme_end >= 0 else ""
    rest = entry[len(prefix) :]
    components = rest.split("/")
    first_glob = next((i for i, c in enumerate(components) if _has_glob(c)), None)
    base_entry = entry if first_glob is None else prefix + "/".join(components[:first_glob])
    if first_glob is not None and not base_entry.rstrip("/").removeprefix(prefix):
        # A glob in the first component: under the root for "/data*/x" (it was "." and listed the
        # working directory instead), under the working directory for "data*/x".
        base_entry = prefix + "/" if prefix or rest.startswith("/") else "."
    try:
        fs, base = open_uri(base_entry, storage)
    except ValueError as exc:
        raise ValueError(f"{field}: {entry}: {exc}") from exc
    except StorageError as exc:
        raise StorageError(f"{field}: {entry}: {exc}") from exc
    name_of = _namer(entry, prefix, base_entry, base)
    if first_glob is None:
        info = _info(fs, base, entry, field)
        if info.type == pafs.FileType.File:
            return [DataFile(fs, base, entry, info.size)]
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{field}: {entry}: no such file or directory")
        return _walk(fs, base, name_of, field)
    pattern = components[first_glob:]
    info = _info(fs, base, entry, field)
    if info.type != pafs.FileType.Directory:
        return []
    return _glob(fs, base, name_of, pattern, field)


def _namer(entry: str, prefix: str, base_entry: str, base: str):
    """Maps a path inside the filesystem back to the form the user wrote (URI or local path)."""
    shown_base = base_entry.rstrip("/")

    def name_of(path: str) -> str:
        tail = path[len(base) :].lstrip("/")
        return f"{shown_base}/{tail}" if tail else shown_base

    return name_of


def _info(fs: pafs.FileSystem, path: str, entry: str, field: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except (OSError, pa.ArrowException) as exc:
        raise OSError(f"{field}: {entry}: cannot read: {exc}") from exc


def _list(fs: pafs.FileSystem, folder: str, recursive: bool, name_of, field: str) -> list[pafs.FileInfo]:
    try:
        return fs.get_file_info(pafs.FileSelector(folder, recursive=recursive))
    except (OSError, pa.ArrowException) as exc:
        raise OSError(f"{field}: {name_of(folder)}: cannot list: {exc}") from exc


def _walk(fs: pafs.FileSystem, base: str, name_of, field: str) -> list[DataFile]:
    """Every file under `base` that is not hidden ('.' or '_' first in its path under base)."""
    files = []
    for info in _list(fs, base, True, name_of, field):
        if info.type != pafs.FileType.File:
            continue
        parts = info.path[len(base) :].strip("/").split("/")
        if any(p.startswith((".", "_")) for p in parts):
            continue
        files.append(DataFile(fs, info.path, name_of(info.path), info.size))
    return sorted(files, key=lambda f: f.path)


def _glob(fs: pafs.FileSystem, base: str, name_of, pattern: list[str], field: str) -> list[DataFile]:
    """The files under `base` whose path matches `pattern` component by component (hidden ones
    left out), listing one folder level per component: a recursive listing of `base` first walked
    the whole tree under it (all of "/" for "/data*/part-*")."""
    folders, files = [base], []
    for depth, component in enumerate(pattern):
        last = depth == len(pattern) - 1
        deeper = []
        for folder in folders:
            for info in _list(fs, folder, False, name_of, field):
                if info.base_name.startswith((".", "_")) or not fnmatch.fnmatchcase(info.base_name, component):
                    continue
                if last and info.type == pafs.FileType.File:
                    files.append(DataFile(fs, info.path, name_of(info.path), info.size))
                elif not last and info.type == pafs.FileType.Directory:
                    deeper.append(info.path)
        folders = deeper
    return sorted(files, key=lambda f: f.path)
