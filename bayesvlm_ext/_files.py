"""Output files that a failure or a kill never destroys: written aside, then renamed over the target.

Every file the package writes goes through `replacing` (or `atomic_open` / `write_json` on top of it):
the data go to a uniquely named temporary file in the target's own folder, are flushed to disk, and
only then renamed over the target with os.replace, which is atomic on a POSIX filesystem. A reader
sees the old file or the new one, never a torn one; an exception, Ctrl-C or a failed check leaves the
old file in place and removes the temporary one (a SIGKILL can leave a `.NAME.tmp-*` file behind, never
a damaged target). Targets are checked before any work (`output_file`): a symlink is followed and its
target written (the link stays a link), a directory or a device, FIFO or socket is refused with a
ValueError naming the option. The replaced file is a new inode: it keeps the old permission bits, not
its owner or other hard links; a new file gets 0o666 less the umask, as open() gives.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections.abc import Iterator
from typing import IO


def output_file(path: str | os.PathLike, option: str = "path", create: bool = True) -> str:
    """The file that writing `path` will replace: symlinks resolved, parent folders created (with `create`;
    without, only checked to be creatable: for checking a command's outputs before it does any work).

    Raises ValueError naming `option` when `path` is empty, names a directory or an existing file that is
    not a regular file (a device, FIFO or socket), or when its folder cannot be a folder.
    """
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{option}: the output path is empty")
    if path.endswith((os.sep, "/")):  # realpath would drop the separator and write a file named like the folder
        raise ValueError(f"{option} {path}: names a directory; give a file name")
    target = os.path.realpath(path)  # a symlink (chain) is written through, not replaced
    try:
        mode = os.stat(target).st_mode
    except (FileNotFoundError, NotADirectoryError):  # ENOTDIR: a file in its path, reported as its folder below
        mode = None
    except OSError as error:
        raise ValueError(f"{option} {path}: cannot be written ({error.strerror})") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise ValueError(f"{option} {path}: is a directory; give a file name")
    if mode is not None and not stat.S_ISREG(mode):
        raise ValueError(f"{option} {path}: is not a regular file (a device, FIFO or socket); refusing to replace it")
    folder = os.path.dirname(target)
    if not create:
        _check_creatable(folder, option, path)
        return target
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{option} {path}: its folder {folder} is not a directory") from None
    except OSError as error:
        raise ValueError(f"{option} {path}: cannot create its folder {folder} ({error.strerror})") from None
    return target


def output_directory(path: str | os.PathLike, option: str = "path", create: bool = True) -> str:
    """The directory `path` (symlinks resolved; created if missing with `create`, else only checked to be
    creatable); ValueError naming `option` if it is a file or cannot be created."""
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{option}: the output path is empty")
    target = os.path.realpath(path)
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"{option} {path}: exists and is not a directory")
    if not create:
        _check_creatable(target, option, path)
        return target
    try:
        os.makedirs(target, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{option} {path}: cannot create the directory ({error.strerror})") from None
    return target


@contextlib.contextmanager
def replacing(path: str | os.PathLike, option: str = "path") -> Iterator[str]:
    """Yields a temporary path beside `path`; when the block ends without an exception the temporary file is
    renamed over `path` (after `output_file`'s checks, done before the block runs), else it is removed."""
    target = output_file(path, option)
    temporary = _create_temporary(target)
    try:
        yield temporary
        _sync(temporary)
        mode = _existing_mode(target)
        if mode is not None:  # a replaced file keeps its permissions; a new one has open()'s (0o666 less the umask)
            os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    sync_folder(os.path.dirname(target))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", option: str = "path") -> Iterator[IO]:
    """open(path, mode) that replaces `path` only once the block has completed (see `replacing`)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"argument 'mode' must be 'w' or 'wb', got {mode!r}")
    with replacing(path, option) as temporary:
        with open(temporary, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f


def write_json(path: str | os.PathLike, value, option: str = "path", indent: int | None = 2) -> None:
    """JSON of `value` written atomically to `path` (serialised first, so a bad value never touches the file)."""
    text = json.dumps(value, indent=indent)
    with atomic_open(path, "w", option) as f:
        f.write(text + "\n")


def _sync(path: str) -> None:
    """Flushes a written file to stable storage before the rename makes it visible."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _check_creatable(folder: str, option: str, path: str) -> None:
    """ValueError naming `option` unless `folder` is, or can be made, a directory this process writes in."""
    existing = folder
    while not os.path.exists(existing):  # the nearest existing ancestor decides
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{option} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: no permission to write in {existing}")


def sync_folder(folder: str) -> None:
    """Flushes a folder's entries (a rename into it) to stable storage; best effort: some filesystems refuse it."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _create_temporary(target: str) -> str:
    """A new empty file `.NAME.tmp-RANDOM` beside `target`.

    Created with mode 0o666, so the kernel applies the umask as open() would; reading the umask with
    os.umask would set it to 0 for a moment, process-wide, and another thread's files would be made
    world-writable meanwhile (tempfile.mkstemp makes 0o600, so it needs that).
    """
    folder, name = os.path.split(target)
    for _ in range(100):
        temporary = os.path.join(folder, f".{name}.tmp-{secrets.token_hex(6)}")
        try:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(descriptor)
        return temporary
    raise FileExistsError(f"cannot create a temporary file beside {target}: 100 names taken")


def _existing_mode(target: str) -> int | None:
    """The permission bits of `target`, None when it does not exist."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        return None
