"""Credentials in a broker URL, in every form the clients accept, stay out of every place
the URL is shown: `App.broker_name` (and the reprs built on it), the worker started and
stopped lines in both log formats, and the ``stats --watch`` header."""

from __future__ import annotations

import orjson
import pytest

import aioworkers
from aioworkers.errors import ConfigError

from .test_cli import cli

SECRET = "hunter2"

# Each form reaches the server: redis-py passes unknown query parameters to the connection
# (after percent-decoding their names), and the test server accepts any password of the
# default user.
REDIS_FORMS = {
    "query password": "&password=" + SECRET,
    "percent-encoded name": "&pass%77ord=" + SECRET,
    "username and password": "&username=default&password=" + SECRET,
}


@pytest.mark.parametrize(
    "url",
    [
        f"redis://default:{SECRET}@127.0.0.1:6379/0",
        f"redis://127.0.0.1:6379/0?password={SECRET}",
        f"redis://127.0.0.1:6379/0?prefix=x&PASSWORD={SECRET}&db=1",
        f"redis://127.0.0.1:6379/0?pass%77ord={SECRET}",
        f"rediss://127.0.0.1:6380/0?ssl_password={SECRET}",
        f"redis://127.0.0.1:6379/0?pass={SECRET}",
        f"redis://127.0.0.1:6379/0?passwd={SECRET}",
        f"amqp://guest:{SECRET}@127.0.0.1:5672/vh",
        f"amqps://guest:{SECRET}@127.0.0.1:5671/?heartbeat=30",
        f"sqs://?region=eu-west-1&aws_secret_access_key={SECRET}",
        f"sqs://?aws_access_key_id=AKIA{SECRET}&aws_session_token={SECRET}",
        f"sqs://?secret_key={SECRET}&access_key=AKIA{SECRET}&token={SECRET}",
    ],
)
def test_broker_name_and_reprs_hide_credentials(url: str) -> None:
    # No connection is made: the broker is opened on first use.
    app = aioworkers.App(url)
    assert SECRET not in app.broker_name
    assert "***" in app.broker_name
    assert SECRET not in repr(app)
    if url.startswith("sqs://"):
        # sqs:// refuses credentials in its URL (they come from the AWS chain), by name.
        with pytest.raises(ConfigError) as info:
            app.worker()
        assert SECRET not in str(info.value)
    else:
        assert SECRET not in repr(app.worker())
    assert app.broker_name.split("://")[0] == url.split("://")[0]


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("form", sorted(REDIS_FORMS))
def test_worker_started_and_stopped_lines_hide_credentials(
    redis_url: str, form: str, log_format: str
) -> None:
    url = redis_url + REDIS_FORMS[form]
    result = cli("run", "telapp:app", "--broker", url, "--burst", "--log-format", log_format)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    if log_format == "json":
        lines = [orjson.loads(line)["message"] for line in lines]
    started = [line for line in lines if "worker started" in line]
    stopped = [line for line in lines if "worker stopped" in line]
    assert len(started) == len(stopped) == 1, result.stderr
    assert "=***" in started[0]
    assert "=***" in stopped[0]
    assert SECRET not in result.stderr + result.stdout


@pytest.mark.parametrize("form", sorted(REDIS_FORMS))
def test_stats_watch_header_hides_credentials(redis_url: str, form: str) -> None:
    url = redis_url + REDIS_FORMS[form]
    result = cli("stats", "telapp:app", "--broker", url, "--watch", "0.1", "--count", "1")
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0]
    assert header.startswith("redis://127.0.0.1:6379/0?prefix=")
    assert "=***" in header
    assert SECRET not in result.stdout + result.stderr
