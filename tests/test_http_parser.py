"""expserver._http.RequestParser: the request corpus, then single behaviours.

Every corpus case (tests/corpus/{valid,invalid}/NAME.http, expected result in NAME.json) is
fed whole, byte by byte, split in two at every offset, and whole followed by the start of a
next request. The verdict must never depend on how the bytes arrive: the same requests, or
the same error status, every way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from expserver._http import HttpError, Request, RequestParser

CORPUS = Path(__file__).parent / "corpus"


def load_corpus(kind: str) -> list[tuple[str, bytes, Any]]:
    """[(name, raw bytes, expected JSON)] of tests/corpus/<kind>, sorted by name."""
    cases = []
    for http in sorted((CORPUS / kind).glob("*.http")):
        expected = json.loads(http.with_suffix(".json").read_text())
        cases.append((http.stem, http.read_bytes(), expected))
    return cases


VALID = load_corpus("valid")
INVALID = load_corpus("invalid")


def as_dict(req: Request) -> dict[str, Any]:
    """A Request in the corpus JSON shape (bytes as latin-1 strings)."""

    def s(b: bytes) -> str:
        return b.decode("latin-1")

    return {
        "method": s(req.method),
        "target": s(req.target),
        "path": s(req.path),
        "query": s(req.query),
        "version": req.version,
        "headers": [[s(n), s(v)] for n, v in req.headers],
        "host": s(req.host),
        "content_length": req.content_length,
        "chunked": bool(req.chunked),
        "keep_alive": bool(req.keep_alive),
        "expect_continue": bool(req.expect_continue),
        "body": s(req.body),
    }


class Outcome:
    """What a parser made of a byte stream: the requests, then an error status or None."""

    def __init__(self, requests: list[dict[str, Any]], status: int | None, pending: int):
        self.requests = requests
        self.status = status
        self.pending = pending

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Outcome) and vars(self) == vars(other)

    def __repr__(self) -> str:
        if self.status is not None:
            return f"<error {self.status} after {len(self.requests)} requests>"
        return f"<{len(self.requests)} requests, {self.pending} bytes pending>"


def run(chunks: Iterable[bytes], **limits: int) -> Outcome:
    parser = RequestParser(**limits)
    requests: list[dict[str, Any]] = []
    try:
        for chunk in chunks:
            requests.extend(as_dict(r) for r in parser.feed(chunk))
    except HttpError as exc:
        return Outcome(requests, exc.status, -1)
    return Outcome(requests, None, parser.pending)


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def check(data: bytes, expected: Any, chunks: list[bytes]) -> str | None:
    """None when feeding ``chunks`` gives the corpus result, else what went wrong."""
    got = run(chunks)
    if isinstance(expected, dict):  # invalid: only the status is fixed (requests
        # completed in the same feed as the error are not returned)
        if got.status != expected["status"]:
            return f"expected error {expected['status']}, got {got!r}"
        return None
    if got.status is not None or got.pending:
        return f"expected {len(expected)} requests, got {got!r}"
    if got.requests != expected:
        return f"requests differ: {got.requests!r}"
    return None


MODES = ["whole", "bytewise", "split2", "then_partial"]
NEXT_PARTIAL = b"GET /next HT"


def ids(cases: list[tuple[str, bytes, Any]]) -> list[str]:
    return [name for name, _, _ in cases]


def feed_modes(name: str, data: bytes, expected: Any, mode: str) -> None:
    if mode == "whole":
        err = check(data, expected, [data])
    elif mode == "bytewise":
        err = check(data, expected, bytewise(data))
    elif mode == "split2":
        errs = []
        for i in range(1, len(data)):
            e = check(data, expected, [data[:i], data[i:]])
            if e is not None:
                errs.append(f"split at {i}: {e}")
        err = "; ".join(errs[:3]) + f" ({len(errs)} offsets fail)" if errs else None
    else:  # the next request's first bytes arrive with this one: nothing changes
        got = run([data + NEXT_PARTIAL])
        if isinstance(expected, dict):
            err = None if got.status == expected["status"] else f"got {got!r}"
        elif got.status is not None or got.requests != expected:
            err = f"got {got!r}"
        else:
            err = None if got.pending == len(NEXT_PARTIAL) else f"pending {got.pending}"
    assert err is None, f"{name} ({mode}): {err}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("name", "data", "expected"), VALID, ids=ids(VALID))
def test_valid_corpus(name: str, data: bytes, expected: Any, mode: str) -> None:
    feed_modes(name, data, expected, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("name", "data", "expected"), INVALID, ids=ids(INVALID))
def test_invalid_corpus(name: str, data: bytes, expected: Any, mode: str) -> None:
    feed_modes(name, data, expected, mode)


def test_corpus_is_complete() -> None:
    for kind in ("valid", "invalid"):
        stems = {p.stem for p in (CORPUS / kind).iterdir()}
        for stem in stems:
            assert (CORPUS / kind / f"{stem}.http").is_file(), f"{kind}/{stem}.http missing"
            assert (CORPUS / kind / f"{stem}.json").is_file(), f"{kind}/{stem}.json missing"
    assert len(VALID) >= 40 and len(INVALID) >= 80


# ---------------------------------------------------------------- single behaviours

GET = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


def status_of(data: bytes, **limits: int) -> int | None:
    """The error status for ``data`` (fed whole and byte by byte, which must agree)."""
    whole, split = run([data], **limits), run(bytewise(data), **limits)
    assert whole.status == split.status
    return whole.status


def test_error_persists_on_every_later_feed() -> None:
    parser = RequestParser()
    with pytest.raises(HttpError) as first:
        parser.feed(b"GET / HTTP/2.0\r\n")
    assert first.value.status == 505
    for later in (b"", GET, b"\r\n"):
        with pytest.raises(HttpError) as again:
            parser.feed(later)
        assert (again.value.status, again.value.reason) == (505, first.value.reason)


def test_http_error_carries_status_and_reason() -> None:
    with pytest.raises(HttpError) as exc:
        RequestParser().feed(b"GET / HTTP/1.1\r\nHost: h\r\nX-A : b\r\n\r\n")
    assert exc.value.status == 400
    assert "colon" in exc.value.reason
    assert str(exc.value).startswith("400: ")


def test_pending_counts_bytes_of_the_incomplete_request() -> None:
    parser = RequestParser()
    assert parser.pending == 0
    assert parser.feed(b"") == []
    assert parser.feed(b"GET / HTTP/1.1\r\nHo") == []
    assert parser.pending == 18
    [req] = parser.feed(b"st: h\r\n\r\nPOST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n12")
    assert req.method == b"GET" and parser.pending == 0  # body bytes are consumed as read
    assert parser.feed(b"345") == [] and parser.pending == 0
    [post] = parser.feed(b"67890GET")
    assert post.body == b"1234567890" and parser.pending == 3


def test_requests_come_out_as_soon_as_complete() -> None:
    parser = RequestParser()
    assert parser.feed(GET[:-1]) == []
    [req] = parser.feed(GET[-1:])
    assert req.body == b""  # no body: done at the end of the head
    head = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert parser.feed(head + b"3\r\nabc\r\n0\r\n\r") == []
    [post] = parser.feed(b"\n")
    assert post.body == b"abc"


def test_request_get_returns_the_first_value() -> None:
    [req] = RequestParser().feed(b"GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\na: 2\r\n\r\n")
    assert req.get(b"a") == b"1"
    assert req.get(b"missing") is None
    assert "GET" in repr(req)


def test_large_body_in_many_pieces() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    parser = RequestParser()
    got: list[Request] = []
    got += parser.feed(b"PUT /f HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body))
    for i in range(0, len(body), 65521):
        got += parser.feed(body[i : i + 65521])
    assert [r.body for r in got] == [body]


@pytest.mark.parametrize("limit", [16, 100, 1000])
def test_max_line_is_configurable(limit: int) -> None:
    def line(n: int) -> bytes:  # a request line of n bytes
        return b"GET /" + b"a" * (n - 14) + b" HTTP/1.1\r\nHost: h\r\n\r\n"

    assert status_of(line(limit), max_line=limit) is None
    assert status_of(line(limit + 1), max_line=limit) == 414
    assert status_of(b"M" * (limit + 1) + b" / HTTP/1.1\r\n", max_line=limit) == 400


@pytest.mark.parametrize("limit", [8, 100, 1000])
def test_max_field_is_configurable(limit: int) -> None:
    def field(n: int) -> bytes:  # a field line of n bytes
        return b"GET / HTTP/1.1\r\nHost: h\r\nX:" + b"v" * (n - 2) + b"\r\n\r\n"

    assert status_of(field(limit), max_field=limit) is None
    assert status_of(field(limit + 1), max_field=limit) == 431
    # the limit holds whatever the field's bytes: a long name too
    assert status_of(b"GET / HTTP/1.1\r\n" + b"N" * (limit + 1), max_field=limit) == 431


def test_max_fields_is_configurable() -> None:
    def fields(n: int) -> bytes:
        return b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X: v\r\n" * (n - 1) + b"\r\n"

    assert status_of(fields(5), max_fields=5) is None
    assert status_of(fields(6), max_fields=5) == 431


@pytest.mark.parametrize("limit", [64, 500])
def test_max_head_is_configurable(limit: int) -> None:
    def head(n: int) -> bytes:  # a head of exactly n bytes, final CRLF included
        start = b"GET / HTTP/1.1\r\nHost: h\r\nX: "
        return start + b"v" * (n - len(start) - 4) + b"\r\n\r\n"

    assert status_of(head(limit), max_head=limit) is None
    assert status_of(head(limit + 1), max_head=limit) == 431
    # empty lines before the request line count: they cannot stream in for ever
    assert status_of(b"\r\n" * limit, max_head=limit) == 431
    assert status_of(b"\r\n" * 10 + GET, max_head=limit) is None


def test_limits_apply_per_request_not_per_connection() -> None:
    parser = RequestParser(max_head=64)
    for _ in range(50):
        assert len(parser.feed(GET * 2)) == 2


def test_limit_is_reported_before_a_later_bad_byte() -> None:
    # the verdict is that of the first byte that breaks a rule, however the bytes arrive:
    # here the line is already too long before the NUL
    data = b"GET /" + b"a" * 100 + b"\x00 HTTP/1.1\r\n"
    assert status_of(data, max_line=50) == 414
    assert status_of(data, max_line=500) == 400


def test_leading_empty_lines_are_skipped_between_pipelined_requests() -> None:
    reqs = RequestParser().feed(GET + b"\r\n" + GET + b"\r\n\r\n" + GET)
    assert len(reqs) == 3


def test_chunk_extension_size_is_bounded() -> None:
    head = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    ok = head + b"1;" + b"e" * 4000 + b"\r\na\r\n0\r\n\r\n"
    assert [r.body for r in RequestParser().feed(ok)] == [b"a"]
    assert status_of(head + b"1;" + b"e" * 5000 + b"\r\na\r\n0\r\n\r\n") == 400
    assert status_of(head + b"1" + b" " * 5000 + b";\r\na\r\n0\r\n\r\n") == 400


def test_trailer_section_size_is_bounded() -> None:
    head = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert status_of(head + b"0\r\n" + b"T: v\r\n" * 1000 + b"\r\n") is None
    assert status_of(head + b"0\r\n" + b"T: v\r\n" * 3000 + b"\r\n") == 431


def test_chunk_size_of_16_hex_digits() -> None:
    head = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    [req] = RequestParser().feed(head + b"0000000000000003\r\nabc\r\n0\r\n\r\n")
    assert req.body == b"abc"
    # sizes up to 2**60 - 1 are accepted (the body limit is the connection's job)...
    parser = RequestParser()
    assert parser.feed(head + b"fffffffffffffff\r\n" + b"x" * 10) == []
    assert parser.pending == 0
    # ...and larger ones are a 400, never a wrapped-around negative size
    for size in (b"1000000000000000", b"8000000000000000", b"ffffffffffffffff"):
        assert status_of(head + size + b"\r\nabc") == 400


def test_content_length_of_18_digits_is_accepted() -> None:
    parser = RequestParser()
    data = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 999999999999999999\r\n\r\n"
    assert parser.feed(data + b"abc") == [] and parser.pending == 0
