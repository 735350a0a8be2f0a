"""A worker moves what exists as it starts out of the garbage collector's walks (gc.freeze),
once per process, unless told not to. In a subprocess each: the freeze is process-wide."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import asyncio, gc, sys
    import aioworkers

    app = aioworkers.App("memory://")
    ran = []

    @app.task()
    async def job(i: int) -> None:
        ran.append(i)

    async def main(freeze: bool) -> None:
        await job.enqueue(1)
        before = gc.get_freeze_count()
        await app.worker(gc_freeze=freeze).run(burst=True)
        first = gc.get_freeze_count()
        # A second worker in the same process freezes nothing more.
        await job.enqueue(2)
        await app.worker(gc_freeze=freeze).run(burst=True)
        print(before, first, gc.get_freeze_count(), ran)

    asyncio.run(main(sys.argv[1] == "on"))
    """
)


def run(mode: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return out.stdout.strip().split(maxsplit=3)


@pytest.mark.parametrize("mode", ["on", "off"])
def test_the_first_worker_freezes_once(mode: str) -> None:
    before, first, second, ran = run(mode)
    assert ran == "[1, 2]"  # both jobs ran either way
    assert before == "0"
    if mode == "on":
        assert int(first) > 1000  # the modules, classes and app as the worker started
        # Once per process: no more frozen by the second (frozen objects whose count drops
        # are still freed, so it may be fewer).
        assert int(second) <= int(first)
    else:
        assert first == second == "0"
