"""The output file system: a local path or a ``pyarrow.fs`` URI (``s3://``, ``gs://``, ...).

Every write is atomic: bytes go to a hidden temporary name beside the target, then are
renamed, so a crash never leaves a half-written image or manifest part under its real name.
"""

from __future__ import annotations

import os
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


class WriteFailed(OSError):
    """A write that failed, named by the file it was writing (never its hidden temporary name).

    An OSError still (``errno`` kept), so callers that handle I/O errors handle it; its text is
    the user's line: ``cannot write <path>: <reason>``. The arguments are OSError's own
    (errno, reason, path), so it pickles (an actor's error crosses Ray).
    """

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def reason(exc: OSError) -> str:
    """An I/O error's cause in a few words ("Permission denied"), without the library's wording
    around it (pyarrow's strerror holds "Failed to open local file '...'. Detail: ...")."""
    if isinstance(exc, WriteFailed):
        return exc.strerror
    if exc.errno:
        return os.strerror(exc.errno)
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__


def write_bytes(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a file atomically: a hidden temporary name, then a rename.

    On failure (a full disk, a read-only folder) the temporary file is removed, so no partial
    file is left behind, and the error raised is a WriteFailed naming ``path``.
    """
    parent, name = path.rsplit("/", 1)
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
    try:
        filesystem.create_dir(parent, recursive=True)
        with filesystem.open_output_stream(tmp) as out:
            out.write(data)
        filesystem.move(tmp, path)
    except OSError as exc:
        _discard(filesystem, tmp)
        raise WriteFailed(exc.errno, reason(exc), path) from exc
    except BaseException:  # Ctrl-C or SIGTERM mid-write: leave no partial file either
        _discard(filesystem, tmp)
        raise


def _discard(filesystem: pafs.FileSystem, tmp: str) -> None:
    """Delete a failed write's temporary file, if it got that far; a failure here changes nothing
    (the next render's remove_temporaries deletes what is left)."""
    try:
        if exists(filesystem, tmp):
            filesystem.delete_file(tmp)
    except OSError:
        pass


# The probe a render writes and deletes before Ray starts, to find an unwritable output at once.
PROBE_NAME = ".farm-write-probe"


def check_writable(filesystem: pafs.FileSystem, folder: str) -> None:
    """Write and delete a small file in ``folder`` (created if missing); raises the OSError
    (a WriteFailed) if the folder cannot take a write."""
    probe = join(folder, f"{PROBE_NAME}-{uuid.uuid4().hex[:8]}")
    write_bytes(filesystem, probe, b"farm\n")
    filesystem.delete_file(probe)


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
