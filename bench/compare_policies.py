#!/usr/bin/env python3
"""What a policy costs: 1 KiB static files behind each policy, expserver against nginx.

    python bench/compare_policies.py [--duration S] [--rounds N] [--connections C]
                                     [--only NAME ...] [--json out.json]

One expserver (one worker) and one nginx (one worker) each serve the same 1 KiB file on one
port per variant, configured alike:

    open          nothing but the file
    headers       two header rules       expserver "headers": {"add": {X-A, X-B}}
                                         nginx     add_header X-A ...; add_header X-B ...;
    access_log    an access log on disk  expserver "access_log": {"path": F, "format":
                                         "combined"}; nginx access_log F combined
                                         buffer=64k flush=1s (the same batching)
    basic_auth    a bcrypt password      the same htpasswd file (one user, bcrypt cost 10);
                                         nginx auth_basic + auth_basic_user_file; wrk sends
                                         the right Authorization on every request
    rate_limit    a rate limit that      expserver "rate_limit": {"rate": "1000000r/s",
                  never refuses          "burst": 1000}; nginx limit_req_zone ... rate=
                                         1000000r/s + limit_req burst=1000 nodelay

For each variant `wrk -t1 -c C -d S --latency --timeout 10s` runs against expserver, nginx,
expserver, nginx (--rounds each) and the best round of each is kept; the report gives the
ratio expserver/nginx per variant and, for expserver, the cost of each variant against its
own open route in the same run (the issues' targets: a route with two header rules and an
authenticated or rate-limited route at least 1.0x nginx; the access log costing at most 10%
of the open route's req/s). Servers on the first CPU, wrk on the second, as in
compare_nginx.py. Nothing here is a pass/fail test.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402
import bcrypt  # noqa: E402
from compare_nginx import Scenario, WrkRun, cpu_busy, run_wrk  # noqa: E402

BODY = bytes(range(256)) * 4


def fetch_with_auth(port: int) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/1k.bin", headers={"Authorization": AUTH.split(b": ", 1)[1].decode()})
    resp = conn.getresponse()
    return resp.status, resp.read()


@dataclass
class Variant:
    name: str
    expserver: dict[str, Any]       # keys added to the expserver server object
    nginx: str                      # directives added to the nginx server block


AUTH = b"Authorization: Basic " + base64.b64encode(b"bench:secret")


def variants(work: Path) -> list[Variant]:
    users = work / "htpasswd"
    users.write_bytes(b"bench:" + bcrypt.hashpw(b"secret", bcrypt.gensalt(10)) + b"\n")
    return [
        Variant("open", {}, ""),
        Variant("headers", {"headers": {"add": {"X-A": "one", "X-B": "two"}}},
                'add_header X-A "one" always; add_header X-B "two" always;'),
        Variant("access_log",
                {"access_log": {"path": str(work / "exp-access.log"), "format": "combined"}},
                f"access_log {work / 'nginx-access.log'} combined buffer=64k flush=1s;"),
        Variant("basic_auth", {"basic_auth": {"users_file": str(users)}},
                f'auth_basic "bench"; auth_basic_user_file {users};'),
        Variant("rate_limit", {"rate_limit": {"rate": "1000000r/s", "burst": 1000,
                                              "nodelay": True}},
                "limit_req zone=bench burst=1000 nodelay;"),
    ]


def configs(work: Path, root: Path, chosen: list[Variant]) -> tuple[dict[str, int], dict[str, int]]:
    exp_ports = {v.name: h.free_port() for v in chosen}
    ngx_ports = {v.name: h.free_port() for v in chosen}
    servers = [{"listeners": [{"host": "127.0.0.1", "port": exp_ports[v.name]}],
                "routes": [{"req_path": "/", "type": "file_serve", "dir_path": str(root)}],
                **v.expserver} for v in chosen]
    (work / "expserver.json").write_text(json.dumps({"workers": 1, "servers": servers}))
    blocks = "\n".join(f"""
    server {{
        listen 127.0.0.1:{ngx_ports[v.name]};
        root {root};
        {v.nginx}
    }}""" for v in chosen)
    (work / "nginx.conf").write_text(h.nginx_conf(work, f"""    default_type application/octet-stream;
    access_log off;
    limit_req_zone $binary_remote_addr zone=bench:10m rate=1000000r/s;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 75;
{blocks}"""))
    return exp_ports, ngx_ports


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--only", nargs="*", help="variants to run (default: all)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    h.install_signal_exit()
    h.ensure_debian_packages({"nginx": "nginx-light", "wrk": "wrk"})
    server_cpus, load_cpus = h.split_cpus()
    work = Path(tempfile.mkdtemp(prefix="policies-"))
    root = work / "www"
    root.mkdir()
    (root / "1k.bin").write_bytes(BODY)
    chosen = [v for v in variants(work) if not args.only or v.name in args.only]
    exp_ports, ngx_ports = configs(work, root, chosen)
    servers = []
    try:
        servers += h.start_expserver(h.DEFAULT_EXPSERVER_CMD, config=work / "expserver.json",
                                     root=root, ports=list(exp_ports.values()), workdir=work,
                                     cpus=server_cpus)
        nginx = h.start_nginx(work / "nginx.conf", work, cpus=server_cpus)
        servers.append(nginx)
        nginx.wait_ready(list(ngx_ports.values()))
        for v in chosen:
            for port in (exp_ports[v.name], ngx_ports[v.name]):
                status, body = fetch_with_auth(port)
                if status != 200 or body != BODY:
                    sys.exit(f"{v.name}: port {port} answered {status}, not the file")
        print(f"CPU busy before the run: {cpu_busy():.0%}", file=sys.stderr)
        best: dict[str, dict[str, WrkRun]] = {}
        for v in chosen:
            sc = Scenario(v.name, "/1k.bin", args.connections, headers=[AUTH.decode()])
            print(f"{v.name}:", file=sys.stderr)
            for _ in range(args.rounds):
                for who, port in (("expserver", exp_ports[v.name]), ("nginx", ngx_ports[v.name])):
                    run = run_wrk(who, port, sc, args.duration, load_cpus)
                    if who not in best.setdefault(v.name, {}) or \
                            run.req_per_sec > best[v.name][who].req_per_sec:
                        best[v.name][who] = run
                    time.sleep(0.5)
    finally:
        for s in servers:
            s.stop()
    open_rate = best.get("open", {}).get("expserver")
    print(f"\n1 KiB static at {args.connections} connections, best of {args.rounds} rounds of "
          f"{args.duration} s each (req/s)")
    print(f"{'variant':12s} | {'expserver':>10s} | {'nginx':>10s} | {'exp/nginx':>9s} | "
          f"{'vs own open':>11s} | {'exp p99':>8s} | {'nginx p99':>9s}")
    for v in chosen:
        e, n = best[v.name]["expserver"], best[v.name]["nginx"]
        own = f"{e.req_per_sec / open_rate.req_per_sec:.2f}" if open_rate else "-"
        print(f"{v.name:12s} | {e.req_per_sec:10,.0f} | {n.req_per_sec:10,.0f} | "
              f"{e.req_per_sec / n.req_per_sec:9.2f} | {own:>11s} | {e.p99_ms:6.2f}ms | "
              f"{n.p99_ms:7.2f}ms")
    print("targets: headers, basic_auth, rate_limit >= 1.00 exp/nginx; access_log >= 0.90 "
          "of expserver's own open route")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {k: {s: asdict(r) for s, r in v.items()} for k, v in best.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
