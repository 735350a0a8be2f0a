"""A web dashboard for an `aioworkers.App`, to mount in your ASGI application or serve
with ``aioworkers web``: queues, workers, dead letters, jobs.

    from aioworkers.web import basic_auth, dashboard
    api.mount("/jobs", dashboard(app, auth=basic_auth("admin", "s3cret")))

Needs the ``web`` extra: ``pip install 'aio-job-workers[web]'`` (Starlette, Jinja2 and
uvicorn; the templates, stylesheet and script ship inside this package).
"""

from __future__ import annotations

try:
    import jinja2  # noqa: F401
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - the extra is installed in the tests
    raise ImportError(
        f"aioworkers.web needs the 'web' extra: pip install 'aio-job-workers[web]' ({exc})"
    ) from exc

from starlette.types import ASGIApp

from ..app import App
from ._app import Dashboard
from ._auth import Auth, AuthResult, basic_auth, bearer_token


def dashboard(
    app: App,
    *,
    auth: Auth | None,
    read_only: bool = False,
    show_args: bool = False,
    secret: bytes | None = None,
) -> ASGIApp:
    """The dashboard of ``app`` as an ASGI app, to mount under any path.

    ``auth``: a callable that takes the Starlette ``Request`` and returns True (let it
    through), False (401) or a ``Response`` to send instead; `basic_auth` and
    `bearer_token` make one. None is allowed only with ``read_only=True``, and then the
    dashboard answers only loopback clients of a server bound to loopback.

    ``read_only``: no replay, purge or cancel (the forms are not shown; a POST is a 403).
    ``show_args``: show the arguments of dead jobs (hidden by default: they may hold
    personal data or secrets). ``secret``: the key that signs CSRF tokens (random per
    process by default; give one when several processes serve the dashboard).
    """
    return Dashboard(app, auth=auth, read_only=read_only, show_args=show_args, secret=secret)


__all__ = ["Auth", "AuthResult", "basic_auth", "bearer_token", "dashboard"]
