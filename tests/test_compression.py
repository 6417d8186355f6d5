from __future__ import annotations

import gc
import gzip
import os
import random
import zlib
from collections.abc import Callable
from pathlib import Path

import brotli
import pytest

from expserver import compression
from expserver.compression import CompressionCache, CompressStream, negotiate

# -- negotiation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "gzip_ok", "br_ok", "expected"),
    [
        (b"gzip", True, True, "gzip"),
        (b"br", True, True, "br"),
        (b"gzip, deflate, br", True, True, "br"),  # tie: br wins
        (b"gzip, deflate, br, zstd", True, False, "gzip"),  # br not enabled
        (b"br", True, False, None),
        (b"gzip", False, True, None),
        (b"gzip;q=0", True, True, None),
        (b"gzip;q=0, br;q=0", True, True, None),
        (b"gzip;q=1.0, br;q=0.5", True, True, "gzip"),
        (b"gzip;q=0.8, br;q=0.9", True, True, "br"),
        (b"*", True, True, "br"),
        (b"*", True, False, "gzip"),
        (b"*;q=0", True, True, None),
        (b"gzip;q=0, *", True, True, "br"),
        (b"gzip;q=0, *", True, False, None),  # "*" covers only codings not named
        (b"br;q=0, *;q=0.5", True, True, "gzip"),
        (b"x-gzip", True, True, "gzip"),
        (b"GZIP", True, True, "gzip"),
        (b"gzip ; Q=0.5", True, True, "gzip"),
        (b"identity", True, True, None),
        (b"deflate", True, True, None),
        (b"gzip;q=0.5, identity;q=1", True, True, None),  # identity explicitly preferred
        (b"gzip;q=0.5, identity;q=0.5", True, True, "gzip"),
        (b"gzip;q=0.5", True, True, "gzip"),  # implicit identity does not outrank
        (b"gzip;q=2", True, True, None),  # malformed q: the element is ignored
        (b"gzip;q=1.001", True, True, None),
        (b"gzip;q=0.1234", True, True, None),
        (b"gzip;q=abc, br", True, True, "br"),
        (b"gzip;q=0.", True, True, None),
        (b"gzip;q=1.", True, True, "gzip"),
        (b" , ,gzip", True, True, "gzip"),
        (b"", True, True, None),
    ],
)
def test_negotiate(header: bytes, gzip_ok: bool, br_ok: bool, expected: str | None) -> None:
    assert negotiate(header, gzip_ok, br_ok) == expected


# -- encoders ----------------------------------------------------------------------------------

TEXT = b"".join(b"line %d: the quick brown fox jumps over the lazy dog\n" % i for i in range(5000))


def test_gzip_is_real_gzip() -> None:
    out = compression.compress(TEXT, "gzip", 6)
    assert out[:2] == b"\x1f\x8b"
    assert gzip.decompress(out) == TEXT
    assert len(out) < len(TEXT) // 5


def test_brotli_roundtrip() -> None:
    out = compression.compress(TEXT, "br", 5)
    assert brotli.decompress(out) == TEXT
    assert len(out) < len(TEXT) // 5


def _open(tmp_path: Path, data: bytes) -> int:
    p = tmp_path / "f.txt"
    p.write_bytes(data)
    return os.open(p, os.O_RDONLY)


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    ("encoding", "decode"), [("gzip", gzip.decompress), ("br", brotli.decompress)]
)
def test_stream_roundtrip_and_closes_fd(
    tmp_path: Path, encoding: str, decode: Callable[[bytes], bytes]
) -> None:
    rnd = random.Random(7)
    # Mixed content over several 64 KiB reads: text plus incompressible noise.
    data = TEXT * 3 + rnd.randbytes(200_000) + TEXT
    fd = _open(tmp_path, data)
    stream = CompressStream(fd, encoding, 5)
    chunks = list(stream)
    assert all(chunks), "an empty chunk would end a chunked body early"
    assert decode(b"".join(chunks)) == data
    assert not _fd_open(fd)
    assert list(stream) == []


def test_stream_closes_fd_when_dropped_unstarted(tmp_path: Path) -> None:
    fd = _open(tmp_path, TEXT)
    stream = CompressStream(fd, "gzip", 1)
    del stream
    gc.collect()
    assert not _fd_open(fd)


def test_stream_empty_file(tmp_path: Path) -> None:
    fd = _open(tmp_path, b"")
    assert gzip.decompress(b"".join(CompressStream(fd, "gzip", 6))) == b""


# -- cache -------------------------------------------------------------------------------------


def test_cache_hit_miss_and_validator() -> None:
    c = CompressionCache(max_bytes=1000, max_entry_bytes=500)
    assert c.get("k", (1, 2, 3)) is None
    assert c.misses == 1
    assert c.put("k", (1, 2, 3), b"x" * 10)
    assert c.get("k", (1, 2, 3)) == b"x" * 10
    assert c.hits == 1
    # The source changed: the stale entry is dropped, not served.
    assert c.get("k", (1, 2, 4)) is None
    assert c.misses == 2
    assert len(c) == 0
    assert c.size == 0


def test_cache_per_entry_cap() -> None:
    c = CompressionCache(max_bytes=1000, max_entry_bytes=100)
    assert not c.put("big", 0, b"x" * 101)
    assert len(c) == 0
    assert c.put("ok", 0, b"x" * 100)


def test_cache_evicts_lru_and_stays_under_cap() -> None:
    c = CompressionCache(max_bytes=300, max_entry_bytes=100)
    for i in range(3):
        c.put(i, 0, bytes(100))
    assert c.size == 300
    assert c.get(0, 0) is not None  # 0 becomes most recently used; 1 is now the oldest
    c.put(3, 0, bytes(100))
    assert c.size == 300
    assert c.evictions == 1
    assert c.get(1, 0) is None
    assert c.get(0, 0) is not None
    for i in range(100):
        c.put(("many", i), 0, bytes(1 + i % 100))
        assert c.size <= 300
    assert c.size == sum(len(v[1]) for v in c._entries.values())


def test_cache_replace_same_key_accounts_size() -> None:
    c = CompressionCache(max_bytes=1000, max_entry_bytes=1000)
    c.put("k", 1, bytes(100))
    c.put("k", 2, bytes(40))
    assert c.size == 40
    assert c.get("k", 2) == bytes(40)


def test_gzip_level_changes_output() -> None:
    # Sanity check that the level reaches zlib (the cache key includes it).
    assert compression.compress(TEXT, "gzip", 1) != compression.compress(TEXT, "gzip", 9)
    assert zlib.decompress(compression.compress(TEXT, "gzip", 9), 31) == TEXT
