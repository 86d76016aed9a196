"""The output file system: a local path or a ``pyarrow.fs`` URI (``s3://``, ``gs://``, ...).

Every write is atomic: bytes go to a hidden temporary name beside the target, then are
renamed, so a crash never leaves a half-written image or manifest part under its real name.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from pyarrow import fs as pafs


def normalise_root(root: str) -> str:
    """Local paths become absolute (actors may run in another working directory); URIs stay."""
    if "://" in root:
        return root.rstrip("/")
    return str(Path(root).expanduser().resolve())


def open_root(root: str) -> tuple[pafs.FileSystem, str]:
    """The file system and base path for an output root."""
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), normalise_root(root)


def join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))


# Temporary files are hidden (a leading ".") so dataset readers skip them, and end in
# this suffix so a later run can tell a crash's leftovers from anything else.
TMP_SUFFIX = ".tmp"


def write_bytes(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a file atomically: a hidden temporary name, then a rename."""
    parent, name = path.rsplit("/", 1)
    filesystem.create_dir(parent, recursive=True)
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
    with filesystem.open_output_stream(tmp) as out:
        out.write(data)
    filesystem.move(tmp, path)


def read_bytes(filesystem: pafs.FileSystem, path: str) -> bytes:
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def exists(filesystem: pafs.FileSystem, path: str) -> bool:
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def remove_temporaries(filesystem: pafs.FileSystem, folder: str) -> int:
    """Delete what a crash mid-write left behind (hidden ``.tmp`` files); returns how many."""
    if not exists(filesystem, folder):
        return 0
    leftovers = [
        info.path
        for info in filesystem.get_file_info(pafs.FileSelector(folder))
        if info.base_name.startswith(".") and info.base_name.endswith(TMP_SUFFIX)
    ]
    for path in leftovers:
        filesystem.delete_file(path)
    return len(leftovers)
