#!/usr/bin/env python3
"""Which stdlib TLS path the core should use: ``_ssl._SSLSocket`` on the descriptor, or
``SSLObject`` with two ``MemoryBIO``s.

    python bench/tls_transport.py [--requests N] [--size BYTES]

One TLS connection over a socketpair, client and server in this process. For each request
the client sends a 27-byte GET; the server side reads it and writes a response of --size
bytes, and only the server side is timed (its read and its write, once the request bytes
are in the socket: the wait is not counted). Two server sides, alternately:

    fd         the object ``SSLContext._wrap_socket`` makes on the socket: OpenSSL reads
               from and writes to the descriptor itself (what expserver uses; one C call
               per read or write, no copy besides decryption into our buffer)
    memorybio  ``SSLContext.wrap_bio``: recv into a buffer, copy it into the incoming BIO,
               decrypt, encrypt into the outgoing BIO, copy it out, send

Prints microseconds per request for each, and the ratio. A measurement, not a test.
"""
from __future__ import annotations

import argparse
import select
import socket
import ssl
import statistics
import time

import trustme


def contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(server)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client)
    return server, client


def handshake(client: ssl.SSLSocket, server_step) -> None:
    done = [False, False]
    while not all(done):
        for i, step in enumerate((client.do_handshake, server_step)):
            if not done[i]:
                try:
                    step()
                    done[i] = True
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass


REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def exchange(client: ssl.SSLSocket, raw: socket.socket, serve, size: int) -> float:
    client.sendall(REQUEST)
    select.select([raw], [], [])
    t0 = time.perf_counter()
    serve()
    spent = time.perf_counter() - t0
    got = 0
    while got < size:
        got += len(client.recv(1 << 20))
    return spent


def fd_side(sctx: ssl.SSLContext, cctx: ssl.SSLContext, response: bytes):
    a, b = socket.socketpair()
    b.setblocking(False)
    client = cctx.wrap_socket(a, server_hostname="localhost", do_handshake_on_connect=False)
    client.setblocking(False)
    tls = sctx._wrap_socket(b, True, None, owner=None, session=None)
    handshake(client, tls.do_handshake)
    client.setblocking(True)
    buf = memoryview(bytearray(16384))

    def serve() -> None:
        tls.read(16384, buf)
        while True:
            try:
                tls.write(response)
                return
            except ssl.SSLWantWriteError:
                select.select([], [b], [])
    return client, b, serve


def bio_side(sctx: ssl.SSLContext, cctx: ssl.SSLContext, response: bytes):
    a, b = socket.socketpair()
    b.setblocking(False)
    client = cctx.wrap_socket(a, server_hostname="localhost", do_handshake_on_connect=False)
    client.setblocking(False)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = sctx.wrap_bio(incoming, outgoing, server_side=True)
    raw = memoryview(bytearray(65536))
    buf = memoryview(bytearray(16384))

    def step() -> None:
        try:
            incoming.write(raw[:b.recv_into(raw)])
        except BlockingIOError:
            pass
        try:
            obj.do_handshake()
        finally:
            data = outgoing.read()
            if data:
                b.sendall(data)
    handshake(client, step)
    client.setblocking(True)

    def serve() -> None:
        while True:
            incoming.write(raw[:b.recv_into(raw)])
            try:
                obj.read(16384, buf)
                break
            except ssl.SSLWantReadError:
                continue
        obj.write(response)
        data = outgoing.read()
        b.setblocking(True)
        b.sendall(data)
        b.setblocking(False)
    return client, b, serve


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--size", type=int, default=1024)
    args = p.parse_args()
    sctx, cctx = contexts()
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % args.size + b"x" * args.size
    sides = {"fd": fd_side(sctx, cctx, response), "memorybio": bio_side(sctx, cctx, response)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.requests):
        for name, (client, raw, serve) in sides.items():
            times[name].append(exchange(client, raw, serve, len(response)))
    us = {name: statistics.median(t) * 1e6 for name, t in times.items()}
    print(f"{args.size}-byte responses, {args.requests} requests each, server side only "
          "(median):")
    for name, value in us.items():
        print(f"  {name:10s} {value:7.2f} us/request")
    print(f"  memorybio / fd: {us['memorybio'] / us['fd']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
