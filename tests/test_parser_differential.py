"""expserver's request parser against httptools (llhttp) and h11, on the same bytes.

For every corpus case, and for generated valid requests, the three parsers must agree on
accept / reject, and when all accept, on each request's method, target, version, headers,
keep-alive and body. Where expserver means to differ, the case is in INTENDED_DIFFERENCES
with the reason; an allow-listed case that stops differing fails too, so the list stays
true. (Statuses are not compared: neither peer has a status model worth matching.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h11
import httptools
import pytest
from hypothesis import HealthCheck, given, settings

# pytest puts tests/ on sys.path (rootdir-relative "prepend" import mode): share the model
from test_parser_properties import pipelines

from expserver._http import HttpError, RequestParser

CORPUS = Path(__file__).parent / "corpus"

INTENDED_DIFFERENCES: dict[str, str] = {
    # -- line ends: CRLF only (RFC 9112 2.2 lets a recipient accept a bare LF; we do not,
    #    because a front end that reads the bytes differently is how smuggling starts)
    "invalid/bare_lf_everywhere": "h11 accepts bare LF line ends",
    "invalid/bare_lf_request_line": "h11 accepts a bare LF after the request line",
    "invalid/bare_lf_field_line": "h11 accepts a bare LF after a field line",
    "invalid/bare_lf_end_of_head": "h11 accepts a bare LF as the empty line ending the head",
    "invalid/bare_lf_before_request_line": "we skip only CRLF empty lines before the "
    "request line; llhttp also skips a lone LF",
    "invalid/bare_cr_end_of_head": "a bare CR is a 400 at once; h11 only looks for CRLFCRLF "
    "and keeps waiting",
    "invalid/trailer_bare_lf": "h11 accepts a bare LF in the trailer section",
    "invalid/chunk_end_bare_cr": "a bare CR where the last CRLF belongs is a 400; h11 keeps "
    "waiting",
    # -- field syntax
    "invalid/obs_fold": "RFC 9112 5.2 lets a server reject obs-fold with 400, and we do; "
    "h11 unfolds it",
    "invalid/obs_fold_tab": "obs-fold (HTAB) is a 400 for us; h11 unfolds it",
    "invalid/trailer_obs_fold": "obs-fold in a trailer is a 400 for us; h11 unfolds it",
    "invalid/ctl_in_value": "control bytes are not field-value bytes (RFC 9110 5.5); h11 "
    "accepts any byte but NUL and whitespace controls",
    "invalid/esc_in_value": "ESC is a control byte (RFC 9110 5.5); h11 accepts it",
    "invalid/del_in_value": "DEL is not a field-value byte (RFC 9110 5.5); h11 accepts it",
    # -- request line
    "valid/leading_crlf": "RFC 9112 2.2: a server SHOULD ignore empty lines before the "
    "request line; h11 rejects them",
    "valid/method_extension": "any token is a method (RFC 9110 9.1; routing answers 405/501); "
    "llhttp knows a fixed list",
    "valid/method_lowercase_kept": "methods are case-sensitive tokens, 'get' is one (and not "
    "GET); llhttp knows a fixed upper-case list",
    "valid/target_obs_text": "we take raw non-ASCII bytes in the target as nginx does; "
    "llhttp and h11 accept ASCII only",
    "valid/http11_minor_version_2": "HTTP/1.2 is handled as HTTP/1.1 (RFC 9110 2.5); llhttp "
    "rejects it",
    "invalid/http20": "only major version 1 is spoken here (505); llhttp and h11 parse an "
    "HTTP/2.0 request line as HTTP/1",
    "invalid/http09_version": "HTTP/0.9 is a 505; llhttp and h11 accept the version",
    "invalid/http09_no_version": "a request line without a version (HTTP/0.9) is a 400; "
    "llhttp accepts it",
    "invalid/two_spaces_after_method": "exactly one SP between request-line parts (RFC 9112 "
    "3); llhttp accepts several",
    "invalid/two_spaces_before_version": "exactly one SP between request-line parts (RFC "
    "9112 3); llhttp accepts several",
    "invalid/expect_other": "an expectation other than 100-continue is a 417 (RFC 9110 "
    "10.1.1); llhttp and h11 do not look at Expect",
    # -- request target and Host (RFC 9112 3.2: 400 for a missing, repeated or invalid Host)
    "invalid/absolute_form_invalid_host_field": "Host must be valid even when an absolute-"
    "form target supplies the host; llhttp and h11 do not check Host syntax",
    "invalid/absolute_form_empty_host": "'http:///x' has an empty host, which RFC 9110 4.2.1 "
    "says to reject; h11 does not parse targets",
    "invalid/absolute_form_userinfo": "userinfo in an http(s) target is deprecated (RFC 9110 "
    "4.2.4) and we answer 400; llhttp and h11 accept it",
    "invalid/target_authority_form_get": "authority-form is for CONNECT only (RFC 9112 "
    "3.2.3); llhttp and h11 take any target for any method",
    "invalid/target_asterisk_get": "asterisk-form is for OPTIONS only (RFC 9112 3.2.4); "
    "llhttp and h11 accept '*' for GET",
    "invalid/host_with_slash": "'a/b' is not a valid Host; llhttp and h11 do not check Host syntax",
    "invalid/host_with_space": "'a b' is not a valid Host; llhttp and h11 do not check Host syntax",
    "invalid/host_with_userinfo": "'user@host' is not a valid Host; llhttp and h11 do not "
    "check Host syntax",
    "invalid/host_port_not_digits": "a port is digits only (RFC 3986 3.2.3); llhttp and h11 "
    "do not check Host syntax",
    "invalid/host_two_colons": "'a:1:2' is not host[:port]; llhttp and h11 do not check "
    "Host syntax",
    "invalid/host_ipv6_unclosed": "an IP-literal needs its ']'; llhttp and h11 do not check "
    "Host syntax",
    "invalid/absolute_form_empty_host_with_port": "'http://:80/' has an empty host (RFC "
    "9110 4.2.1); h11 does not parse targets",
    "invalid/absolute_form_bad_port": "a port is digits only; h11 does not parse targets",
    "invalid/duplicate_host": "two Host fields are a 400; llhttp does not count Host fields",
    "invalid/duplicate_host_same": "two Host fields are a 400 even when equal; llhttp does "
    "not count Host fields",
    "invalid/missing_host_http11": "an HTTP/1.1 request without Host is a 400; llhttp does "
    "not require Host",
    "invalid/absolute_form_missing_host_field": "an HTTP/1.1 request without Host is a 400 "
    "even in absolute-form (as nginx); llhttp does not require Host",
    # -- framing (the smuggling surface: one reading only)
    "invalid/cl_and_te": "RFC 9112 6.1 lets a server reject Content-Length with "
    "Transfer-Encoding, and we do; h11 lets chunked win",
    "invalid/te_and_cl": "Transfer-Encoding with Content-Length is a 400; h11 lets chunked win",
    "invalid/cl_duplicate_same": "any repeated Content-Length is a 400 (as llhttp); h11 "
    "accepts identical values (RFC 9110 8.6 allows either)",
    "invalid/cl_list": "a Content-Length list '5, 5' is a 400 (as llhttp); h11 accepts "
    "identical values",
    "invalid/cl_19_digits": "Content-Length has at most 18 digits (no overflow to check, and "
    "no real body is 10**18 bytes); llhttp and h11 accept it and wait for the body",
    "invalid/te_http10": "Transfer-Encoding in an HTTP/1.0 request is faulty framing (RFC "
    "9112 6.1), a 400; llhttp and h11 decode it",
    "invalid/te_gzip_chunked": "codings other than chunked are not implemented: 501; llhttp "
    "decodes the chunks and passes the gzip data on",
    "valid/chunked_ows_tab": "HTAB is OWS around 'chunked' as anywhere (RFC 9110 5.6.3); "
    "llhttp rejects 'chunked<HTAB>'",
    "valid/chunk_ext_bws": "RFC 9112 7.1.1 allows BWS before ';' in a chunk extension; "
    "llhttp (strict) and h11 reject it",
    "invalid/chunk_size_trailing_space": "whitespace after a chunk size must lead to ';' "
    "(RFC 9112 7.1.1); h11 accepts trailing whitespace",
    "invalid/chunk_size_too_long": "a chunk size has at most 16 hex digits, leading zeros "
    "included (a bounded line); llhttp and h11 accept more zeros",
    "invalid/chunk_size_overflow": "chunk sizes of 2**60 and more are a 400; h11 takes up to "
    "20 hex digits and waits for the data",
    "invalid/chunk_ext_ctl": "a control byte in a chunk extension is a 400; h11 accepts any "
    "extension bytes",
    # -- keep-alive
    "valid/http10_keepalive": "HTTP/1.0 with 'Connection: keep-alive' stays open (as nginx); "
    "h11 always closes HTTP/1.0",
    "valid/http10_keepalive_and_close": "'close' wins over 'keep-alive' in the same field "
    "(RFC 9112 9.6); llhttp keeps the connection open",
    # -- limits: ours are nginx-sized and counted per line; llhttp has none and h11 one
    #    bound (16 KiB) on a head that is still incomplete
    "invalid/fields_101": "we cap a head at 100 fields (431); llhttp and h11 have no count limit",
    "invalid/request_line_8193": "we cap the request line at 8192 bytes (414)",
    "invalid/target_very_long": "we cap the request line at 8192 bytes (414)",
    "invalid/method_very_long": "a 9000-byte method is over our request-line limit",
    "invalid/field_line_8193": "we cap a field line at 8192 bytes (431)",
    "invalid/field_name_very_long": "a 9000-byte field name is over our field-line limit",
    "invalid/header_section_too_large": "we cap the head at 64 KiB (431)",
}


def load_corpus() -> list[tuple[str, bytes]]:
    return [
        (f"{kind}/{p.stem}", p.read_bytes())
        for kind in ("valid", "invalid")
        for p in sorted((CORPUS / kind).glob("*.http"))
    ]


CASES = load_corpus()


# ---------------------------------------------------------------- one adapter per parser
# An outcome is (verdict, requests): verdict "accept" (every byte went into complete
# requests), "reject" (an error) or "incomplete" (still waiting for bytes); a request is
# (method, target, version, [(lower-case name, value)], keep_alive, body).


def run_expserver(data: bytes) -> tuple[str, list[tuple[Any, ...]]]:
    parser = RequestParser()
    try:
        reqs = parser.feed(data)
    except HttpError:
        return "reject", []
    out = [
        (
            r.method,
            r.target,
            b"1.1" if r.version == 11 else b"1.0",
            list(r.headers),
            bool(r.keep_alive),
            r.body,
        )
        for r in reqs
    ]
    return ("incomplete" if parser.pending else "accept"), out


class _HttptoolsProtocol:
    def __init__(self) -> None:
        self.done: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None

    def on_message_begin(self) -> None:
        self.current = {"url": b"", "headers": [], "body": b""}

    def on_url(self, url: bytes) -> None:
        assert self.current is not None
        self.current["url"] += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        if "head" not in self.current:  # llhttp reports trailer fields here too
            # llhttp hands over trailing OWS, which is not part of the value (RFC 9112 5)
            self.current["headers"].append((name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        assert self.current is not None
        self.current["head"] = (
            self.parser.get_method(),
            self.parser.get_http_version().encode(),
            self.parser.should_keep_alive(),
        )

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current["body"] += body

    def on_message_complete(self) -> None:
        assert self.current is not None
        self.done.append(self.current)
        self.current = None


def run_httptools(data: bytes) -> tuple[str, list[tuple[Any, ...]]]:
    proto = _HttptoolsProtocol()
    proto.parser = httptools.HttpRequestParser(proto)  # type: ignore[attr-defined]
    try:
        proto.parser.feed_data(data)  # type: ignore[attr-defined]
        verdict = "incomplete" if proto.current is not None else "accept"
    except httptools.HttpParserError:
        verdict = "reject"
    out = [
        (d["head"][0], d["url"], d["head"][1], d["headers"], d["head"][2], d["body"])
        for d in proto.done
    ]
    return verdict, ([] if verdict == "reject" else out)


def run_h11(data: bytes) -> tuple[str, list[tuple[Any, ...]]]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    out: list[tuple[Any, ...]] = []
    current: list[Any] | None = None
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                break
            if isinstance(event, h11.Request):
                current = [
                    event.method,
                    event.target,
                    event.http_version,
                    [(n, v) for n, v in event.headers],
                    None,
                    b"",
                ]
            elif isinstance(event, h11.Data):
                assert current is not None
                current[5] += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert current is not None
                # answer, so that h11 moves on to the next pipelined request
                conn.send(h11.Response(status_code=204, headers=[]))
                conn.send(h11.EndOfMessage())
                current[4] = conn.our_state is h11.DONE
                out.append(tuple(current))
                current = None
                if conn.our_state is not h11.DONE:
                    break  # h11 closes after this request: the rest is never read
                conn.start_next_cycle()
            else:
                break
    except h11.RemoteProtocolError:
        return "reject", []
    pending = current is not None or bool(conn.trailing_data[0])
    return ("incomplete" if pending else "accept"), out


PARSERS = {"expserver": run_expserver, "httptools": run_httptools, "h11": run_h11}


def normalize(outcome: tuple[str, list[tuple[Any, ...]]]) -> tuple[str, list[tuple[Any, ...]]]:
    """h11 lower-cases the Transfer-Encoding value: compare that value case-insensitively."""
    verdict, reqs = outcome
    return verdict, [
        r[:3] + ([(n, v.lower() if n == b"transfer-encoding" else v) for n, v in r[3]],) + r[4:]
        for r in reqs
    ]


def compare(data: bytes) -> tuple[bool, dict[str, Any]]:
    """(whether the parsers disagree, each parser's outcome)."""
    outcomes = {name: normalize(run(data)) for name, run in PARSERS.items()}
    verdicts = {v for v, _ in outcomes.values()}
    if len(verdicts) > 1:
        return True, outcomes
    if verdicts == {"accept"}:
        ours = outcomes["expserver"][1]
        return any(o[1] != ours for o in outcomes.values()), outcomes
    return False, outcomes


def describe(outcomes: dict[str, Any]) -> str:
    return "\n".join(
        f"  {name}: {verdict} {reqs!r}"[:600] for name, (verdict, reqs) in outcomes.items()
    )


@pytest.mark.parametrize(("name", "data"), CASES, ids=[n for n, _ in CASES])
def test_corpus_case(name: str, data: bytes) -> None:
    differs, outcomes = compare(data)
    if name in INTENDED_DIFFERENCES:
        assert differs, (
            f"{name} no longer differs from httptools/h11: remove it from "
            f"INTENDED_DIFFERENCES\n{describe(outcomes)}"
        )
    else:
        assert not differs, (
            f"{name}: the parsers disagree; fix expserver or allow-list "
            f"the case with the reason\n{describe(outcomes)}"
        )


def test_allow_list_names_corpus_cases() -> None:
    names = {n for n, _ in CASES}
    assert set(INTENDED_DIFFERENCES) <= names, set(INTENDED_DIFFERENCES) - names


def test_corpus_json_agrees_with_the_verdict() -> None:
    # the harness itself: valid cases are accepted by us, invalid ones rejected
    for name, data in CASES:
        expected = json.loads((CORPUS / f"{name}.json").read_text())
        verdict = run_expserver(data)[0]
        assert verdict == ("reject" if isinstance(expected, dict) else "accept"), name


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pipelines(peer_safe=True))
def test_generated_requests_agree(pipeline: Any) -> None:
    data = pipeline.data
    differs, outcomes = compare(data)
    assert not differs, f"{data!r}\n{describe(outcomes)}"
