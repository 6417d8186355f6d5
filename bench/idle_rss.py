#!/usr/bin/env python3
"""Memory per idle keep-alive connection: expserver against nginx (one worker each).

    python bench/idle_rss.py [-n 10000] [--only expserver|nginx] [--json out.json]

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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402

REQUEST = b"GET /small.txt HTTP/1.1\r\nHost: x\r\n\r\n"
SMALL = b"small file for idle keep-alive connections\n"
# Connects in flight at once: below any sane listen backlog (Python's default is 128,
# nginx's 511); a full accept queue makes Linux drop handshakes and retry them seconds later.
CONCURRENT_CONNECTS = 64
SETTLE_S = 1.0
REQUEST_TIMEOUT_S = 10.0


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


async def open_idle(port: int, n: int, concurrency: int = CONCURRENT_CONNECTS) -> list[Conn]:
    """Open n keep-alive connections, each after one full request/response.

    Raises with a count of what failed rather than leaving a half-measured server.
    """
    sem = asyncio.Semaphore(concurrency)

    async def one() -> Conn:
        async with sem:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), REQUEST_TIMEOUT_S)
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


def measure(name: str, server: h.Server, port: int, n: int, concurrency: int) -> dict[str, object]:
    # Warm-up: first-request allocations (caches, MIME table, buffers) are not per connection.
    asyncio.run(_warm(port))
    time.sleep(SETTLE_S)
    tree_before = {pid: h.rss_kib(pid) for pid in [server.pid, *h.descendants(server.pid)]}

    async def run() -> dict[str, object]:
        t0 = time.monotonic()
        conns = await open_idle(port, n, concurrency)
        opened_s = time.monotonic() - t0
        await asyncio.sleep(SETTLE_S)
        pid = serving_process(server.pid)
        after = h.rss_kib(pid)
        tree_after = {p: h.rss_kib(p) for p in [server.pid, *h.descendants(server.pid)]}
        alive = await still_open(conns)
        sockets = h.socket_fd_count(pid)
        await close_all(conns)
        before = tree_before.get(pid)
        if before is None:
            raise RuntimeError(f"{name}: serving process {pid} appeared after the baseline")
        per_conn = (after - before) / alive if alive else float("nan")
        return {
            "server": name, "pid": pid, "cmdline": h.process_name(pid), "connections": n,
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


async def _warm(port: int) -> None:
    conns = await open_idle(port, 8)
    await close_all(conns)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--connections", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=CONCURRENT_CONNECTS,
                    help="connects in flight at once")
    ap.add_argument("--only", choices=("expserver", "nginx"))
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

        if args.only in (None, "expserver"):
            port = h.free_port()
            config = work / "expserver.json"
            h.write_expserver_config(config, root, port)
            servers = []
            try:
                servers = h.start_expserver(args.expserver_cmd, config=config, root=root,
                                            ports=[port], workdir=work)
                results["expserver"] = measure("expserver", servers[0], port, n,
                                                     args.concurrency)
            finally:
                for server in servers:
                    server.stop()

        if args.only in (None, "nginx"):
            port = h.free_port()
            conf = work / "nginx.conf"
            # Headroom matters: with fewer than 1/16 of worker_connections free, nginx
            # starts closing idle keep-alive connections to make room.
            h.write_nginx_conf(conf, work, root, port, worker_connections=2 * n + 512,
                               rlimit_nofile=2 * n + 1024)
            nginx = h.start_nginx(conf, work)
            try:
                nginx.wait_ready([port])
                results["nginx"] = measure("nginx", nginx, port, n, args.concurrency)
            finally:
                nginx.stop()

    print()
    print(f"RSS per idle keep-alive connection ({n} connections, one worker each):")
    for name, r in results.items():
        print(f"  {name:9s} {r['rss_per_conn_kib']:8.2f} KiB/conn  "
              f"(RSS {r['rss_before_kib']} -> {r['rss_after_kib']} KiB, "
              f"{r['still_open']} open)")
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
