"""Command line: ``expserver serve``, ``check``, and ``reload|stop|quit|reopen``."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import replace

from . import __version__, config

EXTENSIONS = ("_loop", "_access", "_pipe", "_http", "_conn", "_relay", "_proxy", "_zone")
# The signal each control command sends to the master (nginx -s's set).
CONTROL = {"reload": signal.SIGHUP, "stop": signal.SIGTERM, "quit": signal.SIGQUIT,
           "reopen": signal.SIGUSR1}


def _load_core() -> None:
    """Import the compiled core or stop with a clear message: there is no slow fallback."""
    import importlib

    for name in EXTENSIONS:
        try:
            importlib.import_module(f"expserver.{name}")
        except ImportError as e:
            raise SystemExit(
                f"expserver: the compiled core module expserver.{name} failed to import ({e}).\n"
                "Rebuild it with `pip install .` (it needs a C compiler and Python headers)."
            ) from None


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number or "auto"') from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="expserver", description=__doc__)
    p.add_argument("--version", action="version", version=f"expserver {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the server")
    s.add_argument("dir", nargs="?", help="directory to serve when no config is given "
                   "(default: the current directory)")
    s.add_argument("-c", "--config", help="eXpServer JSON (or TOML) config file")
    s.add_argument("--host", help="listen address (default 127.0.0.1 without a config)")
    s.add_argument("--port", type=int, help="listen port (default 8080 without a config)")
    s.add_argument("--workers", type=_workers,
                   help='worker processes, or "auto" for one per CPU (overrides the config)')
    s.add_argument("--allow-root", action="store_true",
                   help='serve as root without a "user" to drop to, and say nothing of it')
    s.add_argument("--pid-file", help="where the master writes its pid (overrides the config)")
    c = sub.add_parser("check", help="validate a config and print a summary")
    c.add_argument("-c", "--config", required=True, help="config file to check")
    for name, signum in CONTROL.items():
        what = {"reload": "reload the config without dropping connections",
                "stop": "stop at once", "quit": "stop after the requests in flight",
                "reopen": "reopen the log files (after logrotate)"}[name]
        k = sub.add_parser(name, help=f"{what} (sends {signum.name} to the master)")
        k.add_argument("-c", "--config", help="the config the server runs (finds its pid file)")
        k.add_argument("--pid-file", help="the master's pid file")
        k.add_argument("--port", type=int, help="without a config: the port of `serve DIR`")
    return p


def _overrides(args: argparse.Namespace) -> Callable[[config.Config], config.Config]:
    """The command line's changes to a loaded config (applied again at each reload)."""

    def adjust(cfg: config.Config) -> config.Config:
        if args.host or args.port:
            listeners = {(lc.host, lc.port) for s in cfg.servers for lc in s.listeners}
            if args.port and len(listeners) > 1:
                raise config.ConfigError("$", "--port needs a config with a single listener")
            cfg = replace(cfg, servers=tuple(
                replace(s, listeners=tuple(
                    replace(lc, host=args.host or lc.host, port=args.port or lc.port)
                    for lc in s.listeners))
                for s in cfg.servers))
        if args.workers is not None:
            if args.workers == "auto":
                cfg = replace(cfg, workers=os.cpu_count() or 1)
            elif args.workers < 1:
                raise config.ConfigError("$", "--workers must be at least 1")
            else:
                cfg = replace(cfg, workers=args.workers)
        return cfg

    return adjust


def _config_for(args: argparse.Namespace) -> config.Config:
    if args.config:
        if args.dir:
            raise config.ConfigError("$", "give either a config file or a directory, not both")
        cfg = config.load(args.config)
    else:
        directory = args.dir or os.getcwd()
        if not os.path.isdir(directory):
            raise config.ConfigError("$", f"{directory}: no such directory")
        if args.port is not None and not 1 <= args.port <= 65535:
            raise config.ConfigError("$", f"--port {args.port} is out of range 1..65535")
        cfg = config.default(os.path.abspath(directory), args.host or "127.0.0.1",
                             args.port or 8080)
    return _overrides(args)(cfg)


def _certificates(cfg: config.Config) -> None:
    """What each server's certificate says (the loader has checked it loads and matches)."""
    from .tls import certificate_summary
    for i, server in enumerate(cfg.servers):
        if server.tls is not None:
            line, warning = certificate_summary(server.tls)
            print(f"servers[{i}]: {line}")
            if warning:
                print(f"expserver: warning: servers[{i}]: {warning}", file=sys.stderr)


def _pid_file(args: argparse.Namespace) -> str:
    from .master import default_pid_file
    if args.pid_file:
        return args.pid_file
    if args.config:
        try:
            configured = config.load(args.config).pid_file
        except config.ConfigError:
            configured = None   # reload anyway: the master says what is wrong with it
        return configured or default_pid_file(args.config)
    return default_pid_file(None, getattr(args, "port", None))


def _control(args: argparse.Namespace) -> int:
    path = _pid_file(args)
    try:
        with open(path) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not a process id"
        print(f"expserver: cannot read the pid file {path}: {reason} (is the server "
              "running with this config?)", file=sys.stderr)
        return 1
    try:
        os.kill(pid, CONTROL[args.command])
    except ProcessLookupError:
        print(f"expserver: no process {pid} (from {path}): the server is not running",
              file=sys.stderr)
        return 1
    except PermissionError:
        print(f"expserver: not allowed to signal process {pid}", file=sys.stderr)
        return 1
    print(f"expserver: sent {CONTROL[args.command].name} to {pid}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in CONTROL:
        return _control(args)
    try:
        if args.command == "check":
            cfg = config.load(args.config)
            print(config.summary(cfg))
            _certificates(cfg)
            print(f"{args.config}: ok")
            return 0
        cfg = _config_for(args)
    except config.ConfigError as e:
        where = args.config or "arguments"
        print(f"expserver: {where}: {e}", file=sys.stderr)
        return 1
    _load_core()
    from . import server

    try:
        return server.serve(cfg, allow_root=args.allow_root, pid_file=args.pid_file,
                            adjust=_overrides(args))
    except server.StartupError as e:
        print(f"expserver: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
