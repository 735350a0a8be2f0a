"""How the default run is shaped, so the whole suite stays near ten minutes on two cores:

- which tests it leaves to ``-m slow``: the slow copies of scenarios that a faster copy
  already runs by default (each entry names the copy that stays; soaks and chaos runs mark
  themselves with ``@pytest.mark.slow`` where they are written);
- which tests run alone: the run is spread over pytest-xdist workers (``-n 2`` in
  pyproject.toml: most tests wait on worker processes and timers, not on the CPU), and a
  test that changes a shared server for everyone (RabbitMQ's memory alarm, every
  connection closed, a server setting) must not overlap another test. Every test holds a
  shared lock while it runs; these hold it exclusively.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# node id (as pytest prints it, from tests/) -> the copy that runs by default instead
SLOW_COPIES: dict[str, str] = {
    # The benchmark harness end to end: the redis smoke run covers the same scripts.
    "benchmarks/test_harness.py::test_smoke_run_reports_every_workload_for_both_sides[sqlite]": (
        "[redis]"
    ),
    "benchmarks/test_harness.py::test_smoke_run_measures_otel_overhead_against_aioworkers": (
        "tests/benchmarks/test_otel_cost.py"
    ),
    # The fault matrix on moto SQS (a few tens of messages a second): kills and garbage stay.
    "e2e_matrix/test_restart.py::test_worker_rides_out_a_broker_restart_and_finishes_every_job_once[sqs]": (  # noqa: E501
        "[redis], [amqp], [postgres]"
    ),
    "e2e_matrix/test_shutdown.py::test_sigterm_finishes_or_releases_jobs_and_another_worker_takes_them_at_once[sqs-drain]": (  # noqa: E501
        "the other brokers"
    ),
    "e2e_matrix/test_shutdown.py::test_sigterm_finishes_or_releases_jobs_and_another_worker_takes_them_at_once[sqs-stop-now]": (  # noqa: E501
        "the other brokers"
    ),
    "e2e_matrix/test_shutdown.py::test_sigterm_finishes_or_releases_jobs_and_another_worker_takes_them_at_once[sqs-grace-out]": (  # noqa: E501
        "the other brokers"
    ),
    "e2e_matrix/test_bad_jobs.py::test_a_job_that_kills_its_worker_is_dead_lettered_after_max_deliveries[sqs]": (  # noqa: E501
        "the other brokers"
    ),
    "e2e_matrix/test_delays.py::test_a_delayed_retry_is_honoured_within_ten_percent[sqs]": (
        "the other brokers, and tests/brokers/test_conformance.py::TestSqs"
    ),
    # Periodic jobs with real worker processes: every broker's scheduler is the same code.
    "periodic/test_processes.py::test_three_workers_fire_every_slot_once_through_kill_and_stop[amqp]": (  # noqa: E501
        "[redis]"
    ),
    "periodic/test_processes.py::test_three_workers_fire_every_slot_once_through_kill_and_stop[sqlite]": (  # noqa: E501
        "[redis]"
    ),
    "periodic/test_processes.py::test_down_and_back_catches_up_within_catchup[amqp]": "[redis]",
    "periodic/test_processes.py::test_down_and_back_catches_up_within_catchup[sqlite]": "[redis]",
    # --processes: the supervisor is the same on every broker.
    "deploy/test_supervisor.py::test_three_processes_share_a_queue_and_a_killed_child_is_replaced[sqlite]": (  # noqa: E501
        "[redis]"
    ),
    # A stalled worker fenced: the same fencing, stalled at another moment.
    "e2e/test_leases.py::test_stalled_worker_is_fenced_and_the_new_owner_settles[after_its_run_would_end-once]": (  # noqa: E501
        "[while_its_run_sleeps-once]"
    ),
    "e2e/test_leases.py::test_stalled_worker_is_fenced_and_the_new_owner_settles[after_its_run_would_end-work]": (  # noqa: E501
        "[while_its_run_sleeps-work]"
    ),
    # SQS leases in whole seconds: the per-call lease is checked in tests/brokers/test_leases.py.
    "brokers/test_conformance.py::TestSqs::test_extend_keeps_the_lease_past_the_visibility_timeout": (  # noqa: E501
        "test_leases.py [sqs]"
    ),
    "brokers/test_conformance.py::TestSqs::test_extend_sets_the_lease_from_now_and_it_runs_out": (
        "test_leases.py [sqs]"
    ),
}


# node id, or a prefix of it ending in "::" (a whole module) -> what it changes for everyone
EXCLUSIVE: dict[str, str] = {
    "brokers/test_amqp_faults.py::": (
        "RabbitMQ's memory alarm (every publisher blocks), rabbit app settings, policies"
    ),
    "brokers/test_amqp.py::test_consumer_count_comes_back_after_rabbitmq_closes_every_connection": (
        "rabbitmqctl close_all_connections"
    ),
    "e2e_matrix/test_restart.py::test_worker_rides_out_a_broker_restart_and_finishes_every_job_once[amqp]": (  # noqa: E501
        "rabbitmqctl close_all_connections"
    ),
}


def _exclusive(nodeid: str) -> bool:
    node = nodeid.removeprefix("tests/")
    return node in EXCLUSIVE or any(node.startswith(key) for key in EXCLUSIVE if key.endswith("::"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    slow = pytest.mark.slow
    for item in items:
        if item.nodeid.removeprefix("tests/") in SLOW_COPIES:
            item.add_marker(slow)


@contextmanager
def _turn(run: str, exclusive: bool) -> Iterator[None]:
    """A readers-writer lock between the xdist workers of one run, with a turnstile so that a
    test waiting to run alone is not starved by the others' stream of shared turns."""
    base = Path(tempfile.gettempdir()) / f"aioworkers-tests-{run}"
    with open(f"{base}.gate", "a") as gate, open(f"{base}.turn", "a") as turn:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(turn, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(turn, fcntl.LOCK_UN)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:  # one process: nothing overlaps
        return (yield)
    with _turn(run, _exclusive(item.nodeid)):
        return (yield)
