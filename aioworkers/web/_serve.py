"""``aioworkers web``: the dashboard on its own uvicorn server, login from the environment."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterator, Mapping

import uvicorn

from ..app import App
from ..errors import ConfigError
from . import dashboard
from ._auth import Auth, basic_auth, bearer_token, loopback

log = logging.getLogger("aioworkers")

ENV_USER = "AIOWORKERS_WEB_USER"
ENV_PASSWORD = "AIOWORKERS_WEB_PASSWORD"
ENV_TOKEN = "AIOWORKERS_WEB_TOKEN"


def auth_from_env(env: Mapping[str, str]) -> tuple[Auth | None, str]:
    """The login the environment sets (never the command line: ``ps`` shows that), and
    how to describe it."""
    user, password, token = (env.get(name, "") for name in (ENV_USER, ENV_PASSWORD, ENV_TOKEN))
    if token and (user or password):
        raise ConfigError(f"set either {ENV_USER} and {ENV_PASSWORD}, or {ENV_TOKEN}: not both")
    if token:
        return bearer_token(token), "a bearer token"
    if user or password:
        if not (user and password):
            raise ConfigError(f"set both {ENV_USER} and {ENV_PASSWORD} (HTTP Basic login)")
        return basic_auth(user, password), f"HTTP Basic as {user!r}"
    return None, "no login"


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's own re-raises the signal once it has shut down, so the process would
        # die by SIGTERM; a stop asked for is a clean exit (0), as for `aioworkers run`.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


async def serve(
    app: App,
    *,
    host: str,
    port: int,
    read_only: bool,
    show_args: bool,
    env: Mapping[str, str] = os.environ,
) -> int:
    """Serve the dashboard until SIGINT/SIGTERM (uvicorn's handlers); returns 0."""
    auth, login = auth_from_env(env)
    if auth is None and not (read_only and loopback(host)):
        raise ConfigError(
            f"the dashboard needs a login: set {ENV_USER} and {ENV_PASSWORD} (HTTP Basic) "
            f"or {ENV_TOKEN} (bearer), or serve it --read-only on a loopback --host"
        )
    asgi = dashboard(app, auth=auth, read_only=read_only, show_args=show_args)
    config = uvicorn.Config(
        asgi,
        host=host,
        port=port,
        lifespan="off",
        log_config=None,  # the command line configured logging already
        proxy_headers=False,  # the client address is the socket's: loopback means loopback
        server_header=False,
    )
    shown = f"[{host}]" if ":" in host else host
    mode = "read-only" if read_only else "read-write"
    log.info("dashboard of %s on http://%s:%d/ (%s, %s)", app.broker_name, shown, port, login, mode)
    await _Server(config).serve()
    return 0
