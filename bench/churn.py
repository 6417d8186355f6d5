#!/usr/bin/env python3
"""Memory under connection churn: do connections that reset at once leave anything behind?

    python bench/churn.py [--duration 60] [--quick] [--mode reset|request] [--send-partial]
                          [--rate-cap N] [--no-nginx] [--max-rss-mib 2048] [--json out.json]

Starts expserver (one worker, a file_serve route on a temp dir holding a 1 KiB
`probe.html`) and, unless --no-nginx, nginx (one worker, same files). For each server in
turn, one load process runs for --duration seconds (60; --quick: 10) a tight loop of
socket() / setsockopt(SO_LINGER, on, 0 s) / blocking connect() / close(): the close sends
an RST, so the server accepts a connection whose peer is already gone. Before the reset
it sends nothing (`--mode reset`, the default), an unfinished head (`--send-partial`), or
(`--mode request`) a whole `GET /probe.html` head, so that a request is dispatched and
its answer written to a connection that is being reset.

Meanwhile a probe in this process opens a fresh connection every 50 ms (fixed schedule),
sends `GET /probe.html` with `Connection: close`, and wants a 200 with the exact bytes
within 5 s (latency: connect to last byte); the RSS of the server's process tree (nginx:
master + worker) is sampled every second. Report per server: connections/s achieved,
probe success and p50/p99/max, RSS at the start, at the end of the churn, peak and 5 s
after, growth (end - start), and the serving process's descriptors (/proc/PID/fd) before
and 2 s after, a leak check. Targets for reading, not asserted: RSS growth < 32 MiB after
60 s of churn, probe p99 < 20 ms; nginx in the same run shows what the machine allows.
Past --max-rss-mib (2048) a server's churn ends early, and the report says so. CPUs: the
server alone on the first, load and probe on the second (--no-pin: none). Everything
targets 127.0.0.1 and stops what it started, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402
import compare_nginx as cn  # noqa: E402  (/proc/stat CPU sampling)
from slowloris import percentile  # noqa: E402

PROBE_INTERVAL_S = 0.05
PROBE_TIMEOUT_S = 5.0
PROBE_BODY = (b"churn probe " * 100)[:1024]
PROBE_REQUEST = b"GET /probe.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
CHURN_REQUEST = b"GET /probe.html HTTP/1.1\r\nHost: x\r\n\r\n"
CHURN_PARTIAL = b"GET /probe.html HTTP/1.1\r\nHost: x\r\n"
TARGET_GROWTH_MIB = 32
TARGET_P99_MS = 20
FDS_AFTER_S = 2.0
RSS_AFTER_S = 5.0


# --------------------------------------------------------------------------- load process


def run_load(args: argparse.Namespace) -> int:
    """The churn loop (a child process of this script); prints its counts as JSON."""
    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signum, _frame: stopping.append(True))
    addr, linger = ("127.0.0.1", args.load), struct.pack("ii", 1, 0)
    payload = (CHURN_REQUEST if args.mode == "request"
               else CHURN_PARTIAL if args.send_partial else b"")
    conns = errors = last_count = 0
    kinds: Counter[str] = Counter()
    per_second: list[int] = []
    t0 = last_second = time.monotonic()
    while not stopping:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            s.connect(addr)
            if payload:
                s.send(payload)
            conns += 1
        except OSError as exc:
            errors += 1
            kinds[errno.errorcode.get(exc.errno or 0, type(exc).__name__)] += 1
        finally:
            s.close()
        now = time.monotonic()
        if now >= last_second + 1:
            per_second.append(conns - last_count)
            last_count, last_second = conns, last_second + 1
        if now >= t0 + args.duration:
            break
        if args.rate_cap:
            wait = t0 + (conns + errors) / args.rate_cap - now
            if wait > 0:
                time.sleep(wait)
    print(json.dumps({"conns": conns, "errors": errors, "error_kinds": kinds,
                      "elapsed_s": round(time.monotonic() - t0, 2), "per_second": per_second,
                      "stopped_by_signal": bool(stopping)}))
    return 0


# --------------------------------------------------------------------------- probe


async def probe_once(port: int) -> tuple[bool, float, str]:
    t0 = time.perf_counter()
    writer = None
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(PROBE_REQUEST)
            data = await reader.read(-1)   # Connection: close: read to EOF
        elapsed = time.perf_counter() - t0
        head, _, body = data.partition(b"\r\n\r\n")
        why = "" if head.startswith(b"HTTP/1.1 200 ") else f"status {head[:30]!r}"
        why = why or ("" if body == PROBE_BODY else "wrong body")
        return not why, elapsed, why
    except OSError as exc:  # TimeoutError is one
        why = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
        return False, time.perf_counter() - t0, why
    finally:
        if writer is not None:
            writer.close()


async def probe_until(port: int, stop: asyncio.Event) -> list[tuple[bool, float, str]]:
    tasks: list[asyncio.Task[tuple[bool, float, str]]] = []
    next_at = time.monotonic()
    while not stop.is_set():
        tasks.append(asyncio.create_task(probe_once(port)))
        next_at += PROBE_INTERVAL_S
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))
        except TimeoutError:
            pass
    return list(await asyncio.gather(*tasks))


def tree_rss_kib(pid: int) -> int:
    """VmRSS of pid and all its descendants (0 for a process that is gone)."""
    def one(p: int) -> int:
        try:
            return h.rss_kib(p)
        except (OSError, RuntimeError):
            return 0
    return sum(one(p) for p in [pid, *h.descendants(pid)])


def listen_overflows() -> int:
    """TcpExt ListenOverflows (whole network namespace): SYNs dropped on a full accept queue."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    return int(lines[1].split()[lines[0].split().index("ListenOverflows")])


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


# --------------------------------------------------------------------------- one server


async def measure(server: h.Server, port: int, args: argparse.Namespace,
                  load_cpus: set[int] | None) -> dict[str, object]:
    pid = ([server.pid, *h.descendants(server.pid)])[-1]  # nginx's worker, or expserver
    for _ in range(8):  # warm up: the first requests load modules, fill caches
        await probe_once(port)
    await asyncio.sleep(0.5)
    rss_start, fds_start, overflows = tree_rss_kib(server.pid), fd_count(pid), listen_overflows()
    argv = [sys.executable, str(Path(__file__).resolve()), "--load", str(port),
            "--duration", str(args.duration), "--mode", args.mode,
            *(["--send-partial"] if args.send_partial else []),
            *(["--rate-cap", str(args.rate_cap)] if args.rate_cap else [])]
    stop, samples, early, t0 = asyncio.Event(), [], None, time.monotonic()
    probes = asyncio.create_task(probe_until(port, stop))
    load = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            preexec_fn=(lambda: os.sched_setaffinity(0, load_cpus))
                            if load_cpus else None)
    try:
        while load.poll() is None:
            await asyncio.sleep(0.1)
            if time.monotonic() - t0 < len(samples) + 1:
                continue
            rss = tree_rss_kib(server.pid)
            samples.append([round(time.monotonic() - t0, 1), rss])
            if early is None and rss > args.max_rss_mib * 1024:
                early = f"RSS {rss / 1024:.0f} MiB > --max-rss-mib at {samples[-1][0]} s"
            elif early is None and server.proc.poll() is not None:
                early = f"server exited ({server.proc.returncode}) at {samples[-1][0]} s"
            if early is not None:
                load.terminate()
            if time.monotonic() - t0 > args.duration + 15:
                load.kill()
        out = load.stdout.read() if load.stdout else b""
    finally:
        if load.poll() is None:
            load.kill()
        load.wait()
    t_end, rss_end = time.monotonic(), tree_rss_kib(server.pid)
    overflows = listen_overflows() - overflows
    stop.set()
    await asyncio.sleep(max(0.0, t_end + FDS_AFTER_S - time.monotonic()))
    fds_after = fd_count(pid)
    await asyncio.sleep(max(0.0, t_end + RSS_AFTER_S - time.monotonic()))
    rss_after = tree_rss_kib(server.pid)
    results = await probes
    churn = json.loads(out.decode() or "{}") or {"conns": 0, "errors": 0, "elapsed_s": 1,
                                                  "error_kinds": {}, "per_second": []}
    ok = [lat * 1000 for good, lat, _ in results if good]
    failures = Counter(why for good, _lat, why in results if not good)
    return {
        "server": server.name, "mode": args.mode + (" partial" if args.send_partial else ""),
        "churn": churn, "conns_per_s": round(churn["conns"] / max(0.01, churn["elapsed_s"])),
        "probes": len(results), "probe_ok": len(ok), "probe_failures": dict(failures),
        "probe_p50_ms": round(statistics.median(ok), 2) if ok else None,
        "probe_p99_ms": round(percentile(ok, 0.99), 2) if ok else None,
        "probe_max_ms": round(max(ok), 2) if ok else None,
        "rss_start_kib": rss_start, "rss_end_kib": rss_end,
        "rss_peak_kib": max([rss_start, rss_end, *(s[1] for s in samples)]),
        "rss_after_kib": rss_after, "growth_kib": rss_end - rss_start,
        "fds_start": fds_start, "fds_after": fds_after, "stopped_early": early,
        "listen_overflows": overflows, "rss_samples": samples,
        "server_alive": server.proc.poll() is None}


# --------------------------------------------------------------------------- report


def fmt_table(reports: list[dict]) -> str:
    head = ("server", "mode", "conns/s", "load errors", "probe ok", "p50 ms", "p99 ms (<20)",
            "max ms", "RSS start/end/peak/after MiB", "growth MiB (<32)", "fds before/after")
    rows = [head]
    ms = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for r in reports:
        mib = [r[k] / 1024 for k in ("rss_start_kib", "rss_end_kib", "rss_peak_kib",
                                     "rss_after_kib")]
        rows.append((
            r["server"], r["mode"], f"{r['conns_per_s']:,}", f"{r['churn']['errors']:,}",
            f"{100 * r['probe_ok'] / max(1, r['probes']):.2f}% of {r['probes']}",
            ms(r["probe_p50_ms"]), ms(r["probe_p99_ms"]), ms(r["probe_max_ms"]),
            " / ".join(f"{m:.1f}" for m in mib), f"{r['growth_kib'] / 1024:+.1f}",
            f"{r['fds_start']} / {r['fds_after']}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) if i < 2 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    for r in reports:
        notes = [f"{r['churn']['conns']:,} connections in {r['churn']['elapsed_s']} s",
                 f"{r['listen_overflows']} SYNs dropped on a full accept queue",
                 f"slowest second of the load {min(r['churn']['per_second'] or [0]):,} conns",
                 *([f"load errors {r['churn']['error_kinds']}"] if r["churn"]["errors"] else []),
                 *([f"failed probes {r['probe_failures']}"] if r["probe_failures"] else []),
                 *([f"churn STOPPED EARLY: {r['stopped_early']}"] if r["stopped_early"] else []),
                 *([] if r["server_alive"] else ["the server was not running at the end"])]
        lines.append(f"{r['server']}/{r['mode']}: " + "; ".join(notes))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, help="seconds of churn per server (60)")
    ap.add_argument("--quick", action="store_true", help="10 s of churn per server")
    ap.add_argument("--mode", choices=["reset", "request"], default="reset")
    ap.add_argument("--send-partial", action="store_true", help="send an unfinished head")
    ap.add_argument("--rate-cap", type=float, help="at most this many connections/s")
    ap.add_argument("--with-nginx", action="store_true", default=True, help="(default)")
    ap.add_argument("--no-nginx", dest="with_nginx", action="store_false")
    ap.add_argument("--max-rss-mib", type=float, default=2048,
                    help="end a server's churn early when its RSS passes this (2048)")
    ap.add_argument("--expserver-cmd", default=h.DEFAULT_EXPSERVER_CMD,
                    help="command template with {python} {config}")
    ap.add_argument("--json", type=Path, help="also save the results here")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="no CPU affinity")
    ap.add_argument("--load", type=int, help=argparse.SUPPRESS)  # internal: the churn child
    args = ap.parse_args()
    args.duration = args.duration or (10.0 if args.quick else 60.0)
    if args.load:
        return run_load(args)

    if args.with_nginx:
        h.ensure_debian_packages({"nginx": "nginx-light"})
    h.install_signal_exit()
    h.raise_nofile_limit()
    server_cpus, load_cpus = h.split_cpus() if args.pin else (None, None)
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)  # the probe runs in this process
    env = {"cpus": os.cpu_count(), "server_cpus": sorted(server_cpus or []),
           "load_cpus": sorted(load_cpus or []), "duration_s": args.duration,
           "mode": args.mode, "send_partial": args.send_partial, "rate_cap": args.rate_cap,
           "nginx": h.tool_version([h.nginx_binary(), "-v"]) if args.with_nginx else None,
           "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
           "cpu_busy_at_start": round(cn.cpu_busy(), 3)}
    print(f"environment: {json.dumps(env)}", file=sys.stderr)
    if env["cpu_busy_at_start"] > 0.1:  # the shared build box often is
        print(f"warning: the machine is not idle ({env['cpu_busy_at_start']:.0%} of CPU busy "
              "before the run); figures will be noisy", file=sys.stderr)

    reports: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="expserver-churn-") as tmp:
        work, root = Path(tmp), Path(tmp) / "www"
        root.mkdir(mode=0o755)
        work.chmod(0o755)  # nginx's worker may run as another user
        (root / "probe.html").write_bytes(PROBE_BODY)
        for name in ["expserver", *(["nginx"] if args.with_nginx else [])]:
            port = h.free_port()
            servers: list[h.Server] = []
            try:
                if name == "expserver":
                    h.write_expserver_config(work / "expserver.json", root, port)
                    servers = h.start_expserver(args.expserver_cmd, config=work / "expserver.json",
                                                root=root, workdir=work, cpus=server_cpus,
                                                ports=[port])
                else:
                    h.write_nginx_conf(work / "nginx.conf", work, root, port,
                                       worker_connections=8192, rlimit_nofile=20000)
                    servers = [h.start_nginx(work / "nginx.conf", work, cpus=server_cpus)]
                    servers[0].wait_ready([port])
                print(f"{name}: {args.duration:g} s of churn ...", file=sys.stderr)
                r = asyncio.run(measure(servers[0], port, args, load_cpus))
                if not r["server_alive"]:
                    print(servers[0].log_tail(), file=sys.stderr)
                reports.append(r)
                print(f"  {r['conns_per_s']:,} conns/s; probe p99 {r['probe_p99_ms']} ms; "
                      f"RSS {r['rss_start_kib']} -> {r['rss_end_kib']} -> "
                      f"{r['rss_after_kib']} KiB", file=sys.stderr)
            finally:
                for server in servers:
                    server.stop()
            time.sleep(1.0)

    print()
    print(f"connection churn against one worker on 127.0.0.1: {args.duration:g} s per server, "
          f"one load process (socket/SO_LINGER 0/connect/close), probe every "
          f"{PROBE_INTERVAL_S * 1000:.0f} ms; RSS of the server's process tree")
    print(f"targets for reading: RSS growth < {TARGET_GROWTH_MIB} MiB after 60 s of churn, "
          f"probe p99 < {TARGET_P99_MS} ms; fds after should equal fds before")
    print(fmt_table(reports))
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "results": reports}, indent=2))
        print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
