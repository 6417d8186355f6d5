#!/usr/bin/env python3
"""Memory per idle keep-alive connection: expserver against nginx (one worker each).

    python bench/idle_rss.py [-n 10000] [--only expserver|nginx] [--tls] [--json out.json]

For each server: start it on a temp directory, warm it up with a few requests, read the
serving process's RSS (VmRSS in /proc/<pid>/status), open N connections from this
process (each sends one complete `GET /small.txt HTTP/1.1` and reads the whole response,
so the server holds a real idle keep-alive connection, not a half-open accept), read the
RSS again, check the connections are still open, and print (after - before) / N in KiB.

Which process is measured: the one in the server's process tree that holds the most
sockets once the connections are open -- nginx's worker (not its master), and for
expserver the pid of `python -m expserver serve` itself, or its worker if it forks one.
Both servers keep idle connections for 75 s by default, and the whole run takes well
under that per server.

--tls: the same over HTTPS. Both servers get one certificate made for the run (ECDSA
P-256; --rsa: RSA 2048) on a TLS listener (nginx: `ssl_session_cache shared:SSL:10m`,
`ssl_protocols TLSv1.2 TLSv1.3`, as in compare_tls.py), and each of the N connections
completes a full TLS handshake (Python's ssl, TLS 1.3, no session offered) and one request
before it is left idle. The target printed beside expserver's figure is <= 48 KiB per idle
TLS connection (for reading, not asserted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402
import compare_tls as ct  # noqa: E402  (certificate and TLS configs)

REQUEST = b"GET /small.txt HTTP/1.1\r\nHost: x\r\n\r\n"
SMALL = b"small file for idle keep-alive connections\n"
# Connects in flight at once: below any sane listen backlog (Python's default is 128,
# nginx's 511); a full accept queue makes Linux drop handshakes and retry them seconds later.
CONCURRENT_CONNECTS = 64
SETTLE_S = 1.0
REQUEST_TIMEOUT_S = 10.0
TLS_TARGET_KIB = 48.0   # expserver, per idle TLS keep-alive connection


async def read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, _, rest = head.partition(b"\r\n")
    if b" 200 " not in status_line + b" ":
        raise RuntimeError(f"unexpected status line {status_line!r}")
    length = None
    for line in rest.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length is None:  # a stand-in without Content-Length: body runs to EOF
        return await reader.read()
    return await reader.readexactly(length)


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_idle(port: int, n: int, concurrency: int = CONCURRENT_CONNECTS,
                    tls: ssl.SSLContext | None = None) -> list[Conn]:
    """Open n keep-alive connections, each after one full request/response (over TLS
    when `tls` is a client context: a full handshake each, no session offered).

    Raises with a count of what failed rather than leaving a half-measured server.
    """
    sem = asyncio.Semaphore(concurrency)

    async def one() -> Conn:
        async with sem:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, ssl=tls), REQUEST_TIMEOUT_S)
            try:
                writer.write(REQUEST)
                body = await asyncio.wait_for(read_response(reader), REQUEST_TIMEOUT_S)
                if body != SMALL:
                    raise RuntimeError(f"unexpected body {body[:60]!r}")
            except BaseException:
                writer.close()
                raise
            return reader, writer

    outcomes = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    conns = [o for o in outcomes if isinstance(o, tuple)]
    failures = [o for o in outcomes if not isinstance(o, tuple)]
    if failures:
        await close_all(conns)
        kinds = sorted({f"{type(f).__name__}: {f}"[:100] for f in failures})
        raise RuntimeError(f"{len(failures)} of {n} connections failed: {kinds[:5]} (timeouts "
                           f"often mean a small listen backlog: try --concurrency 8)")
    return conns


async def still_open(conns: list[Conn]) -> int:
    await asyncio.sleep(0.2)  # let the loop notice any close from the server
    return sum(1 for reader, writer in conns
               if not reader.at_eof() and not writer.transport.is_closing())


async def close_all(conns: list[Conn]) -> None:
    for _, writer in conns:
        writer.close()
    await asyncio.sleep(0.1)


def serving_process(root_pid: int) -> int:
    tree = [root_pid, *h.descendants(root_pid)]
    return max(tree, key=lambda pid: (h.socket_fd_count(pid), pid == root_pid))


def measure(name: str, server: h.Server, port: int, n: int, concurrency: int,
            tls: ssl.SSLContext | None = None) -> dict[str, object]:
    # Warm-up: first-request allocations (caches, MIME table, buffers) are not per connection.
    asyncio.run(_warm(port, tls))
    time.sleep(SETTLE_S)
    tree_before = {pid: h.rss_kib(pid) for pid in [server.pid, *h.descendants(server.pid)]}

    async def run() -> dict[str, object]:
        t0 = time.monotonic()
        conns = await open_idle(port, n, concurrency, tls)
        opened_s = time.monotonic() - t0
        await asyncio.sleep(SETTLE_S)
        pid = serving_process(server.pid)
        after = h.rss_kib(pid)
        tree_after = {p: h.rss_kib(p) for p in [server.pid, *h.descendants(server.pid)]}
        alive = await still_open(conns)
        sockets = h.socket_fd_count(pid)
        tls_info = None
        if tls is not None and conns:
            sslobj = conns[0][1].get_extra_info("ssl_object")
            tls_info = f"{sslobj.version()} {sslobj.cipher()[0]}" if sslobj else None
        await close_all(conns)
        before = tree_before.get(pid)
        if before is None:
            raise RuntimeError(f"{name}: serving process {pid} appeared after the baseline")
        per_conn = (after - before) / alive if alive else float("nan")
        return {
            "server": name, "pid": pid, "cmdline": h.process_name(pid), "connections": n,
            "tls": tls_info,
            "still_open": alive, "server_sockets": sockets, "open_seconds": round(opened_s, 2),
            "rss_before_kib": before, "rss_after_kib": after,
            "rss_per_conn_kib": round(per_conn, 3),
            "tree_rss_before_kib": tree_before, "tree_rss_after_kib": tree_after,
        }

    result = asyncio.run(run())
    print(f"{name}: pid {result['pid']} ({result['cmdline']}): RSS {result['rss_before_kib']} "
          f"-> {result['rss_after_kib']} KiB with {result['still_open']}/{n} idle connections "
          f"open ({result['server_sockets']} sockets in the server; opened in "
          f"{result['open_seconds']} s) = {result['rss_per_conn_kib']} KiB/conn",
          file=sys.stderr)
    if result["still_open"] != n:
        print(f"warning: {name} closed {n - result['still_open']} of the {n} connections "
              f"(no keep-alive?)", file=sys.stderr)
    return result


async def _warm(port: int, tls: ssl.SSLContext | None = None) -> None:
    conns = await open_idle(port, 8, tls=tls)
    await close_all(conns)


def tls_client_context(ca: Path) -> ssl.SSLContext:
    """Verifies the run's certificate; no session is ever offered (each connection makes
    its own context-less handshake: asyncio passes no session)."""
    return ssl.create_default_context(cafile=str(ca))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--connections", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=CONCURRENT_CONNECTS,
                    help="connects in flight at once")
    ap.add_argument("--only", choices=("expserver", "nginx"))
    ap.add_argument("--tls", action="store_true",
                    help="idle TLS connections (a handshake and one request each)")
    ap.add_argument("--rsa", action="store_true",
                    help="--tls: an RSA 2048 certificate (default ECDSA P-256)")
    ap.add_argument("--json", type=Path, help="also save the results here")
    ap.add_argument("--expserver-cmd", default=h.DEFAULT_EXPSERVER_CMD,
                    help="command template; placeholders {python} {config} {dir} {port}")
    args = ap.parse_args()
    n = args.connections

    h.ensure_debian_packages({"nginx": "nginx-light"})
    h.install_signal_exit()
    limit = h.raise_nofile_limit()  # the servers inherit it too
    if n + 200 > limit:
        sys.exit(f"RLIMIT_NOFILE is {limit}; cannot open {n} connections (use -n)")

    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="expserver-idle-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        root = work / "www"
        root.mkdir(mode=0o755)
        (root / "small.txt").write_bytes(SMALL)
        (root / "small.txt").chmod(0o644)
        tls_ctx = None
        if args.tls:
            cert, key, ca, cert_kind = ct.make_certificate(work, args.rsa)
            for p in (cert, key):
                p.chmod(0o644)
            tls_ctx = tls_client_context(ca)
            print(f"TLS: {cert_kind}", file=sys.stderr)

        if args.only in (None, "expserver"):
            port = h.free_port()
            config = work / "expserver.json"
            ports = [port]
            if args.tls:
                # a plain server and a TLS server (compare_tls.py's config); measured on TLS
                tls_ports = {"expserver": h.free_port(), "expserver_tls": port}
                ct.write_expserver_config(config, root, tls_ports, cert, key,
                                          ct.PROTOCOLS["both"])
                ports = [port, tls_ports["expserver"]]
            else:
                h.write_expserver_config(config, root, port)
            servers = []
            try:
                servers = h.start_expserver(args.expserver_cmd, config=config, root=root,
                                            ports=ports, workdir=work)
                results["expserver"] = measure("expserver", servers[0], port, n,
                                                     args.concurrency, tls_ctx)
            finally:
                for server in servers:
                    server.stop()

        if args.only in (None, "nginx"):
            port = h.free_port()
            conf = work / "nginx.conf"
            # Headroom matters: with fewer than 1/16 of worker_connections free, nginx
            # starts closing idle keep-alive connections to make room.
            ports = [port]
            if args.tls:
                tls_ports = {"nginx": h.free_port(), "nginx_tls": port}
                ct.write_nginx_conf(conf, work, root, tls_ports, cert, key,
                                    ct.PROTOCOLS["both"], worker_connections=2 * n + 512,
                                    rlimit_nofile=2 * n + 1024, probe=False)
                ports = [port, tls_ports["nginx"]]
            else:
                h.write_nginx_conf(conf, work, root, port, worker_connections=2 * n + 512,
                                   rlimit_nofile=2 * n + 1024)
            nginx = h.start_nginx(conf, work)
            try:
                nginx.wait_ready(ports)
                results["nginx"] = measure("nginx", nginx, port, n, args.concurrency, tls_ctx)
            finally:
                nginx.stop()

    print()
    kind = f"TLS ({cert_kind}, {next(iter(results.values()))['tls']}) " if args.tls and \
        results else ""
    print(f"RSS per idle {kind}keep-alive connection ({n} connections, one worker each):")
    for name, r in results.items():
        target = ""
        if args.tls and name == "expserver":
            met = "met" if r["rss_per_conn_kib"] <= TLS_TARGET_KIB else "NOT met"
            target = f"  target <= {TLS_TARGET_KIB:.0f} KiB: {met}"
        print(f"  {name:9s} {r['rss_per_conn_kib']:8.2f} KiB/conn  "
              f"(RSS {r['rss_before_kib']} -> {r['rss_after_kib']} KiB, "
              f"{r['still_open']} open){target}")
    if len(results) == 2 and results["nginx"]["rss_per_conn_kib"]:
        ratio = results["expserver"]["rss_per_conn_kib"] / results["nginx"]["rss_per_conn_kib"]
        print(f"  ratio expserver/nginx: {ratio:.2f} (lower is better)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
