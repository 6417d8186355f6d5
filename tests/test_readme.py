"""The README documents every config key the schema knows."""
from pathlib import Path

from expserver import config

README = (Path(__file__).parent.parent / "README.md").read_text()


def _keys(schema: dict) -> set[str]:
    keys = set(schema.get("properties", {}))
    for sub in schema.get("$defs", {}).values():
        keys |= set(sub.get("properties", {}))
    return keys


def test_every_config_key_is_documented() -> None:
    missing = sorted(k for k in _keys(config.schema()) if f"| `{k}` |" not in README)
    assert not missing, f"keys missing from the README tables: {missing}"


def test_readme_has_the_two_commands() -> None:
    assert "pip install . && expserver serve" in README
    assert "pip install -e '.[test]' && python -m pytest" in README
