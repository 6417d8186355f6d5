"""Command line: ``expserver serve`` and ``expserver check``."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from . import __version__, config

EXTENSIONS = ("_loop", "_pipe", "_http", "_conn")


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
    s.add_argument("--workers", type=int, help="worker processes (overrides the config)")
    c = sub.add_parser("check", help="validate a config and print a summary")
    c.add_argument("-c", "--config", required=True, help="config file to check")
    return p


def _config_for(args: argparse.Namespace) -> config.Config:
    if args.config:
        if args.dir:
            raise config.ConfigError("$", "give either a config file or a directory, not both")
        cfg = config.load(args.config)
        if args.host or args.port:
            listeners = {(lc.host, lc.port) for s in cfg.servers for lc in s.listeners}
            if args.port and len(listeners) > 1:
                raise config.ConfigError("$", "--port needs a config with a single listener")
            cfg = replace(cfg, servers=tuple(
                replace(s, listeners=tuple(
                    config.ListenerConfig(args.host or lc.host, args.port or lc.port)
                    for lc in s.listeners))
                for s in cfg.servers))
    else:
        directory = args.dir or os.getcwd()
        if not os.path.isdir(directory):
            raise config.ConfigError("$", f"{directory}: no such directory")
        if args.port is not None and not 1 <= args.port <= 65535:
            raise config.ConfigError("$", f"--port {args.port} is out of range 1..65535")
        cfg = config.default(os.path.abspath(directory), args.host or "127.0.0.1",
                             args.port or 8080)
    if args.workers is not None:
        if args.workers < 1:
            raise config.ConfigError("$", "--workers must be at least 1")
        cfg = replace(cfg, workers=args.workers)
    return cfg


def _certificates(cfg: config.Config) -> None:
    """What each server's certificate says (the loader has checked it loads and matches)."""
    from .tls import certificate_summary
    for i, server in enumerate(cfg.servers):
        if server.tls is not None:
            line, warning = certificate_summary(server.tls)
            print(f"servers[{i}]: {line}")
            if warning:
                print(f"expserver: warning: servers[{i}]: {warning}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
        return server.serve(cfg)
    except server.StartupError as e:
        print(f"expserver: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
