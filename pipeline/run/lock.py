"""One writer per run folder: the driver of a run holds an exclusive lock on OUTPUT/.sdft.lock while it runs.

The lock is an advisory `flock`, so the kernel drops it when the holder dies, however it dies: a folder whose run was
SIGKILLed is free again, and the next run takes it over with one line naming the process that left it. The file keeps
its holder's pid, host and start time (for that line and for the refusal); it is emptied on a clean release, never
deleted, so two runs can never lock two different files of the same name. flock is local to a host: on a shared
filesystem, give every run its own folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from ..errors import OutputError

LOCK_FILE = ".sdft.lock"


class RunLock:
    def __init__(self, output_dir: Path):
        """Take the folder's lock (creating the folder), or refuse with one line when a live run holds it."""
        output_dir = Path(output_dir)
        if output_dir.exists() and not output_dir.is_dir():
            raise OutputError(f"output {output_dir} is a file, not a folder: choose another --output")
        self.path = output_dir / LOCK_FILE
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"output {output_dir} is not writable ({e.strerror}): choose another --output") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            os.close(self.fd)
            raise OutputError(f"output {output_dir} is in use by a run that is still alive ({_describe(holder)}): "
                              "wait for it to end or stop it, or choose another --output") from None
        left = self._holder()
        if left:  # its holder died without releasing it: the kernel dropped the flock
            print(f"sdft: taking over {output_dir}: its previous run ({_describe(left)}) stopped without releasing it",
                  file=sys.stderr)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)

    def _holder(self) -> dict:
        try:
            return json.loads(os.pread(self.fd, 4096, 0) or b"{}")
        except ValueError:
            return {}

    def release(self) -> None:
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)  # a clean end: nothing for the next run to report
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(holder: dict) -> str:
    if not holder:
        return "pid unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
