"""${VAR} and ${VAR:-default} in config values (expserver.config.environ)."""
from __future__ import annotations

import json

import pytest

from expserver import config
from expserver.config.environ import substitute

ENV = {"PORT": "9000", "HOST": "127.0.0.1", "DIR": "/srv", "ON": "true", "T": "2.5"}


@pytest.mark.parametrize("text,expected", [
    ("${PORT}", "9000"),
    ("x${PORT}y", "x9000y"),
    ("${MISSING:-fallback}", "fallback"),
    ("${MISSING:-}", ""),
    ("$${PORT}", "${PORT}"),
    ("plain $ sign", "plain $ sign"),
    ("${HOST}:${PORT}", "127.0.0.1:9000"),
])
def test_references_are_replaced(text, expected):
    assert substitute({"k": text}, env=ENV)["k"] == expected


def test_names_are_not_values():
    assert substitute({"${PORT}": "a"}, env=ENV) == {"${PORT}": "a"}


@pytest.mark.parametrize("text,reason", [
    ("${NOPE}", "environment variable NOPE is not set"),
    ("${1BAD}", "is not ${NAME} or ${NAME:-default}"),
    ("${OPEN", "is not ${NAME} or ${NAME:-default}"),
])
def test_bad_references_name_the_path(text, reason):
    with pytest.raises(config.ConfigError) as err:
        substitute({"servers": [{"x": [text]}]}, env=ENV)
    assert err.value.path == "servers[0].x[0]"
    assert reason in err.value.reason


def test_numbers_and_booleans_written_as_references(tmp_path, monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    (tmp_path / "srv").mkdir()
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"header_timeout": "${T}", "servers": [{
        "listeners": [{"host": "${HOST}", "port": "${PORT}"}],
        "routes": [{"req_path": "/", "type": "file_serve", "dir_path": "${SRV:-srv}",
                    "autoindex": "${ON}"}]}]}))
    cfg = config.load(str(path))
    assert (cfg.servers[0].listeners[0].host, cfg.servers[0].listeners[0].port) == \
        ("127.0.0.1", 9000)
    assert cfg.header_timeout == 2.5
    assert cfg.servers[0].routes[0].dir_path == str(tmp_path / "srv")
    assert cfg.servers[0].routes[0].autoindex is True


def test_a_number_from_the_environment_is_still_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("PORT", "99999")
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"servers": [{"listeners": [{"host": "h", "port": "${PORT}"}]}]}))
    with pytest.raises(config.ConfigError) as err:
        config.load(str(path))
    assert str(err.value) == "servers[0].listeners[0].port: must be between 1 and 65535, got 99999"


def test_a_literal_string_is_not_a_number(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"servers": [{"listeners": [{"host": "h", "port": "8080"}]}]}))
    with pytest.raises(config.ConfigError, match="expected an integer"):
        config.load(str(path))
