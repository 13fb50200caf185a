"""Where a bulk job's images and results live: local paths and object-store URIs.

A local path (`photos/`, `/data/cat.jpg`) is read with the standard library and walked as
`iei embed` walks it (`find_images`: the same files, the same rules). A URI goes to pyarrow's
filesystems where it knows the scheme (`s3://`, `gs://`, `abfs://`, `hdfs://`, `file://`) and
to fsspec's otherwise (`local://`, `gcs://`, `az://`, … with the fsspec package of that store).
Rows name a URI's files by URI (`s3://bucket/a/cat.jpg`), a local path's by its absolute path.

No Ray here: these functions run inside Ray's tasks, and are tested without it.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..client.bulk import IMAGE_SUFFIXES, find_images
from ..client.index_files import BulkError
from ..client.inputs import printable

URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")
# pyarrow.fs.FileSystem.from_uri's schemes whose path is the URI after the scheme (a bucket,
# then the key); the others go through fsspec.
ARROW_SCHEMES = frozenset({"file", "s3", "gs", "gcs"})
# pyarrow's schemes whose authority is not in the path (`hdfs://namenode:8020/photos` is `/photos`
# there, `abfs://container@account.dfs.core.windows.net/x` is `container/x`): rows named from the
# path would lose the host or the account, so they are refused rather than half supported.
UNSUPPORTED_SCHEMES = frozenset({"hdfs", "viewfs", "abfs", "abfss"})


@dataclass(frozen=True)
class Location:
    """A file or folder: its filesystem (None: local, the standard library), its path there,
    and the name rows give it."""

    filesystem: Any  # pyarrow.fs.FileSystem, or None for a plain local path
    path: str
    scheme: str = ""

    def name(self, path: str) -> str:
        """What a row calls the file at `path` of this filesystem."""
        return f"{self.scheme}://{path}" if self.scheme else path

    def child(self, path: str) -> Location:
        return Location(self.filesystem, path, self.scheme)


def is_uri(text: str) -> bool:
    return URI.match(text) is not None


@lru_cache(maxsize=64)
def _filesystem(scheme: str, authority: str) -> Any:
    """One filesystem per store and bucket in a process (S3's client is costly to create)."""
    uri = f"{scheme}://{authority}"
    if scheme in ARROW_SCHEMES:
        from pyarrow import fs

        return fs.FileSystem.from_uri(uri + ("/" if scheme == "file" else ""))[0]
    try:
        import fsspec
        from pyarrow import fs
    except ImportError:
        raise BulkError(f"{uri}: this scheme needs fsspec: pip install 'iei[ray]'") from None
    try:
        filesystem = fsspec.filesystem(scheme)
    except (ImportError, ValueError) as exc:
        raise BulkError(f"{scheme}:// is not a filesystem fsspec can open here ({exc})") from None
    return fs.PyFileSystem(fs.FSSpecHandler(filesystem))


def locate(text: str) -> Location:
    """A command-line path or URI -> its Location (a local path made absolute: Ray's workers
    run in other folders)."""
    match = URI.match(text)
    if match is None:
        return Location(None, os.path.abspath(text))
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme in UNSUPPORTED_SCHEMES:
        raise BulkError(
            f"{scheme}:// is not supported by --ray (its paths leave out the host or account "
            "that rows would need): copy to s3:// or gs://, or use a mounted folder"
        )
    if scheme in ("file", "local"):
        return Location(_filesystem(scheme, ""), "/" + rest.lstrip("/"), scheme)
    return Location(_filesystem(scheme, rest.split("/", 1)[0]), rest.rstrip("/"), scheme)


# --- listing ---------------------------------------------------------------------------------


# A row names a local file by `printable` (client/inputs.py): a name that is not valid UTF-8
# cannot be an Arrow string (the listing's block failed, and the job with it, on every
# --resume), so its bytes stand as `\xNN` escapes, which `local_path` turns back.
_ESCAPED_BYTE = re.compile(rb"\\x([0-9a-f]{2})")


def local_path(name: str) -> str:
    """The local file or folder a row's name stands for: the name itself, or, where no such
    file exists and the name holds `\\xNN` escapes, the name of those bytes."""
    if "\\x" not in name or os.path.lexists(name):
        return name
    raw = _ESCAPED_BYTE.sub(lambda m: bytes([int(m.group(1), 16)]), name.encode())
    return os.fsdecode(raw)


def is_image_name(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES


def list_roots(roots: Iterable[str]) -> tuple[list[str], list[str]]:
    """(files, folders): the files named and found one level under each root, and the folders
    below that, each to be walked by a task of its own (`walk_folder`), so that a catalogue
    spread over many folders is listed in parallel. Files named are taken whatever their
    suffix; files found only when they have an image suffix (as `iei embed` does)."""
    files: dict[str, None] = {}
    folders: dict[str, None] = {}
    for root in roots:
        location = locate(root)
        if location.filesystem is None:
            path = Path(location.path)
            if path.is_file():
                files[printable(str(path))] = None
            elif path.is_dir():
                with os.scandir(path) as entries:
                    for entry in sorted(entries, key=lambda e: e.name):
                        # os.walk's rule: a link to a folder is not followed
                        if entry.is_dir() and not entry.is_symlink():
                            folders[printable(entry.path)] = None
                        elif not entry.is_dir() and is_image_name(entry.name):
                            # a dangling link too: reported unreadable
                            files[printable(entry.path)] = None
            else:
                raise BulkError(f"no such file or folder: {root}")
            continue
        from pyarrow import fs

        info = location.filesystem.get_file_info(location.path)
        if info.type == fs.FileType.File:
            files[location.name(location.path)] = None
        elif info.type == fs.FileType.Directory:
            selector = fs.FileSelector(location.path, recursive=False)
            for entry in sorted(location.filesystem.get_file_info(selector), key=lambda e: e.path):
                if entry.type == fs.FileType.Directory:
                    folders[location.name(entry.path)] = None
                elif entry.type == fs.FileType.File and is_image_name(entry.path):
                    files[location.name(entry.path)] = None
        else:
            raise BulkError(f"no such file or folder: {root}")
    return without_overlaps(list(files), list(folders))


def without_overlaps(files: list[str], folders: list[str]) -> tuple[list[str], list[str]]:
    """Roots that overlap (`photos photos/sub`) list a file or folder twice: a folder inside
    another one of the list is walked with it, and an image file inside one is found by its
    walk (a file named whatever its suffix is kept: the walk skips it)."""

    listed = {d.rstrip("/") for d in folders}

    def in_a_listed_folder(name: str) -> bool:  # by its parents: a set lookup each
        parent = name.rstrip("/").rpartition("/")[0]
        while parent and not parent.endswith(":/"):
            if parent in listed:
                return True
            parent = parent.rpartition("/")[0]
        return False

    kept = [d for d in folders if not in_a_listed_folder(d)]
    return [f for f in files if not (is_image_name(f) and in_a_listed_folder(f))], kept


def walk_folder(folder: str) -> list[str]:
    """The image files under `folder` (a name from `list_roots`), recursively, sorted."""
    location = locate(folder)
    if location.filesystem is None:
        return [printable(name) for name in find_images([Path(local_path(location.path))])]
    from pyarrow import fs

    selector = fs.FileSelector(location.path, recursive=True)
    return sorted(
        location.name(entry.path)
        for entry in location.filesystem.get_file_info(selector)
        if entry.type == fs.FileType.File and is_image_name(entry.path)
    )


# --- reading ---------------------------------------------------------------------------------


# A file over this is an error row, not read whole: an image file is far smaller (a 50 MP photo,
# IEI_MAX_IMAGE_PIXELS, is 10-30 MB as a JPEG, 150 MB as a plain TIFF), and one of 2 GiB or more
# failed the job (Arrow's binary column) on every --resume.
MAX_FILE_BYTES = 256 << 20


@dataclass(frozen=True)
class Read:
    """A file's content and SHA-256, or why it could not be read."""

    content: bytes
    sha256: str | None
    error: str | None


def read_file(name: str) -> Read:
    try:
        location = locate(name)  # a row's name is a path or URI again
        if location.filesystem is None:
            with open(local_path(location.path), "rb") as file:
                content = file.read(MAX_FILE_BYTES + 1)
        else:
            with location.filesystem.open_input_stream(location.path) as stream:
                content = stream.read(MAX_FILE_BYTES + 1)
    except (OSError, BulkError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return Read(b"", None, f"cannot read: {reason}")
    if len(content) > MAX_FILE_BYTES:
        return Read(b"", None, f"too large: over {MAX_FILE_BYTES >> 20} MiB")
    return Read(content, hashlib.sha256(content).hexdigest(), None)


def read_files(names: Iterable[str]) -> Iterator[Read]:
    return (read_file(name) for name in names)
