"""A run directory belongs to one run: checked usable before any work, then locked.

:func:`prepare_dir` refuses, naming the path, an output folder that is a file, lies under
a file, or cannot be written. :class:`RunDirLock` holds an exclusive ``flock`` on
``<run>/.dinodet.lock`` for as long as the run lives; the file says who holds it (pid,
host, start time, command), so a second run on the same folder fails at once with that
in its message. The kernel drops a ``flock`` when its process dies however it dies, so a
lock left by a killed run is taken over by the next one without any guessing; where the
file system has no ``flock`` (some network mounts), the holder's pid is checked instead.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from dinodet.errors import RunDirError

try:
    import fcntl
except ImportError:  # Windows: the pid-file fallback only
    fcntl = None  # type: ignore[assignment]

__all__ = ["RunDirLock", "prepare_dir"]


def prepare_dir(path: str | Path, what: str = "--out") -> Path:
    """Create ``path`` (and its parents) as a writable folder, or raise
    :class:`~dinodet.errors.RunDirError` naming it and why not (the checks of
    :func:`dinodet.weights.check_output_dir`, then the creation)."""
    from dinodet.weights import check_output_dir

    path = check_output_dir(Path(path).expanduser(), what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"{what} {path} cannot be created: {e.strerror or e}") from e
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class RunDirLock:
    """``with RunDirLock(run_dir): ...`` — exclusive use of ``run_dir`` by this process.

    Raises :class:`~dinodet.errors.RunDirError` when another live process holds it (the
    message names its pid, host, start time and command). Releasing empties the lock file
    but leaves it in place: removing a locked file would let two later runs lock two
    different files of the same name.
    """

    FILE = ".dinodet.lock"

    def __init__(self, run_dir: str | Path, what: str = "--out") -> None:
        self.run_dir = Path(run_dir).expanduser()
        self.path = self.run_dir / self.FILE
        self.what = what
        self._fd: int | None = None
        self.took_over: dict[str, Any] | None = None  # a dead holder's record, if any

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    @staticmethod
    def _record() -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "command": " ".join(sys.argv)[:500]}

    def _holder(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _busy(self, holder: dict[str, Any], unsure: bool = False) -> RunDirError:
        who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
               f"{holder.get('started', '?')}: {holder.get('command', '?')}")
        hint = f" (if it is no longer running, delete {self.path})" if unsure else ""
        return RunDirError(
            f"{self.what} {self.run_dir} is in use by another run ({who}); wait for it to "
            f"finish, stop it, or choose another {self.what}{hint}")

    def acquire(self) -> None:
        prepare_dir(self.run_dir, self.what)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"{self.what} {self.run_dir}: cannot create {self.path}: "
                              f"{e.strerror or e}") from e
        try:
            self._lock(fd)
            previous = self._holder()
            if previous.get("pid") not in (None, os.getpid()):
                self.took_over = previous  # its process is gone: the kernel let us lock
            data = (json.dumps(self._record()) + "\n").encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _lock(self, fd: int) -> None:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                raise self._busy(self._holder()) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise RunDirError(f"cannot lock {self.path}: {e.strerror or e}") from e
        # No flock here: trust the recorded pid when it is on this host.
        holder = self._holder()
        pid, host = holder.get("pid"), holder.get("host")
        elsewhere = host != socket.gethostname()
        if isinstance(pid, int) and pid != os.getpid() and (elsewhere or _pid_alive(pid)):
            raise self._busy(holder, unsure=elsewhere)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing drops the flock
        self._fd = None
