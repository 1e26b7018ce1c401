"""Small file helpers: sha256, atomic writes (temp file, fsync, rename), writable-folder checks, the
one-run-per-folder lock."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from blockskip.runtime.errors import FolderInUseError, OutputError
from blockskip.runtime.formats import CHECKPOINT_DIR, LOCK_FILE, TEMP_PREFIX, TEMP_SUFFIX

StrPath = str | os.PathLike[str]


def sha256_file(path: StrPath, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: StrPath, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)``, fsync the file, then rename it over ``path`` (and fsync the folder).

    A crash leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: StrPath, obj: object) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)

    atomic_write(path, write)


def ensure_writable_dir(path: StrPath, what: str = "output folder") -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(
            f"cannot create {what} {str(path)!r}: {e.strerror}; choose another path with -o"
        ) from e
    if not path.is_dir():
        raise OutputError(f"{what} {str(path)!r} exists and is not a folder; choose another path with -o")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(
            f"{what} {str(path)!r} is not writable ({e.strerror}); choose another path with -o"
        ) from e
    return path


# an atomic write's temporary (Python's mkstemp: 8 characters of [a-z0-9_]; the native runner's mkstemps: 6
# of [A-Za-z0-9])
TEMP_NAME = re.compile(rf"^{re.escape(TEMP_PREFIX)}.+\.[A-Za-z0-9_]{{6,}}{re.escape(TEMP_SUFFIX)}$")


@dataclass
class _Hold:
    fd: int | None  # the lock file's descriptor (None: no flock on that file system)
    holds: int


_held: dict[str, _Hold] = {}  # real path of a locked folder -> its lock
_held_guard = threading.Lock()


def remove_stale_temps(folder: StrPath) -> list[str]:
    """Remove what atomic writes killed mid-way left in ``folder`` (only while holding its lock); returns
    the names removed."""
    removed: list[str] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        p = os.path.join(folder, name)
        if TEMP_NAME.match(name) and os.path.isfile(p) and not os.path.islink(p):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
                removed.append(name)
    return removed


def _holder(lock: str) -> str:
    """The pid written in a lock file (its holder writes it just after taking the lock)."""
    for _ in range(20):
        try:
            text = Path(lock).read_text().strip()
        except OSError:
            text = ""
        if text.isdigit():
            return text
        time.sleep(0.01)
    return "unknown"


@contextlib.contextmanager
def folder_lock(folder: StrPath, what: str, hint: str, temps: tuple[str, ...] = (".",)) -> Iterator[Path]:
    """Hold ``folder``'s run lock: an advisory ``flock`` on ``folder/LOCK_FILE`` (``runtime.formats``),
    which holds this process's pid and is released when the process ends, however it ends. Another
    process holding it is a :class:`FolderInUseError` naming its pid (``what`` names the folder, ``hint``
    what to do instead). Taking it removes the temporaries a killed run's atomic writes left in the
    folders ``temps`` (relative to ``folder``). Re-entrant within a process. ``folder`` must exist. On a
    file system without ``flock`` the run goes on unlocked (and removes nothing)."""
    folder = Path(folder)
    key = os.path.realpath(folder)
    with _held_guard:
        if key in _held:
            _held[key].holds += 1
        else:
            _held[key] = _Hold(_take(folder, what, hint, temps), 1)
    try:
        yield folder
    finally:
        with _held_guard:
            _held[key].holds -= 1
            if _held[key].holds == 0:
                fd = _held.pop(key).fd
                if fd is not None:
                    os.close(fd)  # the only descriptor of the lock: closing it releases the lock


def _take(folder: Path, what: str, hint: str, temps: tuple[str, ...]) -> int | None:
    lock = os.path.join(folder, LOCK_FILE)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise OutputError(
            f"cannot create the lock file of {what} {str(folder)!r} ({e.strerror}); {hint}"
        ) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise FolderInUseError(
                f"{what} {str(folder)!r} is in use by another run (pid {_holder(lock)}); "
                f"wait for it to end, or {hint}"
            ) from None
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None  # no flock here
        raise OutputError(f"cannot lock {what} {str(folder)!r} ({e.strerror}); {hint}") from e
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:
        os.close(fd)
        raise OutputError(
            f"cannot write the lock file of {what} {str(folder)!r} ({e.strerror}); {hint}"
        ) from e
    for sub in temps:
        remove_stale_temps(folder / sub)
    return fd


def output_lock(out: StrPath) -> contextlib.AbstractContextManager[Path]:
    """The run lock of an output folder (it and its checkpoint folder are cleaned of temporaries)."""
    return folder_lock(out, "output folder", "choose another output folder with -o", (".", CHECKPOINT_DIR))


def cache_lock(cache: StrPath) -> contextlib.AbstractContextManager[Path]:
    """The run lock of a cache folder."""
    return folder_lock(cache, "cache folder", "use another --cache folder")
