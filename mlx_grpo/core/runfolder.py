"""The run folder as a shared resource: one process at a time, no writes through symlinks.

A run folder is locked with `fcntl.flock` on RUN_DIR/.lock, which holds the
pid and host of its owner. The OS drops the lock when the process ends, however
it ends, so a killed run never blocks the next resume. The lock keeps other
processes out; within one process, holds are counted. Files of the run are
opened with O_NOFOLLOW: a symlink planted in the folder is refused, never
written through. A full disk becomes one `DiskFull` message that says what
was being written, where, how much space is left and how to continue.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import TextIO

LOCK_FILE = ".lock"
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class RunInUse(ValueError):
    """Another process holds the run folder's lock."""


class SymlinkRefused(ValueError):
    """A file of the run folder is a symlink, so writing it could change a file elsewhere."""


class DiskFull(ValueError):
    """The disk (or the user's quota) ran out while the run was writing."""


class RunLock:
    """A hold on a run folder's lock; `release` (or process exit) frees it.

    The lock belongs to the process: several holds in one process share it
    (set up again before the last run was released), and the folder is free
    once every hold is released.
    """

    def __init__(self, path: Path):
        self.path = path
        self._held = True

    def release(self) -> None:
        with _guard:
            if not self._held:
                return
            self._held = False
            fd, count = _holds.pop(self.path)
            if count > 1:
                _holds[self.path] = (fd, count - 1)
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    def __del__(self) -> None:  # a run dropped without release (e.g. `setup` alone)
        with contextlib.suppress(Exception):
            self.release()


_holds: dict[Path, tuple[int, int]] = {}  # lock file -> (descriptor, holds in this process)
_guard = threading.Lock()


def lock(run_dir: str | Path) -> RunLock:
    """Take RUN_DIR's lock (the folder must exist); RunInUse when another process has it."""
    path = Path(run_dir).resolve() / LOCK_FILE  # the file itself: never followed
    with _guard:
        if path in _holds:
            fd, count = _holds[path]
            _holds[path] = (fd, count + 1)
            return RunLock(path)
        _holds[path] = (_take(Path(run_dir), path), 1)
        return RunLock(path)


def _take(run_dir: Path, path: Path) -> int:
    fd = _open(path, os.O_RDWR | os.O_CREAT)
    # A few tries: `check_unlocked` in another process may hold it for a moment.
    for attempt in range(5):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt == 4:
                holder = _holder(fd)
                os.close(fd)
                raise RunInUse(_in_use(run_dir, path, holder)) from None
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return fd


def check_unlocked(run_dir: str | Path) -> None:
    """Refuse a run folder whose lock another process holds; writes nothing."""
    path = Path(run_dir).resolve() / LOCK_FILE  # the file itself: never followed
    if path in _holds or not (path.exists() or path.is_symlink()):
        return
    fd = _open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        raise RunInUse(_in_use(Path(run_dir), path, _holder(fd))) from None
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    words = os.pread(fd, 200, 0).decode(errors="replace").split()
    if len(words) < 2:
        return "another process (its id is not written yet)"
    pid, host = words[0], words[1]
    return f"process {pid} on {host}" + (" (this machine)" if host == socket.gethostname() else "")


def _in_use(run_dir: Path, path: Path, holder: str) -> str:
    return (
        f"run folder {run_dir} is in use by {holder}, which holds {path}. Two processes in one "
        "run folder would mix their checkpoints and logs. Wait for that run to finish or stop "
        "it, then try again (the lock ends with its process, so a killed run does not block "
        "a resume)."
    )


# --------------------------------------------------------------------------- safe writing


def refuse_symlinks(run_dir: Path, names: tuple[str, ...] | list[str]) -> None:
    """Refuse the run when one of RUN_DIR/NAME is a symlink (even a dangling one)."""
    for name in names:
        if (Path(run_dir) / name).is_symlink():
            raise SymlinkRefused(_symlink_message(Path(run_dir) / name))


def open_append(path: Path) -> TextIO:
    """Open a run file for appending text, creating it; refuses a symlink."""
    return os.fdopen(_open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a")


def open_new(path: Path) -> TextIO:
    """Open a run file for writing from empty, creating it; refuses a symlink."""
    return os.fdopen(_open(path, os.O_WRONLY | os.O_TRUNC | os.O_CREAT), "w")


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SymlinkRefused(_symlink_message(path)) from None
        raise


def _symlink_message(path: Path) -> str:
    return (
        f"{path} is a symlink (to {os.readlink(path)}); mlx-grpo does not write run files "
        "through symlinks, which could overwrite a file outside the run folder. Remove the "
        "symlink (or replace it with a regular file), then start the run again."
    )


# --------------------------------------------------------------------------- full disks


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _FULL


def disk_full(what: str, where: Path, kept: str, then: str) -> DiskFull:
    """The error of a write that ran out of space.

    `kept` says what is still intact, `then` how to go on once there is space.
    """
    probe = next((p for p in [Path(where), *Path(where).parents] if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    return DiskFull(
        f"the disk is full (or the quota is used up) while writing {what} to {where}: "
        f"{free / 1e6:.1f} MB free there. {kept} Free some space (or lower save_total_limit), "
        f"then {then}."
    )
