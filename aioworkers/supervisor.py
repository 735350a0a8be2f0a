"""Several worker processes on one box: ``aioworkers run --processes N``.

The supervisor imports nothing of the user's: it starts each child as a fresh
interpreter (``python -m aioworkers`` with the same arguments, so no fork after import),
restarts a child that died with capped backoff and says why, forwards SIGTERM/SIGINT so
every child drains within its grace period, and starts a fresh child for one that
recycled itself on a limit (exit code `RECYCLE_EXIT`).

Children start one first: only once it is up do the others start, so a broken deploy
(an import error, a bad flag) is reported by one child, once, and never respawned.

The child side lives here too: `watch_child` tells the supervisor the worker is up,
recycles the worker when it outgrows ``--max-memory-per-child``, and stops it if the
supervisor is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("aioworkers")

# A child that drained and exited because of a limit: start a fresh one at once.
# (EX_TEMPFAIL: a process manager restarting on failure restarts it too.)
RECYCLE_EXIT = 75
# The CLI's exit code for a usage or configuration error: the same for every child.
USAGE_EXIT = 2

ENV_CHILD = "AIOWORKERS_CHILD"  # "<index>:<supervisor pid>:<ready fd>"

MAX_START_FAILURES = 3  # children in a row that die before they are up: give up
BACKOFF = 0.5  # first restart delay after a crash, doubled per crash in a row ...
MAX_BACKOFF = 30.0  # ... up to this
STABLE = 5.0  # a child that lived this long was no crash loop: its slot starts afresh
KILL_MARGIN = 15.0  # past --grace: children still running are killed
WATCH_EVERY = 0.5


def child_count(processes: int) -> int:
    """``--processes 0``: one per CPU this process may run on (not a cgroup CPU quota)."""
    if processes > 0:
        return processes
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def plan(args: argparse.Namespace) -> int | None:
    """For ``aioworkers run``: how many children to supervise, or None to run the worker
    in this process (a child, or a plain ``run``)."""
    index = child_index()
    if index is not None:
        # Children share the flags: each needs a port of its own.
        if getattr(args, "metrics_port", None):
            args.metrics_port += index
        return None
    if args.processes is None and (args.max_jobs_per_child or args.max_memory_per_child):
        return 1  # a per-child limit needs someone to start the next child
    return None if args.processes is None else child_count(args.processes)


def child_index() -> int | None:
    """This process's index under a supervisor, or None if it is not a child."""
    spec = os.environ.get(ENV_CHILD)
    return int(spec.split(":")[0]) if spec else None


def describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    if rc == RECYCLE_EXIT:
        return "recycled"
    return f"exited with code {rc}"


@dataclass
class Slot:
    """One child position: the process in it now, and how its recent ones fared."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    ready: bool = False
    crashes: int = 0  # in a row, for the backoff


class Supervisor:
    """Keeps ``processes`` children running ``python -m aioworkers *argv``."""

    def __init__(self, argv: Sequence[str], processes: int, *, grace: float | None) -> None:
        self.argv = list(argv)
        self.slots = [Slot(i) for i in range(processes)]
        # The app's own grace is unknown here (the app is never imported): without
        # --grace, a child that does not exit is left to the process manager.
        self.grace = grace
        self._stopping = False
        self._signals = 0
        self._go = asyncio.Event()  # the first child is up (or we are stopping)
        self._wake = asyncio.Event()  # cuts a restart delay short on stop
        self._start_failures = 0
        self._gave_up: int | None = None
        self._unclean = False

    async def run(self) -> int:
        """Run until a signal (or every child finished, with ``--burst``); the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        log.info("supervisor %d: starting %d worker processes", os.getpid(), len(self.slots))
        try:
            async with asyncio.TaskGroup() as tg:
                for slot in self.slots:
                    tg.create_task(self._keep(slot))
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if self._gave_up is not None:
            return self._gave_up
        return 1 if self._unclean else 0

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        live = [s.proc for s in self.slots if s.proc is not None and s.proc.returncode is None]
        if self._signals == 1:
            log.info(
                "%s: stopping %d worker processes (send again to stop now)", sig.name, len(live)
            )
            if self.grace is not None:
                asyncio.get_running_loop().call_later(self.grace + KILL_MARGIN, self._kill)
        self._stop()
        for proc in live:
            # Each child drains on the first signal and cancels its jobs on the second.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    def _stop(self) -> None:
        self._stopping = True
        self._go.set()
        self._wake.set()

    def _kill(self) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                log.error("worker process %d did not stop in time: killing it", slot.proc.pid)
                self._unclean = True
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.kill()

    async def _keep(self, slot: Slot) -> None:
        if slot.index:
            await self._go.wait()
        while not self._stopping:
            started = time.monotonic()
            rc = await self._run_child(slot)
            delay = self._after_exit(slot, rc, time.monotonic() - started)
            if delay is None:
                return
            if delay:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)

    async def _run_child(self, slot: Slot) -> int:
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        env[ENV_CHILD] = f"{slot.index}:{os.getpid()}:{write_fd}"
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "aioworkers",
                *self.argv,
                env=env,
                pass_fds=(write_fd,),
                # A group of its own: a terminal's Ctrl-C reaches the supervisor only, which
                # forwards it once (a second copy would mean "stop now" to the child).
                process_group=0,
            )
        finally:
            os.close(write_fd)
        slot.proc, slot.ready = proc, False
        if self._stopping:  # the signal came while this child was being spawned
            proc.send_signal(signal.SIGTERM)
        with os.fdopen(read_fd, "rb", buffering=0) as ready_pipe:
            # One byte when the worker is up; end of file if the child exits first.
            reader = asyncio.StreamReader()
            loop = asyncio.get_running_loop()
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), ready_pipe
            )
            try:
                if await reader.read(1):
                    slot.ready = True
                    self._start_failures = 0
                    self._go.set()
            finally:
                transport.close()
        return await proc.wait()

    def _after_exit(self, slot: Slot, rc: int, lived: float) -> float | None:
        """Log why a child ended; the delay before its slot restarts, or None: not again."""
        pid = slot.proc.pid if slot.proc is not None else 0
        why = describe_exit(rc)
        if self._stopping:
            clean = rc in (0, RECYCLE_EXIT) or (rc < 0 and not slot.ready)
            self._unclean |= not clean
            why = "stopped" if rc == 0 else why
            log.log(logging.INFO if clean else logging.WARNING, "worker process %d %s", pid, why)
            return None
        if rc == 0:
            log.info("worker process %d finished", pid)  # --burst: the queues are empty
            return None
        if rc == RECYCLE_EXIT:
            log.info("worker process %d recycled: starting a fresh one", pid)
            slot.crashes = 0
            return 0.0
        if not slot.ready and _failed_itself(rc):
            self._start_failures += 1
            if rc == USAGE_EXIT or self._start_failures >= MAX_START_FAILURES:
                self._give_up(pid, why, rc)
                return None
        if lived > STABLE:
            slot.crashes = 0
        slot.crashes += 1
        delay = min(MAX_BACKOFF, BACKOFF * 2.0 ** (slot.crashes - 1))
        phase = "at start" if not slot.ready else "while running"
        log.warning("worker process %d %s %s; restarting in %.1fs", pid, why, phase, delay)
        return delay

    def _give_up(self, pid: int, why: str, rc: int) -> None:
        log.error(
            "worker process %d %s before it was up (%d in a row): not restarting; "
            "fix the error above and start again",
            pid,
            why,
            self._start_failures,
        )
        self._gave_up = rc if rc > 0 else 1
        self._stop()
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(signal.SIGTERM)


def _failed_itself(rc: int) -> bool:
    """An exit the child chose or caused (an error, a segfault), not a kill from outside
    (an operator, the OOM killer): only those count towards giving up at start."""
    return rc > 0 or -rc not in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)


def supervise(argv: Sequence[str], processes: int, *, grace: float | None) -> int:
    """Run the supervisor for ``aioworkers *argv`` on a loop of its own; the exit code."""
    return asyncio.run(Supervisor(argv, processes, grace=grace).run())


# -- the child side ------------------------------------------------------------------------


def rss_mb() -> float:
    """This process's resident memory in MB (the peak where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


async def watch_child(
    worker: Worker, *, max_memory_mb: float | None, every: float = WATCH_EVERY
) -> None:
    """Beside `Worker.run` in a CLI worker: tell a supervisor once the worker is up,
    recycle it past ``max_memory_mb``, and stop it if its supervisor is gone."""
    spec = os.environ.pop(ENV_CHILD, "")  # not for processes the jobs start
    parent = int(spec.split(":")[1]) if spec else None
    ready_fd = int(spec.split(":")[2]) if spec else None
    await worker.wait_started()
    if ready_fd is not None:
        with contextlib.suppress(OSError):
            os.write(ready_fd, b"1")
        os.close(ready_fd)
    if max_memory_mb is not None and rss_mb() >= max_memory_mb:
        log.warning(
            "--max-memory-per-child %.0f MB is below this worker's %.0f MB at start: "
            "each worker process will run at least one job",
            max_memory_mb,
            rss_mb(),
        )
    while worker.state != "STOPPED":
        await asyncio.sleep(every)
        if parent is not None and os.getppid() != parent:
            log.warning("the supervisor (pid %d) is gone: stopping", parent)
            worker.stop()
            return
        if max_memory_mb is not None and worker.jobs_started:
            rss = rss_mb()
            if rss > max_memory_mb:
                worker.recycle(f"{rss:.0f} MB resident, over --max-memory-per-child")
                return
