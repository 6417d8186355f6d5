#!/usr/bin/env python3
"""HTTPS comparison: expserver against nginx, same certificate, same run, loopback only.

    python bench/compare_tls.py [--duration S] [--quick] [--rounds N] [--rsa] [--json out.json]

Both servers run one worker and serve the same temp directory (1k.bin, 64k.bin, 1m.bin of
random bytes) on a TLS port and on a plain port, with one certificate made for the run
(ECDSA P-256 by default, RSA 2048 with --rsa). nginx (Debian nginx-light) has
`ssl_session_cache shared:SSL:10m`, `ssl_protocols TLSv1.2 TLSv1.3`, the TLS 1.2 ciphers
expserver uses by default (Mozilla intermediate), the keep-alive settings of
compare_nginx.py and `access_log off`.

Scenarios, alternating expserver, nginx, expserver, nginx (--rounds of each), best round
of each server reported with its p99, the paired ratio of back-to-back rounds, and each
server's CPU time per request:

  tls 1k/64k/1m c64   wrk -t1 -c64 https://127.0.0.1:PORT/FILE (keep-alive: 64
                      handshakes at the start, then only requests)
  handshake full c16  ab -c 16 (no -k): a new connection and a full handshake per request;
                      ab never offers a session (checked before the runs)
  handshake resumed   wrk -t1 -c16 -H "Connection: close": a new connection per request
    c16               that resumes the previous session (wrk keeps it across reconnects)
  plain 64k c64/c256  wrk -t1 against the plain ports, in the same run

The bytes of every URL are checked first on both servers. The targets printed beside the
figures are for reading, not asserted. As in compare_nginx.py the servers are pinned to the
first CPU and the load generator to the second (--no-pin: not).

The figures are ratios measured in one run; they are not comparable across machines,
and nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402
import compare_nginx as cn  # noqa: E402  (wrk output parser, /proc/stat sampling)
import compare_proxy as cp  # noqa: E402  (per-CPU and per-process CPU time)

SERVERS = ("expserver", "nginx")
FILES = cn.FILES                                  # 1k.bin, 64k.bin, 1m.bin
HANDSHAKE_FILE = "1k.bin"
HANDSHAKE_CONCURRENCY = 16
# Mozilla intermediate's TLS 1.2 suites: expserver's default (expserver/config/model.py),
# given to nginx too so that a TLS 1.2 client meets the same list on both.
INTERMEDIATE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305")
PROTOCOLS = {"both": ["TLSv1.2", "TLSv1.3"], "TLSv1.2": ["TLSv1.2"], "TLSv1.3": ["TLSv1.3"]}


@dataclass
class Scenario:
    name: str
    group: str          # "tls", "handshake", "plain"
    tool: str           # "wrk" or "ab"
    path: str
    connections: int
    target: float       # expserver/nginx ratio to reach (for reading, not asserted)
    tls: bool = True
    close: bool = False  # wrk: Connection: close (a new connection per request)

    @property
    def what(self) -> str:
        if self.tool == "ab":
            return f"ab -c {self.connections} (no -k): full handshakes"
        extra = " -H 'Connection: close'" if self.close else ""
        scheme = "https" if self.tls else "http"
        return f"wrk -t1 -c{self.connections}{extra} {scheme}://...{self.path}"


@dataclass
class Run:
    """One load run (wrk or ab) against one server."""
    server: str
    req_per_sec: float
    p99_ms: float
    p50_ms: float
    requests: int
    errors: dict[str, int] = field(default_factory=dict)
    non_2xx: int = 0
    tool_info: dict[str, str] = field(default_factory=dict)


@dataclass
class Round:
    run: Run
    cpu_busy: dict[str, float] = field(default_factory=dict)   # "cpu0" -> 0..1
    server_cpu: float = 0.0                                    # cores used by the server

    @property
    def cpu_us_per_request(self) -> float:
        return 1e6 * self.server_cpu / max(1.0, self.run.req_per_sec)


@dataclass
class Result:
    scenario: str
    group: str
    target: float
    rounds: list[Round]
    best: dict[str, Round]
    skipped: str | None = None

    def median_cpu_us(self, server: str) -> float:
        """The server's CPU time per request, median of its rounds: on a shared machine this
        moves far less than req/s (a round slowed by a neighbour costs the server no more
        CPU per request)."""
        return statistics.median(r.cpu_us_per_request for r in self.rounds
                                 if r.run.server == server)

    def paired_ratios(self) -> list[float]:
        exp = [r for r in self.rounds if r.run.server == "expserver"]
        ngx = [r for r in self.rounds if r.run.server == "nginx"]
        return [e.run.req_per_sec / n.run.req_per_sec for e, n in zip(exp, ngx)
                if n.run.req_per_sec]


def scenarios(quick: bool) -> list[Scenario]:
    out = [Scenario(f"tls {name[:-4]} c64", "tls", "wrk", f"/{name}", 64,
                    1.0 if size <= 1024 else 0.9) for name, size in FILES.items()]
    out.append(Scenario(f"handshake full c{HANDSHAKE_CONCURRENCY}", "handshake", "ab",
                        f"/{HANDSHAKE_FILE}", HANDSHAKE_CONCURRENCY, 0.9))
    out.append(Scenario(f"handshake resumed c{HANDSHAKE_CONCURRENCY}", "handshake", "wrk",
                        f"/{HANDSHAKE_FILE}", HANDSHAKE_CONCURRENCY, 0.9, close=True))
    for c in ([64] if quick else [64, 256]):
        out.append(Scenario(f"plain 64k c{c}", "plain", "wrk", "/64k.bin", c, 1.0, tls=False))
    return out


# --------------------------------------------------------------------------- certificate


def make_certificate(work: Path, rsa: bool) -> tuple[Path, Path, Path, str]:
    """(cert chain, key, CA file, description) for localhost and 127.0.0.1.

    trustme (a CA and a leaf it signs) when installed; else a self-signed leaf from the
    openssl command line. Either way the leaf is ECDSA P-256 or RSA 2048.
    """
    cert, key, ca = work / "cert.pem", work / "key.pem", work / "ca.pem"
    kind = "RSA 2048" if rsa else "ECDSA P-256"
    try:
        import trustme
    except ImportError:
        trustme = None
    if trustme is not None:
        key_type = trustme.KeyType.RSA if rsa else trustme.KeyType.ECDSA
        authority = trustme.CA(key_type=key_type)
        leaf = authority.issue_cert("localhost", "127.0.0.1", key_type=key_type)
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        for pem in leaf.cert_chain_pems[1:]:
            pem.write_to_path(str(cert), append=True)
        leaf.private_key_pem.write_to_path(str(key))
        authority.cert_pem.write_to_path(str(ca))
        return cert, key, ca, f"{kind} leaf signed by a trustme CA"
    newkey = ["-newkey", "rsa:2048"] if rsa else \
        ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    subprocess.run(["openssl", "req", "-x509", *newkey, "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "7", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    shutil.copy(cert, ca)
    return cert, key, ca, f"{kind} self-signed (openssl req)"


# --------------------------------------------------------------------------- configs


def write_nginx_conf(path: Path, workdir: Path, root: Path, ports: dict[str, int],
                     cert: Path, key: Path, protocols: list[str],
                     worker_connections: int = 4096, rlimit_nofile: int | None = None,
                     probe: bool = True) -> None:
    """One worker; a plain server, a TLS server and (probe) a second TLS server whose
    access log records whether each handshake resumed a session. The probe is used only
    before the runs, to check what the load tools offer; the measured servers log nothing.
    """
    probe_server = ""
    if probe:
        probe_server = f"""
    server {{
        listen 127.0.0.1:{ports['nginx_probe']} ssl;
        root {root};
        access_log {workdir / 'nginx_probe.log'} probe;
    }}"""
    path.write_text(h.nginx_conf(workdir, f"""    types {{
        text/plain txt;
        application/octet-stream bin;
    }}
    default_type application/octet-stream;
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 75;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_session_cache shared:SSL:10m;
    ssl_protocols {' '.join(protocols)};
    ssl_ciphers {INTERMEDIATE_CIPHERS};
    log_format probe '$ssl_protocol $ssl_session_reused';

    server {{
        listen 127.0.0.1:{ports['nginx']};
        root {root};
    }}

    server {{
        listen 127.0.0.1:{ports['nginx_tls']} ssl;
        root {root};
    }}{probe_server}""", worker_connections=worker_connections, rlimit_nofile=rlimit_nofile))


def write_expserver_config(path: Path, root: Path, ports: dict[str, int], cert: Path,
                           key: Path, protocols: list[str]) -> None:
    """One worker; a plain server and a TLS server (the same file_serve route on each)."""
    route = {"req_path": "/", "type": "file_serve", "dir_path": str(root)}
    servers = [
        {"listeners": [{"host": "127.0.0.1", "port": ports["expserver"]}], "routes": [route]},
        {"listeners": [{"host": "127.0.0.1", "port": ports["expserver_tls"], "tls": True}],
         "tls": {"cert": str(cert), "key": str(key), "protocols": protocols},
         "routes": [route]},
    ]
    path.write_text(json.dumps({"server_name": "eXpServer", "workers": 1,
                                "servers": servers}, indent=2))


def write_content(root: Path) -> dict[str, bytes]:
    rng = random.Random(1)
    content = {name: rng.randbytes(size) for name, size in FILES.items()}
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    for name, data in content.items():
        (root / name).write_bytes(data)
        (root / name).chmod(0o644)
    return content


# --------------------------------------------------------------------------- checks


def client_context(ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    return ctx


def fetch(port: int, path: str, ctx: ssl.SSLContext | None) -> tuple[int, bytes, str]:
    """(status, body, "TLSv1.3 TLS_AES_256_GCM_SHA384" or "plain")."""
    if ctx is None:
        conn: http.client.HTTPConnection = http.client.HTTPConnection(
            "127.0.0.1", port, timeout=10)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=ctx)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        how = "plain"
        if ctx is not None:
            sock = conn.sock
            how = f"{sock.version()} {sock.cipher()[0]}"  # type: ignore[union-attr]
        return resp.status, body, how
    finally:
        conn.close()


def check_scenario(sc: Scenario, ports: dict[str, int], expected: bytes,
                   ctx: ssl.SSLContext) -> str | None:
    """None when both servers answer 200 with the file's exact bytes, else why not."""
    seen = {}
    for server, port in ports.items():
        try:
            status, body, how = fetch(port, sc.path, ctx if sc.tls else None)
        except (OSError, ssl.SSLError) as exc:
            return f"{server}: {exc}"
        if status != 200:
            return f"{server}: status {status}"
        if body != expected:
            return f"{server}: body of {len(body)} bytes differs from the {len(expected)}-byte file"
        seen[server] = how
    print(f"  check: 200 and the exact {len(expected)} bytes from both ("
          + ", ".join(f"{s}: {v}" for s, v in seen.items()) + ")", file=sys.stderr)
    return None


def resumes(port: int, ctx: ssl.SSLContext) -> str:
    """Does the server resume a session it issued? Two connections from Python's ssl, the
    second offering the first one's session (read after a full response, so that a TLS 1.3
    ticket has arrived)."""
    session = None
    out = []
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as s:
                s.sendall(b"GET /1k.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                while s.recv(65536):
                    pass
                out.append(s.session_reused)
                session = s.session
    return "yes" if out == [False, True] else f"no ({out})"


def probe_tool(argv: list[str], log: Path) -> tuple[int, int]:
    """Run a load tool briefly against nginx's probe server: (full, resumed) handshakes."""
    log.write_text("")
    subprocess.run(argv, capture_output=True, timeout=60, check=False)
    time.sleep(0.3)
    lines = [line.split() for line in log.read_text().splitlines() if line.strip()]
    return (sum(1 for x in lines if x[-1] == "."), sum(1 for x in lines if x[-1] == "r"))


# --------------------------------------------------------------------------- load tools


def wrk_argv(sc: Scenario, port: int, duration: int) -> list[str]:
    scheme = "https" if sc.tls else "http"
    argv = ["wrk", "-t1", f"-c{sc.connections}", f"-d{duration}s", "--latency",
            "--timeout", "10s"]
    if sc.close:
        argv += ["-H", "Connection: close"]
    return argv + [f"{scheme}://127.0.0.1:{port}{sc.path}"]


def ab_argv(sc: Scenario, port: int, duration: int, requests: int = 1_000_000) -> list[str]:
    # -n after -t: ab's -t alone caps a run at 50,000 requests. -r: a reset connection is
    # counted, not fatal. No -k: one request per connection, a full handshake each.
    return ["ab", "-q", "-r", "-t", str(duration), "-n", str(requests),
            "-c", str(sc.connections), f"https://127.0.0.1:{port}{sc.path}"]


def parse_ab(server: str, out: str) -> Run:
    rps = re.search(r"^Requests per second:\s+([\d.]+)", out, re.M)
    done = re.search(r"^Complete requests:\s+(\d+)", out, re.M)
    failed = re.search(r"^Failed requests:\s+(\d+)", out, re.M)
    p50 = re.search(r"^\s+50%\s+(\d+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\d+)", out, re.M)
    if not (rps and done and failed and p50 and p99):
        raise RuntimeError(f"could not parse ab output:\n{out}")
    errors = {}
    if int(failed.group(1)):
        detail = re.search(r"\(Connect: (\d+), Receive: (\d+), Length: (\d+), Exceptions: (\d+)\)",
                           out)
        errors = dict(zip(("connect", "receive", "length", "exceptions"),
                          map(int, detail.groups()))) if detail else \
            {"failed": int(failed.group(1))}
    non2xx = re.search(r"^Non-2xx responses:\s+(\d+)", out, re.M)
    info = {}
    for key, pattern in (("protocol", r"^SSL/TLS Protocol:\s+(\S+)"),
                         ("temp_key", r"^Server Temp Key:\s+(.+)$")):
        m = re.search(pattern, out, re.M)
        if m:
            info[key] = m.group(1).strip()
    return Run(server, float(rps.group(1)), float(p99.group(1)), float(p50.group(1)),
               int(done.group(1)), errors, int(non2xx.group(1)) if non2xx else 0, info)


def run_load(server: str, port: int, sc: Scenario, duration: int,
             cpus: set[int] | None) -> Run:
    argv = ab_argv(sc, port, duration) if sc.tool == "ab" else wrk_argv(sc, port, duration)
    preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60,
                         preexec_fn=preexec, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({out.returncode}): {out.stderr or out.stdout}")
    if sc.tool == "ab":
        return parse_ab(server, out.stdout)
    w = cn.parse_wrk(server, out.stdout)
    return Run(server, w.req_per_sec, w.p99_ms, w.p50_ms, w.requests, w.errors, w.non_2xx)


def measured_round(server: str, pid: int, port: int, sc: Scenario, duration: int,
                   cpus: set[int] | None) -> Round:
    cpu0 = cp.cpu_times()
    jiffies0 = cp.tree_jiffies(pid)
    t0 = time.monotonic()
    run = run_load(server, port, sc, duration, cpus)
    elapsed = time.monotonic() - t0
    jiffies1 = cp.tree_jiffies(pid)
    cpu1 = cp.cpu_times()
    hz = os.sysconf("SC_CLK_TCK")
    busy = {c: round(1 - (cpu1[c][1] - cpu0[c][1]) / max(1, cpu1[c][0] - cpu0[c][0]), 3)
            for c in cpu1 if c in cpu0}
    result = Round(run, busy, round((jiffies1 - jiffies0) / hz / elapsed, 3))
    bad = sum(run.errors.values()) + run.non_2xx
    note = f"  [{bad} errors/non-2xx: {run.errors} non2xx={run.non_2xx}]" if bad else ""
    print(f"  {server:9s} {run.req_per_sec:10.0f} req/s  p50 {run.p50_ms:7.2f} ms  "
          f"p99 {run.p99_ms:7.2f} ms  server {result.server_cpu:.2f} cores "
          f"{result.cpu_us_per_request:7.1f} us/req; CPU busy "
          + ", ".join(f"{c} {v:.0%}" for c, v in busy.items()) + note, file=sys.stderr)
    return result


# --------------------------------------------------------------------------- report


def fmt_table(results: list[Result]) -> str:
    head = ("scenario", "target", "expserver req/s", "nginx req/s", "ratio exp/nginx",
            "paired ratio (median)", "met", "expserver p99", "nginx p99",
            "server CPU exp/nginx", "CPU us/req (median) exp/nginx", "ratio per CPU-s")
    rows = [head]
    for r in results:
        if r.skipped:
            rows.append((r.scenario, f">= {r.target:.1f}x", "skipped") + ("-",) * (len(head) - 3))
            continue
        e, n = r.best["expserver"], r.best["nginx"]
        ratio = e.run.req_per_sec / n.run.req_per_sec
        rows.append((r.scenario, f">= {r.target:.1f}x", f"{e.run.req_per_sec:,.0f}",
                     f"{n.run.req_per_sec:,.0f}", f"{ratio:.2f}",
                     f"{statistics.median(r.paired_ratios()):.2f}",
                     "yes" if ratio >= r.target else "NO",
                     f"{e.run.p99_ms:.2f} ms", f"{n.run.p99_ms:.2f} ms",
                     f"{e.server_cpu:.0%} / {n.server_cpu:.0%}",
                     f"{r.median_cpu_us('expserver'):.1f} / {r.median_cpu_us('nginx'):.1f}",
                     f"{r.median_cpu_us('nginx') / max(1e-9, r.median_cpu_us('expserver')):.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    for r in results:
        if r.skipped:
            lines.append(f"skipped {r.scenario}: {r.skipped}")
            continue
        paired = statistics.median(r.paired_ratios())
        best_ratio = r.best["expserver"].run.req_per_sec / r.best["nginx"].run.req_per_sec
        if (paired >= r.target) != (best_ratio >= r.target):
            lines.append(f"note {r.scenario}: the paired ratio ({paired:.2f}) and the best "
                         f"rounds' ({best_ratio:.2f}) fall on either side of the target")
        for s, best in r.best.items():
            rates = [x.run.req_per_sec for x in r.rounds if x.run.server == s]
            if len(rates) > 1 and min(rates) < 0.85 * max(rates):
                lines.append(f"noisy {r.scenario} {s}: rounds spread "
                             f"{min(rates):,.0f}..{max(rates):,.0f} req/s (try --rounds 4+)")
            bad = sum(best.run.errors.values()) + best.run.non_2xx
            if bad:
                lines.append(f"note {r.scenario} {s}: {bad} socket errors/non-2xx "
                             f"({best.run.errors}, non-2xx {best.run.non_2xx})")
            if best.server_cpu < 0.9:
                lines.append(f"note {r.scenario} {s}: the server used only "
                             f"{best.server_cpu:.0%} of its core -- the load generator or "
                             f"the machine limited this round; compare CPU us/req")
    return "\n".join(lines)


def environment(args: argparse.Namespace, pinned: bool, cert_kind: str) -> dict[str, object]:
    nginx_v = subprocess.run([h.nginx_binary(), "-V"], capture_output=True, text=True)
    built = re.search(r"built with (OpenSSL [^\n]*)", nginx_v.stderr)
    return {
        "nginx": h.tool_version([h.nginx_binary(), "-v"]),
        "nginx_openssl": built.group(1) if built else "?",
        "python_openssl": ssl.OPENSSL_VERSION,
        "wrk": h.tool_version(["wrk", "--version"]),
        "ab": h.tool_version(["ab", "-V"]),
        "certificate": cert_kind, "protocols": PROTOCOLS[args.protocol],
        **h.machine(), "duration_s": args.duration,
        "rounds": args.rounds, "aggregate": "best round per server (max req/s, its p99)",
        "pinned": pinned, "expserver_cmd": args.expserver_cmd,
        "cpu_busy_at_start": round(cn.cpu_busy(), 3),
    }


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=None, help="seconds per run (10)")
    ap.add_argument("--quick", action="store_true", help="2 s runs, 1 round, plain c64 only")
    ap.add_argument("--rounds", type=int, default=None,
                    help="runs of each server per scenario (3; --quick: 1)")
    ap.add_argument("--rsa", action="store_true", help="RSA 2048 certificate (default: "
                    "ECDSA P-256)")
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="both",
                    help="TLS versions both servers accept (both: TLSv1.2 TLSv1.3; the "
                         "clients then negotiate 1.3)")
    ap.add_argument("--only", nargs="+", choices=("tls", "handshake", "plain"),
                    help="run only these groups of scenarios")
    ap.add_argument("--json", type=Path, help="also save the results here")
    ap.add_argument("--expserver-cmd", default=h.DEFAULT_EXPSERVER_CMD,
                    help="command template; placeholders {python} {config} {dir} {port}")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="do not split CPUs between the servers and the load generator")
    args = ap.parse_args()
    if args.duration is None:
        args.duration = 2 if args.quick else 10
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3

    h.ensure_debian_packages({"nginx": "nginx-light", "wrk": "wrk", "ab": "apache2-utils"})
    h.install_signal_exit()
    h.raise_nofile_limit()
    server_cpus, load_cpus = h.split_cpus() if args.pin else (None, None)
    protocols = PROTOCOLS[args.protocol]

    servers: dict[str, h.Server] = {}
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="expserver-tls-bench-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        root = work / "www"
        content = write_content(root)
        cert, key, ca, cert_kind = make_certificate(work, args.rsa)
        for p in (cert, key):
            p.chmod(0o644)
        env = environment(args, server_cpus is not None, cert_kind)
        print(f"environment: {json.dumps(env)}", file=sys.stderr)
        if env["cpu_busy_at_start"] > 0.1:
            print(f"warning: the machine is not idle ({env['cpu_busy_at_start']:.0%} of CPU "
                  "busy before the run); figures will be noisy", file=sys.stderr)
        ports = {name: h.free_port() for name in
                 ("nginx", "nginx_tls", "nginx_probe", "expserver", "expserver_tls")}
        ctx = client_context(ca)
        try:
            conf = work / "nginx.conf"
            write_nginx_conf(conf, work, root, ports, cert, key, protocols)
            servers["nginx"] = h.start_nginx(conf, work, cpus=server_cpus)
            servers["nginx"].wait_ready([ports["nginx"], ports["nginx_tls"],
                                         ports["nginx_probe"]])
            config = work / "expserver.json"
            write_expserver_config(config, root, ports, cert, key, protocols)
            started = h.start_expserver(args.expserver_cmd, config=config, root=root,
                                        workdir=work, cpus=server_cpus,
                                        ports=[ports["expserver"], ports["expserver_tls"]])
            servers["expserver"] = started[0]
            print(f"ready: ports {ports}", file=sys.stderr)

            # What the load tools offer (checked on nginx's logging probe server) and
            # whether each server resumes a session when it is offered one.
            probe_log = work / "nginx_probe.log"
            probe_sc = Scenario("probe", "handshake", "ab", f"/{HANDSHAKE_FILE}", 4, 0)
            ab_hs = probe_tool(ab_argv(probe_sc, ports["nginx_probe"], 5, requests=200),
                               probe_log)
            probe_sc.close = True
            wrk_hs = probe_tool(wrk_argv(probe_sc, ports["nginx_probe"], 1), probe_log)
            resumption = {s: resumes(ports[f"{s}_tls"], ctx) for s in SERVERS}
            handshakes = {"ab": {"full": ab_hs[0], "resumed": ab_hs[1]},
                          "wrk_connection_close": {"full": wrk_hs[0], "resumed": wrk_hs[1]},
                          "server_resumes_offered_session": resumption}
            env["handshake_check"] = handshakes
            print(f"handshake check: ab -c 4: {ab_hs[0]} full, {ab_hs[1]} resumed; wrk -c 4 "
                  f"Connection: close: {wrk_hs[0]} full, {wrk_hs[1]} resumed; a server "
                  f"resumes an offered session: {resumption}", file=sys.stderr)

            for sc in scenarios(args.quick):
                if args.only and sc.group not in args.only:
                    continue
                suffix = "_tls" if sc.tls else ""
                sc_ports = {s: ports[s + suffix] for s in SERVERS}
                print(f"{sc.name}: {sc.what}", file=sys.stderr)
                why = check_scenario(sc, sc_ports, content[sc.path.lstrip("/")], ctx)
                if why is None and sc.tool == "ab" and ab_hs[1]:
                    why = f"ab resumed {ab_hs[1]} sessions: not full handshakes"
                if why is None and sc.close and "yes" not in resumption.values():
                    why = "no server resumes sessions"
                if why:
                    print(f"  SKIPPED: {why}", file=sys.stderr)
                    results.append(Result(sc.name, sc.group, sc.target, [], {}, skipped=why))
                    continue
                rounds: list[Round] = []
                for _ in range(args.rounds):
                    for s in SERVERS:
                        rounds.append(measured_round(s, servers[s].pid, sc_ports[s], sc,
                                                     args.duration, load_cpus))
                        time.sleep(0.5)
                best = {s: max((r for r in rounds if r.run.server == s),
                               key=lambda r: r.run.req_per_sec) for s in SERVERS}
                results.append(Result(sc.name, sc.group, sc.target, rounds, best))
        finally:
            for server in reversed(list(servers.values())):
                server.stop()

    print()
    print(f"{cert_kind} certificate, TLS {'/'.join(p[4:] for p in protocols)}; "
          f"{args.duration} s per run, {args.rounds} alternating round(s) per server, best "
          "round shown; ratio > 1 means expserver is faster; 'ratio per CPU-s' is nginx's "
          "median CPU time per request over expserver's (> 1: expserver costs less per "
          "request)")
    print(f"handshakes: full = {HANDSHAKE_CONCURRENCY} concurrent `ab` clients, no "
          f"keep-alive (ab offered no session: {ab_hs[0]} full, {ab_hs[1]} resumed in the "
          f"check); resumed = wrk -c{HANDSHAKE_CONCURRENCY} with Connection: close "
          f"({wrk_hs[1]} of {sum(wrk_hs)} resumed in the check); p99 of ab includes the "
          "connect and handshake, wrk's starts at the request")
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
