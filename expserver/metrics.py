"""``metrics`` routes: eXpServer's dashboard JSON and the same figures for Prometheus.

Every worker counts in its own ``Stats`` (expserver._conn) and, twice a second, copies them
with its RSS and CPU use into its slot of a ``Board``: an anonymous shared memory map the
master makes before forking, so any worker can answer for all of them without a message.
The worker that answers refreshes its own slot first, so a single worker is always exact.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import time
from typing import Any

from . import log
from ._conn import Stats

# What each worker publishes, in slot order (all integers).
FIELDS = (
    "pid", "rss_bytes", "cpu_percent",
    "conn_current", "conn_accepted", "conn_error", "conn_timeout", "conn_accepted_error",
    "req_total", "req_file_serve", "req_reverse_proxy", "req_redirect",
    "res_1xx", "res_2xx", "res_3xx", "res_4xx", "res_5xx", "res_time_total_usec",
    "res_time_peak_usec", "send_bytes", "recv_bytes",
)
_SLOT = struct.Struct(f"<{len(FIELDS)}q")
# Requests are counted per route type; metrics routes too, though they are not published.
ROUTE_KINDS = ("file_serve", "reverse_proxy", "redirect", "metrics")
PUBLISH_EVERY = 0.5
_PAGE = os.sysconf("SC_PAGE_SIZE")


class Board:
    """One slot of integers per worker, shared across fork()."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.started = time.time()
        self.master_pid = os.getpid()
        self._map = mmap.mmap(-1, _SLOT.size * workers)

    def write(self, slot: int, values: tuple[int, ...]) -> None:
        _SLOT.pack_into(self._map, slot * _SLOT.size, *values)

    def read(self) -> list[dict[str, int]]:
        return [dict(zip(FIELDS, _SLOT.unpack_from(self._map, i * _SLOT.size)))
                for i in range(self.workers)]


class WorkerMetrics:
    """This worker's side: per-route-type request counts, and publishing to the board."""

    def __init__(self, stats: Stats, board: Board, slot: int) -> None:
        self.stats = stats
        self.board = board
        self.slot = slot
        self.by_kind = dict.fromkeys(ROUTE_KINDS, 0)
        self._cpu = (time.monotonic(), _cpu_seconds())
        # Opened once (in the worker: /proc/self is whoever opens it): publishing then needs
        # no descriptor, so it goes on when the worker has run out of them.
        self._statm = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)

    def publish(self) -> None:
        s = self.stats
        now, used = time.monotonic(), _cpu_seconds()
        then, before = self._cpu
        self._cpu = (now, used)
        cpu = round(100 * (used - before) / (now - then)) if now > then else 0
        rss = int(os.pread(self._statm, 256, 0).split()[1]) * _PAGE
        self.board.write(self.slot, (
            os.getpid(), rss, cpu,
            s.conn_current, s.conn_accepted, s.conn_error, s.conn_timeout,
            s.conn_accepted_error, s.req_total, self.by_kind["file_serve"],
            self.by_kind["reverse_proxy"], self.by_kind["redirect"],
            s.res_1xx, s.res_2xx, s.res_3xx, s.res_4xx, s.res_5xx,
            int(s.res_time_total * 1e6), int(s.res_time_peak * 1e6), s.send_bytes, s.recv_bytes,
        ))

    def start(self, loop: Any) -> None:
        def tick() -> None:
            loop.call_later(PUBLISH_EVERY, tick)    # first: a failed publish stops nothing
            try:
                self.publish()
            except Exception as exc:    # the first tick runs here, not in the loop
                log.exception("publishing this worker's metrics", exc)
        tick()


class Metrics:
    """The handler of a ``metrics`` route."""

    def __init__(self, worker: WorkerMetrics, server_name: str) -> None:
        self.worker = worker
        self.server_name = server_name
        self._sys = _sys_cpu()

    def __call__(self, req: Any) -> tuple[int, bytes, object]:
        if req.method not in (b"GET", b"HEAD"):
            return 405, b"Allow: GET, HEAD\r\nContent-Type: text/plain\r\n", b"GET or HEAD\n"
        self.worker.publish()
        figures = self.figures()
        accept = req.get(b"accept") or b""
        if b"format=prometheus" in req.query or b"text/plain;version=0.0.4" in accept \
                or b"openmetrics" in accept:
            return 200, (b"Content-Type: text/plain; version=0.0.4\r\n"
                         b"Cache-Control: no-store\r\n"), prometheus(figures)
        return 200, (b"Content-Type: application/json\r\nCache-Control: no-store\r\n"
                     b"Access-Control-Allow-Origin: *\r\n"), json.dumps(figures).encode()

    def figures(self) -> dict[str, Any]:
        board = self.worker.board
        slots = [s for s in board.read() if s["pid"]]

        def total(name: str) -> int:
            return sum(s[name] for s in slots)

        answered = sum(total(f"res_{c}xx") for c in range(1, 6))
        mem_total, mem_available = _meminfo()
        busy, all_ = _sys_cpu()
        sys_cpu = (busy - self._sys[0]) / (all_ - self._sys[1]) if all_ > self._sys[1] else 0
        self._sys = (busy, all_)
        return {
            "uptime_msec": int((time.time() - board.started) * 1000),
            "pid": board.master_pid,
            "workers": board.workers,
            "server_name": self.server_name,
            "sys_cpu_usage_percent": round(100 * sys_cpu),
            "sys_ram_usage_bytes": mem_total - mem_available,
            "sys_ram_total_bytes": mem_total,
            "workers_ram_usage_bytes": total("rss_bytes"),
            "workers_cpu_usage_percent": [s["cpu_percent"] for s in slots],
            "conn_current": total("conn_current"),
            "conn_accepted": total("conn_accepted"),
            "conn_error": total("conn_error"),
            "conn_timeout": total("conn_timeout"),
            "conn_accepted_error": total("conn_accepted_error"),
            # requests counted but not answered yet (this one included)
            "req_current": max(0, total("req_total") - answered),
            "req_total": total("req_total"),
            "req_file_serve": total("req_file_serve"),
            "req_reverse_proxy": total("req_reverse_proxy"),
            "req_redirect": total("req_redirect"),
            "res_avg_res_time_msec": total("res_time_total_usec") // 1000 // answered
            if answered else 0,
            "res_peak_res_time_msec": max((s["res_time_peak_usec"] for s in slots),
                                          default=0) // 1000,
            **{f"res_code_{c}xx": total(f"res_{c}xx") for c in range(1, 6)},
            "traffic_total_send_bytes": total("send_bytes"),
            "traffic_total_recv_bytes": total("recv_bytes"),
        }


_GAUGES = {"uptime_msec", "workers", "sys_cpu_usage_percent", "sys_ram_usage_bytes",
           "sys_ram_total_bytes", "workers_ram_usage_bytes", "conn_current", "req_current",
           "res_avg_res_time_msec", "res_peak_res_time_msec"}


def prometheus(figures: dict[str, Any]) -> bytes:
    """The figures in Prometheus' text format (counters and gauges named expserver_*)."""
    lines = []
    for name, value in figures.items():
        if name in ("pid", "server_name"):
            continue
        metric = f"expserver_{name}"
        if name == "workers_cpu_usage_percent":
            lines.append(f"# TYPE {metric} gauge")
            lines += [f'{metric}{{worker="{i}"}} {v}' for i, v in enumerate(value)]
            continue
        kind = "gauge" if name in _GAUGES else "counter"
        lines += [f"# TYPE {metric} {kind}", f"{metric} {value}"]
    return ("\n".join(lines) + "\n").encode("ascii")


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _sys_cpu() -> tuple[int, int]:
    with open("/proc/stat", "rb") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def _meminfo() -> tuple[int, int]:
    info = {}
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            name, _, rest = line.partition(b":")
            info[name] = int(rest.split()[0]) * 1024
    return info.get(b"MemTotal", 0), info.get(b"MemAvailable", 0)
