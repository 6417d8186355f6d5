#!/usr/bin/env python3
"""Slow clients: does a normal client still get prompt answers, and are slow ones cut?

    python bench/slowloris.py [--mode headers|body|read|all] [--with-nginx] [--quick]
                              [--json out.json]

Starts expserver (static files, one worker, header/body/send timeouts of --timeout
seconds, 10 by default) and attacks it with slowhttptest on 127.0.0.1:

    headers  slowhttptest -H -c 1000 -r 200 -i 10 -l 30   slowloris: a request head that
             never ends, one more header line every 10 s; cut by header_timeout (a total
             deadline from the first byte)
    body     slowhttptest -B -c 500 -r 200 -i 15 -l 30 -s 65536   slow POST to /upload (a
             reverse_proxy route to the upstream of upstream_server.py): a complete head
             announcing 64 KiB, then a few bytes every 15 s; cut by body_timeout (idle)
    read     slowhttptest -X -c 500 -r 200 -l 30 -w 512 -y 1024 -n 1 -z 32   slow read: GET
             of a 256 KiB file through a tiny receive window, 32 bytes read per second.
             The file fits the kernel's socket buffer, so the server is done with it at
             once; this shows responsiveness and memory, not send_timeout (bench/README.md)

Meanwhile a probe opens a fresh connection every 50 ms for the whole attack, sends
`GET /probe.html` and reads the whole 1 KiB reply, and records success and latency. The
report gives the probe's success rate and p50/p99/max latency, what slowhttptest saw
(peak connections held open, connections closed by the server, its own verdict), whether
every slow connection was closed by its deadline, and the server's RSS before, at its
peak during, and after the attack. --with-nginx runs the same against nginx (one worker,
client_header_timeout / client_body_timeout / send_timeout set to the same seconds).

CPU placement on 2 cores: the server under test alone on the first CPU, slowhttptest and
the probe on the second. Nothing here is a pass/fail test; the targets of issue 3
(probe success 100%, p99 < 100 ms under 1,000 slowloris connections) are printed beside
the figures for reading, not asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402
import compare_nginx as cn  # noqa: E402  (/proc/stat CPU sampling)
import upstream_server  # noqa: E402

PROBE_INTERVAL_S = 0.05
PROBE_TIMEOUT_S = 5.0
PROBE_BODY = (b"probe " * 200)[:1024]
# The slow readers' file. Linux lets a loopback socket's send buffer grow to ~4 MB, so a
# server hands a file of this size to the kernel at once; the 500 slow readers then pin
# ~0.3 GB of kernel socket memory (1 MiB would pin ~1.2 GB, near tcp_mem's pressure mark).
BIG_SIZE = 256 * 1024
RSS_SAMPLE_S = 0.25
# A slow connection counts as late if it is still open this long after its deadline
# (slowhttptest reports once per second, so less than 2 s cannot be told apart).
DEADLINE_SLACK_S = 2


@dataclass
class Mode:
    name: str
    flag: str           # slowhttptest's test-mode switch
    connections: int
    interval: int       # -i: seconds between follow-up bytes (headers, body)
    path: str           # what the slow clients ask for
    cut_by: str         # the server timeout that should close them
    extra: list[str] = field(default_factory=list)
    # Whether that timeout runs from the connection's first byte, so that "closed by
    # open + timeout" can be checked from slowhttptest's per-second figures.
    deadline_from_open: bool = True


MODES = {
    "headers": Mode("headers", "-H", 1000, 10, "/", "header_timeout (total, from the "
                    "first byte)"),
    "body": Mode("body", "-B", 500, 15, "/upload", "body_timeout (idle)", ["-s", "65536"]),
    "read": Mode("read", "-X", 500, 10, "/big.bin", "the kernel (see bench/README.md)",
                 ["-w", "512", "-y", "1024", "-n", "1", "-z", "32"], deadline_from_open=False),
}


@dataclass
class Report:
    server: str
    mode: str
    slowhttptest_argv: list[str]
    duration_s: float
    probes: int
    probe_ok: int
    probe_errors: dict[str, int]
    probe_p50_ms: float | None
    probe_p99_ms: float | None
    probe_max_ms: float | None
    slow_peak_open: int
    slow_opened: int
    slow_closed: int
    slow_errors: int
    slow_exit_status: str
    slow_service_unavailable_s: int
    late_connections: int | None  # most slow connections open past deadline + slack
    last_close_s: int | None   # second of the attack when the last slow connection closed
    rss_before_kib: int
    rss_peak_kib: int
    rss_after_kib: int
    timeline: list[list[int]]  # slowhttptest's CSV: second, closed, pending, connected
    server_died: str | None = None

    @property
    def probe_ok_pct(self) -> float:
        return 100.0 * self.probe_ok / max(1, self.probes)


# --------------------------------------------------------------------------- servers


def write_content(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    files = {"index.html": b"<!DOCTYPE html>\n<title>slowloris target</title>\n",
             "probe.html": PROBE_BODY, "big.bin": os.urandom(BIG_SIZE)}
    for name, data in files.items():
        (root / name).write_bytes(data)
        (root / name).chmod(0o644)


def write_expserver_config(path: Path, root: Path, port: int, timeout: float,
                           upstream_port: int | None) -> None:
    routes: list[dict[str, object]] = [
        {"req_path": "/", "type": "file_serve", "dir_path": str(root)}]
    if upstream_port is not None:
        routes.append({"req_path": "/upload", "type": "reverse_proxy",
                       "upstreams": [f"127.0.0.1:{upstream_port}"]})
    path.write_text(json.dumps({
        "server_name": "eXpServer", "workers": 1,
        "header_timeout": timeout, "body_timeout": timeout, "send_timeout": timeout,
        "servers": [{"listeners": [{"host": "127.0.0.1", "port": port}],
                     "routes": routes}]}, indent=2))


def write_nginx_conf(path: Path, workdir: Path, root: Path, port: int, timeout: float,
                     upstream_port: int | None) -> None:
    secs = f"{max(1, round(timeout))}s"
    upload = "" if upstream_port is None else f"""
        location = /upload {{
            proxy_pass http://127.0.0.1:{upstream_port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}"""
    path.write_text(h.nginx_conf(workdir, f"""    types {{
        text/html html;
        application/octet-stream bin;
    }}
    default_type application/octet-stream;
    access_log off;
    sendfile on;
    keepalive_timeout 75;
    client_header_timeout {secs};
    client_body_timeout {secs};
    send_timeout {secs};

    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {root};{upload}
    }}""", worker_connections=8192, rlimit_nofile=20000))


def serving_pid(server: h.Server) -> int:
    """nginx's worker (the master only supervises); expserver itself, or its worker."""
    kids = h.descendants(server.pid)
    return kids[-1] if kids else server.pid


# --------------------------------------------------------------------------- probe


@dataclass
class Probe:
    ok: bool
    latency_s: float
    error: str = ""


async def probe_once(port: int) -> Probe:
    t0 = time.perf_counter()
    writer = None
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /probe.html HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Connection: close\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, _, fields = head.partition(b"\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", fields)
            body = await reader.readexactly(int(length.group(1))) if length else b""
        elapsed = time.perf_counter() - t0
        if not status_line.startswith(b"HTTP/1.1 200 "):
            return Probe(False, elapsed, f"status {status_line[:40]!r}")
        if body != PROBE_BODY:
            return Probe(False, elapsed, "wrong body")
        return Probe(True, elapsed)
    except TimeoutError:
        return Probe(False, time.perf_counter() - t0, "timeout")
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        return Probe(False, time.perf_counter() - t0, type(exc).__name__)
    finally:
        if writer is not None:
            writer.close()


async def probe_until(port: int, stop: asyncio.Event) -> list[Probe]:
    """A fresh-connection probe every PROBE_INTERVAL_S (on a fixed schedule, so a slow
    answer does not delay the next probe) until stop is set; then wait for the last."""
    tasks: list[asyncio.Task[Probe]] = []
    next_at = time.monotonic()
    while not stop.is_set():
        tasks.append(asyncio.create_task(probe_once(port)))
        next_at += PROBE_INTERVAL_S
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))
        except TimeoutError:
            pass
    return list(await asyncio.gather(*tasks))


async def sample_rss(pid: int, stop: asyncio.Event) -> int:
    peak = 0
    while not stop.is_set():
        try:
            peak = max(peak, h.rss_kib(pid))
        except (OSError, RuntimeError):
            break
        try:
            await asyncio.wait_for(stop.wait(), RSS_SAMPLE_S)
        except TimeoutError:
            pass
    return peak


# --------------------------------------------------------------------------- slowhttptest

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def slowhttptest_argv(mode: Mode, port: int, length: int, out_prefix: Path) -> list[str]:
    return ["slowhttptest", mode.flag, "-c", str(mode.connections), "-r", "200",
            "-i", str(mode.interval), "-l", str(length), "-p", "3", *mode.extra,
            "-u", f"http://127.0.0.1:{port}{mode.path}", "-g", "-o", str(out_prefix)]


def parse_slowhttptest(stdout: str, csv_path: Path) -> dict[str, object]:
    text = _ANSI.sub("", stdout)

    def last(label: str) -> int:
        found = re.findall(rf"^{label}:\s+(\d+)", text, re.M)
        return int(found[-1]) if found else 0

    exit_status = re.search(r"Exit status:\s*(.+)", text)
    ended = re.search(r"Test ended on (\d+)\w* second", text)
    timeline: list[list[int]] = []
    unavailable = 0
    if csv_path.exists():
        for line in csv_path.read_text().splitlines()[1:]:
            cells = [int(x) for x in line.split(",")]
            # Seconds, Closed, Pending, Connected, Service Available (0 = probe failed;
            # otherwise slowhttptest writes the connection count there, for its chart).
            timeline.append(cells[:4])
            unavailable += cells[4] == 0
    return {"closed": last("closed"), "error": last("error"),
            "exit_status": exit_status.group(1).strip() if exit_status else "?",
            "ended_s": int(ended.group(1)) if ended else None,
            "timeline": timeline, "unavailable_s": unavailable}


def deadline_check(timeline: list[list[int]], deadline_s: float) -> tuple[int, int | None]:
    """(most connections open past their deadline + slack, second of the last close).

    A connection opened by second t should be closed by t + deadline + slack, so the
    connections opened by then minus those closed by then must not exceed zero. Opened
    by t = closed + connected at t (slowhttptest's cumulative figures).
    """
    opened = {s: c + conn for s, c, _pending, conn in timeline}
    closed = {s: c for s, c, _pending, _conn in timeline}
    late = 0
    lag = int(deadline_s) + DEADLINE_SLACK_S
    for s in closed:
        if s - lag in opened:
            late = max(late, opened[s - lag] - closed[s])
    total = max(opened.values(), default=0)
    last_close = next((s for s, c, _p, _n in timeline if total and c >= total), None)
    return late, last_close


# --------------------------------------------------------------------------- one run


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))]


async def attack(server: h.Server, port: int, mode: Mode, length: int, timeout: float,
                 work: Path, cpus: set[int] | None) -> Report:
    pid = serving_pid(server)
    for _ in range(8):  # warm up: the first requests load modules, fill caches
        await probe_once(port)
    await asyncio.sleep(0.5)
    rss_before = h.rss_kib(pid)

    prefix = work / f"slowhttptest-{server.name}-{mode.name}"
    argv = slowhttptest_argv(mode, port, length, prefix)
    print(f"  {' '.join(argv)}", file=sys.stderr)
    stop = asyncio.Event()
    probes_task = asyncio.create_task(probe_until(port, stop))
    rss_task = asyncio.create_task(sample_rss(pid, stop))
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=work,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    try:
        stdout, _ = await asyncio.wait_for(proc.communicate(), length + 60)
    except TimeoutError:
        proc.kill()
        stdout, _ = await proc.communicate()
    duration = time.monotonic() - t0
    stop.set()
    probes = await probes_task
    rss_peak = await rss_task
    await asyncio.sleep(1.0)
    try:
        rss_after = h.rss_kib(pid)
    except (OSError, RuntimeError):  # the server died; the caller reports it
        rss_after = 0

    slow = parse_slowhttptest(stdout.decode(errors="replace"), prefix.with_suffix(".csv"))
    if not slow["timeline"]:
        raise RuntimeError(f"slowhttptest wrote no report (status {proc.returncode}):\n"
                           f"{_ANSI.sub('', stdout.decode(errors='replace'))[-2000:]}")
    timeline = slow["timeline"]
    late, last_close = deadline_check(timeline, timeout)
    if not mode.deadline_from_open:
        late = None
    opened = max(c + conn for _s, c, _p, conn in timeline)
    closed = int(slow["closed"])
    if "no open connections left" in str(slow["exit_status"]).lower():
        # slowhttptest stops as soon as the server has closed every connection, before
        # its last once-a-second report: the report's figures are a second stale.
        closed = opened - int(slow["error"])
        if last_close is None:
            last_close = slow["ended_s"]
    ok = [p.latency_s * 1000 for p in probes if p.ok]
    errors: dict[str, int] = {}
    for p in probes:
        if not p.ok:
            errors[p.error] = errors.get(p.error, 0) + 1
    return Report(
        server=server.name, mode=mode.name, slowhttptest_argv=argv,
        duration_s=round(duration, 1), probes=len(probes), probe_ok=len(ok),
        probe_errors=errors,
        probe_p50_ms=round(statistics.median(ok), 2) if ok else None,
        probe_p99_ms=round(percentile(ok, 0.99), 2) if ok else None,
        probe_max_ms=round(max(ok), 2) if ok else None,
        slow_peak_open=max(conn for _s, _c, _p, conn in timeline),
        slow_opened=opened, slow_closed=closed, slow_errors=int(slow["error"]),
        slow_exit_status=str(slow["exit_status"]),
        slow_service_unavailable_s=int(slow["unavailable_s"]),
        late_connections=late, last_close_s=last_close,
        rss_before_kib=rss_before, rss_peak_kib=max(rss_peak, rss_before),
        rss_after_kib=rss_after, timeline=timeline)


# --------------------------------------------------------------------------- report


def fmt_table(reports: list[Report]) -> str:
    head = ("mode", "server", "slow open (peak)", "closed by server", "late", "last close",
            "probe ok", "probe p50", "probe p99", "probe max", "RSS before/peak/after MiB")
    rows = [head]
    for r in reports:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f} ms"
        rows.append((
            r.mode, r.server, f"{r.slow_peak_open} of {r.slow_opened}",
            f"{r.slow_closed}", "n/a" if r.late_connections is None else f"{r.late_connections}",
            "-" if r.last_close_s is None else f"{r.last_close_s} s",
            f"{r.probe_ok_pct:.2f}% of {r.probes}", ms(r.probe_p50_ms), ms(r.probe_p99_ms),
            ms(r.probe_max_ms),
            f"{r.rss_before_kib / 1024:.1f} / {r.rss_peak_kib / 1024:.1f} / "
            f"{r.rss_after_kib / 1024:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) if i < 2 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    for r in reports:
        lines.append(f"{r.mode}/{r.server}: slowhttptest: {r.slow_exit_status}; its own probe "
                     f"saw the service unavailable for {r.slow_service_unavailable_s} s; "
                     f"attack lasted {r.duration_s} s")
        if r.probe_errors:
            lines.append(f"{r.mode}/{r.server}: failed probes: {r.probe_errors}")
        if r.server_died:
            lines.append(f"{r.mode}/{r.server}: {r.server_died}")
    return "\n".join(lines)


def run_one(name: str, mode: Mode, args: argparse.Namespace, work: Path, root: Path,
            length: int, timeout: float, upstream_port: int | None,
            server_cpus: set[int] | None, attacker_cpus: set[int] | None) -> Report:
    """Start one server on a fresh port, attack it, stop it."""
    port = h.free_port()
    servers: list[h.Server] = []
    try:
        if name == "expserver":
            config = work / "expserver.json"
            write_expserver_config(config, root, port, timeout, upstream_port)
            servers = h.start_expserver(args.expserver_cmd, config=config, root=root,
                                        workdir=work, cpus=server_cpus, ports=[port])
        else:
            conf = work / "nginx.conf"
            write_nginx_conf(conf, work, root, port, timeout, upstream_port)
            servers = [h.start_nginx(conf, work, cpus=server_cpus)]
            servers[0].wait_ready([port])
        report = asyncio.run(attack(servers[0], port, mode, length, timeout, work,
                                    attacker_cpus))
        if servers[0].proc.poll() is not None:
            report.server_died = (f"{name} exited ({servers[0].proc.returncode}) during the "
                                  f"attack:\n{servers[0].log_tail()}")
        return report
    finally:
        for server in servers:
            server.stop()


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=[*MODES, "all"], default="headers")
    ap.add_argument("--with-nginx", action="store_true", help="also attack nginx")
    ap.add_argument("--quick", action="store_true",
                    help="12 s attacks against 5 s server timeouts (same connection counts)")
    ap.add_argument("--length", type=int, help="slowhttptest -l: attack length, s (30)")
    ap.add_argument("--timeout", type=float, help="the servers' header/body/send timeouts, "
                    "s (10)")
    ap.add_argument("--expserver-cmd", default=h.DEFAULT_EXPSERVER_CMD,
                    help="command template with {python} {config}")
    ap.add_argument("--json", type=Path, help="also save the results here")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="do not split CPUs between the server and the attackers")
    args = ap.parse_args()
    length = args.length or (12 if args.quick else 30)
    timeout = args.timeout or (5.0 if args.quick else 10.0)
    modes = list(MODES.values()) if args.mode == "all" else [MODES[args.mode]]
    if args.quick:  # keep the interval above the timeout it should trip
        modes = [Mode(**{**asdict(m), "interval": min(m.interval, int(timeout) + 3)})
                 for m in modes]

    needs_nginx = args.with_nginx or any(m.name == "body" for m in modes)
    h.ensure_debian_packages({"slowhttptest": "slowhttptest",
                              **({"nginx": "nginx-light"} if needs_nginx else {})})
    h.install_signal_exit()
    h.raise_nofile_limit()
    server_cpus, attacker_cpus = h.split_cpus() if args.pin else (None, None)
    if attacker_cpus:
        os.sched_setaffinity(0, attacker_cpus)  # the probe runs in this process
    version = re.search(r"version ([\d.]+)", subprocess.run(
        ["slowhttptest", "-h"], capture_output=True, text=True).stdout)
    env = {"slowhttptest": version.group(1) if version else "?",
           "cpus": os.cpu_count(), "server_cpus": sorted(server_cpus or []),
           "attacker_cpus": sorted(attacker_cpus or []), "length_s": length,
           "timeout_s": timeout, "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
           "cpu_busy_at_start": round(cn.cpu_busy(), 3)}
    if args.with_nginx:
        env["nginx"] = h.tool_version([h.nginx_binary(), "-v"])
    print(f"environment: {json.dumps(env)}", file=sys.stderr)
    if env["cpu_busy_at_start"] > 0.1:
        print(f"warning: the machine is not idle ({env['cpu_busy_at_start']:.0%} of CPU busy "
              "before the run); latencies will be noisy", file=sys.stderr)

    reports: list[Report] = []
    upstream: h.Server | None = None
    with tempfile.TemporaryDirectory(prefix="expserver-slowloris-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        root = work / "www"
        write_content(root)
        upstream_port = None
        if any(m.name == "body" for m in modes):
            # The slow POSTs go to a reverse_proxy route: a static route answers a POST
            # with 405 at once, and slowhttptest's `Connection: close` lets the server
            # close right after, so there would be no slow body to read.
            upstream_port = h.free_port()
            upstream, _ = upstream_server.start(work, upstream_port, cpus=attacker_cpus)
        try:
            for mode in modes:
                for name in ["expserver", *(["nginx"] if args.with_nginx else [])]:
                    print(f"{mode.name} vs {name}: {mode.connections} connections, cut by "
                          f"{mode.cut_by} = {timeout:g} s", file=sys.stderr)
                    report = run_one(name, mode, args, work, root, length, timeout,
                                     upstream_port, server_cpus, attacker_cpus)
                    reports.append(report)
                    print(f"  probe {report.probe_ok_pct:.2f}% ok of {report.probes}, p99 "
                          f"{report.probe_p99_ms} ms, max {report.probe_max_ms} ms; slow "
                          f"connections: peak {report.slow_peak_open} open, "
                          f"{report.slow_closed} closed; RSS {report.rss_before_kib} -> "
                          f"{report.rss_peak_kib} -> {report.rss_after_kib} KiB",
                          file=sys.stderr)
                    time.sleep(1.0)
        finally:
            if upstream is not None:
                upstream.stop()

    print()
    print(f"slowhttptest against one worker on 127.0.0.1, server timeouts {timeout:g} s, "
          f"probe: a fresh connection GET of 1 KiB every {PROBE_INTERVAL_S * 1000:.0f} ms "
          f"(percentiles over successful probes); issue 3's target under 1,000 slowloris "
          f"connections: 100% ok, p99 < 100 ms")
    print("late: most slow connections still open more than "
          f"{DEADLINE_SLACK_S} s past their deadline; last close: second of the attack when "
          "the last one was closed")
    print(fmt_table(reports))
    if args.json:
        args.json.write_text(json.dumps({"environment": env,
                                         "results": [asdict(r) for r in reports]}, indent=2))
        print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
