#!/usr/bin/env python3
"""Load comparison: expserver against nginx, same machine, same run, loopback only.

    python bench/compare_nginx.py [--duration S] [--quick] [--json out.json]

Both servers run with one worker and serve the same temp directory (1k.bin, 64k.bin,
1m.bin of random bytes and text64k.html, 64 KiB of deterministic compressible HTML).
Each scenario is measured with `wrk -t1 -c C -d S --latency --timeout 10s`, alternating
expserver, nginx, expserver, nginx (--rounds of each), and the best round of each server
is reported (highest req/s; p99 is taken from that same round). Alternating spreads any
drift of the machine (thermal, noisy neighbours) over both servers.

wrk runs with ONE thread: on a 2-core machine that leaves one core to the server under
test and one to the load generator. By default (when there are >= 2 CPUs) that split is
enforced with CPU affinity: servers on the first CPU, wrk on the second (--no-pin: not).

The gzip scenario is run twice: against nginx's `gzip on` (compresses every response)
and against `gzip_static on` (a precompressed .gz), because expserver caches compressed
bodies of small files; see bench/README.md.

The figures are ratios measured in one run; they are not comparable across machines,
and nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402

FILES = {"1k.bin": 1024, "64k.bin": 64 * 1024, "1m.bin": 1024 * 1024}
TEXT_FILE = "text64k.html"
TEXT_SIZE = 64 * 1024


@dataclass
class Scenario:
    name: str
    path: str
    connections: int
    gzip: bool = False
    # Which nginx server answers: "nginx" (plain), "nginx_gzip" (gzip on, compresses every
    # response) or "nginx_gzip_static" (gzip_static on: sends the precompressed .gz file).
    nginx_server: str = "nginx"
    headers: list[str] = field(default_factory=list)     # extra request fields for wrk


@dataclass
class WrkRun:
    server: str
    req_per_sec: float
    p99_ms: float
    p50_ms: float
    requests: int
    errors: dict[str, int] = field(default_factory=dict)
    non_2xx: int = 0


@dataclass
class Result:
    scenario: str
    connections: int
    runs: list[WrkRun]
    best: dict[str, WrkRun]
    skipped: str | None = None


# --------------------------------------------------------------------------- content


def make_html(size: int, seed: int = 9110) -> bytes:
    """Deterministic, realistic-looking HTML of exactly `size` bytes (compresses ~3-4x,
    like real pages: repeated markup, varied prose)."""
    rng = random.Random(seed)
    words = (
        "the server request response header body client connection keep alive timeout "
        "buffer socket event loop worker process config route upstream proxy cache file "
        "directory listing index gzip brotli compression range etag modified status code "
        "error redirect permanent temporary method path query fragment encoding charset "
        "latency throughput memory backpressure pipeline session listener balancer health "
        "check metrics dashboard prometheus counter gauge histogram bucket percentile "
        "a an and or but with without for from into onto over under between through "
        "is are was were be been being has have had do does did will would should could "
        "fast slow small large many few every each some any all none quickly carefully "
        "network kernel user space system call epoll sendfile writev read write accept "
        "close open bind listen shutdown signal reload graceful drain respawn master"
    ).split()

    def sentence() -> str:
        n = rng.randint(6, 18)
        text = " ".join(rng.choice(words) for _ in range(n))
        return text[0].upper() + text[1:] + rng.choice(".....?!")

    parts = ["<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
             "<title>expserver benchmark page</title>\n"
             "<link rel=\"stylesheet\" href=\"/static/site.css\">\n</head>\n<body>\n"
             "<nav class=\"top\"><ul><li><a href=\"/\">Home</a></li>"
             "<li><a href=\"/docs/\">Docs</a></li><li><a href=\"/blog/\">Blog</a></li>"
             "</ul></nav>\n<main>\n"]
    closing = "</main>\n<footer><p>&copy; expserver authors</p></footer>\n</body>\n</html>\n"
    body_budget = size - len(closing) - 64
    length = sum(len(p) for p in parts)
    section = 0
    while length < body_budget:
        section += 1
        kind = rng.random()
        if kind < 0.55:
            prose = " ".join(sentence() for _ in range(rng.randint(2, 5)))
            chunk = f"<p class=\"text\">{prose}</p>\n"
        elif kind < 0.7:
            chunk = f"<h2 id=\"s{section}\">{sentence()[:-1]}</h2>\n"
        elif kind < 0.85:
            items = "".join(
                f"<li><a href=\"/docs/{rng.choice(words)}-{rng.randint(1, 99)}.html\">"
                f"{sentence()[:-1]}</a></li>\n" for _ in range(rng.randint(3, 6)))
            chunk = f"<ul class=\"links\">\n{items}</ul>\n"
        else:
            rows = "".join(
                f"<tr><td>{rng.choice(words)}</td><td>{rng.randint(0, 99999)}</td>"
                f"<td>{rng.randint(0, 999)}.{rng.randint(0, 9)} ms</td></tr>\n"
                for _ in range(rng.randint(3, 8)))
            chunk = ("<table class=\"stats\">\n<tr><th>name</th><th>count</th><th>time</th></tr>\n"
                     f"{rows}</table>\n")
        if length + len(chunk) > body_budget:
            break
        parts.append(chunk)
        length += len(chunk)
    text = "".join(parts)
    pad = size - len(text) - len(closing)
    # Pad with an HTML comment to hit the exact size (needs >= 7 bytes for "<!--" "-->").
    if pad >= 7:
        filler = "".join(rng.choice(words) + " " for _ in range(pad))[: pad - 8]
        text += "<!--" + filler + "-->\n"
        text += " " * (size - len(text) - len(closing))
    data = (text + closing).encode()
    assert len(data) == size, (len(data), size)
    return data


def write_content(root: Path) -> dict[str, bytes]:
    rng = random.Random(1)
    content = {name: rng.randbytes(size) for name, size in FILES.items()}
    content[TEXT_FILE] = make_html(TEXT_SIZE)
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    for name, data in content.items():
        (root / name).write_bytes(data)
        (root / name).chmod(0o644)
    # For nginx's gzip_static: the same level as the on-the-fly scenario, mtime 0.
    gz = root / (TEXT_FILE + ".gz")
    gz.write_bytes(gzip.compress(content[TEXT_FILE], compresslevel=6, mtime=0))
    gz.chmod(0o644)
    return content


# --------------------------------------------------------------------------- checks


def fetch(port: int, path: str, accept_gzip: bool) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Accept-Encoding": "gzip"} if accept_gzip else {}
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def check_scenario(sc: Scenario, ports: dict[str, int], expected: bytes) -> str | None:
    """None when both servers answer correctly and alike, else why not."""
    sizes = {}
    for server, port in ports.items():
        try:
            status, headers, body = fetch(port, sc.path, sc.gzip)
        except OSError as exc:
            return f"{server}: {exc}"
        if status != 200:
            return f"{server}: status {status}"
        if sc.gzip:
            if headers.get("content-encoding") != "gzip":
                got = headers.get("content-encoding")
                return f"{server}: no Content-Encoding: gzip (got {got!r})"
            try:
                plain = gzip.decompress(body)
            except OSError as exc:
                return f"{server}: bad gzip body: {exc}"
            if plain != expected:
                return f"{server}: decompressed body differs from the file"
        elif body != expected:
            return f"{server}: body of {len(body)} bytes differs from the {len(expected)}-byte file"
        sizes[server] = len(body)
    if not sc.gzip and len(set(sizes.values())) != 1:
        return f"body lengths differ: {sizes}"
    if sc.gzip:
        print(f"  gzip body sizes: {sizes} (from {len(expected)})", file=sys.stderr)
    return None


# --------------------------------------------------------------------------- wrk

_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _to_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(server: str, out: str) -> WrkRun:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    total = re.search(r"^\s+(\d+) requests in", out, re.M)
    if not (rps and p99 and p50 and total):
        raise RuntimeError(f"could not parse wrk output:\n{out}")
    errors = {}
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors = dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups())))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return WrkRun(server=server, req_per_sec=float(rps.group(1)), p99_ms=_to_ms(p99.group(1)),
                  p50_ms=_to_ms(p50.group(1)), requests=int(total.group(1)), errors=errors,
                  non_2xx=int(non2xx.group(1)) if non2xx else 0)


def run_wrk(server: str, port: int, sc: Scenario, duration: int,
            cpus: set[int] | None) -> WrkRun:
    # --timeout 10s: wrk drops requests slower than its 2 s default from the latency
    # histogram, which would flatter the p99 of a server that stalls some connections.
    argv = ["wrk", "-t1", f"-c{sc.connections}", f"-d{duration}s", "--latency", "--timeout", "10s"]
    if sc.gzip:
        argv += ["-H", "Accept-Encoding: gzip"]
    for line in sc.headers:
        argv += ["-H", line]
    argv.append(f"http://127.0.0.1:{port}{sc.path}")
    preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60,
                         preexec_fn=preexec, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr or out.stdout}")
    run = parse_wrk(server, out.stdout)
    bad = sum(run.errors.values()) + run.non_2xx
    note = f"  [{bad} errors/non-2xx: {run.errors} non2xx={run.non_2xx}]" if bad else ""
    print(f"  {server:9s} {run.req_per_sec:12.0f} req/s  p50 {run.p50_ms:8.2f} ms  "
          f"p99 {run.p99_ms:8.2f} ms{note}", file=sys.stderr)
    return run


# --------------------------------------------------------------------------- report


def fmt_table(results: list[Result]) -> str:
    head = ("scenario", "expserver req/s", "nginx req/s", "ratio exp/nginx",
            "expserver p99", "nginx p99")
    rows = [head]
    for r in results:
        if r.skipped:
            rows.append((r.scenario, "skipped", "-", "-", "-", "-"))
            continue
        e, n = r.best["expserver"], r.best["nginx"]
        rows.append((r.scenario, f"{e.req_per_sec:,.0f}", f"{n.req_per_sec:,.0f}",
                     f"{e.req_per_sec / n.req_per_sec:.2f}", f"{e.p99_ms:.2f} ms",
                     f"{n.p99_ms:.2f} ms"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    for r in results:
        if r.skipped:
            lines.append(f"skipped {r.scenario}: check failed: {r.skipped}")
        for s, run in r.best.items():
            rates = [x.req_per_sec for x in r.runs if x.server == s]
            if len(rates) > 1 and min(rates) < 0.85 * max(rates):
                lines.append(f"noisy {r.scenario} {s}: rounds spread "
                             f"{min(rates):,.0f}..{max(rates):,.0f} req/s (try --rounds 3+)")
            bad = sum(run.errors.values()) + run.non_2xx
            if bad:
                lines.append(f"note {r.scenario} {s}: {bad} socket errors/non-2xx "
                             f"({run.errors}, non-2xx {run.non_2xx})")
    return "\n".join(lines)


def cpu_busy(interval: float = 1.0) -> float:
    """Fraction of all CPUs busy over `interval` seconds (from /proc/stat)."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]), idle
    total0, idle0 = sample()
    time.sleep(interval)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def environment(args: argparse.Namespace, pinned: bool) -> dict[str, object]:
    return {
        "nginx": h.tool_version([h.nginx_binary(), "-v"]),
        "wrk": h.tool_version(["wrk", "--version"]),
        **h.machine(), "duration_s": args.duration,
        "rounds": args.rounds, "aggregate": "best round per server (max req/s, its p99)",
        "pinned": pinned, "expserver_cmd": args.expserver_cmd,
        "cpu_busy_at_start": round(cpu_busy(), 3),
    }


# --------------------------------------------------------------------------- main


def scenarios(quick: bool) -> list[Scenario]:
    conns = [64] if quick else [64, 256]
    out = [Scenario(f"{name[:-4]} c{c}", f"/{name}", c) for name in FILES for c in conns]
    out.append(Scenario("gzip text64k c64", f"/{TEXT_FILE}", 64, gzip=True,
                        nginx_server="nginx_gzip"))
    # expserver keeps compressed bodies of small files in a cache; nginx's gzip module
    # compresses every response again. gzip_static (a .gz file made once, beside the
    # original) is nginx's own answer to that, so it is measured as well.
    out.append(Scenario("gzip text64k c64 vs gzip_static", f"/{TEXT_FILE}", 64, gzip=True,
                        nginx_server="nginx_gzip_static"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=None, help="seconds per wrk run (10)")
    ap.add_argument("--quick", action="store_true", help="2 s runs, 64 connections only")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each server per scenario")
    ap.add_argument("--json", type=Path, help="also save the results here")
    ap.add_argument("--expserver-cmd", default=h.DEFAULT_EXPSERVER_CMD,
                    help="command template; placeholders {python} {config} {dir} {port} "
                         "(without {config} it is started once per port)")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="do not split CPUs between the servers and wrk")
    args = ap.parse_args()
    if args.duration is None:
        args.duration = 2 if args.quick else 10

    h.ensure_debian_packages({"nginx": "nginx-light", "wrk": "wrk"})
    h.install_signal_exit()
    h.raise_nofile_limit()
    server_cpus, wrk_cpus = h.split_cpus() if args.pin else (None, None)
    env = environment(args, server_cpus is not None)
    print(f"environment: {json.dumps(env)}", file=sys.stderr)
    if env["cpu_busy_at_start"] > 0.1:
        print(f"warning: the machine is not idle ({env['cpu_busy_at_start']:.0%} of CPU busy "
              "before the run); figures will be noisy", file=sys.stderr)

    servers: list[h.Server] = []
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="expserver-bench-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        root = work / "www"
        content = write_content(root)
        ports = {"nginx": h.free_port(), "nginx_gzip": h.free_port(),
                 "nginx_gzip_static": h.free_port(),
                 "expserver": h.free_port(), "expserver_gzip": h.free_port()}
        try:
            conf = work / "nginx.conf"
            h.write_nginx_conf(conf, work, root, ports["nginx"], ports["nginx_gzip"],
                               gzip_static_port=ports["nginx_gzip_static"])
            nginx = h.start_nginx(conf, work, cpus=server_cpus)
            servers.append(nginx)
            nginx.wait_ready([ports["nginx"], ports["nginx_gzip"], ports["nginx_gzip_static"]])

            config = work / "expserver.json"
            h.write_expserver_config(config, root, ports["expserver"], ports["expserver_gzip"])
            servers += h.start_expserver(
                args.expserver_cmd, config=config, root=root, workdir=work, cpus=server_cpus,
                ports=[ports["expserver"], ports["expserver_gzip"]])
            print(f"ready: ports {ports}", file=sys.stderr)

            for sc in scenarios(args.quick):
                sc_ports = {"expserver": ports["expserver_gzip" if sc.gzip else "expserver"],
                            "nginx": ports[sc.nginx_server]}
                print(f"{sc.name}: {sc.path} -c {sc.connections}", file=sys.stderr)
                why = check_scenario(sc, sc_ports, content[sc.path.lstrip("/")])
                if why:
                    print(f"  SKIPPED, check failed: {why}", file=sys.stderr)
                    results.append(Result(sc.name, sc.connections, [], {}, skipped=why))
                    continue
                runs = []
                for _ in range(args.rounds):
                    for server in ("expserver", "nginx"):
                        runs.append(run_wrk(server, sc_ports[server], sc, args.duration,
                                            wrk_cpus))
                        time.sleep(0.5)
                best = {s: max((r for r in runs if r.server == s),
                               key=lambda r: r.req_per_sec) for s in ("expserver", "nginx")}
                results.append(Result(sc.name, sc.connections, runs, best))
        finally:
            for server in reversed(servers):
                server.stop()

    print()
    print(f"wrk -t1, {args.duration} s per run, {args.rounds} alternating rounds per server, "
          f"best round shown; ratio > 1 means expserver is faster")
    print(fmt_table(results))
    if args.json:
        args.json.write_text(json.dumps(
            {"environment": env, "results": [asdict(r) for r in results]}, indent=2))
        print(f"saved {args.json}")
    return 1 if any(r.skipped for r in results) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
