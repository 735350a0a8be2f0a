"""The sqlite:// file holds job arguments: the database, its WAL and its shared-memory
file are created readable by their owner only (never looser than the umask allows), and
a file that already exists keeps the permissions its owner gave it."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from aioworkers import ConfigError
from aioworkers.brokers.sqlite import SqliteBroker
from aioworkers.idempotency.sqlite import SqliteStore

from .conftest import fetch_n


@pytest.fixture
def umask() -> Iterator[None]:
    """Restores the process umask the test changes."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _modes(db: Path) -> dict[str, str]:
    """The permission bits of the database and the two files SQLite creates beside it."""
    return {
        name: oct(stat.S_IMODE(os.stat(f"{db}{name}").st_mode)) for name in ("", "-wal", "-shm")
    }


OWNER_ONLY = dict.fromkeys(("", "-wal", "-shm"), "0o600")


async def _use(broker_db: Path, store_db: Path) -> None:
    """Publish, fetch and claim with the files still open, so the WAL and SHM exist."""
    broker = SqliteBroker(f"sqlite:///{broker_db}")
    store = SqliteStore(f"sqlite:///{store_db}")
    try:
        await broker.publish("q", [b"card 4111 1111 1111 1111"])
        (delivery,) = await fetch_n(broker, "q", 1, within=5)
        assert await store.claim("charge:1", "me", lease=30) == "claimed"
        await broker.depth("q")  # the reading connection maps the SHM too
        assert _modes(broker_db) == OWNER_ONLY
        assert _modes(store_db) == OWNER_ONLY
        await broker.ack([delivery])
    finally:
        await broker.aclose()
        await store.aclose()


@pytest.mark.usefixtures("umask")
@pytest.mark.parametrize("mask", [0o000, 0o022, 0o027, 0o077], ids=oct)
async def test_new_files_are_readable_by_their_owner_only(tmp_path: Path, mask: int) -> None:
    os.umask(mask)
    # The store both in the broker's file (the default) and in a file of its own.
    await _use(tmp_path / "jobs.db", tmp_path / "jobs.db")
    await _use(tmp_path / "sub" / "queue.db", tmp_path / "keys.db")


@pytest.mark.usefixtures("umask")
async def test_an_existing_file_keeps_the_permissions_its_owner_set(tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    db.touch()
    db.chmod(0o640)  # e.g. readable by a monitoring group, on purpose
    broker = SqliteBroker(f"sqlite:///{db}")
    try:
        await broker.publish("q", [b"x"])
        await fetch_n(broker, "q", 1, within=5)
        # SQLite gives the WAL and SHM the database's own permissions.
        assert _modes(db) == dict.fromkeys(("", "-wal", "-shm"), "0o640")
    finally:
        await broker.aclose()


async def test_a_file_that_cannot_be_created_is_a_config_error(tmp_path: Path) -> None:
    db = tmp_path / ("x" * 300 + ".db")  # a name longer than the file system allows
    broker = SqliteBroker(f"sqlite:///{db}")
    with pytest.raises(ConfigError, match="cannot create the file: File name too long"):
        await broker.publish("q", [b"x"])
    await broker.aclose()
