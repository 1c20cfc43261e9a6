"""Process hygiene: one writer per stage, stages that end with their pipeline, SIGTERM handled like Ctrl-C.

- `exclusive(path, what)`: an advisory lock (flock) held while a stage or pipeline runs. The kernel drops it
  when the holder dies, even by kill -9, so a crashed run never blocks the next one, and a run still alive
  makes the next one stop at once ("already running") instead of writing the same outputs.
- `follow_pipeline()`: a stage started by `medssl pipeline` ends (its MLflow run KILLED) within a second
  of the pipeline process dying, whatever killed it.
- `terminate_as_interrupt()`: SIGTERM raises KeyboardInterrupt, so runs end KILLED and temporary files go.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import os
import signal
import socket
import threading
import time
from pathlib import Path

from medssl.errors import Busy

PIPELINE_PID_ENV = "MEDSSL_PIPELINE_PID"


def process_id(pid: int | None = None) -> str:
    """'<host>:<pid>:<start time in clock ticks>': names one process, immune to pid reuse."""
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid)}"


def _start_ticks(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name
    except (OSError, IndexError):
        return "?"


def alive(process: str) -> bool | None:
    """Whether the process named by process_id() still runs; None when it ran on another host."""
    try:
        host, pid, ticks = process.rsplit(":", 2)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    return _start_ticks(int(pid)) == ticks != "?" and not _zombie(int(pid))


def _zombie(pid: int) -> bool:
    """Dead but not yet reaped by its parent (kill -9 of a child whose parent has not waited yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


@contextlib.contextmanager
def exclusive(path: Path, what: str):
    """Hold an exclusive lock on `path` for the block; Busy (naming the holder) if another process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise Busy(f"{what} is already running ({holder}); two runs would write the same outputs. "
                       f"Wait for it to finish or stop it (lock: {path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def terminate_as_interrupt() -> None:
    """SIGTERM -> KeyboardInterrupt in the main thread (runs end KILLED, `finally` blocks run)."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def follow_pipeline(interval: float = 1.0) -> None:
    """Under `medssl pipeline` (MEDSSL_PIPELINE_PID set): SIGTERM this process when the pipeline is gone."""
    watched = os.environ.get(PIPELINE_PID_ENV)
    if not watched:
        return

    def watch():
        while alive(watched) is not False:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="follow-pipeline", daemon=True).start()


def one_writer(name):
    """Decorate a stage function taking `lay` (a Layout): hold the stage's lock while it runs.
    `name(arguments)` -> the lock's name, e.g. lambda a: f"pretrain-{a['method']}"."""
    def deco(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            stage = name(bound.arguments)
            with exclusive(bound.arguments["lay"].lock(stage), f"stage {stage}"):
                return fn(*args, **kwargs)
        return wrapper
    return deco
