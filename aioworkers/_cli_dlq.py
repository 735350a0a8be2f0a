"""``aioworkers dlq list|replay|purge``: every queue of the app, grouped, or ``--queue``."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

import orjson

from ._cli_checks import _note_unknown_queues, _warn_private_broker
from .app import App
from .dlq import DeadLetterQueue


async def cmd_dlq(app: App, args: argparse.Namespace) -> int:
    _warn_private_broker(app)
    _note_unknown_queues(app, args.queue)
    dlqs = [app.dlq(queue) for queue in args.queue or app.queues()]
    if args.action == "purge":
        for dlq in dlqs:
            print(f"purged {_letters(await dlq.purge())} from {dlq.queue!r}")
    elif args.action == "replay":
        return await _replay(dlqs, args.ids)
    else:
        entries = {dlq.queue: await dlq.list(args.limit) for dlq in dlqs}
        if args.json:
            doc = {
                queue: [asdict(e) | {"body": e.body.decode(errors="replace")} for e in listed]
                for queue, listed in entries.items()
            }
            print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        else:
            for queue, listed in entries.items():
                print(f"{queue}: {_letters(len(listed))}")
                for e in listed:
                    print(
                        f"  {e.id}  {e.task or '-'}  {e.reason}  attempts={e.attempts}  "
                        f"{e.error or ''}".rstrip()
                    )
    return 0


async def _replay(dlqs: list[DeadLetterQueue], ids: list[str] | None) -> int:
    """Each queue's DLQ as it is now, once: never the letters that die again meanwhile."""
    wanted = None if ids is None else set(ids)
    found: set[str] = set()
    for dlq in dlqs:
        entries = await dlq.list(dlq.SCAN_LIMIT)
        if wanted is not None:
            entries = [e for e in entries if e.id in wanted or e.entry_id in wanted]
            found.update(e.id for e in entries)
            found.update(e.entry_id for e in entries)
        print(f"replayed {_letters(await dlq.replay_entries(entries))} to {dlq.queue!r}")
        if len(entries) == dlq.SCAN_LIMIT:
            print(f"  {dlq.queue!r} may hold more: replay again for the rest", file=sys.stderr)
    missing = [i for i in ids or () if i not in found]
    if missing:
        queues = ", ".join(repr(dlq.queue) for dlq in dlqs)
        for job_id in missing:
            print(
                f"aioworkers: no dead letter with id {job_id!r} in queue {queues}", file=sys.stderr
            )
        return 1
    return 0


def _letters(n: int) -> str:
    return f"{n} dead letter" if n == 1 else f"{n} dead letters"
