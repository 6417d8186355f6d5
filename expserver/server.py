"""Running a config: a master process (expserver/master.py) and its workers
(expserver/worker.py), in nginx's process model, whatever the number of workers."""
from __future__ import annotations

from collections.abc import Callable

from . import config
from .master import Master, StartupError, default_pid_file

__all__ = ["StartupError", "serve"]


def serve(cfg: config.Config, *, allow_root: bool = False, pid_file: str | None = None,
          adjust: Callable[[config.Config], config.Config] | None = None) -> int:
    """Serve until stopped; the exit code. Raises StartupError before anything listens.
    ``adjust``: the command line's overrides, applied to each reloaded config too."""
    if pid_file is None:
        pid_file = cfg.pid_file or default_pid_file(
            cfg.source, cfg.servers[0].listeners[0].port if cfg.source is None else None)
    return Master(cfg, allow_root=allow_root, pid_file=pid_file, adjust=adjust).run()
