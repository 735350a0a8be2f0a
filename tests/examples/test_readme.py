"""The README as a user reads it: its install lines name this distribution."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_install_lines_name_this_distribution_not_the_unrelated_aioworkers() -> None:
    name = PYPROJECT["project"]["name"]
    # "aioworkers" and "aioworkers-*" on PyPI belong to another project.
    assert name != "aioworkers"
    assert not name.startswith("aioworkers-")
    installs = re.findall(r"pip install [^`\n]*", README)
    named = [line for line in installs if "[" in line and not line.startswith("pip install -e")]
    assert named, installs
    for line in named:
        assert f"'{name}[" in line, line
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert extras["all"] == [f"{name}[redis,amqp,sqs,otel,uvloop]"]
    assert f"{name}[all]" in extras["dev"]
    assert "can't be installed in one environment" in README
