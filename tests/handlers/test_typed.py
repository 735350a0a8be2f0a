"""Typed arguments: checked at enqueue against the handler's annotations, converted back in
the worker; a message whose arguments do not convert is dead-lettered (``bad_arguments``)."""

from __future__ import annotations

import dataclasses
import enum
import inspect
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import orjson
import pydantic
import pytest
from typing_extensions import TypedDict  # Pydantic needs it before Python 3.12

from aioworkers import App, current_job
from aioworkers.arguments import arguments_for, is_plain
from aioworkers.envelope import Envelope, encode, new_id, now_ms

from ..runtime.conftest import POLL, MakeApp, run_burst


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Size(enum.IntEnum):
    S = 1
    L = 3


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Address(TypedDict):
    city: str
    zip: str


class Customer(pydantic.BaseModel):
    id: UUID
    since: date


VALUES: list[tuple[Any, Any]] = [
    (datetime, datetime(2024, 5, 1, 12, 30, 15, 250000, tzinfo=UTC)),
    (datetime, datetime(2024, 5, 1, 12, 30)),  # naive stays naive
    (date, date(2024, 2, 29)),
    (UUID, uuid4()),
    (Decimal, Decimal("1234.5600")),
    (Color, Color.BLUE),
    (Size, Size.L),
    (Point, Point(1, -2)),
    (Address, Address(city="Lyon", zip="69001")),
    (Customer, Customer(id=uuid4(), since=date(2020, 1, 1))),
    (list[UUID], [uuid4(), uuid4()]),
    (datetime | None, None),
    (dict[str, Decimal], {"a": Decimal("0.1")}),
]


@pytest.mark.parametrize(("annotation", "value"), VALUES)
async def test_each_supported_type_round_trips_through_the_broker(
    make_app: MakeApp, annotation: Any, value: Any
) -> None:
    app, _ = make_app()
    got: list[Any] = []

    async def handler(value: Any) -> None:
        got.append(value)

    handler.__annotations__ = {"value": annotation, "return": None}
    task = app.task(name="typed")(handler)
    await task.enqueue(value)
    await run_burst(app.worker(poll=POLL))
    assert got == [value]
    if value is not None and not isinstance(value, dict | list):
        assert type(got[0]) is type(value)


async def test_a_wrong_type_is_an_error_at_enqueue_naming_the_parameter() -> None:
    app = App("memory://")

    @app.task
    async def ship(order_id: UUID, at: datetime, amount: Decimal, color: Color) -> None:
        pass

    good = (uuid4(), datetime.now(UTC), Decimal("1"), Color.RED)
    for i, bad in enumerate(["not-a-uuid", "yesterday", "1.5x", "green"]):
        args = list(good)
        args[i] = bad
        name = list(ship.signature.parameters)[i]
        with pytest.raises(TypeError, match=f"'{name}'"):
            await ship.enqueue(*args)
    with pytest.raises(TypeError, match="'at'"):
        await app.enqueue("ship", kwargs={"order_id": uuid4(), "at": 12, "amount": 1, "color": 1})
    assert (await app.stats()).ready == 0


async def test_the_json_form_is_accepted_at_enqueue(make_app: MakeApp) -> None:
    # What a producer without the types sends (aioworkers enqueue, another language).
    app, _ = make_app()
    got: list[Any] = []

    @app.task
    async def ship(order_id: UUID, at: datetime, point: Point) -> None:
        got.append((order_id, at, point))

    uid = uuid4()
    await app.enqueue(
        "ship", args=[str(uid), "2024-05-01T12:00:00Z"], kwargs={"point": {"x": 1, "y": 2}}
    )
    await run_burst(app.worker(poll=POLL))
    assert got == [(uid, datetime(2024, 5, 1, 12, tzinfo=UTC), Point(1, 2))]


async def test_arguments_that_do_not_convert_are_dead_lettered(make_app: MakeApp) -> None:
    app, faulty = make_app()
    ran: list[int] = []

    @app.task
    async def ship(order_id: UUID) -> None:
        ran.append(1)

    env = Envelope(new_id(), "ship", ["not-a-uuid"], {}, enqueued_at=now_ms())
    await faulty.publish("default", [encode(env)])
    worker = app.worker(poll=POLL)
    await run_burst(worker)
    assert ran == []
    (letter,) = await app.dlq().list()
    assert letter.reason == "bad_arguments"
    assert "order_id" in (letter.error or "")


def test_plain_json_tasks_have_no_adapter() -> None:
    app = App("memory://")

    @app.task
    async def plain(a, b: int, c: str | None, d: list[dict[str, Any]], *e: float, **f: bool):  # type: ignore[no-untyped-def]
        pass

    assert plain.handler is None  # called directly: nothing converts, nothing checks
    assert is_plain(dict[str, list[int | None]])
    assert not is_plain(list[UUID])


def test_typed_args_travel_as_their_json_forms() -> None:
    async def handler(at: datetime, amount: Decimal, *ids: UUID, **points: Point) -> None:
        pass

    arguments = arguments_for("h", handler, inspect.signature(handler))
    assert arguments is not None
    uid = uuid4()
    at = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    args, kwargs = arguments.encode([at, Decimal("2.50"), uid], {"p": Point(1, 2)})
    assert orjson.loads(orjson.dumps([args, kwargs])) == [
        ["2024-01-02T03:04:05Z", "2.50", str(uid)],
        {"p": {"x": 1, "y": 2}},
    ]
    assert arguments.decode(args, kwargs) == ([at, Decimal("2.50"), uid], {"p": Point(1, 2)})


async def test_typed_and_sync_together_see_their_job(make_app: MakeApp) -> None:
    app, _ = make_app()
    got: list[Any] = []

    @app.task
    def report(day: date) -> None:
        got.append((day, current_job().task))

    await report.enqueue(date(2024, 1, 31))
    await run_burst(app.worker(poll=POLL))
    assert got == [(date(2024, 1, 31), "report")]
