"""Content-coding: Accept-Encoding negotiation, gzip/brotli encoders and a bounded cache.

* :func:`negotiate` picks ``"br"``, ``"gzip"`` or ``None`` (identity) from an Accept-Encoding
  value. Browsers send a handful of distinct values, so the answer is memoised.
* :func:`compress` encodes a whole body in memory; :class:`CompressStream` encodes an open file
  as an iterator of chunks (64 KiB reads) for files too big to hold or cache.
* :class:`CompressionCache` is an LRU of compressed bodies bounded by total bytes, keyed by
  ``(path, encoding, level)`` and validated against ``(mtime_ns, size, ino)`` of the source so
  an edited file is never answered from a stale entry.

gzip output is the real gzip container (zlib ``wbits=31``), which ``gzip.decompress`` and
``curl --compressed`` accept.
"""

from __future__ import annotations

import os
import zlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from functools import lru_cache

import brotli

GZIP = "gzip"
BR = "br"

CHUNK = 64 * 1024
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_ENTRY_BYTES = 8 * 1024 * 1024

_QDIGITS = frozenset(b"0123456789")


def _qvalue(v: bytes) -> float | None:
    """``qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )``; None if malformed."""
    if v[:1] not in (b"0", b"1") or (len(v) > 1 and v[1:2] != b".") or len(v) > 5:
        return None
    frac = v[2:]
    if not all(c in _QDIGITS for c in frac):
        return None
    if v[:1] == b"1":
        return 1.0 if frac.strip(b"0") == b"" else None
    return float(b"0." + frac) if frac else 0.0


@lru_cache(maxsize=256)
def negotiate(accept_encoding: bytes, gzip_ok: bool, br_ok: bool) -> str | None:
    """Best enabled coding the client accepts, or None for identity.

    Highest q wins; ``*`` covers codings not named; q=0 means "not acceptable"; br beats gzip
    on a tie (smaller output for text). An explicitly listed ``identity`` with a strictly
    higher q than the best coding keeps the response uncompressed. Elements with a malformed
    q-value are ignored rather than trusted.
    """
    q: dict[bytes, float] = {}
    for element in accept_encoding.split(b","):
        coding, _, params = element.partition(b";")
        coding = coding.strip(b" \t").lower()
        if not coding:
            continue
        weight: float | None = 1.0
        for param in params.split(b";") if params else ():
            name, eq, value = param.strip(b" \t").partition(b"=")
            if eq and name.lower() == b"q":
                weight = _qvalue(value)
        if weight is None:
            continue
        if coding == b"x-gzip":
            coding = b"gzip"
        q.setdefault(coding, weight)
    star = q.get(b"*", 0.0)
    best: str | None = None
    best_q = 0.0
    # br first so that it wins ties.
    for candidate, enabled in ((BR, br_ok), (GZIP, gzip_ok)):
        if enabled:
            w = q.get(candidate.encode(), star)
            if w > best_q:
                best, best_q = candidate, w
    if best is not None and q.get(b"identity", 0.0) > best_q:
        return None
    return best


def compress(data: bytes, encoding: str, level: int) -> bytes:
    """Encode ``data`` whole as ``encoding`` ("gzip" or "br") at ``level``."""
    if encoding == GZIP:
        return zlib.compress(data, level, wbits=31)
    out: bytes = brotli.compress(data, quality=level)
    return out


class CompressStream:
    """Iterator of encoded chunks of open file ``fd``; owns ``fd`` and closes it.

    A class rather than a generator so the descriptor is closed even if the response is
    dropped before the first chunk is pulled (a never-started generator skips ``finally``).
    """

    __slots__ = ("_fd", "_final", "_step")

    def __init__(self, fd: int, encoding: str, level: int) -> None:
        self._fd = fd
        self._step: Callable[[bytes], bytes]
        self._final: Callable[[], bytes] | None
        if encoding == GZIP:
            z = zlib.compressobj(level, zlib.DEFLATED, 31)
            self._step, self._final = z.compress, z.flush
        else:
            b = brotli.Compressor(quality=level)
            self._step, self._final = b.process, b.finish

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        # Encoders buffer internally and often return b"" for a whole read; an empty chunk
        # would read as end-of-body to a chunked writer, so keep reading until there is output.
        while self._final is not None:
            data = os.read(self._fd, CHUNK)
            if data:
                out = self._step(data)
            else:
                out = self._final()
                self.close()
            if out:
                return out
        raise StopIteration

    def close(self) -> None:
        self._final = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


class CompressionCache:
    """LRU of compressed bodies, bounded by ``max_bytes`` in total and per entry.

    ``hits``/``misses``/``evictions`` count lookups so tests and metrics can see it work.
    """

    def __init__(
        self, max_bytes: int = DEFAULT_MAX_BYTES, max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES
    ) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        self.size = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._entries: OrderedDict[Hashable, tuple[Hashable, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, validator: Hashable) -> bytes | None:
        """Cached body for ``key`` if it was made from the same source version."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry[0] != validator:
            # The source changed: the entry can never be valid again.
            del self._entries[key]
            self.size -= len(entry[1])
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[1]

    def put(self, key: Hashable, validator: Hashable, data: bytes) -> bool:
        """Store ``data``; False if it is larger than the per-entry cap."""
        if len(data) > self.max_entry_bytes:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.size -= len(old[1])
        self._entries[key] = (validator, data)
        self.size += len(data)
        while self.size > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.size -= len(evicted)
            self.evictions += 1
        return True

    def clear(self) -> None:
        self._entries.clear()
        self.size = 0


# One per process: routes serving the same file share entries (the key has the path).
shared_cache = CompressionCache()
