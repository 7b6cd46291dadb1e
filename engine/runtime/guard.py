"""One run per run directory, and no worker outliving its launcher.

- `RunLock(run_dir)`: an advisory lock (fcntl.flock) on run_dir/.lock, held by the main process (rank 0,
  taken before the process group forms, so a second launch into a busy directory fails within seconds;
  torchrun then stops that launch's other workers) for the whole run; the kernel drops it when the
  process ends however it ends. The file names the holder (PID, host); a second run fails with them.
  Everything a run deletes in its directory (`.tmp-*` leftovers, stale metrics) it deletes under this
  lock, so it never touches a live run's files. Multi-node runs keep run_dir on a shared filesystem
  whose flock is coherent across hosts (NFSv4, Lustre with flock); rank 0 holds the lock.
- `watch_parent()`: under a launcher (torchrun sets LOCAL_RANK), a daemon thread polls os.getppid(); when
  the launcher is gone the worker signals itself SIGTERM (a checkpoint within checkpoint.stop_grace_s,
  engine/loop.py), and exits outright if it is still alive `hard_exit_s` later.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time

try:
    import fcntl
except ImportError:  # not POSIX: no lock (documented)
    fcntl = None

LOCK_FILE = ".lock"
_HELD: dict[str, RunLock] = {}  # path -> the lock this process holds (a second build in-process reuses it)


class RunDirectoryBusy(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunLock:
    def __init__(self, run_dir: str):
        self.path = os.path.join(os.path.abspath(run_dir), LOCK_FILE)
        self._fd: int | None = None

    @classmethod
    def acquire(cls, run_dir: str) -> RunLock:
        """The run directory's lock for this process (re-entrant within a process); RunDirectoryBusy
        naming the holder when another process has it."""
        lock = _HELD.get(os.path.join(os.path.abspath(run_dir), LOCK_FILE))
        if lock is not None and lock._fd is not None:
            return lock
        lock = cls(run_dir)
        lock._take()
        _HELD[lock.path] = lock
        return lock

    def _take(self) -> None:
        if fcntl is None:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown process"
            os.close(fd)
            raise RunDirectoryBusy(f"{os.path.dirname(self.path)} is in use by another run ({holder}); wait for it "
                                   f"to end, stop it, or use another --run_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None
        _HELD.pop(self.path, None)


def watch_parent(poll_s: float = 1.0, hard_exit_s: float = 60.0) -> threading.Thread | None:
    """Under a launcher (LOCAL_RANK set): SIGTERM to this process when its parent dies, os._exit(143)
    if it is still alive `hard_exit_s` later. Returns the thread (None when not started)."""
    if "LOCAL_RANK" not in os.environ:
        return None
    parent = os.getppid()
    if parent == 1:  # already orphaned before we looked: nothing to compare against
        return None

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(hard_exit_s)
        os._exit(128 + signal.SIGTERM)

    thread = threading.Thread(target=watch, name="rebel-parent-watchdog", daemon=True)
    thread.start()
    return thread
