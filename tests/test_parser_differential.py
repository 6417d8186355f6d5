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

from expserver._http import HttpError, RequestParser

# pytest puts tests/ on sys.path (rootdir-relative "prepend" import mode): share the model
from test_parser_properties import pipelines

CORPUS = Path(__file__).parent / "corpus"

INTENDED_DIFFERENCES: dict[str, str] = {
    # -- limits: ours are nginx-sized and counted per line; the peers have none (llhttp)
    #    or one 16 KiB bound on the whole head (h11)
    "invalid/fields_101": "we cap a head at 100 fields (431); llhttp and h11 have no count "
    "limit",
    "invalid/request_line_8193": "we cap the request line at 8192 bytes (414); llhttp has no "
    "limit and h11 only bounds the whole head at 16 KiB",
    "invalid/field_line_8193": "we cap a field line at 8192 bytes (431); llhttp has no limit "
    "and h11 only bounds the whole head at 16 KiB",
    "invalid/method_very_long": "a 9000-byte method is over our request-line limit; h11 has "
    "no method limit and keeps the line under its 16 KiB head bound",
    "invalid/field_name_very_long": "a 9000-byte field name is over our field-line limit; "
    "llhttp has no limit and h11 keeps it under its 16 KiB head bound",
    "invalid/header_section_too_large": "we cap the head at 64 KiB (431); llhttp has no "
    "limit",
    # -- semantics that only expserver checks
    "invalid/expect_other": "an expectation other than 100-continue is a 417 for us (RFC "
    "9110 10.1.1); llhttp and h11 do not look at Expect",
    "invalid/absolute_form_invalid_host_field": "Host must be valid even when an absolute-"
    "form target supplies the host (RFC 9112 3.2); llhttp and h11 do not check Host syntax",
    "invalid/absolute_form_empty_host": "'http:///x' has an empty host, which RFC 9110 4.2.1 "
    "says to reject; h11 does not parse targets",
    "invalid/absolute_form_userinfo": "userinfo in an http(s) target is deprecated (RFC 9110 "
    "4.2.4) and we answer 400; llhttp and h11 accept it",
    "invalid/target_authority_form_get": "authority-form is for CONNECT only (RFC 9112 "
    "3.2.3); llhttp and h11 take any target for any method",
    "invalid/target_asterisk_get": "asterisk-form is for OPTIONS only (RFC 9112 3.2.4); "
    "llhttp and h11 accept '*' for GET",
    "invalid/host_with_slash": "'a/b' is not a valid Host (RFC 9112 3.2 says 400); llhttp "
    "and h11 do not check Host syntax",
    "invalid/host_with_space": "'a b' is not a valid Host (RFC 9112 3.2 says 400); llhttp "
    "and h11 do not check Host syntax",
    "invalid/host_with_userinfo": "'user@host' is not a valid Host (RFC 9112 3.2); llhttp "
    "and h11 do not check Host syntax",
    "invalid/duplicate_host": "two Host fields are a 400 (RFC 9112 3.2); llhttp does not "
    "count Host fields",
    "invalid/duplicate_host_same": "two Host fields are a 400 even when equal (RFC 9112 "
    "3.2); llhttp does not count Host fields",
    "invalid/missing_host_http11": "an HTTP/1.1 request without Host is a 400 (RFC 9112 "
    "3.2); llhttp does not require Host",
    "invalid/absolute_form_missing_host_field": "an HTTP/1.1 request without Host is a 400 "
    "even in absolute-form (RFC 9112 3.2, as nginx); llhttp does not require Host",
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
        (r.method, r.target, b"1.1" if r.version == 11 else b"1.0", list(r.headers),
         bool(r.keep_alive), r.body)
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
        if "head" not in self.current:   # llhttp reports trailer fields here too
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
    proto.parser = httptools.HttpRequestParser(proto)   # type: ignore[attr-defined]
    try:
        proto.parser.feed_data(data)   # type: ignore[attr-defined]
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
                current = [event.method, event.target, event.http_version,
                           [(n, v) for n, v in event.headers], None, b""]
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
                    break   # h11 closes after this request: the rest is never read
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
    return "\n".join(f"  {name}: {verdict} {reqs!r}"[:600]
                     for name, (verdict, reqs) in outcomes.items())


@pytest.mark.parametrize(("name", "data"), CASES, ids=[n for n, _ in CASES])
def test_corpus_case(name: str, data: bytes) -> None:
    differs, outcomes = compare(data)
    if name in INTENDED_DIFFERENCES:
        assert differs, (f"{name} no longer differs from httptools/h11: remove it from "
                         f"INTENDED_DIFFERENCES\n{describe(outcomes)}")
    else:
        assert not differs, (f"{name}: the parsers disagree; fix expserver or allow-list "
                             f"the case with the reason\n{describe(outcomes)}")


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
