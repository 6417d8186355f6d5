"""Log files written off the loop: a writer thread behind a bounded queue.

``submit(data)`` never waits: it hands bytes to the thread, or, when the queue is full (the
disk or the reader of stdout is slower than the server), drops them and says so, and the
caller counts the lines lost. The thread does the blocking writes. ``reopen()`` (SIGUSR1,
after logrotate moved the file) makes the thread open the path again; lines already queued
go to the new file. Descriptors are opened when the object is made (by the master, before it
forks and drops privileges); a forked worker starts a thread of its own on first use.
"""
from __future__ import annotations

import os
import queue
import threading

QUEUE_CHUNKS = 64          # at most 64 x 64 KiB of lines waiting for the disk
_REOPEN = object()
_STOP = object()


class LogFile:
    """A file path, or ``"stdout"``/``"stderr"``, appended to by a thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = self._open()
        self.failed_writes = 0
        self._pid = -1
        self._queue: queue.Queue[object] = queue.Queue(QUEUE_CHUNKS)
        self._thread: threading.Thread | None = None

    def _open(self) -> int:
        if self.path == "stdout":
            return 1
        if self.path == "stderr":
            return 2
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def _started(self) -> queue.Queue[object]:
        if self._pid != os.getpid():        # first use in this process (a worker after fork)
            self._pid = os.getpid()
            self._queue = queue.Queue(QUEUE_CHUNKS)
            self._thread = threading.Thread(target=self._run, name="expserver-log",
                                            daemon=True)
            self._thread.start()
        return self._queue

    def submit(self, data: bytes) -> bool:
        try:
            self._started().put_nowait(data)
        except queue.Full:
            return False
        return True

    def write_now(self, data: bytes) -> None:
        """Before any loop runs (start-up messages): a plain write."""
        self._write(data)

    def reopen(self) -> None:
        try:
            self._started().put_nowait(_REOPEN)
        except queue.Full:
            pass                            # the thread is far behind; the next USR1 will do

    def chown(self, uid: int, gid: int) -> None:
        if self.fd > 2:
            os.fchown(self.fd, uid, gid)

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (waiting at most ``timeout``), then stop the thread."""
        if self._thread is not None and self._pid == os.getpid():
            try:
                self._queue.put(_STOP, timeout=timeout)
            except queue.Full:
                return
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if item is _REOPEN:
                try:
                    fd = self._open()
                except OSError:
                    self.failed_writes += 1     # keep the old file rather than nothing
                    continue
                old, self.fd = self.fd, fd
                if old > 2:
                    os.close(old)
                continue
            self._write(item)  # type: ignore[arg-type]

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                import select
                select.select([], [self.fd], [], 1.0)
                continue
            except OSError:
                self.failed_writes += 1
                return
            view = view[n:]
