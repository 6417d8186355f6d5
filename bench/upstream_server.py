#!/usr/bin/env python3
"""The upstream behind both proxies in compare_proxy.py: a separate nginx instance.

    python bench/upstream_server.py [--port P] [--size 1024] [--cpu N]   # runs until Ctrl-C

Why nginx: the upstream must be the same for both proxies and must never be the
bottleneck, so that the proxies' own costs decide the figures. A one-worker nginx that
answers every request with `return 200 "<body>"` (the body sits in its config, so there
is no file system call, no ETag/Last-Modified and no sendfile per request) is the
cheapest HTTP/1.1 server on this machine -- cheaper per request than any Python upstream
(http.server, aiohttp, or expserver itself) by a wide margin -- and it is not one of the
two contestants' code paths: nginx-the-proxy and nginx-the-upstream are separate
processes with separate configs, and expserver is never measured against itself.
`keepalive_requests 1000000` and `keepalive_timeout 75` keep both proxies' pooled
connections open for the whole run; `access_log off`; `listen ... backlog=4096` and
`worker_connections 8192` so that a proxy opening hundreds of short-lived connections
(nginx's pool overflow at 256 client connections) is never refused.

The body is `size` printable ASCII bytes (deterministic), served as
`application/octet-stream` with a Content-Length, so a proxied reply can be checked byte
for byte against a direct one.
"""

from __future__ import annotations

import argparse
import random
import re
import socket
import string
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402

DEFAULT_SIZE = 1024


def body(size: int = DEFAULT_SIZE) -> bytes:
    """The reply body: `size` letters and digits, the same in every run.

    Letters and digits only, so it can sit inside an nginx `return` string unquoted of
    `"`, `\\`, `$` (nginx would expand variables) or `;`.
    """
    rng = random.Random(size)
    return "".join(rng.choice(string.ascii_letters + string.digits)
                   for _ in range(size)).encode()


def write_conf(path: Path, workdir: Path, port: int, size: int = DEFAULT_SIZE,
               status_port: int | None = None) -> bytes:
    """nginx.conf of the upstream; returns the body it answers with.

    With status_port, a second server on that port answers nginx's stub_status (its
    counters of accepted connections and served requests, read by `counters()`), kept off
    the measured port so that it cannot change what the proxies see.

    `/upload` answers the same, but only once it has read the whole request body: nginx's
    `return` answers at once and discards a body, so that location proxies to the
    upstream's own `/`, which makes nginx read the body first (proxy_request_buffering).
    slowloris.py's slow-POST mode needs an upstream that waits for the body like that.
    """
    data = body(size)
    status = ""
    if status_port is not None:
        status = f"""
    server {{
        listen 127.0.0.1:{status_port};
        location / {{
            stub_status;
        }}
    }}"""
    path.write_text(h.nginx_conf(workdir, f"""    default_type application/octet-stream;
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75;

    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            return 200 "{data.decode()}";
        }}
        location = /upload {{
            proxy_pass http://127.0.0.1:{port}/;
        }}
    }}{status}""", name="upstream", worker_connections=8192, rlimit_nofile=20000))
    return data


def start(workdir: Path, port: int, size: int = DEFAULT_SIZE, cpus: set[int] | None = None,
          status_port: int | None = None) -> tuple[h.Server, bytes]:
    """Start the upstream nginx (its own conf, pid and logs under workdir); wait for it."""
    conf = workdir / "upstream.conf"
    data = write_conf(conf, workdir, port, size, status_port)
    argv = [h.nginx_binary(), "-e", str(workdir / "upstream_error.log"), "-p", str(workdir),
            "-c", str(conf), "-g", "daemon off;"]
    server = h.Server("upstream", argv, workdir / "upstream.out", cpus=cpus)
    try:
        server.wait_ready([port] if status_port is None else [port, status_port])
    except BaseException:
        server.stop()
        raise
    return server, data


def counters(status_port: int) -> dict[str, int]:
    """The upstream's stub_status: connections accepted and requests served so far, and
    connections open now (`accepts`, `requests`, `active`; the status request counts)."""
    with socket.create_connection(("127.0.0.1", status_port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        chunks = []
        while chunk := s.recv(4096):
            chunks.append(chunk)
    text = b"".join(chunks).decode()
    active = re.search(r"Active connections:\s*(\d+)", text)
    totals = re.search(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s*$", text, re.M)
    if not (active and totals):
        raise RuntimeError(f"unexpected stub_status reply: {text!r}")
    return {"accepts": int(totals.group(1)), "requests": int(totals.group(3)),
            "active": int(active.group(1))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE, help="body bytes (1024)")
    ap.add_argument("--cpu", type=int, action="append", help="pin to this CPU (repeatable)")
    args = ap.parse_args()
    h.ensure_debian_packages({"nginx": "nginx-light"})
    h.install_signal_exit()
    h.raise_nofile_limit()
    port = args.port or h.free_port()
    with tempfile.TemporaryDirectory(prefix="expserver-upstream-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        server, data = start(work, port, args.size, set(args.cpu) if args.cpu else None)
        print(f"upstream nginx (pid {server.pid}) on http://127.0.0.1:{port}/ answering "
              f"{len(data)} bytes; Ctrl-C stops it", file=sys.stderr)
        try:
            while server.proc.poll() is None:
                time.sleep(0.5)
            print(f"upstream exited:\n{server.log_tail()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0
        finally:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
