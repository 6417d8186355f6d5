"""Shared plumbing for the load benchmarks in bench/ (not a benchmark itself).

Starting and stopping servers, waiting for ports, installing the Debian tools the
benchmarks need, writing the nginx and expserver configs, and reading process memory
from /proc. Everything here targets 127.0.0.1 only.

Servers are started in their own session (process group) so that stopping one also
stops any worker processes it forked, and nothing else.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# How `expserver serve` is started unless --expserver-cmd says otherwise. `{python} -m`
# (not the console script) so that the pid we get is the server itself, not a wrapper.
DEFAULT_EXPSERVER_CMD = "{python} -m expserver serve -c {config}"


# --------------------------------------------------------------------------- tools


def ensure_debian_packages(binaries: dict[str, str]) -> None:
    """Install the Debian package for each missing binary (`{binary: package}`).

    Runs `apt-get update` first, as the brief asks; waits for a dpkg lock held by an
    install already running in the background instead of failing on it.
    """
    missing = {pkg for binary, pkg in binaries.items() if shutil.which(binary) is None
               and not Path("/usr/sbin", binary).exists()}
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"missing {sorted(missing)}: run as root or `apt-get install -y "
                 f"{' '.join(sorted(missing))}` first")
    print(f"installing {' '.join(sorted(missing))} with apt-get ...", file=sys.stderr)
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", *lock, "update"], check=True, env=env)
    subprocess.run(["apt-get", *lock, "install", "-y", *sorted(missing)], check=True, env=env)


def nginx_binary() -> str:
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(found).exists():
        sys.exit("nginx not found after install")
    return found


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError as exc:
        return f"unavailable ({exc})"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "?"


# --------------------------------------------------------------------------- ports


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- processes


class Server:
    """One server process (plus whatever it forks), stderr/stdout kept in a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, *,
                 cwd: Path | None = None, cpus: set[int] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")
        preexec = None
        if cpus:
            def preexec() -> None:  # runs in the child before exec; workers inherit it
                os.sched_setaffinity(0, cpus)
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=cwd, env=env, start_new_session=True, preexec_fn=preexec)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def wait_ready(self, ports: list[int], timeout: float = 20.0) -> None:
        """Poll until every port accepts; fail early (with the log) if the process dies."""
        deadline = time.monotonic() + timeout
        pending = list(ports)
        while pending:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode} "
                                   f"before listening; its output:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not accepting on {pending} after {timeout}s; "
                                   f"its output:\n{self.log_tail()}")
            pending = [p for p in pending if not port_accepts(p)]
            if pending:
                time.sleep(0.1)

    def stop(self) -> None:
        """TERM the server's process group, KILL it if it lingers."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        # The group may still hold workers even after the leader exited.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


def install_signal_exit() -> None:
    """Make SIGTERM/SIGHUP unwind like Ctrl-C so that `finally` blocks stop the servers."""
    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit (children inherit it)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def split_cpus() -> tuple[set[int] | None, set[int] | None]:
    """(server cpus, load generator cpus): one core each when there are at least two."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, {cpus[1]}


# --------------------------------------------------------------------------- /proc


def rss_kib(pid: int) -> int:
    """VmRSS of one process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def descendants(pid: int) -> list[int]:
    """All descendants of pid (children, grandchildren, ...), from /proc/*/stat."""
    parent_of: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 (ppid) follows the parenthesised command name, which may hold spaces.
        fields = stat.rsplit(")", 1)[1].split()
        parent_of[int(entry.name)] = int(fields[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        kids = [child for child, parent in parent_of.items() if parent == current]
        found.extend(kids)
        frontier.extend(kids)
    return sorted(found)


def socket_fd_count(pid: int) -> int:
    count = 0
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd).startswith("socket:"):
                    count += 1
            except OSError:
                continue
    except OSError:
        return 0
    return count


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()[:80]
    except OSError:
        return "?"


# --------------------------------------------------------------------------- configs


def machine() -> dict[str, object]:
    """What a benchmark's JSON says of the machine it ran on."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(),
            "python": sys.version.split()[0],
            "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3]}


def nginx_conf(workdir: Path, http: str, *, name: str = "nginx", worker_connections: int = 4096,
               rlimit_nofile: int | None = None) -> str:
    """An nginx.conf around the ``http`` block's own directives: one worker, and everything
    it writes (pid, error log, temp files, all named after ``name``) under workdir; as root,
    `user root` so the worker can read the benchmark's files.

    `daemon off;` is not written here: it is passed with -g on the command line, and
    nginx rejects a directive given twice.
    """
    user = "user root;\n" if os.geteuid() == 0 else ""
    rlimit = f"worker_rlimit_nofile {rlimit_nofile};\n" if rlimit_nofile else ""
    temp = "\n".join(f"    {kind}_temp_path {workdir / (name + '_' + kind)};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""{user}worker_processes 1;
{rlimit}pid {workdir / (name + '.pid')};
error_log {workdir / (name + '_error.log')} warn;

events {{
    worker_connections {worker_connections};
}}

http {{
{temp}
{http}
}}
"""


def write_nginx_conf(path: Path, workdir: Path, root: Path, plain_port: int,
                     gzip_port: int | None = None, worker_connections: int = 4096,
                     rlimit_nofile: int | None = None,
                     gzip_static_port: int | None = None) -> None:
    """A minimal nginx.conf for static files (nginx_conf), with a gzip and a gzip_static
    server on ports of their own when asked for."""
    gzip_server = ""
    if gzip_port is not None:
        # text/html is always in gzip_types; naming it again only makes nginx warn
        # "duplicate MIME type", so the list below is text/html + text/plain in effect.
        gzip_server = f"""
    server {{
        listen 127.0.0.1:{gzip_port};
        root {root};
        gzip on;
        gzip_comp_level 6;
        gzip_types text/plain;
        gzip_min_length 256;
    }}"""
    if gzip_static_port is not None:
        gzip_server += f"""
    server {{
        listen 127.0.0.1:{gzip_static_port};
        root {root};
        gzip_static on;
    }}"""
    path.write_text(nginx_conf(workdir, f"""    types {{
        text/html html;
        text/plain txt;
        application/octet-stream bin;
    }}
    default_type application/octet-stream;
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 75;

    server {{
        listen 127.0.0.1:{plain_port};
        root {root};
    }}{gzip_server}""", worker_connections=worker_connections, rlimit_nofile=rlimit_nofile))


def start_nginx(conf: Path, workdir: Path, cpus: set[int] | None = None) -> Server:
    argv = [nginx_binary(), "-e", str(workdir / "nginx_error.log"), "-p", str(workdir),
            "-c", str(conf), "-g", "daemon off;"]
    return Server("nginx", argv, workdir / "nginx.out", cpus=cpus)


def write_expserver_config(path: Path, root: Path, plain_port: int,
                           gzip_port: int | None = None) -> None:
    """eXpServer JSON config: one worker; a plain file_serve server and, optionally, a
    second server on its own port with gzip_enable/gzip_level 6."""
    servers = [{"listeners": [{"host": "127.0.0.1", "port": plain_port}],
                "routes": [{"req_path": "/", "type": "file_serve", "dir_path": str(root)}]}]
    if gzip_port is not None:
        servers.append({"listeners": [{"host": "127.0.0.1", "port": gzip_port}],
                        "routes": [{"req_path": "/", "type": "file_serve",
                                    "dir_path": str(root), "gzip_enable": True,
                                    "gzip_level": 6}]})
    path.write_text(json.dumps({"server_name": "eXpServer", "workers": 1,
                                "servers": servers}, indent=2))


def expserver_argvs(template: str, *, config: Path, root: Path,
                    ports: list[int]) -> list[tuple[list[str], list[int]]]:
    """Expand an --expserver-cmd template into [(argv, ports it serves)].

    Placeholders: {python} {config} {dir} {port}. A template that uses {config} is run
    once and serves every port from the config; one without it (a stand-in such as
    `{python} -m http.server {port} --bind 127.0.0.1 --directory {dir}`) is run once per
    port.
    """
    def expand(port: int) -> list[str]:
        return [token.format(python=sys.executable, config=config, dir=root, port=port)
                for token in shlex.split(template)]
    if "{config}" in template:
        return [(expand(ports[0]), ports)]
    return [(expand(port), [port]) for port in ports]


def start_expserver(template: str, *, config: Path, root: Path, ports: list[int],
                    workdir: Path, cpus: set[int] | None = None) -> list[Server]:
    servers: list[Server] = []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    try:
        for i, (argv, served) in enumerate(expserver_argvs(template, config=config,
                                                           root=root, ports=ports)):
            server = Server("expserver", argv, workdir / f"expserver{i}.out", cwd=REPO,
                            cpus=cpus, env=env)
            servers.append(server)
            server.wait_ready(served)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers
