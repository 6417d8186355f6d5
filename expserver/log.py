"""The error log: one line per event, nginx's shape, never a bare traceback.

``2026/12/02 10:00:00 [error] 4242: upstream 127.0.0.1:3000 refused the connection``

Every part of the server logs through the functions here, so the destination and the level
are set in one place (:func:`configure`). An unexpected exception is logged once, with its
context and the innermost frame it came from (:func:`exception`); the whole traceback only
at ``debug``, for developers. The server configures a :class:`~expserver.logfile.LogFile`
(``error_log``): lines then go through its writer thread, so logging never waits on a disk;
until then (and in tests) they are written to ``sys.stderr``.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Any, TextIO

LEVELS = ("debug", "info", "warn", "error")
_rank = {name: i for i, name in enumerate(LEVELS)}


class _State:
    stream: TextIO | None = None    # None: whatever sys.stderr is at the time
    file: Any = None                # a LogFile (the server's error_log), or None
    level: int = _rank["warn"]
    dropped: int = 0


_state = _State()


def configure(stream: TextIO | None = None, level: str | None = None,
              file: Any = None) -> None:
    if stream is not None:
        _state.stream = stream
    if file is not None:
        _state.file = file
    if level is not None:
        _state.level = _rank[level]


def reopen() -> None:
    if _state.file is not None:
        _state.file.reopen()


def close() -> None:
    """Write what is queued (at exit)."""
    if _state.file is not None:
        _state.file.close()


def enabled(level: str) -> bool:
    return _rank[level] >= _state.level


def _write(level: str, message: str) -> None:
    if _rank[level] < _state.level:
        return
    stamp = time.strftime("%Y/%m/%d %H:%M:%S")
    line = f"{stamp} [{level}] {os.getpid()}: {message}\n"
    if _state.file is not None:
        if not _state.file.submit(line.encode("utf-8", "replace")):
            _state.dropped += 1
        return
    try:
        stream = _state.stream or sys.stderr
        stream.write(line)
        stream.flush()
    except (OSError, ValueError):
        pass        # a closed or full log must never take a request down with it


def debug(message: str) -> None:
    _write("debug", message)


def info(message: str) -> None:
    _write("info", message)


def warn(message: str) -> None:
    _write("warn", message)


def error(message: str) -> None:
    _write("error", message)


def where(exc: BaseException) -> str:
    """``file:line in function`` of the frame that raised ``exc``."""
    tb = exc.__traceback__
    if tb is None:
        return "unknown place"
    frame = traceback.extract_tb(tb)[-1]
    return f"{os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}"


def exception(context: str, exc: BaseException) -> None:
    """An unexpected exception: one error line naming what failed, the exception and where."""
    _write("error", f"{context}: {type(exc).__name__}: {exc} (at {where(exc)})")
    if _state.level == 0:
        _write("debug", "".join(traceback.format_exception(exc)).rstrip())
