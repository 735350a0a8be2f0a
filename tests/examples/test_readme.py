"""The README as a user reads it: every Python and shell block runs as written, and its
install lines name this distribution.

Blocks run in the order of the README, grouped by its ``##`` sections: one test per
section, in a directory of its own that the section's blocks share (a ``# name.py``
block is saved under that name, so a later shell block can say ``name:app``). Python
blocks run in a fresh interpreter that takes a top-level ``await``; shell blocks run in
bash with this venv's ``aioworkers`` first on the PATH. No broker URL is set, so the
embedded default (``./aioworkers.db``) is used unless a block names a server, and then
the local one the other tests use must be up. A block that cannot run here (it installs
packages, or is the test suite) says why in a ``<!-- not run: ... -->`` line right
before it; there are few of those.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..services import RABBITMQ, REDIS, ensure, postgres_database_sync

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

PYTHON = ("python",)
SHELL = ("sh", "bash", "shell")
# Blocks in other languages (or none: output, URL forms, synopses) are not run.
NOT_RUN = ("", "yaml")
MAX_EXEMPT = 3
EXEMPT = re.compile(r"<!-- not run: (.+?) -->")
FILE_NAME = re.compile(r"# (\w+\.py)\n")

# Runs a file the way `python -m asyncio` runs what is pasted into it: top-level awaits
# included.
RUNNER = """
import ast, asyncio, sys
path = sys.argv[1]
code = compile(open(path).read(), path, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
result = eval(code, {"__name__": "__main__", "__file__": path})
if asyncio.iscoroutine(result):
    asyncio.run(result)
"""


@dataclass(frozen=True)
class Block:
    section: str
    lang: str
    text: str
    line: int  # of the opening fence, 1-based
    not_run: str  # the reason, or ""


def blocks(text: str) -> list[Block]:
    found: list[Block] = []
    lines = text.splitlines()
    section = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        if line.startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            before = [x for x in lines[:i] if x.strip()][-1:]
            exempt = EXEMPT.fullmatch(before[0].strip()) if before else None
            body = "\n".join(lines[i + 1 : end]) + "\n"
            found.append(Block(section, line[3:].strip(), body, i + 1, exempt[1] if exempt else ""))
            i = end
        i += 1
    return found


BLOCKS = blocks(README)
RUN = [b for b in BLOCKS if b.lang in PYTHON + SHELL and not b.not_run]
SECTIONS = list(dict.fromkeys(b.section for b in RUN))


def test_every_block_is_run_or_says_why_not() -> None:
    assert {b.lang for b in BLOCKS} <= set(PYTHON + SHELL + NOT_RUN), "a block nobody runs"
    exempt = [b for b in BLOCKS if b.not_run]
    assert all(b.lang in PYTHON + SHELL for b in exempt), exempt
    # Every exemption sits right before a block, and they stay few.
    assert len(EXEMPT.findall(README)) == len(exempt)
    assert len(exempt) <= MAX_EXEMPT, [f"line {b.line}: {b.not_run}" for b in exempt]
    assert len(RUN) >= 6  # the API, the CLI, idempotency keys, embedding, Lambda


@pytest.mark.parametrize("section", SECTIONS)
def test_readme_section_runs_as_written(section: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AIOWORKERS_BROKER_URL"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    with contextlib.ExitStack() as stack:
        if any("postgresql://" in b.text for b in RUN if b.section == section):
            # Blocks read DATABASE_URL (default: the local server's postgres database):
            # here a database of the test's own, dropped afterwards.
            env["DATABASE_URL"] = stack.enter_context(postgres_database_sync("aw_readme"))
        _run_section(section, tmp_path, env)


def _run_section(section: str, tmp_path: Path, env: dict[str, str]) -> None:
    for block in (b for b in RUN if b.section == section):
        if "redis://" in block.text:
            ensure(REDIS)
        if "amqp://" in block.text:
            ensure(RABBITMQ)
        if block.lang in PYTHON:
            named = FILE_NAME.match(block.text)
            path = tmp_path / (named[1] if named else f"readme_line_{block.line}.py")
            path.write_text(block.text)
            argv = [sys.executable, "-c", RUNNER, str(path)]
        else:
            argv = ["bash", "-e", "-o", "pipefail", "-c", block.text]
        result = subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=45, check=False
        )
        where = f"README.md line {block.line} ({block.lang}):\n{block.text}"
        assert result.returncode == 0, (
            f"{where}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
        assert "Traceback" not in result.stderr, f"{where}\n{result.stderr}"


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
    assert extras["all"] == [f"{name}[redis,amqp,sqs,postgres,otel,uvloop,web]"]
    assert f"{name}[all]" in extras["dev"]
    assert "can't be installed in one environment" in README
