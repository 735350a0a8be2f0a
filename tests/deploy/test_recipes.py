"""The recipes in examples/deploy/ parse, and say what the README says they do.

``systemd-analyze verify`` checks the unit where it is installed; the supervisord
section is read the way supervisord reads it (an ini file), and the container file is
checked line by line (no image is built).
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aioworkers import cli

DEPLOY = Path(__file__).resolve().parents[2] / "examples" / "deploy"


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _check_run_command(argv: list[str]) -> float:
    """The recipe's ``aioworkers run ...`` parses with the real CLI; returns its grace."""
    assert argv[0].endswith("aioworkers")
    args = cli.build_parser().parse_args(argv[1:])
    assert args.command == "run"
    assert args.processes is not None
    assert args.max_memory_per_child
    assert args.grace is not None
    grace: float = args.grace
    return grace


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # keys are case-sensitive in a unit
    unit.read(DEPLOY / "aioworkers.service")
    return unit


def test_systemd_unit_stops_gracefully_and_limits_resources() -> None:
    service = _unit()["Service"]
    grace = _check_run_command(shlex.split(service["ExecStart"]))
    assert service["KillSignal"] == "SIGTERM"
    # Only the supervisor gets the signal; it forwards one copy per child.
    assert service["KillMode"] == "mixed"
    assert float(service["TimeoutStopSec"]) > grace
    assert service["Restart"] == "on-failure"
    for limit in ("MemoryMax", "CPUQuota", "TasksMax"):
        assert service[limit]
    assert service["User"] != "root"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at this venv's.
    text = (DEPLOY / "aioworkers.service").read_text()
    binary = Path(sys.executable).parent / "aioworkers"
    unit = tmp_path / "aioworkers.service"
    unit.write_text(text.replace("/srv/myapp/.venv/bin/aioworkers", str(binary)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "aioworkers.service" not in result.stderr, result.stderr


def test_supervisord_program_stops_gracefully() -> None:
    conf = configparser.ConfigParser(interpolation=None, strict=True)
    conf.read(DEPLOY / "supervisord.conf")
    program = conf["program:aioworkers"]
    grace = _check_run_command(shlex.split(program["command"]))
    assert program["stopsignal"] == "TERM"
    assert program["stopasgroup"] == "false"  # the supervisor forwards the signal itself
    assert float(program["stopwaitsecs"]) > grace
    assert program["autorestart"] in ("unexpected", "true")
    assert program["user"] != "root"


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: comments dropped, continuations joined."""
    logical = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in logical.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_container_file_runs_as_non_root_with_a_health_check() -> None:
    lines = _instructions(DEPLOY / "Containerfile")
    known = {"FROM", "ENV", "RUN", "WORKDIR", "COPY", "USER", "HEALTHCHECK", "STOPSIGNAL"}
    known |= {"ENTRYPOINT", "CMD", "ARG", "LABEL", "EXPOSE"}
    assert lines[0][0] == "FROM"
    assert {word for word, _ in lines} <= known
    words = [word for word, _ in lines]
    user = lines[words.index("USER")][1]
    assert user not in ("root", "0")
    assert words.index("USER") < words.index("ENTRYPOINT")

    health = lines[words.index("HEALTHCHECK")][1]
    check = json.loads(health[health.index("CMD") + 3 :])  # exec form: a JSON array
    assert "/healthz" in check[-1] or "--fail-if" in check
    compile(check[-1], "HEALTHCHECK", "exec")  # the python -c program parses

    assert lines[words.index("STOPSIGNAL")][1] == "SIGTERM"
    entry = json.loads(lines[words.index("ENTRYPOINT")][1])
    command = shlex.split(entry[2].removeprefix("exec "))
    values = {"$WORKER_PROCESSES": "2", "$METRICS_PORT": "9100"}
    _check_run_command([values.get(a, a) for a in command if a != "$@"])
