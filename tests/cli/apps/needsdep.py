"""An app that imports a library that is not installed."""

from __future__ import annotations

import no_such_dependency_for_aioworkers_tests  # noqa: F401

import aioworkers

app = aioworkers.App("memory://")
