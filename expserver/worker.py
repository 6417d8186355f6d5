"""A worker process: one loop serving one generation of the config on inherited sockets.

The master forks it with everything it must not do itself after dropping privileges
already done: sockets bound, TLS contexts loaded, log files opened. The worker drops to the
configured user, builds its sites once (expserver/app.py), and runs its loop until a signal:

* TERM, INT: stop now.
* QUIT: graceful: stop accepting (its copies of the listening sockets close; connections
  queued in the kernel wait for the other workers), answer what is in flight (idle
  keep-alive connections get a moment for one last request, answered with
  ``Connection: close``), health routes answer 503, then exit, at the latest after
  ``drain_timeout``.
* USR1: reopen the log files (the master has made the new ones).

Signal handlers only queue; the loop acts (expserver/_loop.pyx).
"""
from __future__ import annotations

import os
import signal
import socket
from typing import Any

from . import config, log
from ._access import AccessLog
from ._conn import Core, Listener, Settings
from ._loop import Loop
from .app import App, build_sites
from .logfile import LogFile
from .metrics import Board, WorkerMetrics

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGHUP)
FLUSH_EVERY = 1.0
Address = tuple[str, int]


def settings_of(cfg: config.Config, servers: list[config.ServerConfig]) -> Settings:
    """Connection limits of one listener.

    The head is read before the Host (and so the server) is known: its timeouts come from
    the listener's first server, as nginx takes them from the default server. The body
    limit is the loosest of the listener's routes; each route enforces its own.
    """
    first = servers[0]
    limits = [r.max_body_size for s in servers for r in s.routes] or [first.max_body_size]
    return Settings(keepalive_timeout=first.keepalive_timeout,
                    header_timeout=first.header_timeout, body_timeout=first.body_timeout,
                    send_timeout=first.send_timeout,
                    max_body_size=0 if 0 in limits else max(limits),
                    max_connections=cfg.max_connections)


def access_logs(cfg: config.Config, files: dict[str, LogFile]) -> list[Any]:
    """Each server's AccessLog (one per path and format, shared), or False for none."""
    made: dict[tuple[str, str], AccessLog] = {}
    out: list[Any] = []
    for server in cfg.servers:
        spec = server.access_log
        if spec is None:
            out.append(False)
            continue
        key = (spec.path, spec.format)
        if key not in made:
            made[key] = AccessLog(spec.format, files[spec.path])
        out.append(made[key])
    return out


def run(cfg: config.Config, socks: dict[Address, socket.socket], board: Board, slot: int,
        contexts: dict[Address, Any], files: dict[str, LogFile],
        identity: tuple[int, int] | None, early: list[int], zones: dict[Any, Any]) -> int:
    """Serve until a signal says stop (``early``: signals that came before the loop)."""
    if identity is not None:
        uid, gid = identity
        os.setgroups([gid])
        os.setgid(gid)
        os.setuid(uid)
    loop = Loop()
    core = Core(loop)
    worker = WorkerMetrics(core.stats, board, slot)
    logs = access_logs(cfg, files)
    worker.access_logs = unique = list({id(a): a for a in logs if a is not False}.values())
    worker.start(loop)
    sites = build_sites(cfg, loop, core, worker, logs, zones)  # once: shared by listeners
    listeners = []
    for address, sock in socks.items():
        mine = [i for i, s in enumerate(cfg.servers)
                if any((lc.host, lc.port) == address for lc in s.listeners)]
        app = App([sites[i] for i in mine], worker)
        listener = Listener(core, sock, app.handle,
                            settings_of(cfg, [cfg.servers[i] for i in mine]))
        listener.tls_context = contexts.get(address)
        listener.access_log = app.default_log
        listener.start()
        listeners.append(listener)

    def flush() -> None:
        loop.call_later(FLUSH_EVERY, flush)
        for access_log in unique:
            access_log.flush()

    def on_signal(signum: int) -> None:
        if signum == signal.SIGQUIT:
            if core.draining:
                return
            for listener in listeners:
                listener.stop()
            core.drain()
            if not core.connections:
                loop.stop()
            else:
                loop.call_later(cfg.drain_timeout, loop.stop)
        elif signum == signal.SIGUSR1:
            for file in files.values():
                file.reopen()
            log.reopen()
        elif signum != signal.SIGHUP:   # HUP is the master's
            loop.stop()

    loop.watch_signals(SIGNALS, on_signal)
    for signum in early:
        loop.call_soon(lambda signum=signum: on_signal(signum))
    flush()
    loop.run()
    core.close_all()
    loop.close()                # its epoll descriptor and wake-up pipe, whatever holds it
    for access_log in unique:
        access_log.flush()
    for file in files.values():
        file.close()
    log.close()
    return 0
