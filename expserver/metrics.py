"""``metrics`` routes: eXpServer's dashboard JSON and the same figures for Prometheus.

Every worker counts in its own ``Stats`` (expserver._conn) and, twice a second, copies them
with its RSS and CPU use into its slot of a ``Board``: an anonymous shared memory map the
master makes once, before it forks anything, so any worker can answer for all of them
without a message. The worker that answers refreshes its own slot first, so a single worker
is always exact.

The board outlives reloads: the master gives each new worker a free slot, and when a worker
exits it adds the worker's counters to the *retired* slot and frees its slot, so totals stay
continuous across reloads and respawns (gauges — connections open, memory — only count live
workers).
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import time
from typing import Any

from . import log
from ._conn import DURATION_BUCKETS, Stats

# Requests are counted per route type (the dashboard shows three of them).
ROUTE_KINDS = ("file_serve", "reverse_proxy", "redirect", "metrics", "health", "respond")
# What each worker publishes, in slot order (all integers). Gauges first, then counters.
GAUGES = ("pid", "rss_bytes", "cpu_percent", "conn_current")
FIELDS = GAUGES + (
    "conn_accepted", "conn_error", "conn_timeout", "conn_accepted_error",
    "req_total", *(f"req_{kind}" for kind in ROUTE_KINDS),
    "res_1xx", "res_2xx", "res_3xx", "res_4xx", "res_5xx",
    "res_time_total_usec", "res_time_peak_usec", "send_bytes", "recv_bytes", "cpu_time_msec",
    "log_dropped", *(f"hist_{i}" for i in range(len(DURATION_BUCKETS) + 1)),
)
_SLOT = struct.Struct(f"<{len(FIELDS)}q")
_HEAD = struct.Struct("<qqq")      # workers of the current generation, master pid, start (ms)
PUBLISH_EVERY = 0.5
_PAGE = os.sysconf("SC_PAGE_SIZE")
MAX_SLOTS = 2 * 1024 + 1           # every worker of two generations (a reload), at most


class Board:
    """A header, a retired slot, and one slot of integers per worker, shared across fork()."""

    def __init__(self, workers: int, slots: int = MAX_SLOTS) -> None:
        self.slots = slots
        self._map = mmap.mmap(-1, _HEAD.size + _SLOT.size * (slots + 1))
        self.set_workers(workers)
        self.free = list(range(slots, 0, -1))   # slot 0 is the retired one

    def set_workers(self, workers: int, master_pid: int | None = None) -> None:
        started = _HEAD.unpack_from(self._map, 0)[2] or int(time.time() * 1000)
        _HEAD.pack_into(self._map, 0, workers, master_pid or os.getpid(), started)

    @property
    def workers(self) -> int:
        return _HEAD.unpack_from(self._map, 0)[0]

    @property
    def master_pid(self) -> int:
        return _HEAD.unpack_from(self._map, 0)[1]

    @property
    def started(self) -> float:
        return _HEAD.unpack_from(self._map, 0)[2] / 1000

    def _offset(self, slot: int) -> int:
        return _HEAD.size + slot * _SLOT.size

    def write(self, slot: int, values: tuple[int, ...]) -> None:
        _SLOT.pack_into(self._map, self._offset(slot), *values)

    def slot(self, slot: int) -> dict[str, int]:
        return dict(zip(FIELDS, _SLOT.unpack_from(self._map, self._offset(slot))))

    def read(self) -> list[dict[str, int]]:
        """The live workers' slots."""
        out = []
        for i in range(1, self.slots + 1):
            if _SLOT.unpack_from(self._map, self._offset(i))[0]:
                out.append(self.slot(i))
        return out

    def retired(self) -> dict[str, int]:
        return self.slot(0)

    # the master's side
    def take(self) -> int:
        return self.free.pop()

    def retire(self, slot: int) -> None:
        """A worker exited: keep its counters in the retired slot, free its own."""
        gone, kept = self.slot(slot), self.retired()
        merged = tuple(0 if name in GAUGES else
                       max(kept[name], gone[name]) if name == "res_time_peak_usec" else
                       kept[name] + gone[name] for name in FIELDS)
        self.write(0, merged)
        self.write(slot, (0,) * len(FIELDS))
        self.free.append(slot)


class WorkerMetrics:
    """This worker's side: per-route-type request counts, and publishing to the board."""

    def __init__(self, stats: Stats, board: Board, slot: int) -> None:
        self.stats = stats
        self.board = board
        self.slot = slot
        self.by_kind = dict.fromkeys(ROUTE_KINDS, 0)
        self.access_logs: list[Any] = []
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
        kinds = self.by_kind
        self.board.write(self.slot, (
            os.getpid(), rss, cpu, s.conn_current,
            s.conn_accepted, s.conn_error, s.conn_timeout, s.conn_accepted_error, s.req_total,
            *(kinds[kind] for kind in ROUTE_KINDS),
            s.res_1xx, s.res_2xx, s.res_3xx, s.res_4xx, s.res_5xx,
            int(s.res_time_total * 1e6), int(s.res_time_peak * 1e6), s.send_bytes, s.recv_bytes,
            int(used * 1000), sum(a.dropped for a in self.access_logs), *s.histogram(),
        ))

    def start(self, loop: Any) -> None:
        def tick() -> None:
            loop.call_later(PUBLISH_EVERY, tick)    # first: a failed publish stops nothing
            try:
                self.publish()
            except Exception as exc:    # the first tick runs here, not in the loop
                log.exception("publishing this worker's metrics", exc)
        tick()


def totals(board: Board) -> tuple[list[dict[str, int]], dict[str, int]]:
    """(live slots, every counter summed over live and retired workers)."""
    slots = board.read()
    retired = board.retired()
    total = {name: sum(s[name] for s in slots) + (0 if name in GAUGES else retired[name])
             for name in FIELDS}
    total["res_time_peak_usec"] = max([retired["res_time_peak_usec"]] +
                                      [s["res_time_peak_usec"] for s in slots])
    return slots, total


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
        accept = req.get(b"accept") or b""
        if b"format=prometheus" in req.query or b"text/plain;version=0.0.4" in accept \
                or b"openmetrics" in accept:
            return 200, (b"Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                         b"Cache-Control: no-store\r\n"), self.prometheus()
        return 200, (b"Content-Type: application/json\r\nCache-Control: no-store\r\n"
                     b"Access-Control-Allow-Origin: *\r\n"), json.dumps(self.figures()).encode()

    def _system(self) -> tuple[float, int, int]:
        mem_total, mem_available = _meminfo()
        busy, all_ = _sys_cpu()
        sys_cpu = (busy - self._sys[0]) / (all_ - self._sys[1]) if all_ > self._sys[1] else 0
        self._sys = (busy, all_)
        return sys_cpu, mem_total - mem_available, mem_total

    def figures(self) -> dict[str, Any]:
        """eXpServer's dashboard contract (flat, integers), plus the two fields its prebuilt
        bundle reads for the "Worker Usage" card."""
        board = self.worker.board
        slots, t = totals(board)
        answered = sum(t[f"res_{c}xx"] for c in range(1, 6))
        sys_cpu, mem_used, mem_total = self._system()
        rss = sum(s["rss_bytes"] for s in slots)
        return {
            "uptime_msec": int((time.time() - board.started) * 1000),
            "pid": board.master_pid,
            "workers": board.workers,
            "server_name": self.server_name,
            "sys_cpu_usage_percent": round(100 * sys_cpu),
            "sys_ram_usage_bytes": mem_used,
            "sys_ram_total_bytes": mem_total,
            "workers_ram_usage_bytes": rss,
            "workers_cpu_usage_percent": [s["cpu_percent"] for s in slots],
            "conn_current": t["conn_current"],
            "conn_accepted": t["conn_accepted"],
            "conn_error": t["conn_error"],
            "conn_timeout": t["conn_timeout"],
            "conn_accepted_error": t["conn_accepted_error"],
            # requests counted but not answered yet (this one included)
            "req_current": max(0, t["req_total"] - answered),
            "req_total": t["req_total"],
            "req_file_serve": t["req_file_serve"],
            "req_reverse_proxy": t["req_reverse_proxy"],
            "req_redirect": t["req_redirect"],
            "res_avg_res_time_msec": t["res_time_total_usec"] // 1000 // answered
            if answered else 0,
            "res_peak_res_time_msec": t["res_time_peak_usec"] // 1000,
            **{f"res_code_{c}xx": t[f"res_{c}xx"] for c in range(1, 6)},
            "traffic_total_send_bytes": t["send_bytes"],
            "traffic_total_recv_bytes": t["recv_bytes"],
            "server_cpu_usage_time_msec": t["cpu_time_msec"],
            "server_ram_usage_bytes": rss,
        }

    def prometheus(self) -> bytes:
        """The figures in Prometheus' text format, by its conventions: counters end in
        ``_total``, times are seconds, sizes bytes, route kinds and status classes labels."""
        board = self.worker.board
        slots, t = totals(board)
        sys_cpu, mem_used, mem_total = self._system()
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP expserver_{name} {help_}")
            out.append(f"# TYPE expserver_{name} {kind}")
            out.extend(f"expserver_{name}{labels} {value}" for labels, value in samples)

        metric("requests_total", "counter", "Requests received, by route kind.",
               [(f'{{kind="{k}"}}', t[f"req_{k}"]) for k in ROUTE_KINDS] +
               [('{kind="none"}', t["req_total"] - sum(t[f"req_{k}"] for k in ROUTE_KINDS))])
        metric("responses_total", "counter", "Responses sent, by status class.",
               [(f'{{code="{c}xx"}}', t[f"res_{c}xx"]) for c in range(1, 6)])
        buckets, running = [], 0
        for i, bound in enumerate(DURATION_BUCKETS):
            running += t[f"hist_{i}"]
            buckets.append((f'_bucket{{le="{bound}"}}', running))
        running += t[f"hist_{len(DURATION_BUCKETS)}"]
        metric("request_duration_seconds", "histogram",
               "Time from a request's head to its response's head.",
               [*buckets, ('_bucket{le="+Inf"}', running),
                ("_sum", t["res_time_total_usec"] / 1e6), ("_count", running)])
        metric("connections_accepted_total", "counter", "Client connections accepted.",
               [("", t["conn_accepted"])])
        metric("connection_errors_total", "counter", "Client connections ended by an error.",
               [("", t["conn_error"])])
        metric("connection_timeouts_total", "counter", "Client connections closed by a timeout.",
               [("", t["conn_timeout"])])
        metric("accept_errors_total", "counter", "Failed accepts (descriptors exhausted).",
               [("", t["conn_accepted_error"])])
        metric("connections", "gauge", "Client connections open now.", [("", t["conn_current"])])
        metric("sent_bytes_total", "counter", "Bytes sent to clients.", [("", t["send_bytes"])])
        metric("received_bytes_total", "counter", "Bytes received from clients.",
               [("", t["recv_bytes"])])
        metric("access_log_dropped_lines_total", "counter",
               "Access log lines the log could not take in time.", [("", t["log_dropped"])])
        metric("cpu_seconds_total", "counter", "CPU time of the workers.",
               [("", t["cpu_time_msec"] / 1000)])
        metric("workers", "gauge", "Workers of the current configuration.",
               [("", board.workers)])
        metric("worker_resident_memory_bytes", "gauge", "Resident memory of each worker.",
               [(f'{{worker="{i}"}}', s["rss_bytes"]) for i, s in enumerate(slots)])
        metric("worker_cpu_ratio", "gauge", "CPU use of each worker (1 = one core).",
               [(f'{{worker="{i}"}}', s["cpu_percent"] / 100) for i, s in enumerate(slots)])
        metric("uptime_seconds", "gauge", "Seconds since the master started.",
               [("", round(time.time() - board.started, 3))])
        metric("system_cpu_ratio", "gauge", "CPU use of the whole machine.",
               [("", round(sys_cpu, 4))])
        metric("system_memory_used_bytes", "gauge", "Memory in use on the machine.",
               [("", mem_used)])
        metric("system_memory_bytes", "gauge", "Memory of the machine.", [("", mem_total)])
        return ("\n".join(out) + "\n").encode("ascii")


def _cpu_seconds() -> float:
    return time.process_time()     # this process's user + system time, finer than os.times


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
