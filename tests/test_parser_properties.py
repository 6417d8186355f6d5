"""Property tests of expserver._http.RequestParser (hypothesis).

- generated valid requests (random tokens, field names and values from the RFC 9110
  alphabets, Content-Length or chunked bodies, pipelines) parse to the generator's model,
  however the bytes are split;
- any bytes (random, or a valid request with a few bytes changed) give requests or an
  HttpError and nothing else, the same verdict however they are split, and never more
  buffered bytes than the head limit;
- a body sent with random chunk sizes, extensions and hex spellings decodes to itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expserver._http import HttpError, RequestParser

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
VCHAR = "".join(map(chr, range(0x21, 0x7F)))
OBS_TEXT = "".join(map(chr, range(0x80, 0x100)))
# the path characters every peer accepts (llhttp refuses obs-text in a target)
PATH_SAFE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@%/"
HOST_NAME = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-."
# names the parser gives a meaning to: the generator adds them only on purpose
SEMANTIC = {"host", "content-length", "transfer-encoding", "connection", "expect"}
PEER_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]

FAST = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def latin1(alphabet: str, min_size: int = 0, max_size: int = 20) -> st.SearchStrategy[str]:
    return st.text(alphabet=alphabet, min_size=min_size, max_size=max_size)


@st.composite
def field_values(draw: st.DrawFn) -> str:
    """field-value = words of field-vchar (obs-text included: every peer takes it) joined
    by runs of SP / HTAB, without OWS at either edge."""
    vchars = VCHAR + OBS_TEXT
    words = draw(st.lists(latin1(vchars, 1, 8), max_size=4))
    seps = [draw(latin1(" \t", 1, 3)) for _ in words[1:]]
    out = words[0] if words else ""
    for sep, word in zip(seps, words[1:]):
        out += sep + word
    return out


@dataclass
class Pipeline:
    """Bytes of one or more requests and the parse result the generator expects."""

    data: bytes = b""
    expected: list[dict[str, Any]] = field(default_factory=list)


def encode_chunked(draw: st.DrawFn, body: bytes, peer_safe: bool) -> bytes:
    """``body`` cut at random points, sizes spelt in random hex, with random extensions."""
    cuts = (
        sorted(draw(st.sets(st.integers(1, max(1, len(body) - 1)), max_size=5)))
        if len(body) > 1
        else []
    )
    pieces = [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)]) if body[a:b]]
    out = b""
    for piece in pieces + [b""]:
        size = f"{len(piece):x}"
        if draw(st.booleans()):
            size = size.upper()
        size = "0" * draw(st.integers(0, 16 - len(size))) + size
        ext = ""
        for _ in range(draw(st.integers(0, 2))):
            name = draw(latin1(TCHAR, 1, 6))
            value = draw(
                st.one_of(
                    st.none(),
                    latin1(TCHAR, 1, 6),
                    latin1(VCHAR.replace('"', "").replace("\\", ""), 0, 6).map(lambda v: f'"{v}"'),
                )
            )
            bws = "" if peer_safe else draw(st.sampled_from(["", " ", "\t "]))
            ext += f"{bws};{name}" + ("" if value is None else f"={value}")
        out += (size + ext).encode("latin-1") + b"\r\n"
        if piece:
            out += piece + b"\r\n"
    if not peer_safe:
        for _ in range(draw(st.integers(0, 2))):
            out += (
                draw(latin1(TCHAR, 1, 8))
                + ":"
                + draw(latin1(" \t", 0, 2))
                + draw(field_values())
                + "\r\n"
            ).encode("latin-1")
    return out + b"\r\n"


@st.composite
def requests_(draw: st.DrawFn, peer_safe: bool = False, keep: bool = False) -> Pipeline:
    """One valid request: its bytes and the Request the parser must make of it.

    ``keep``: the request keeps the connection open (it is not the last of a pipeline).
    """
    if peer_safe:
        method = draw(st.sampled_from(PEER_METHODS))
        version = 11
    else:
        method = draw(latin1(TCHAR, 1, 10))
        version = draw(st.sampled_from([10, 11]))
    path = "/" + draw(latin1(PATH_SAFE if peer_safe else VCHAR.replace("?", "") + OBS_TEXT))
    query = draw(st.one_of(st.none(), latin1(PATH_SAFE + "?" if peer_safe else VCHAR + OBS_TEXT)))
    target = path if query is None else f"{path}?{query}"

    fields: list[tuple[str, str]] = []  # (raw name, value) in the order sent
    raw_lines: list[str] = []

    def add(name: str, value: str, ows: str = " \t") -> None:
        lead = draw(latin1(ows, 0, 2))
        trail = draw(latin1(ows, 0, 2))
        raw_lines.append(f"{name}:{lead}{value}{trail}\r\n")
        fields.append((name.lower(), value))

    names = st.text(alphabet=TCHAR, min_size=1, max_size=12).filter(
        lambda n: n.lower() not in SEMANTIC
    )
    extra = draw(st.lists(st.tuples(names, field_values()), max_size=6))

    host = ""
    has_host = version == 11 or draw(st.booleans())
    host_at = draw(st.integers(0, len(extra)))
    if version == 11:
        conn = None if keep else draw(st.sampled_from([None, "close"]))
    elif keep:
        conn = "keep-alive"
    else:
        conn = draw(st.sampled_from([None, "close", "keep-alive", "Keep-Alive, close"]))
    body = draw(st.binary(max_size=300))
    framing = draw(st.sampled_from(["length", "chunked"] if version == 11 else ["length"]))
    if not body and draw(st.booleans()):
        framing = "none"
    for i, (name, value) in enumerate(extra + [("", "")]):
        if i == host_at and has_host:
            host_name = draw(latin1(HOST_NAME, 1, 20))
            port = draw(st.one_of(st.none(), st.integers(0, 65535)))
            add(
                draw(st.sampled_from(["Host", "host", "HOST"])),
                host_name + ("" if port is None else f":{port}"),
            )
            host = host_name.lower()
        if name:
            add(name, value)
    if conn is not None:
        add("Connection", conn)
    content_length = -1
    if framing == "length":
        content_length = len(body)
        add("Content-Length", str(len(body)))
    elif framing == "chunked":
        # (llhttp rejects "chunked<HTAB>": see INTENDED_DIFFERENCES)
        add("Transfer-Encoding", "chunked", " " if peer_safe else " \t")

    head = f"{method} {target} HTTP/1.{version % 10}\r\n" + "".join(raw_lines) + "\r\n"
    data = head.encode("latin-1")
    if framing == "length":
        data += body
    elif framing == "chunked":
        data += encode_chunked(draw, body, peer_safe)
    else:
        body = b""
    keep_alive = (conn is None) if version == 11 else (conn == "keep-alive")
    expected = {
        "method": method,
        "target": target,
        "path": path,
        "query": query or "",
        "version": version,
        "headers": [[n, v] for n, v in fields],
        "host": host,
        "content_length": content_length,
        "chunked": framing == "chunked",
        "keep_alive": keep_alive,
        "expect_continue": False,
        "body": body.decode("latin-1"),
    }
    return Pipeline(data, [expected])


@st.composite
def pipelines(draw: st.DrawFn, peer_safe: bool = False) -> Pipeline:
    """1-3 requests back to back (only the last may close the connection)."""
    out = Pipeline()
    n = draw(st.integers(1, 3))
    for i in range(n):
        one = draw(requests_(peer_safe, keep=i < n - 1))
        if not peer_safe and out.expected and draw(st.booleans()):
            out.data += b"\r\n"  # an empty line between requests is skipped
        out.data += one.data
        out.expected += one.expected
    return out


# ---------------------------------------------------------------- helpers


def as_dict(req: Any) -> dict[str, Any]:
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


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]


def verdict(chunks: list[bytes], **limits: int) -> tuple[Any, ...]:
    """("error", status) or ("ok", requests, pending); anything but HttpError escapes."""
    parser = RequestParser(**limits)
    reqs: list[dict[str, Any]] = []
    try:
        for chunk in chunks:
            reqs += [as_dict(r) for r in parser.feed(chunk)]
            assert parser.pending < parser_head_limit(limits)
    except HttpError as exc:
        assert exc.status in (400, 414, 417, 431, 501, 505), exc.status
        return ("error", exc.status)
    return ("ok", reqs, parser.pending)


def parser_head_limit(limits: dict[str, int]) -> int:
    return limits.get("max_head", 65536)


# ---------------------------------------------------------------- properties

cut_lists = st.lists(st.integers(0, 10**6), max_size=6)


@FAST
@given(pipelines(), cut_lists)
def test_valid_requests_parse_to_the_model(pipeline: Pipeline, cuts: list[int]) -> None:
    chunks = split(pipeline.data, cuts)
    assert verdict(chunks) == ("ok", pipeline.expected, 0)


@FAST
@given(pipelines())
def test_valid_requests_byte_by_byte(pipeline: Pipeline) -> None:
    data = pipeline.data
    assert verdict([data[i : i + 1] for i in range(len(data))]) == ("ok", pipeline.expected, 0)


LIMITS = st.sampled_from([{}, {"max_line": 40, "max_field": 30, "max_head": 200, "max_fields": 3}])


@FAST
@given(st.binary(max_size=600), cut_lists, LIMITS)
def test_random_bytes_raise_only_http_error(
    data: bytes, cuts: list[int], limits: dict[str, int]
) -> None:
    assert verdict([data], **limits) == verdict(split(data, cuts), **limits)


# bytes that a mutated request is likely to contain: the ones the grammar cares about
INTERESTING = st.sampled_from(list(b"\r\n\t :;,\x00\x7f\x80\xff0-+xX/?*Hh"))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(pipelines()).data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["set", "insert", "delete"]))
        byte = draw(st.one_of(INTERESTING, st.integers(0, 255)))
        if op == "insert" or at == len(data):
            data[at:at] = bytes([byte])
        elif op == "set":
            data[at] = byte
        else:
            del data[at]
    return bytes(data)


@FAST
@given(mutated(), cut_lists, LIMITS)
def test_mutated_requests_same_verdict_however_split(
    data: bytes, cuts: list[int], limits: dict[str, int]
) -> None:
    whole = verdict([data], **limits)
    assert verdict(split(data, cuts), **limits) == whole
    if len(data) < 400:
        assert verdict([data[i : i + 1] for i in range(len(data))], **limits) == whole


@FAST
@given(st.binary(max_size=3000), st.data())
def test_chunked_body_decodes_to_itself(body: bytes, data: st.DataObject) -> None:
    head = b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    wire = head + data.draw(st.composite(lambda d: encode_chunked(d, body, False))())
    wire += b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n"
    result = verdict(split(wire, data.draw(cut_lists)))
    assert result[0] == "ok", result
    assert [r["body"].encode("latin-1") for r in result[1]] == [body, b""]
    assert result[2] == 0


@FAST
@given(
    st.data(),
    st.integers(14, 150),
    st.integers(2, 150),
    st.integers(3, 140),
    st.integers(8, 140),
    cut_lists,
)
def test_line_limits_follow_the_model(
    data: st.DataObject,
    line_len: int,
    field_len: int,
    max_line: int,
    max_field: int,
    cuts: list[int],
) -> None:
    """A request line of L bytes passes iff L <= max_line (else 414), a field line of F
    bytes iff F <= max_field (else 431), whatever the bytes and however they are split."""
    target = "/" + data.draw(
        latin1(VCHAR.replace("?", "") + OBS_TEXT, line_len - 14, line_len - 14)
    )
    value = data.draw(latin1(VCHAR + OBS_TEXT, field_len - 2, field_len - 2))
    wire = f"GET {target} HTTP/1.1\r\nHost: h\r\nX:{value}\r\n\r\n".encode("latin-1")
    got = verdict(split(wire, cuts), max_line=max_line, max_field=max_field)
    if line_len > max_line:
        assert got == ("error", 414)
    elif field_len > max_field:
        assert got == ("error", 431)
    else:
        assert got[0] == "ok" and got[1][0]["headers"][1] == ["x", value]
