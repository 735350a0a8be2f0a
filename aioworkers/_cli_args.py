"""Argument types of the command line: each turns a flag's text into a value, or says what
is wrong with it (argparse prints that, with the flag's name)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any, TypeVar

import orjson


def csv(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return items


_N = TypeVar("_N", int, float)


def number(value: str, convert: Callable[[str], _N], minimum: _N, expected: str) -> _N:
    try:
        n = convert(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
    if not math.isfinite(n):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
    if n < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {n}")
    return n


def positive_int(value: str) -> int:
    return number(value, int, 1, "a whole number")


def port(value: str) -> int:
    n = positive_int(value)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (1-65535), got {n}")
    return n


def seconds(value: str) -> float:
    return number(value, float, 0.0, "a number of seconds")


def count(value: str) -> int:
    n = number(value, int, -(2**63), "a whole number")
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected 0 (one per CPU) or more processes, got {n}")
    return n


def positive_seconds(value: str) -> float:
    s = seconds(value)
    if s == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return s


def megabytes(value: str) -> float:
    try:
        mb = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected megabytes, got {value!r}") from None
    if not mb > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return mb


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def level(value: str) -> str:
    if value.upper() not in LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LEVELS)}, got {value!r}")
    return value.upper()


def json_of(kind: type) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {value!r}") from None
        if not isinstance(doc, kind):
            raise argparse.ArgumentTypeError(f"expected a JSON {kind.__name__}, got {value!r}")
        return doc

    return parse
