"""The run directory before any work: checked writable, and locked against a second live run.

A run directory is resumable, so two runs on one directory at once would interleave their rounds and
state files. :class:`RunLock` makes the second refuse at start with a message naming the holder:

* local directory: an exclusive ``flock`` on ``<out>/.lock``; the kernel drops it when the holder's
  process ends, however it ends, so a crashed run never leaves the directory stuck.
* ``s3://`` / ``gs://`` (no locks in object stores): a ``lock.json`` object with the holder's host, pid
  and a heartbeat refreshed every :data:`HEARTBEAT_S` by a daemon thread; a lock whose heartbeat is older
  than :data:`STALE_S` is a crashed run's and is taken over (with a warning).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from ctray import io as cio
from ctray.errors import ConfigError

log = logging.getLogger(__name__)

HEARTBEAT_S = 60.0
STALE_S = 300.0
LOCK_FILE = ".lock"
REMOTE_LOCK = "lock.json"


def prepare_run_dir(out: str) -> str:
    """Create the run directory (absolute for a local path) and check it can be written.

    Raises:
        ConfigError: ``out`` is an existing file, or the directory cannot be created or written
            (one line naming the path and the reason).
    """
    if cio.is_remote(out):
        try:
            cio.makedirs(out)
        except OSError as e:
            raise ConfigError(f"cannot create the run directory {out}: {e}") from None
        return out
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--out {path} is an existing file, not a directory: give a directory (io.out)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the run directory {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write the run directory {path}: permission denied")
    return path


class RunLock:
    """An exclusive lock on a run directory (module docstring); a context manager.

    Raises (on enter):
        ConfigError: another live run holds the directory (naming its host, pid and start time).
    """

    def __init__(self, out: str):
        self.out = out
        self.remote = cio.is_remote(out)
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.token = uuid.uuid4().hex
        self.info: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                                     "token": self.token}

    def __enter__(self) -> RunLock:
        if self.remote:
            self._acquire_remote()
        else:
            self._acquire_local()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _acquire_local(self) -> None:
        import fcntl

        path = os.path.join(self.out, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise ConfigError(f"run directory {self.out} is in use by another run ({holder}); wait for it to "
                              "finish, or give another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.info).encode(), 0)
        self._fd = fd

    def _acquire_remote(self) -> None:
        path = cio.join(self.out, REMOTE_LOCK)
        if cio.exists(path):
            try:
                held = cio.read_json(path)
            except (OSError, ValueError):
                held = {}
            age = time.time() - float(held.get("heartbeat", 0.0))
            if age < STALE_S:
                raise ConfigError(f"run directory {self.out} is in use by another run ({_describe(held)}, heartbeat "
                                  f"{age:.0f}s ago); wait for it to finish, or give another --out")
            log.warning("run directory %s: taking over a lock whose heartbeat is %.0fs old (a run that ended "
                        "without releasing it: %s)", self.out, age, _describe(held))
        self._beat()
        self._thread = threading.Thread(target=self._heartbeat, name="ctray-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        cio.write_json(cio.join(self.out, REMOTE_LOCK), {**self.info, "heartbeat": time.time()})

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._beat()
            except OSError as e:  # a transient store error must not kill the run; the next beat retries
                log.warning("run lock heartbeat failed: %s", e)

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
            try:
                path = cio.join(self.out, REMOTE_LOCK)
                if cio.exists(path) and cio.read_json(path).get("token") == self.token:
                    cio.remove(path)
            except (OSError, ValueError) as e:
                log.warning("could not remove the run lock %s: %s", self.out, e)


def _describe(held: bytes | dict[str, Any]) -> str:
    if isinstance(held, bytes | bytearray):
        try:
            held = json.loads(bytes(held).decode() or "{}")
        except ValueError:
            held = {}
    assert isinstance(held, dict)
    if not held:
        return "holder unknown"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(held.get("started", 0))))
    return f"pid {held.get('pid', '?')} on {held.get('host', '?')}, started {when}"
