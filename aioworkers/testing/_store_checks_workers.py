"""Store conformance checks: the worker registry (`Store.put_worker`, `live_workers`,
`forget_worker`). The store may hold other workers (a shared server): each check looks
only at the workers it named."""

from __future__ import annotations

import orjson

from ._store_exercise import StoreExercise, store_check


def _info(worker_id: str, **more: object) -> str:
    return orjson.dumps({"id": worker_id, **more}).decode()


@store_check()
async def check_the_worker_registry_lists_the_live_in_order_and_forgets(
    ex: StoreExercise,
) -> None:
    """``put_worker`` keeps a worker's info for its TTL, replaced by the next put (which
    keeps its place); ``live_workers`` lists them in the order first put, without the one
    not put again after its TTL; ``forget_worker`` drops one (False for one not there)."""
    s = ex.store
    # Names in the order they are put, so that a store ordering ties by id agrees too.
    a, b, c = ex.name("w1"), ex.name("w2"), ex.name("w3")
    tag = a.split("-")[1]

    async def ours() -> list[str]:
        return [info for info in await s.live_workers() if tag in info]

    first = _info(a, host='хост "q" {x} |y|', jobs=1)
    await s.put_worker(a, first, ttl=60)
    await s.put_worker(b, _info(b), ttl=ex.ttl)
    await s.put_worker(c, _info(c), ttl=60)
    assert await ours() == [first, _info(b), _info(c)]
    await s.put_worker(a, _info(a, jobs=2), ttl=60)
    assert await ours() == [_info(a, jobs=2), _info(b), _info(c)]

    await ex.lapse()
    await s.put_worker(c, _info(c, jobs=3), ttl=60)
    assert await ours() == [_info(a, jobs=2), _info(c, jobs=3)]
    assert await s.forget_worker(b) is False  # lapsed: not there
    assert await s.forget_worker(c) is True
    assert await s.forget_worker(c) is False
    assert await s.forget_worker(ex.name("never")) is False
    assert await ours() == [_info(a, jobs=2)]
    assert len(await s.live_workers(limit=1)) == 1
    assert await s.live_workers(limit=0) == []
    assert await s.forget_worker(a) is True
    assert await ours() == []


@store_check()
async def check_a_worker_ttl_must_be_positive(ex: StoreExercise) -> None:
    """A zero or negative TTL is a ValueError, and writes nothing."""
    s, w = ex.store, ex.name("w")
    for ttl in (0.0, -1.0):
        try:
            await s.put_worker(w, _info(w), ttl=ttl)
        except ValueError:
            pass
        else:
            raise AssertionError(f"put_worker took ttl={ttl}")
    assert not [info for info in await s.live_workers() if w in info]
