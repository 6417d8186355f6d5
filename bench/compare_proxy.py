#!/usr/bin/env python3
"""Reverse-proxy comparison: expserver against nginx in front of the same upstream.

    python bench/compare_proxy.py [--duration S] [--quick] [--rounds N] [--json out.json]

One upstream (a separate one-worker nginx answering `return 200` with a 1 KiB body, see
bench/upstream_server.py) serves both proxies. Each proxy runs one worker and keeps up to
64 idle connections to it: nginx with `upstream u { server ...; keepalive 64; }`,
`proxy_http_version 1.1`, `proxy_set_header Connection ""`; expserver with a
`reverse_proxy` route and `upstream_keepalive: 64`. Both are checked first (status 200 and
the upstream's exact body); then `wrk -t1 -c C -d S --latency --timeout 10s` runs against
expserver, nginx, expserver, nginx (--rounds of each) at 64 and 256 connections, and the
best round of each proxy is reported (highest req/s, with that round's p99).

At 64 connections both pools can hold every upstream connection; at 256 they cannot, and
the connections beyond the 64 idle ones are opened and closed as needed.

CPU placement (2 cores, 3 busy processes): by default the proxy under test gets a core of
its own, and the upstream and wrk share the other (--pin split). Each round prints how
busy every CPU and each process was, so that a round where the proxy was not the
bottleneck is visible; see bench/README.md for why and for the other layouts.

The figures are ratios measured in one run; they are not comparable across machines,
and nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402
import compare_nginx as cn  # noqa: E402  (wrk runner and parser, /proc/stat CPU sampling)
import upstream_server  # noqa: E402

PROXIES = ("expserver", "nginx")
UPSTREAM_KEEPALIVE = 64
# One process per CPU in the layouts below; the server side is the proxy under test.
PIN_LAYOUTS = {
    "split": "proxy alone on CPU A; upstream and wrk share CPU B",
    "shared": "proxy and upstream share CPU A; wrk alone on CPU B",
    "none": "no affinity: the scheduler places all three",
}


@dataclass
class Round:
    """One wrk run, plus how busy the CPUs and the servers were meanwhile."""
    wrk: cn.WrkRun
    cpu_busy: dict[str, float] = field(default_factory=dict)   # "cpu0" -> 0..1
    proc_cpu: dict[str, float] = field(default_factory=dict)   # "proxy"/"upstream" -> cores
    # From the upstream's stub_status: connections it accepted and requests it served
    # during the round (how often the proxy's pool fell back to a new connection).
    upstream: dict[str, int] = field(default_factory=dict)

    @property
    def new_conns_per_1k(self) -> float:
        return 1000 * self.upstream.get("accepts", 0) / max(1, self.upstream.get("requests", 0))

    @property
    def cpu_us_per_request(self) -> float:
        """The proxy's CPU time per request: its cost, whatever else slowed the round."""
        return 1e6 * self.proc_cpu.get("proxy", 0.0) / max(1.0, self.wrk.req_per_sec)


@dataclass
class Result:
    scenario: str
    connections: int
    rounds: list[Round]
    best: dict[str, Round]
    skipped: str | None = None      # nothing measured (a check failed, a proxy died early)
    incomplete: str | None = None   # some rounds measured, then a proxy failed

    def paired_ratios(self) -> list[float]:
        """expserver/nginx of each pair of back-to-back rounds (exp, nginx, exp, nginx...):
        neighbours share the machine's state, so their ratio drifts far less than the
        best rounds, which may come from different moments of a busy machine."""
        exp = [r for r in self.rounds if r.wrk.server == "expserver"]
        ngx = [r for r in self.rounds if r.wrk.server == "nginx"]
        return [e.wrk.req_per_sec / n.wrk.req_per_sec for e, n in zip(exp, ngx)]


# --------------------------------------------------------------------------- configs


# What nginx adds to the request it sends upstream. "same": the fields expserver sends by
# default (the client's Host, X-Forwarded-For/Proto/Host), so that the upstream gets the same
# request from both proxies and the proxies do the same work; "minimal": nginx's defaults
# (Host: the upstream group's name, nothing else).
NGINX_FIELDS = {
    "same": """
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;""",
    "minimal": "",
}


def write_nginx_proxy_conf(path: Path, workdir: Path, port: int, upstream_port: int,
                           fields: str = "same") -> None:
    # keepalive_requests in the upstream block: nginx closes a pooled connection after
    # 1000 requests by default; the upstream allows 1000000 and expserver has no such
    # limit, so it is raised to the same figure (it changes nginx's result by ~0.1%).
    path.write_text(h.nginx_conf(workdir, f"""    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75;

    upstream u {{
        server 127.0.0.1:{upstream_port};
        keepalive {UPSTREAM_KEEPALIVE};
        keepalive_requests 1000000;
    }}

    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://u;
            proxy_http_version 1.1;
            proxy_set_header Connection "";{NGINX_FIELDS[fields]}
        }}
    }}""", worker_connections=8192, rlimit_nofile=20000))


def write_expserver_proxy_config(path: Path, port: int, upstream_port: int) -> None:
    path.write_text(json.dumps({
        "server_name": "eXpServer", "workers": 1,
        "servers": [{"listeners": [{"host": "127.0.0.1", "port": port}],
                     "routes": [{"req_path": "/", "type": "reverse_proxy",
                                 "upstreams": [f"127.0.0.1:{upstream_port}"],
                                 "upstream_keepalive": UPSTREAM_KEEPALIVE}]}]},
        indent=2))


def layout(mode: str) -> dict[str, set[int] | None]:
    """CPU sets for "proxy", "upstream" and "wrk" (None: no affinity)."""
    cpus = sorted(os.sched_getaffinity(0))
    if mode == "none" or len(cpus) < 2:
        return {"proxy": None, "upstream": None, "wrk": None}
    a, b = {cpus[0]}, {cpus[1]}
    if mode == "split":
        return {"proxy": a, "upstream": b, "wrk": b}
    return {"proxy": a, "upstream": a, "wrk": b}


# --------------------------------------------------------------------------- checks


def fetch(port: int) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def check(ports: dict[str, int], expected: bytes) -> str | None:
    """None when the upstream and both proxies answer 200 with the same body, else why not."""
    for name, port in ports.items():
        # A few requests each, so that a proxy's pooled (second-use) connection is
        # exercised too, not only the first connect.
        for _ in range(3):
            try:
                status, headers, body = fetch(port)
            except OSError as exc:
                return f"{name}: {exc}"
            if status != 200:
                return f"{name}: status {status}"
            if body != expected:
                return f"{name}: body of {len(body)} bytes differs from the upstream's " \
                       f"{len(expected)} bytes"
        print(f"  {name:9s} 200, {len(body)} bytes, Server: {headers.get('server')}",
              file=sys.stderr)
    return None


# --------------------------------------------------------------------------- /proc


def cpu_times() -> dict[str, tuple[int, int]]:
    """Per-CPU (total, idle) jiffies from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *rest = line.split()
        if name.startswith("cpu") and name != "cpu":
            fields = [int(x) for x in rest]
            out[name] = (sum(fields[:8]), fields[3] + fields[4])
    return out


def tree_jiffies(pid: int) -> int:
    """utime + stime of pid and all its descendants (clock ticks)."""
    total = 0
    for p in [pid, *h.descendants(pid)]:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total


def measured_round(name: str, port: int, connections: int, duration: int,
                   cpus: dict[str, set[int] | None], pids: dict[str, int],
                   status_port: int) -> Round:
    sc = cn.Scenario(f"1k c{connections}", "/", connections)
    up0 = upstream_server.counters(status_port)
    cpu0 = cpu_times()
    jiffies0 = {role: tree_jiffies(pid) for role, pid in pids.items()}
    t0 = time.monotonic()
    run = cn.run_wrk(name, port, sc, duration, cpus["wrk"])
    elapsed = time.monotonic() - t0
    cpu1 = cpu_times()
    up1 = upstream_server.counters(status_port)
    # Minus one connection and one request: the stub_status request itself.
    upstream = {"accepts": up1["accepts"] - up0["accepts"] - 1,
                "requests": up1["requests"] - up0["requests"] - 1}
    hz = os.sysconf("SC_CLK_TCK")
    busy = {c: round(1 - (cpu1[c][1] - cpu0[c][1]) / max(1, cpu1[c][0] - cpu0[c][0]), 3)
            for c in cpu1 if c in cpu0}
    proc = {role: round((tree_jiffies(pid) - jiffies0[role]) / hz / elapsed, 3)
            for role, pid in pids.items()}
    result = Round(run, busy, proc, upstream)
    print(f"  {'':9s} CPU busy: " + ", ".join(f"{c} {v:.0%}" for c, v in busy.items())
          + "; " + ", ".join(f"{r} {v:.2f} cores" for r, v in proc.items())
          + f"; upstream: {upstream['accepts']} new connections, {upstream['requests']} "
          f"requests ({result.new_conns_per_1k:.1f} per 1k)", file=sys.stderr)
    return result


def failure(name: str, server: h.Server, exc: Exception) -> str:
    """Why a round could not be measured; a proxy that died says how, with its log."""
    code = server.proc.poll()
    if code is None:
        return f"{name}: {exc}"
    how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
    return f"{name} {how} during the run; its last output:\n{server.log_tail(15)}"


# --------------------------------------------------------------------------- report


def fmt_table(results: list[Result], proxy_has_own_cpu: bool = True) -> str:
    head = ("scenario", "expserver req/s", "nginx req/s", "ratio exp/nginx",
            "paired ratio (median)", "expserver p99", "nginx p99", "proxy CPU exp/nginx",
            "proxy CPU us/req exp/nginx", "new upstream conns per 1k req exp/nginx")
    rows = [head]
    for r in results:
        if r.skipped:
            rows.append((r.scenario, "skipped") + ("-",) * (len(head) - 2))
            continue
        e, n = r.best["expserver"], r.best["nginx"]
        rows.append((r.scenario, f"{e.wrk.req_per_sec:,.0f}", f"{n.wrk.req_per_sec:,.0f}",
                     f"{e.wrk.req_per_sec / n.wrk.req_per_sec:.2f}",
                     f"{statistics.median(r.paired_ratios()):.2f}", f"{e.wrk.p99_ms:.2f} ms",
                     f"{n.wrk.p99_ms:.2f} ms",
                     f"{e.proc_cpu['proxy']:.0%} / {n.proc_cpu['proxy']:.0%}",
                     f"{e.cpu_us_per_request:.1f} / {n.cpu_us_per_request:.1f}",
                     f"{e.new_conns_per_1k:.1f} / {n.new_conns_per_1k:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    for r in results:
        if r.skipped:
            lines.append(f"skipped {r.scenario}: {r.skipped}")
        if r.incomplete:
            done = len(r.rounds)
            lines.append(f"incomplete {r.scenario}: best of the {done} runs made before "
                         f"{r.incomplete}")
        for s, best in r.best.items():
            rates = [x.wrk.req_per_sec for x in r.rounds if x.wrk.server == s]
            if len(rates) > 1 and min(rates) < 0.85 * max(rates):
                lines.append(f"noisy {r.scenario} {s}: rounds spread "
                             f"{min(rates):,.0f}..{max(rates):,.0f} req/s (try --rounds 3+)")
            bad = sum(best.wrk.errors.values()) + best.wrk.non_2xx
            if bad:
                lines.append(f"note {r.scenario} {s}: {bad} socket errors/non-2xx "
                             f"({best.wrk.errors}, non-2xx {best.wrk.non_2xx})")
            if proxy_has_own_cpu and best.proc_cpu.get("proxy", 1.0) < 0.9:
                lines.append(f"note {r.scenario} {s}: the proxy used only "
                             f"{best.proc_cpu['proxy']:.0%} of a core -- something else "
                             f"(upstream, wrk, the machine) limited this round")
    return "\n".join(lines)


def environment(args: argparse.Namespace, cpus: dict[str, set[int] | None]) -> dict[str, object]:
    return {
        "nginx": h.tool_version([h.nginx_binary(), "-v"]),
        "wrk": h.tool_version(["wrk", "--version"]),
        **h.machine(), "duration_s": args.duration,
        "rounds": args.rounds, "aggregate": "best round per proxy (max req/s, its p99)",
        "pin": args.pin, "affinity": {k: sorted(v) if v else None for k, v in cpus.items()},
        "upstream": "nginx, 1 worker, return 200 with a 1024-byte body (upstream_server.py)",
        "upstream_keepalive": UPSTREAM_KEEPALIVE, "expserver_cmd": args.expserver_cmd,
        "nginx_fields": args.nginx_fields,
        "cpu_busy_at_start": round(cn.cpu_busy(), 3),
    }


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=None, help="seconds per wrk run (10)")
    ap.add_argument("--quick", action="store_true", help="2 s runs, 1 round")
    ap.add_argument("--rounds", type=int, default=None, help="runs of each proxy per "
                    "scenario (2; --quick: 1)")
    ap.add_argument("--connections", type=int, nargs="+", default=[64, 256],
                    help="wrk connection counts (64 256)")
    ap.add_argument("--json", type=Path, help="also save the results here")
    ap.add_argument("--pin", choices=sorted(PIN_LAYOUTS), default="split",
                    help="CPU placement: " + "; ".join(f"{k}: {v}" for k, v in
                                                       PIN_LAYOUTS.items()))
    ap.add_argument("--expserver-cmd", default=h.DEFAULT_EXPSERVER_CMD,
                    help="command template with {python} {config}")
    ap.add_argument("--nginx-fields", choices=sorted(NGINX_FIELDS), default="same",
                    help="request fields nginx adds: same: expserver's (Host, X-Forwarded-*); "
                         "minimal: nginx's defaults")
    args = ap.parse_args()
    if args.duration is None:
        args.duration = 2 if args.quick else 10
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2

    h.ensure_debian_packages({"nginx": "nginx-light", "wrk": "wrk"})
    h.install_signal_exit()
    h.raise_nofile_limit()
    cpus = layout(args.pin)
    env = environment(args, cpus)
    print(f"environment: {json.dumps(env)}", file=sys.stderr)
    if env["cpu_busy_at_start"] > 0.1:
        print(f"warning: the machine is not idle ({env['cpu_busy_at_start']:.0%} of CPU busy "
              "before the run); figures will be noisy", file=sys.stderr)

    results: list[Result] = []
    upstream: h.Server | None = None
    proxies: dict[str, list[h.Server]] = {}
    with tempfile.TemporaryDirectory(prefix="expserver-proxy-bench-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        ports = {"upstream": h.free_port(), "upstream_status": h.free_port(),
                 "expserver": h.free_port(), "nginx": h.free_port()}
        conf = work / "nginx.conf"
        write_nginx_proxy_conf(conf, work, ports["nginx"], ports["upstream"], args.nginx_fields)
        config = work / "expserver.json"
        write_expserver_proxy_config(config, ports["expserver"], ports["upstream"])

        def start_proxy(name: str) -> list[h.Server]:
            if name == "expserver":
                return h.start_expserver(args.expserver_cmd, config=config, root=work,
                                         workdir=work, cpus=cpus["proxy"],
                                         ports=[ports["expserver"]])
            server = h.start_nginx(conf, work, cpus=cpus["proxy"])
            try:
                server.wait_ready([ports["nginx"]])
            except BaseException:
                server.stop()
                raise
            return [server]

        try:
            upstream, expected = upstream_server.start(
                work, ports["upstream"], cpus=cpus["upstream"],
                status_port=ports["upstream_status"])
            for proxy in PROXIES:
                proxies[proxy] = start_proxy(proxy)
            print(f"ready: ports {ports}", file=sys.stderr)

            print("check: GET / on the upstream and through each proxy", file=sys.stderr)
            why = check({k: ports[k] for k in ("upstream", *PROXIES)}, expected)
            for c in args.connections:
                name = f"1k c{c}"
                print(f"{name}: GET / -c {c}", file=sys.stderr)
                if why:
                    print(f"  SKIPPED, check failed: {why}", file=sys.stderr)
                    results.append(Result(name, c, [], {}, skipped=f"check failed: {why}"))
                    continue
                rounds: list[Round] = []
                failed = None
                for _ in range(args.rounds):
                    for proxy in PROXIES:
                        pids = {"proxy": proxies[proxy][0].pid, "upstream": upstream.pid}
                        try:
                            rounds.append(measured_round(proxy, ports[proxy], c, args.duration,
                                                         cpus, pids, ports["upstream_status"]))
                        except RuntimeError as exc:
                            failed = failure(proxy, proxies[proxy][0], exc)
                            print(f"  FAILED: {failed}", file=sys.stderr)
                            if proxies[proxy][0].proc.poll() is not None:
                                # Dead: start it again for the scenarios still to come.
                                for server in proxies.pop(proxy):
                                    server.stop()
                                proxies[proxy] = start_proxy(proxy)
                            break
                        time.sleep(0.5)
                    if failed:
                        break
                if failed and not all(any(r.wrk.server == s for r in rounds)
                                      for s in PROXIES):
                    results.append(Result(name, c, rounds, {}, skipped=failed))
                    continue
                best = {s: max((r for r in rounds if r.wrk.server == s),
                               key=lambda r: r.wrk.req_per_sec) for s in PROXIES}
                results.append(Result(name, c, rounds, best, incomplete=failed))
        finally:
            for servers in proxies.values():
                for server in servers:
                    server.stop()
            if upstream is not None:
                upstream.stop()

    print()
    print(f"reverse proxy, 1 KiB replies from one nginx upstream; wrk -t1, {args.duration} s "
          f"per run, {args.rounds} alternating round(s) per proxy, best round shown; "
          f"CPUs: {PIN_LAYOUTS[args.pin]}; ratio > 1 means expserver is faster")
    print(fmt_table(results, proxy_has_own_cpu=args.pin == "split"))
    if args.json:
        args.json.write_text(json.dumps(
            {"environment": env, "results": [asdict(r) for r in results]}, indent=2))
        print(f"saved {args.json}")
    return 1 if any(r.skipped or r.incomplete for r in results) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
