"""An app whose module fails while it is imported (a setting read at import time)."""

from __future__ import annotations

import os

import aioworkers

app = aioworkers.App("memory://")


def load_settings() -> dict[str, str]:
    return {"smtp": os.environ["BROKENAPP_SMTP_HOST"]}


SETTINGS = load_settings()
