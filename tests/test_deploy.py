"""The deployment files: the Dockerfile, the systemd unit and the Kubernetes manifests say
what the server does (signals, health route, config), and real validators accept them."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from expserver import config

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"


def check(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "expserver", "check", "-c", str(path)],
                          capture_output=True, text=True, env={**os.environ, **env})


def test_the_shipped_config_passes_check(tmp_path):
    out = check(DEPLOY / "expserver.json", {"EXPSERVER_ROOT": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    cfg = json.loads((DEPLOY / "expserver.json").read_text())
    routes = {r["req_path"]: r["type"] for r in cfg["servers"][0]["routes"]}
    assert routes["/healthz"] == "health"


def test_dockerfile_drains_on_stop_checks_health_and_runs_unprivileged():
    text = (ROOT / "Dockerfile").read_text()
    assert "STOPSIGNAL SIGQUIT" in text
    assert re.search(r"HEALTHCHECK .*127\.0\.0\.1:8080/healthz", text, re.S)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert "pip wheel" in text and "/wheels/*.whl" in text      # built from the wheel
    assert "COPY deploy/expserver.json /etc/expserver/expserver.json" in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is installed by .ci/run")
def test_systemd_unit_verifies(tmp_path):
    unit = (DEPLOY / "expserver.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
    assert "KillSignal=SIGQUIT" in unit
    # systemd-analyze checks that the programs exist: point them at this checkout's
    exe = shutil.which("expserver") or str(Path(sys.executable).parent / "expserver")
    path = tmp_path / "expserver.service"
    path.write_text(unit.replace("/usr/local/bin/expserver", exe))
    out = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                         text=True, timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if "expserver.service" in line]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr


def manifests() -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "expserver.yaml").read_text())
            if d]


def test_kubernetes_manifests_are_valid_for_the_api():
    import kubernetes_validate
    docs = manifests()
    assert {d["kind"] for d in docs} == {"ConfigMap", "Deployment", "Service"}
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30", strict=True)


def test_kubernetes_probes_and_stop_follow_the_config(tmp_path):
    docs = {d["kind"]: d for d in manifests()}
    text = docs["ConfigMap"]["data"]["expserver.json"]
    (tmp_path / "www").mkdir()
    path = tmp_path / "expserver.json"
    path.write_text(text.replace("/srv/www", str(tmp_path / "www")))
    cfg = config.load(str(path))
    health = [r.req_path for s in cfg.servers for r in s.routes if r.type == "health"]
    port = cfg.servers[0].listeners[0].port
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["ports"][0]["containerPort"] == port
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in health
    stop = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert "sleep" in stop and "expserver quit -c /etc/expserver/expserver.json" in stop
    assert pod["terminationGracePeriodSeconds"] > cfg.drain_timeout + 5
    assert docs["Deployment"]["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_wheel_holds_every_package_of_the_source():
    """`pip install .` (the README's first command, and the Dockerfile) installs what
    pyproject.toml lists, not the checkout: a subpackage it leaves out would import here,
    from the source tree, and fail for every user."""
    import tomllib
    from setuptools import find_packages

    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(find_packages(str(ROOT), include=settings["packages"]["find"]["include"]))
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "expserver").rglob("__init__.py")}
    assert "expserver.config" in on_disk
    assert listed == on_disk
