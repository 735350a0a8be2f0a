"""The worker registry's record carries the outcome counts (``throttled`` among them) and
reads records left by an older version; ``stats`` sums them, or says it cannot know."""

from __future__ import annotations

import argparse
from dataclasses import asdict

import orjson
import pytest

from aioworkers import App
from aioworkers._registry import WorkerInfo, _Snapshot
from aioworkers.monitor import stats_command
from aioworkers.monitor.stats_command import _live_workers, _workers_doc


def _info(worker_id: str, queues: tuple[str, ...], throttled: int) -> WorkerInfo:
    outcomes = {"ok": 5, "throttled": throttled}
    return WorkerInfo(
        worker_id, "h", 1, queues, 10, 2, 9, 5, 0, 1.0, 2.0, "RUNNING", throttled, outcomes
    )


def test_a_record_round_trips_with_its_counts() -> None:
    info = _info("w1", ("default",), 7)
    assert WorkerInfo.loads(info.dumps()) == info


def test_an_older_record_without_the_counts_is_read() -> None:
    doc = asdict(_info("w1", ("default",), 7))
    del doc["jobs_throttled"], doc["outcomes"]
    old = WorkerInfo.loads(orjson.dumps(doc))
    assert old is not None
    assert (old.jobs_throttled, old.outcomes, old.queues) == (0, {}, ("default",))
    # A field a newer version adds is ignored, not a record lost.
    assert WorkerInfo.loads(orjson.dumps({**doc, "later": 1})) == old


class _Worker:
    queues = ["default"]  # noqa: RUF012
    concurrency = 10
    state = "RUNNING"
    in_flight = 3
    jobs_started = 12
    counts = {"ok": 8, "throttled": 4, "dead": 1}  # noqa: RUF012


def test_a_beat_carries_the_workers_outcome_counts() -> None:
    info = _Snapshot("w1", 1.0).of(_Worker(), 2.0)
    assert (info.jobs_throttled, info.jobs_ok, info.jobs_failed) == (4, 8, 1)
    assert info.outcomes == {"ok": 8, "throttled": 4, "dead": 1}


def test_a_worker_on_several_queues_counts_in_the_totals_only() -> None:
    found = [_info("a", ("emails",), 3), _info("b", ("emails", "sms"), 5)]
    doc = _workers_doc(found, ["emails", "sms"])
    assert doc == {
        "live": 2,
        "throttled": 8,
        "by_queue": {"emails": 3, "sms": 0},
        "outcomes": {"ok": 10, "throttled": 8},
    }


async def test_without_a_store_throttled_is_unknown_not_zero(
    capsys: pytest.CaptureFixture[str],
) -> None:
    app = App("amqp://guest:guest@127.0.0.1:5672/")  # RabbitMQ, no store=: no registry
    assert await _live_workers(app) is None
    unknown = _workers_doc(None, ["default"])
    assert unknown == {"live": None, "throttled": None, "by_queue": None, "outcomes": None}
    assert "throttled unknown" in stats_command._workers_line(unknown)
    memory = App("memory://")
    args = argparse.Namespace(fail_if=None, watch=None, json=True, count=None)
    assert await stats_command.stats(memory, ["default"], args) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert doc["workers"] == {"live": 0, "throttled": 0, "by_queue": {"default": 0}, "outcomes": {}}
    await memory.aclose()
    await app.aclose()
