"""Running a config: bind every listener, then one worker loop or a master and N workers.

Process model (nginx's): with ``workers: 1`` the process itself runs the loop. With more,
the master binds the sockets, forks the workers (which inherit them), forwards TERM/INT/QUIT
to them and respawns a worker that dies unexpectedly. Signal handlers only record the
signal; the loop (or the master's wait loop) acts on it.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys

from . import config
from ._conn import Core, Listener, Settings
from ._loop import Loop
from .app import App, build_sites
from .metrics import Board, WorkerMetrics

BACKLOG = 4096
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)

# Signals that arrive after the sockets listen but before a loop handles them are kept
# here and replayed, instead of getting their default action (QUIT would dump core).
_early: list[int] = []


def _record_early_signals() -> None:
    for s in SIGNALS:
        signal.signal(s, lambda signum, frame: _early.append(signum))


class StartupError(Exception):
    """A one-line reason the server cannot start (port in use, bad address, ...)."""


Address = tuple[str, int]


def bind(cfg: config.Config) -> dict[Address, socket.socket]:
    socks: dict[Address, socket.socket] = {}
    try:
        for server in cfg.servers:
            for lc in server.listeners:
                key = (lc.host, lc.port)
                if key not in socks:
                    socks[key] = _listen(lc.host, lc.port)
    except StartupError:
        for s in socks.values():
            s.close()
        raise
    return socks


def _listen(host: str, port: int) -> socket.socket:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise StartupError(f"cannot listen on {where}: {e.strerror}") from None
    family, kind, proto, _, addr = info[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise StartupError(f"cannot listen on {where}: {e.strerror}") from None
    sock.setblocking(False)
    return sock


def settings_of(cfg: config.Config, servers: list[config.ServerConfig]) -> Settings:
    """Connection limits of one listener.

    The head is read before the Host (and so the server) is known: its timeouts come from
    the listener's first server, as nginx takes them from the default server. The body
    limit is the loosest of the listener's routes; each proxy route enforces its own.
    """
    first = servers[0]
    limits = [r.max_body_size for s in servers for r in s.routes] or [first.max_body_size]
    return Settings(keepalive_timeout=first.keepalive_timeout,
                    header_timeout=first.header_timeout, body_timeout=first.body_timeout,
                    send_timeout=first.send_timeout,
                    max_body_size=0 if 0 in limits else max(limits),
                    max_connections=cfg.max_connections)


def run_worker(cfg: config.Config, socks: dict[Address, socket.socket], board: Board,
               slot: int = 0) -> int:
    loop = Loop()
    core = Core(loop)
    worker = WorkerMetrics(core.stats, board, slot)
    worker.start(loop)
    listeners = []
    sites = build_sites(cfg, loop, worker)      # once: shared by all the listeners
    for (host, port), sock in socks.items():
        mine = [i for i, s in enumerate(cfg.servers)
                if any((lc.host, lc.port) == (host, port) for lc in s.listeners)]
        app = App([sites[i] for i in mine], worker)
        listener = Listener(core, sock, app.handle,
                            settings_of(cfg, [cfg.servers[i] for i in mine]))
        listener.start()
        listeners.append(listener)

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
        else:
            loop.stop()

    loop.watch_signals(SIGNALS, on_signal)
    for signum in _early:
        loop.call_soon(lambda signum=signum: on_signal(signum))
    _early.clear()
    loop.run()
    core.close_all()
    loop.close()        # its descriptors now: a resolver thread may keep the object alive
    return 0


def serve(cfg: config.Config) -> int:
    _record_early_signals()
    socks = bind(cfg)
    for host, port in socks:
        shown = f"[{host}]" if ":" in host else host
        print(f"expserver: listening on http://{shown}:{port}/", file=sys.stderr, flush=True)
    board = Board(cfg.workers)
    if cfg.workers <= 1:
        return run_worker(cfg, socks, board)
    return Master(cfg, socks, board).run()


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive a master killed without a chance to stop it (SIGKILL)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:      # the master died before prctl took effect
        os._exit(0)


PR_SET_PDEATHSIG = 1


class Master:
    def __init__(self, cfg: config.Config, socks: dict[Address, socket.socket],
                 board: Board) -> None:
        self.cfg = cfg
        self.socks = socks
        self.board = board
        self.children: dict[int, int] = {}      # pid -> metrics slot
        self.master_pid = os.getpid()
        self.stopping: int | None = None

    def spawn(self, slot: int) -> None:
        pid = os.fork()
        if pid == 0:
            _die_with_parent(self.master_pid)
            _early.clear()
            _record_early_signals()
            code = 1
            try:
                code = run_worker(self.cfg, self.socks, self.board, slot)
            finally:
                os._exit(code)
        self.children[pid] = slot

    def on_signal(self, signum: int, frame: object) -> None:
        self.stopping = signum
        for sock in self.socks.values():
            sock.close()        # the workers close theirs: then the port refuses
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGQUIT if signum == signal.SIGQUIT else signal.SIGTERM)
            except ProcessLookupError:
                pass

    def run(self) -> int:
        for s in SIGNALS:
            signal.signal(s, self.on_signal)
        if _early:
            self.on_signal(_early[-1], None)
            return 0
        for slot in range(self.cfg.workers):
            self.spawn(slot)
        print(f"expserver: master {os.getpid()} running {self.cfg.workers} workers",
              file=sys.stderr, flush=True)
        while self.children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            slot = self.children.pop(pid, None)
            if self.stopping is None and slot is not None:
                print(f"expserver: worker {pid} died ({status:#x}); starting another",
                      file=sys.stderr, flush=True)
                self.spawn(slot)
        return 0
