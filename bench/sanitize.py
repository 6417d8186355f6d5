#!/usr/bin/env python3
"""The compiled core under AddressSanitizer: memory errors, leaks and descriptors.

    python bench/sanitize.py [--work DIR] [--no-build] [--json out.json] [TEST ...]

Copies the work tree (edits included) into DIR (default: a temp dir, removed afterwards),
builds the extensions there in place with gcc's -fsanitize=address (recoverable, frame
pointers, -g) and runs pytest there on TEST (default: the proxy and static e2e tests and the
compiled-object tests). This tree is never built with ASan. Every Python process gets
libasan in LD_PRELOAD, PYTHONMALLOC=malloc and its own report (log_path), going on after an
error; a sitecustomize.py in DIR keeps LD_PRELOAD from the other processes the tests start
(curl deadlocks in setlocale() under it) and records at each process's exit, after a last
gc.collect(), the objects of ours still alive (LSan cannot see those a cycle keeps: CPython's
GC lists reach them) and, for a serving worker, the descriptors open that were not when its
loop started. A forked worker ends with os._exit: it is checked at the end of its loop.

Summary: processes; distinct ASan errors by kind and top frame (the .pyx line); leaks in
expserver code (a frame in ext/expserver) or elsewhere; live objects; descriptors left.
Exit status 1 for any error, leak of ours or descriptor left. ~7 min on 2 cores.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/e2e/test_proxy.py", "tests/e2e/test_static_e2e.py", "tests/test_conn.py",
         "tests/test_pipe.py", "tests/test_proxy_core.py", "tests/test_faults.py",
         "tests/test_loop.py"]
CFLAGS = "-fsanitize=address -fsanitize-recover=address -fno-omit-frame-pointer -g"
SUPPRESSIONS = "leak:thread_PyThread_start_new_thread\n"  # CPython's: a daemon thread at exit
SITE = r'''
import atexit, collections, ctypes, gc, importlib, json, os, subprocess, sys
LOG, PRELOAD = os.environ.get("SANITIZE_LOG"), os.environ.pop("LD_PRELOAD", "")
state, PID = {"argv": sys.orig_argv}, os.getpid()
_execute_child = subprocess.Popen._execute_child

def fds():  # but ASan's own report, opened once it has something to say
    links = {n: f"/proc/self/fd/{n}" for n in os.listdir("/proc/self/fd")}
    out = {n: os.readlink(p) for n, p in links.items() if os.path.exists(p)}
    return {n: t for n, t in out.items() if not t.startswith(LOG)}

def record():
    gc.collect()
    live = collections.Counter(f"{m[10:]}.{type(o).__name__}" for o in gc.get_objects()
                               if (m := str(getattr(type(o), "__module__", ""))).startswith("expserver._")
                               and "__pyx_scope_struct" not in type(o).__name__)  # closures
    ours = [m.__file__ for n, m in sys.modules.items() if n.startswith("expserver._")]
    state.update(live=live, end=fds(), modules=ours)
    with open(f"{LOG}/exit.{os.getpid()}.json", "w") as f:
        json.dump(state, f)

def execute_child(self, args, executable, *rest):  # rest: preexec_fn, close_fds, pass_fds, cwd, env, ...
    prog, env = os.fsdecode(executable or (args if isinstance(args, (str, bytes)) else args[0])), rest[4]
    if os.path.basename(prog).startswith("python") or prog == sys.executable:
        env = dict(os.environ if env is None else env, LD_PRELOAD=PRELOAD)
    return _execute_child(self, args, executable, *rest[:4], env, *rest[5:])

def watch_worker():  # expserver.server.run_worker, or expserver.worker.run in a forked worker
    for name, attr in (("expserver.worker", "run"), ("expserver.server", "run_worker")):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, attr):
            run = getattr(mod, attr)
            break
    else:
        return
    def watched(*a, **kw):
        state.update(start=fds(), worker=True)
        try:
            return run(*a, **kw)
        finally:
            if os.getpid() != PID:  # forked: os._exit runs no exit hook, so check now
                record()
                getattr(ctypes.CDLL(None), "__lsan_do_recoverable_leak_check")()
    setattr(mod, attr, watched)

if LOG and PRELOAD:
    subprocess.Popen._execute_child = execute_child
    state["start"] = fds()
    atexit.register(record)
    os.register_at_fork(after_in_child=lambda: open(f"{LOG}/fork.{os.getpid()}", "w").close())
    a = sys.orig_argv
    if "-m" in a and a[a.index("-m") + 1:a.index("-m") + 3] == ["expserver", "serve"]:
        watch_worker()
'''
# Held for the process's life on purpose: not counted as left open.
HELD = {"/proc/PID/statm": "the worker's metrics keep it to read their RSS without a new fd"}
FRAME = re.compile(r"^\s+#\d+ 0x[0-9a-f]+ (?:in (\S+) )?(\S+)", re.M)
OURS = re.compile(r"expserver/(_\w+)\.c:(\d+)")
_lines: dict[str, list[str]] = {}


def pyx_line(src: Path, loc: str) -> str:
    """``ext/expserver/_conn.c:123`` -> ``_conn.pyx:45``, from Cython's source comments."""
    m = OURS.search(loc)
    if not m:
        return loc
    path = src / "ext" / "expserver" / f"{m[1]}.c"
    lines = _lines.setdefault(m[1], path.read_text(errors="replace").splitlines()
                              if path.exists() else [])
    for line in reversed(lines[:int(m[2])]):
        hit = re.match(r'\s*/\* "expserver/([^"]+)":(\d+)', line)
        if hit:
            return f"{hit[1]}:{hit[2]}"
    return loc


def top_frame(frames: list[tuple[str, str]]) -> tuple[str, str]:
    for func, loc in frames:
        if "libsanitizer" not in loc and not func.startswith(("__interceptor_", "__asan")):
            return func or "?", loc
    return ("?", "?")


def parse_reports(log: Path, src: Path) -> tuple[dict, dict, set[str]]:
    """ASan errors by (kind, frame) and LSan leaks by (owner, kind, frame): [count, bytes, pids]."""
    errors, leaks = (collections.defaultdict(lambda: [0, 0, set()]) for _ in "el")
    pids = set()
    for f in sorted(log.glob("asan.*")):
        pid, text = f.suffix[1:], f.read_text(errors="replace")
        pids.add(pid)
        for m in re.finditer(r"ERROR: AddressSanitizer: ([\w-]+).*?\n\n", text, re.S):
            func, loc = top_frame(FRAME.findall(m[0]))
            e = errors[(m[1], f"{func} {pyx_line(src, loc)}")]
            e[0] += 1
            e[2].add(pid)
        for m in re.finditer(r"(Direct|Indirect) leak of (\d+) byte.*? in (\d+) object.*?\n"
                             r"((?:\s+#.*\n?)+)", text):
            frames = FRAME.findall(m[4])
            owner = "expserver" if any(OURS.search(loc) for _, loc in frames) else "elsewhere"
            ours = [(fn, loc) for fn, loc in frames if OURS.search(loc)]
            func, loc = (ours or [top_frame(frames)])[0]
            e = leaks[(owner, m[1].lower(), f"{func} {pyx_line(src, loc)}")]
            e[0] += int(m[3])
            e[1] += int(m[2])
            e[2].add(pid)
    return errors, leaks, pids


def kind_of(target: str) -> str:
    """``socket``, ``pipe``, ``anon_inode`` (epoll) or the file, a pid in /proc as PID."""
    kind = target.split(":")[0]
    return kind if kind in ("socket", "pipe", "anon_inode") else re.sub(r"/\d+/", "/PID/", target)


def summarize(log: Path, src: Path, result: str) -> dict:
    exits = [json.loads(p.read_text()) for p in log.glob("exit.*.json")]
    servers = [e for e in exits if e.get("worker")]
    errors, leaks, reported = parse_reports(log, src)
    forks = len(list(log.glob("fork.*")))
    live = sum((collections.Counter(e["live"]) for e in exits), collections.Counter())
    left = collections.Counter(kind_of(t) for e in servers
                               for _, t in set(e["end"].items()) - set(e["start"].items()))
    foreign = sorted({m for e in exits for m in e["modules"] if not m.startswith(str(src))})
    print(f"\npytest: {result}")
    print(f"processes: {len(exits)} Python with an exit record ({len(servers)} serving workers), "
          f"{forks} forked, {len(reported)} wrote an ASan/LSan report")
    if foreign:
        print(f"WARNING: modules not from the ASan build: {foreign}")
    print(f"ASan errors: {sum(v[0] for v in errors.values())}, distinct: {len(errors)}")
    for (kind, frame), (n, _, pids) in sorted(errors.items()):
        print(f"  {kind:28} {n:4} x in {len(pids)} process(es)  at {frame}")
    for owner in ("expserver", "elsewhere"):
        mine = {k: v for k, v in leaks.items() if k[0] == owner}
        print(f"leaks, {owner}: {sum(v[1] for v in mine.values())} bytes in "
              f"{sum(v[0] for v in mine.values())} blocks, distinct: {len(mine)}")
        for (_, kind, frame), (n, size, pids) in sorted(mine.items()):
            print(f"  {kind:8} {size:8} B {n:4} blocks, {len(pids)} process(es)  at {frame}")
    print(f"live objects of ours after the last gc, all processes: {dict(live) or 'none'}")
    held = {k: left.pop(k) for k in HELD if k in left}
    print(f"descriptors left open by serving workers (not open when their loop started): "
          f"{sum(left.values())} {dict(left) or ''}")
    for k, n in held.items():
        print(f"  and {n} x {k}, held on purpose: {HELD[k]}")
    return {"result": result, "processes": len(exits), "servers": len(servers),
            "errors": {" | ".join(k): v[0] for k, v in errors.items()},
            "leaks": {" | ".join(k): v[1] for k, v in leaks.items()},
            "live": dict(live), "fds_left": dict(left)}


def build(src: Path) -> None:
    shutil.rmtree(src, ignore_errors=True)
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, check=True, capture_output=True).stdout.split(b"\0")
    for name in (n for n in map(os.fsdecode, files) if n and (ROOT / n).is_file()):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    env = dict(os.environ, CFLAGS=CFLAGS, LDFLAGS="-fsanitize=address", CC="gcc",
               PYTHONWARNINGS="ignore")
    print(f"building the extensions with ASan in {src} (~1.5 min)", flush=True)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace", "-j", "2"],
                   cwd=src, env=env, check=True, stdout=subprocess.DEVNULL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tests", nargs="*", default=TESTS)
    ap.add_argument("--work", type=Path, help="work dir, kept (default: a temp dir, removed)")
    ap.add_argument("--no-build", action="store_true", help="reuse the build in --work")
    ap.add_argument("--json", type=Path, help="write the summary here")
    args = ap.parse_args()
    if args.no_build and not args.work:
        ap.error("--no-build reuses the build in --work DIR")
    runtime = subprocess.check_output(["gcc", "-print-file-name=libasan.so"], text=True).strip()
    if not os.path.isabs(runtime):
        sys.exit("gcc's libasan not found (Debian: apt-get install gcc libasan8)")
    work = args.work or Path(tempfile.mkdtemp(prefix="expserver-asan-"))
    src, log, site = work / "src", work / "logs", work / "site"
    try:
        if not args.no_build:
            build(src)
        shutil.rmtree(log, ignore_errors=True)
        for d in (log, site):
            d.mkdir(parents=True, exist_ok=True)
        (site / "sitecustomize.py").write_text(SITE)
        (site / "lsan.supp").write_text(SUPPRESSIONS)
        env = dict(os.environ, LD_PRELOAD=runtime, PYTHONMALLOC="malloc", SANITIZE_LOG=str(log),
                   PYTHONPATH=f"{site}{os.pathsep}{src}",
                   ASAN_OPTIONS=f"log_path={log}/asan:detect_leaks=1:halt_on_error=0:exitcode=0",
                   LSAN_OPTIONS=f"suppressions={site}/lsan.supp")
        print(f"running pytest on {len(args.tests)} paths under ASan (~5 min)", flush=True)
        with open(work / "pytest.txt", "w") as out:
            subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            *args.tests], cwd=src, env=env, stdout=out, stderr=subprocess.STDOUT,
                           timeout=3600)
        lines = (work / "pytest.txt").read_text().splitlines()
        result = next((x.strip("= ") for x in reversed(lines) if " in " in x), "no result")
        print("\n".join(x for x in lines if x.startswith(("FAILED", "ERROR"))))
        summary = summarize(log, src, result)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
        print(f"reports: {log}" if args.work else "(--work DIR keeps the reports)")
        bad = summary["errors"] or any(k.startswith("expserver") for k in summary["leaks"]) \
            or summary["fds_left"]
        return 1 if bad else 0
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
