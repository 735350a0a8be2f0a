"""Typed job arguments: checked against the handler's annotations at enqueue, converted
back to those types in the worker.

The conversion is Pydantic's (`pydantic.TypeAdapter`, one per typed parameter, built when
the task is registered): ``datetime``, ``date``, ``UUID``, ``Decimal``, enums,
dataclasses, ``TypedDict``, Pydantic models and containers of them. Parameters that are
unannotated or plain JSON (``str``, ``int``, ``float``, ``bool``, ``list``, ``dict``,
``None``, ``Any``, and lists, dicts and unions of those) are passed as they are: a task
with only such parameters has no adapter at all and pays nothing.

At enqueue a typed argument must be of its annotated type (``UUID`` for ``UUID``), or its
JSON form (the ISO string of a ``datetime``, a dataclass as an object: what a producer
in another language or ``aioworkers enqueue`` sends); anything else is a ``TypeError``
naming the parameter. It travels in its JSON form.
"""

from __future__ import annotations

import inspect
import logging
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from .errors import ConfigError, DecodeError, clip

log = logging.getLogger("aioworkers")

_PLAIN: frozenset[Any] = frozenset(
    {str, int, float, bool, list, dict, type(None), None, Any, object, inspect.Parameter.empty}
)
_PLAIN_ORIGINS: frozenset[Any] = frozenset({list, dict, typing.Union, types.UnionType})
# How much of a conversion error is kept in a dead letter or an enqueue error.
MAX_ERROR = 300


def is_plain(annotation: Any) -> bool:
    """Whether values of ``annotation`` arrive from JSON as they are."""
    if annotation in _PLAIN:
        return True
    origin = typing.get_origin(annotation)
    return origin in _PLAIN_ORIGINS and all(is_plain(a) for a in typing.get_args(annotation))


class Arguments:
    """The typed parameters of one handler, and their adapters."""

    def __init__(self, task: str, signature: inspect.Signature, typed: dict[str, Any]) -> None:
        from pydantic import TypeAdapter  # only a task with a typed parameter imports it

        self._task = task
        params = signature.parameters.values()
        self._positional = [p.name for p in params if p.kind in _POSITIONAL]
        self._var_positional = next((p.name for p in params if p.kind is p.VAR_POSITIONAL), "")
        self._var_keyword = next((p.name for p in params if p.kind is p.VAR_KEYWORD), "")
        self._types = typed
        self._adapters: dict[str, Any] = {}
        for name, tp in typed.items():
            try:
                self._adapters[name] = TypeAdapter(tp)
            except Exception as exc:  # a type Pydantic cannot validate: said at registration
                raise ConfigError(f"task {task!r}: parameter {name!r}: {exc}") from None

    def encode(
        self, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        """Check the typed arguments of an enqueue and give their JSON forms; a
        ``TypeError`` names the first wrong one."""
        return self._each(args, kwargs, self._encode_one)

    def decode(
        self, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        """The arguments of a message converted to the annotated types; a `DecodeError`
        (``bad_arguments``, dead-lettered) if one does not convert."""
        return self._each(args, kwargs, self._decode_one)

    def _each(
        self, args: Sequence[Any], kwargs: dict[str, Any], convert: Callable[[str, Any], Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        adapters = self._adapters
        out = list(args)
        for i, value in enumerate(args):
            name = self._positional[i] if i < len(self._positional) else self._var_positional
            if name in adapters:
                out[i] = convert(name, value)
        named = dict(kwargs)
        for key, value in kwargs.items():
            name = key if key in adapters else self._var_keyword
            if name in adapters:
                named[key] = convert(name, value)
        return out, named

    def _encode_one(self, name: str, value: Any) -> Any:
        from pydantic import ValidationError

        adapter = self._adapters[name]
        try:
            valid = adapter.validate_python(value, strict=True)
        except ValidationError as exc:
            valid = self._json_form(name, value, exc)
        return adapter.dump_python(valid, mode="json")

    def _json_form(self, name: str, value: Any, error: Exception) -> Any:
        from pydantic import ValidationError

        try:
            return self._adapters[name].validate_json(orjson.dumps(value), strict=True)
        except ValidationError as exc:
            error = exc  # as JSON it says more ("invalid character" rather than "not a UUID")
        except (TypeError, orjson.JSONEncodeError):
            pass
        raise TypeError(
            f"argument {name!r} of task {self._task!r} must be {_type_name(self._types[name])} "
            f"(or its JSON form), got {type(value).__name__}: {_first(error)}"
        )

    def _decode_one(self, name: str, value: Any) -> Any:
        from pydantic import ValidationError

        try:
            return self._adapters[name].validate_python(value)
        except ValidationError as exc:
            detail = f"argument {name!r} does not convert: {_first(exc)}"
            raise DecodeError("bad_arguments", clip(detail, MAX_ERROR)) from None


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def arguments_for(
    task: str, fn: Callable[..., Any], signature: inspect.Signature
) -> Arguments | None:
    """The typed parameters of ``signature`` (``fn``'s, without its dependencies), or None
    when every one is plain JSON."""
    hints = _hints(task, fn)
    typed: dict[str, Any] = {}
    for param in signature.parameters.values():
        annotation = hints.get(param.name, param.annotation)
        if isinstance(annotation, str) or is_plain(annotation):
            continue  # a string is an annotation that did not resolve: left as JSON
        typed[param.name] = annotation
    return Arguments(task, signature, typed) if typed else None


def _hints(task: str, fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception as exc:  # a name under TYPE_CHECKING, a typo: no conversion, said once
        log.warning(
            "task %r: its annotations do not resolve (%s); arguments with string "
            "annotations are passed as plain JSON",
            task,
            exc,
        )
        return {}


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else repr(tp)


def _first(error: Exception) -> str:
    errors = getattr(error, "errors", None)
    if callable(errors):
        first = errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return clip(f"{where + ': ' if where else ''}{first.get('msg', '')}", MAX_ERROR)
    return clip(str(error), MAX_ERROR)
