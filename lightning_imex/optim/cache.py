"""The kernel cache: where generated code (C libraries, Triton sources) is kept between
runs, and the rules under which it is loaded again. Both compiled backends go through
:func:`cached` and :func:`private_copy`.

Loading code runs it, so a cached artifact is used only when

- its directory belongs to the current user and no one else may write to it (no group
  or other write bit), as OpenSSH's ``StrictModes`` and pip's cache require: then no one
  else can add, replace or rename anything in it;
- the file is a regular file, not a symbolic link, with that owner and no group or
  other write bit;
- its SHA-256 matches the digest stored beside it (``<name>.sha256``), written after the
  artifact, each by an atomic rename: a truncated, empty, garbage or half-written file
  does not match and is rebuilt.

Owners and modes are read with ``fstat`` from descriptors opened without following a
final symbolic link, so what is checked is what is read, and nothing depends on access
errors (which root never gets). The verified bytes are then copied into a private
per-process directory (``mkdtemp``: mode 0700, removed at exit, or, after a SIGKILL, by
a later process a day on) and loaded from there,
so nothing can swap or truncate a file between its check and ``dlopen`` or ``import``
(truncating a library that a process has mapped kills it with SIGBUS). A copy costs
one write of a few kB per kernel, once per process, and needs no ``/proc``.

A cache directory that is unsafe, cannot be created, or is read-only when a kernel must
be added is not used: the kernel is built in the private directory for this process
only, after one warning per reason that says why and how to fix it.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import secrets
import shutil
import stat
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

__all__ = ["cache_dir", "secure_dir", "load_verified", "store", "cached", "private_dir", "private_copy", "owner_problem",
           "remove_stale_private_dirs"]

DIGEST_SUFFIX = ".sha256"
_HOW_TO_FIX = ("set LIGHTNING_IMEX_CACHE_DIR to a directory that you own and only you can write to "
               "(`mkdir -m 700 <dir>`; see docs/optimizer-core.md, 'Kernel cache')")
_OPEN_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW

_lock = threading.Lock()
_warned: set[str] = set()
_private: tuple[int, Path] | None = None  # (the process that made it, the directory)


def cache_dir() -> Path:
    """Where generated kernels live: ``$LIGHTNING_IMEX_CACHE_DIR``, else the user's cache."""
    root = os.environ.get("LIGHTNING_IMEX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lightning_imex")
    return Path(root)


def secure_dir(kind: str) -> Path | None:
    """``cache_dir() / kind``, created with mode 0700 where missing, if code may be loaded
    from it; else None, after one warning."""
    root = cache_dir()
    directory, where = root / kind, root
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        problem = _directory_problem(os.stat(root))  # the root itself may be the user's symbolic link
        if problem is None and not os.path.lexists(directory):
            problem = _directory_problem(os.stat(root), writing=True)  # by its mode: root may write anywhere
            if problem is None:
                with contextlib.suppress(FileExistsError):  # another process made it first
                    os.mkdir(directory, 0o700)
        if problem is None:
            where = directory
            problem = "is a symbolic link" if os.path.islink(directory) else _directory_problem(os.stat(directory))
    except OSError as error:
        problem = f"cannot be created or read ({error.strerror or error})"
    if problem is None:
        return directory
    _warn_once(f"not using {where}: it {problem}; kernels are built for this process only. To fix: {_HOW_TO_FIX}")
    return None


def load_verified(path: Path) -> bytes | None:
    """The content of the artifact ``path`` if it may be loaded (see the module
    docstring); None if it is missing, damaged or unsafe (warned about once)."""
    try:
        directory = os.open(path.parent, _OPEN_DIRECTORY)
        try:
            if _directory_problem(os.fstat(directory)) is not None:
                return None  # secure_dir has said why
            data = _read(directory, path.name, path)
            digest = _read(directory, path.name + DIGEST_SUFFIX, path)
        finally:
            os.close(directory)
    except OSError:
        return None
    if data is None or digest is None or digest.strip() != hashlib.sha256(data).hexdigest().encode():
        return None  # damaged, or a write in progress: rebuilt
    return data


def _read(directory: int, name: str, path: Path) -> bytes | None:
    try:
        # O_NONBLOCK: a FIFO under that name must not hang the open (a regular file ignores it)
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=directory)
    except OSError:  # missing, or a symbolic link
        return None
    with os.fdopen(fd, "rb") as file:
        status = os.fstat(fd)
        problem = "is not a regular file" if not stat.S_ISREG(status.st_mode) else owner_problem(status)
        if problem is not None:  # one warning per directory and problem, not per file
            _warn_once(f"not loading {path.parent / name}: it {problem}; it is rebuilt (so is any other such "
                       f"file). Remove files that you did not make from the cache, or {_HOW_TO_FIX}",
                       key=f"{path.parent}: {problem}")
            return None
        return file.read()


def store(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` and then its digest beside it, each atomically. A
    directory that cannot take them is skipped, after one warning: the kernel is still
    used by this process."""
    try:
        directory = os.open(path.parent, _OPEN_DIRECTORY)
        try:
            problem = _directory_problem(os.fstat(directory), writing=True)
            if problem is None:
                _write(directory, path.name, data)
                _write(directory, path.name + DIGEST_SUFFIX, f"{hashlib.sha256(data).hexdigest()}\n".encode())
        finally:
            os.close(directory)
    except OSError as error:
        problem = f"cannot be written ({error.strerror or error})"
    if problem is not None:
        _warn_once(f"not storing kernels in {path.parent}: it {problem}; kernels it lacks are built for this "
                   f"process only. To fix: {_HOW_TO_FIX}")


def cached(kind: str, name: str, build: Callable[[], bytes]) -> bytes:
    """The verified artifact ``name`` of the cache's ``kind`` directory; built (and
    stored, where the cache may be used) when missing, damaged or unsafe."""
    directory = secure_dir(kind)
    data = load_verified(directory / name) if directory is not None else None
    if data is None:
        data = build()
        if directory is not None:
            store(directory / name, data)
    return data


PRIVATE_PREFIX = "lightning_imex-"
# A private directory outlives its process only when that process was killed (SIGKILL,
# the OOM killer): removed by a later process, once it is this old and its process gone.
# The age guards against a live process of another PID namespace sharing the directory.
STALE_PRIVATE_SECONDS = 24 * 3600


def private_dir() -> Path:
    """This process's private directory (mode 0700, named by its process ID, removed at
    exit): kernels are built and loaded there. Making one removes those of this user's
    killed processes (:func:`remove_stale_private_dirs`)."""
    global _private
    with _lock:
        if _private is None or _private[0] != os.getpid():  # a forked child makes its own
            remove_stale_private_dirs()
            _private = os.getpid(), Path(tempfile.mkdtemp(prefix=f"{PRIVATE_PREFIX}{os.getpid()}-"))
            atexit.register(_remove_private, *_private)
        return _private[1]


def remove_stale_private_dirs(now: float | None = None) -> None:
    """Removes the private directories in the temporary directory that belong to this user,
    are older than :data:`STALE_PRIVATE_SECONDS` and whose process no longer runs. Anything
    else (another user's, a live process's, a name or mode not ours) is left alone."""
    root, now = Path(tempfile.gettempdir()), time.time() if now is None else now
    try:
        entries = list(root.glob(f"{PRIVATE_PREFIX}*-*"))
    except OSError:
        return
    for entry in entries:
        pid = entry.name[len(PRIVATE_PREFIX):].split("-", 1)[0]
        try:
            info = entry.lstat()  # not following a link
        except OSError:
            continue
        if (not pid.isdigit() or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid()
                or stat.S_IMODE(info.st_mode) != 0o700 or now - info.st_mtime < STALE_PRIVATE_SECONDS
                or _running(int(pid))):
            continue
        shutil.rmtree(entry, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True


def _remove_private(pid: int, directory: Path) -> None:
    if os.getpid() == pid:
        shutil.rmtree(directory, ignore_errors=True)


def private_copy(data: bytes, suffix: str) -> Path:
    """A file of this process's private directory holding ``data``, named by its digest
    (so a name that ``dlopen`` has seen always holds the same library)."""
    path = private_dir() / f"imex_{hashlib.sha256(data).hexdigest()[:32]}{suffix}"
    if not path.exists():
        directory = os.open(path.parent, _OPEN_DIRECTORY)
        try:
            _write(directory, path.name, data)
        finally:
            os.close(directory)
    return path


def _write(directory: int, name: str, data: bytes) -> None:
    """``name`` in ``directory`` holds ``data``: a new file under a random name, renamed
    over it, so a reader sees the old file or the whole new one."""
    temporary = f".{name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=directory)
        raise


def _directory_problem(status: os.stat_result, writing: bool = False) -> str | None:
    """Why code must not be loaded from (``writing``: stored in) this directory; None if it may."""
    if not stat.S_ISDIR(status.st_mode):
        return "is not a directory"
    if writing and not status.st_mode & stat.S_IWUSR:
        return f"is read-only (mode {stat.S_IMODE(status.st_mode):o})"
    return owner_problem(status)


def owner_problem(status: os.stat_result) -> str | None:
    """Why a file or folder with ``status`` may not be trusted to hold what this user wrote
    (another owner, or writable by group or others); None if it may."""
    if status.st_uid != os.geteuid():
        return f"is owned by uid {status.st_uid}, not by you (uid {os.geteuid()})"
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(status.st_mode):o})"
    return None


def _warn_once(message: str, key: str | None = None) -> None:
    key = message if key is None else key
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(f"lightning_imex kernel cache: {message}", stacklevel=3)
