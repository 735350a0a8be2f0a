"""``messaging.system`` comes from the broker (its `MessagingSystem` capability); a
third-party broker without it is named by its class."""

from __future__ import annotations

import pytest

from aioworkers.brokers import open_broker
from aioworkers.brokers.base import MessagingSystem
from aioworkers.telemetry import messaging_system


class AcmeBroker:
    """A third-party broker without the capability."""


class Named:
    messaging_system = "kafka"


def test_a_broker_names_its_system() -> None:
    broker = open_broker("memory://", visibility_timeout=5.0)
    assert isinstance(broker, MessagingSystem)
    assert messaging_system(broker) == "memory"
    assert messaging_system(Named()) == "kafka"


@pytest.mark.parametrize(("broker", "system"), [(AcmeBroker(), "acme"), (object(), "object")])
def test_a_broker_without_it_is_named_by_its_class(broker: object, system: str) -> None:
    assert messaging_system(broker) == system
