"""The master process: sockets, workers, signals, reloads (nginx's process model).

Theory of operation
-------------------
The master binds every listener, loads the TLS contexts and opens the log files (as root,
if started so), then forks the workers of one *generation* (one loaded config), each of
which drops to ``user`` and serves. It never serves a request itself. Its signal handlers
only queue the signal and wake its loop (a pipe); the loop acts:

* TERM, INT: fast stop: TERM to every worker, wait for them, exit 0.
* QUIT: graceful stop: QUIT to every worker (they drain), wait, exit 0.
* HUP: reload. The new config is loaded and checked; if it is invalid, or a new listener
  cannot be bound, the old generation keeps serving and the reason is logged with its
  JSON path. Otherwise a new generation starts: listeners that stay keep their socket (the
  same kernel queue: not a connection is dropped), new ones are bound, TLS contexts and log
  files made anew (new certificates take effect), new workers start, and the old ones get
  QUIT: they stop accepting, finish what is in flight (``drain_timeout``) and exit. Sockets
  the new config no longer has are closed.
* USR1: reopen log files: the master opens the new files (owned by ``user``) and tells the
  workers, which reopen theirs.
* CHLD: a worker exited. One of the current generation that dies is replaced, at once the
  first time, then with an exponential delay while it keeps dying soon after it started;
  after MAX_QUICK_DEATHS such deaths in a row the master gives up: it stops everything and
  exits 1 with the reason, rather than fork hundreds of doomed workers a second.

Metrics survive all this (expserver/metrics.py): the board is made once, and a worker's
counters are kept in the retired slot when it exits.
"""
from __future__ import annotations

import grp
import hashlib
import os
import pwd
import select
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import app, config, log, tls, worker
from .logfile import LogFile
from .metrics import Board

BACKLOG = 4096
MAX_QUICK_DEATHS = 5
QUICK = 2.0                 # a worker that dies sooner than this after its start died at start
MAX_DELAY = 10.0
KILL_AFTER = 5.0            # seconds past drain_timeout after which old workers are killed
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1,
           signal.SIGCHLD)
Address = tuple[str, int]


class StartupError(Exception):
    """A one-line reason the server cannot start (port in use, bad address, ...)."""


def default_pid_file(source: str | None, port: int | None = None) -> str:
    """Where a config's master writes its pid unless ``pid_file`` says: the temp directory,
    under a name made from the config's absolute path (``expserver reload -c FILE`` finds
    it from the same path)."""
    if source is None:
        return os.path.join(tempfile.gettempdir(), f"expserver-{port or 8080}.pid")
    digest = hashlib.sha1(os.path.abspath(source).encode()).hexdigest()[:10]
    return os.path.join(tempfile.gettempdir(), f"expserver-{digest}.pid")


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


def identity(cfg: config.Config, allow_root: bool) -> tuple[int, int] | None:
    """The (uid, gid) workers drop to, or None to stay who we are."""
    if cfg.user is None:
        if os.geteuid() == 0 and not allow_root:
            log.warn('running as root: set "user" in the config to run the workers as '
                     "another user (or --allow-root to say this is intended)")
        return None
    if os.geteuid() != 0:
        log.warn(f'"user": {cfg.user} is ignored: the server was not started as root')
        return None
    try:
        entry = pwd.getpwnam(cfg.user)
    except KeyError:
        raise StartupError(f"user {cfg.user!r} does not exist") from None
    gid = entry.pw_gid
    if cfg.group is not None:
        try:
            gid = grp.getgrnam(cfg.group).gr_gid
        except KeyError:
            raise StartupError(f"group {cfg.group!r} does not exist") from None
    return entry.pw_uid, gid


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"was killed by signal {sig} ({name})"
    return f"exited with status {os.WEXITSTATUS(status)}"


@dataclass
class Generation:
    """Everything one loaded config needs before workers fork."""

    cfg: config.Config
    socks: dict[Address, socket.socket]
    contexts: dict[Address, Any]
    files: dict[str, LogFile]
    zones: dict[Any, Any]           # the limits' shared counters (expserver/app.py zones)
    workers: dict[int, tuple[int, float]] = field(default_factory=dict)  # pid -> (slot, start)

    @classmethod
    def start(cls, cfg: config.Config, reuse: dict[Address, socket.socket]) -> Generation:
        contexts = tls.listener_contexts(cfg)     # before forking: workers share ticket keys
        files: dict[str, LogFile] = {}
        socks: dict[Address, socket.socket] = {}
        try:
            for server in cfg.servers:
                if server.access_log is not None and server.access_log.path not in files:
                    path = server.access_log.path
                    try:
                        files[path] = LogFile(path)
                    except OSError as e:
                        raise StartupError(f"cannot open access log {path}: {e.strerror}") \
                            from None
                for lc in server.listeners:
                    address = (lc.host, lc.port)
                    if address not in socks:
                        socks[address] = reuse.get(address) or _listen(lc.host, lc.port)
        except StartupError:
            for address, sock in socks.items():
                if address not in reuse:
                    sock.close()
            raise
        return cls(cfg, socks, contexts, files, app.zones(cfg))


class Master:
    def __init__(self, cfg: config.Config, *, allow_root: bool = False,
                 pid_file: str | None = None,
                 adjust: Callable[[config.Config], config.Config] | None = None) -> None:
        self.cfg = cfg
        self.adjust = adjust or (lambda c: c)
        self.allow_root = allow_root
        self.pid_file = pid_file
        self.board = Board(cfg.workers)
        self.current: Generation | None = None
        self.old: list[Generation] = []
        self.identity: tuple[int, int] | None = None
        self.queue: list[int] = []
        self.stopping: int | None = None
        self.quick_deaths = 0
        self.respawns: list[tuple[float, int]] = []      # (when, slot) of workers to start
        self.kill_at: list[tuple[float, list[int]]] = []
        self.error_file: LogFile | None = None

    # ------------------------------------------------------------ start and stop
    def run(self) -> int:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake = r
        signal.set_wakeup_fd(w)
        for s in HANDLED:
            signal.signal(s, lambda signum, frame: self.queue.append(signum))
        self.configure_error_log(self.cfg)
        self.current = Generation.start(self.cfg, {})
        self.identity = identity(self.cfg, self.allow_root)
        self.announce(self.current)
        self.write_pid_file()
        try:
            for _ in range(self.cfg.workers):
                self.spawn(self.board.take())
            return self.serve()
        finally:
            for s in HANDLED:       # a late signal must not kill the exit in progress
                if s != signal.SIGCHLD:
                    signal.signal(s, signal.SIG_IGN)
            self.remove_pid_file()
            for sock in self.current.socks.values():
                sock.close()
            log.close()

    def announce(self, gen: Generation) -> None:
        for host, port in gen.socks:
            shown = f"[{host}]" if ":" in host else host
            scheme = "https" if (host, port) in gen.contexts else "http"
            print(f"expserver: listening on {scheme}://{shown}:{port}/", file=sys.stderr,
                  flush=True)

    def configure_error_log(self, cfg: config.Config) -> None:
        spec = cfg.error_log
        try:
            file = LogFile(spec.path)
        except OSError as e:
            raise StartupError(f"cannot open error log {spec.path}: {e.strerror}") from None
        if self.error_file is not None and self.error_file.path != spec.path:
            self.error_file.close()
        self.error_file = file
        log.configure(file=file, level=spec.level)

    def write_pid_file(self) -> None:
        if self.pid_file is None:
            return
        tmp = f"{self.pid_file}.{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(tmp, self.pid_file)
        except OSError as e:
            log.warn(f"cannot write the pid file {self.pid_file}: {e.strerror}")

    def remove_pid_file(self) -> None:
        if self.pid_file is None:
            return
        try:
            with open(self.pid_file) as f:
                if f.read().strip() == str(os.getpid()):
                    os.unlink(self.pid_file)
        except OSError:
            pass

    def spawn(self, slot: int) -> None:
        gen = self.current
        assert gen is not None
        # signals wait until the child has handlers of its own (not the master's queue)
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        pid = os.fork()
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        if pid == 0:
            code = 1
            try:
                code = self.child(gen, slot)
            except BaseException as exc:    # the worker failed to start: say why, once
                if not isinstance(exc, (SystemExit, KeyboardInterrupt)):
                    log.exception("starting a worker", exc)
                    log.close()
            finally:
                os._exit(code)
        gen.workers[pid] = (slot, time.monotonic())

    def child(self, gen: Generation, slot: int) -> int:
        signal.set_wakeup_fd(-1)
        os.close(self._wake)
        early: list[int] = []
        for s in HANDLED:
            signal.signal(s, signal.SIG_DFL if s == signal.SIGCHLD
                          else (lambda signum, frame: early.append(signum)))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        _die_with_parent()
        for old in self.old:                # sockets only an old generation still has
            for address, sock in old.socks.items():
                if address not in gen.socks:
                    sock.close()
        code = worker.run(gen.cfg, gen.socks, self.board, slot, gen.contexts, gen.files,
                          self.identity, early, gen.zones)
        return code

    def signal_workers(self, signum: int, gens: list[Generation] | None = None) -> None:
        for gen in gens if gens is not None else [self.current, *self.old]:
            if gen is None:
                continue
            for pid in gen.workers:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass

    # ------------------------------------------------------------ the loop
    def serve(self) -> int:
        while True:
            timeout = self.next_timeout()
            try:
                select.select([self._wake], [], [], timeout)
            except InterruptedError:
                pass
            try:
                while os.read(self._wake, 256):
                    pass
            except BlockingIOError:
                pass
            code = self.act()
            if code is not None:
                return code

    def next_timeout(self) -> float | None:
        times = [t for t, _ in self.respawns] + [t for t, _ in self.kill_at]
        if not times:
            return None
        return max(0.0, min(times) - time.monotonic())

    def act(self) -> int | None:
        while self.queue:
            signum = self.queue.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                if self.stopping is None or signum != signal.SIGQUIT:
                    self.stopping = signum
                    self.respawns.clear()
                    for gen in (self.current, *self.old):
                        for sock in gen.socks.values() if gen is not None else ():
                            sock.close()    # the workers close theirs: then the port refuses
                    self.signal_workers(signal.SIGQUIT if signum == signal.SIGQUIT
                                        else signal.SIGTERM)
            elif signum == signal.SIGHUP and self.stopping is None:
                self.reload()
            elif signum == signal.SIGUSR1:
                self.reopen()
        code = self.reap()
        if code is not None:
            return code
        now = time.monotonic()
        due = [slot for t, slot in self.respawns if t <= now]
        self.respawns = [(t, slot) for t, slot in self.respawns if t > now]
        for slot in due:
            self.spawn(slot)
        for _, pids in [k for k in self.kill_at if k[0] <= now]:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.kill_at = [k for k in self.kill_at if k[0] > now]
        if self.stopping is not None and not self.alive():
            return 0
        return None

    def alive(self) -> bool:
        gens = [self.current, *self.old]
        return any(g is not None and g.workers for g in gens) or bool(self.respawns)

    def reap(self) -> int | None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid == 0:
                return None
            code = self.exited(pid, status)
            if code is not None:
                return code

    def exited(self, pid: int, status: int) -> int | None:
        for gen in self.old:
            if pid in gen.workers:
                slot, _ = gen.workers.pop(pid)
                self.board.retire(slot)
                if not gen.workers:
                    self.old.remove(gen)
                    for file in gen.files.values():
                        if self.current is None or file not in self.current.files.values():
                            file.close()
                return None
        gen = self.current
        if gen is None or pid not in gen.workers:
            return None
        slot, started = gen.workers.pop(pid)
        self.board.retire(slot)
        if self.stopping is not None:
            return None
        quick = time.monotonic() - started < QUICK
        self.quick_deaths = self.quick_deaths + 1 if quick else 0
        if self.quick_deaths >= MAX_QUICK_DEATHS:
            log.error(f"worker {pid} {describe_exit(status)}; workers died at start "
                      f"{self.quick_deaths} times in a row: giving up")
            self.stopping = signal.SIGTERM
            self.signal_workers(signal.SIGTERM)
            while True:
                try:
                    os.waitpid(-1, 0)
                except ChildProcessError:
                    return 1
        delay = 0.0 if not quick else min(MAX_DELAY, 0.1 * 2 ** (self.quick_deaths - 1))
        log.warn(f"worker {pid} {describe_exit(status)}; starting another"
                 + (f" in {delay:g} s" if delay else ""))
        self.respawns.append((time.monotonic() + delay, self.board.take()))
        return None

    # ------------------------------------------------------------ reload and reopen
    def reload(self) -> None:
        old = self.current
        assert old is not None
        source = old.cfg.source
        try:
            cfg = self.adjust(config.load(source)) if source is not None else old.cfg
            gen = Generation.start(cfg, old.socks)
            ident = identity(cfg, self.allow_root)
        except config.ConfigError as e:
            log.error(f"reload refused, still serving the old config: {source}: {e}")
            return
        except StartupError as e:
            log.error(f"reload refused, still serving the old config: {e}")
            return
        self.configure_error_log(cfg)
        self.identity = ident
        self.cfg = cfg
        self.current = gen
        self.old.append(old)
        self.board.set_workers(cfg.workers)
        for _ in range(cfg.workers):
            self.spawn(self.board.take())
        self.respawns.clear()
        self.quick_deaths = 0
        self.signal_workers(signal.SIGQUIT, [old])
        self.kill_at.append((time.monotonic() + old.cfg.drain_timeout + KILL_AFTER,
                             list(old.workers)))
        for address, sock in old.socks.items():
            if address not in gen.socks:
                sock.close()        # the old workers close their copies as they stop
        log.warn(f"reloaded {source or 'the built-in config'}: {cfg.workers} new worker(s); "
                 f"{len(old.workers)} old one(s) draining")
        self.announce_changes(old, gen)

    def announce_changes(self, old: Generation, new: Generation) -> None:
        for address in new.socks.keys() - old.socks.keys():
            log.warn(f"now listening on {address[0]}:{address[1]}")
        for address in old.socks.keys() - new.socks.keys():
            log.warn(f"no longer listening on {address[0]}:{address[1]}")

    def reopen(self) -> None:
        """USR1: new log files, made by the master (owned by the workers' user)."""
        gens = [g for g in (self.current, *self.old) if g is not None]
        if self.error_file is not None:
            self.error_file.reopen()
        for gen in gens:
            for path in gen.files:
                if path not in ("stdout", "stderr") and self.identity is not None:
                    try:
                        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                        os.fchown(fd, *self.identity)
                        os.close(fd)
                    except OSError as e:
                        log.warn(f"cannot prepare {path} for the workers: {e.strerror}")
        self.signal_workers(signal.SIGUSR1)
        log.info("reopening log files")


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """A worker must not outlive a master killed without a chance to stop it (SIGKILL)."""
    import ctypes
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:      # the master died before prctl took effect
        os._exit(0)
