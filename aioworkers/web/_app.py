"""The dashboard's ASGI app: pages rendered on the server (Jinja2, autoescaped), a JSON
endpoint the charts poll, and forms that POST every change (CSRF-checked)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import jinja2
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._cli_schedules import _row as schedule_row
from .._registry import registry_for
from ..app import App
from ..errors import AioworkersError, ConfigError, redact
from ..monitor.stats_command import _live_workers as live_workers
from ..monitor.stats_command import _workers_doc as workers_doc
from . import _auth, _dead, _jobs
from ._csrf import FIELD, Csrf
from ._history import History, QueueNow

MAX_FORM = 64 * 1024  # bytes of a form: ids of one page at most
HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
}
# What a finished action says, by the code in the redirect (never text from the request).
MESSAGES = {
    "replayed": "Replayed {n} dead letter(s): they are queued again as first attempts.",
    "purged": "Deleted {n} dead letter(s).",
    "none": "Nothing was selected.",
    "cancelled": "Cancel requested: the job will not start, or stops within one lease.",
    "not_cancelled": "Not cancelled: the job had already finished.",
}

Form = dict[str, list[str]]
Handler = Callable[[Request], Awaitable[Response]]


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("aioworkers.web", "templates"),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.StrictUndefined,
    )
    env.filters["q"] = lambda value: quote(str(value), safe="")
    env.filters["num"] = lambda value: "-" if value is None else f"{value:,}"
    env.filters["rate"] = lambda value: "-" if value is None else f"{value:,.1f}"
    env.filters["pct"] = lambda value: "-" if value is None else f"{value:.1%}"
    env.filters["when"] = lambda epoch: datetime.fromtimestamp(epoch, tz=UTC).isoformat(
        timespec="seconds"
    )
    return env


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


class Dashboard:
    """One dashboard of one `App` (see `aioworkers.web.dashboard`)."""

    def __init__(
        self,
        app: App,
        *,
        auth: _auth.Auth | None,
        read_only: bool,
        show_args: bool,
        secret: bytes | None,
    ) -> None:
        if auth is None and not read_only:
            raise ConfigError(
                "the dashboard needs auth= (aioworkers.web.basic_auth(...), bearer_token(...) "
                "or your own callable); only a read_only=True one served on loopback may go "
                "without"
            )
        self.app = app
        self.auth = auth
        self.read_only = read_only
        self.show_args = show_args
        self.csrf = Csrf(secret)
        self.env = _env()
        self._history: History | None = None
        self.asgi: ASGIApp = Starlette(
            routes=self._routes(),
            exception_handlers={AioworkersError: self._failed, OSError: self._failed},
        )

    def _routes(self) -> list[BaseRoute]:
        static = StaticFiles(packages=[("aioworkers.web", "static")])
        return [
            Route("/", self.overview),
            Route("/api/stats", self.stats),
            Route("/queues/{queue}", self.queue),
            Route("/queues/{queue}/dead", self.dead),
            Route("/queues/{queue}/dead/{action}", self.dead_action, methods=["POST"]),
            Route("/workers", self.workers),
            Route("/schedules", self.schedules),
            Route("/job", self.job_lookup),
            Route("/job/{job_id}", self.job),
            Route("/job/{job_id}/cancel", self.job_cancel, methods=["POST"]),
            Mount("/static", static, name="static"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.asgi(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers.setdefault(name, value)
                headers.setdefault("cache-control", "no-store")
            await send(message)

        refused = await _auth.check(Request(scope, receive), self.auth)
        if refused is not None:
            await refused(scope, receive, send_with_headers)
            return
        await self.asgi(scope, receive, send_with_headers)

    # -- rendering ------------------------------------------------------------------------

    @property
    def history(self) -> History:
        if self._history is None:
            self._history = History(self.app.broker)  # the broker opens on first use
        return self._history

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        done = request.query_params.get("done", "")
        count = request.query_params.get("n", "0")
        message = MESSAGES.get(done, "").format(n=int(count) if count.isdigit() else 0)
        html = self.env.get_template(name).render(
            base=_root(request),
            csrf_field=FIELD,
            csrf=self.csrf.token(request),
            read_only=self.read_only,
            broker=self.app.broker_name,
            queues=self.app.queues(),
            has_schedules=bool(self.app.schedules),
            message=message,
            **context,
        )
        response = HTMLResponse(html, status_code=status)
        self.csrf.set_cookie(request, response)
        return response

    async def _failed(self, request: Request, exc: Exception) -> Response:
        """A broker or store that failed mid-page: say so, never a traceback."""
        error = redact(f"{type(exc).__name__}: {exc}", 500)
        return self.render(request, "error.html", 503, title="Unavailable", error=error)

    def not_found(self, request: Request, what: str) -> Response:
        return self.render(request, "error.html", 404, title="Not found", error=what)

    def _known(self, request: Request) -> str | None:
        queue = str(request.path_params["queue"])
        return queue if queue in self.app.queues() else None

    # -- pages ----------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        rows = await self.history.poll(self.app.queues(), fresh=True)
        return self.render(
            request,
            "overview.html",
            title="Overview",
            rows=rows.values(),
            workers=await self._workers_doc(self.app.queues()),
        )

    async def _workers_doc(self, queues: list[str]) -> dict[str, Any]:
        """What the live workers counted, as ``aioworkers stats --json`` shows it."""
        return workers_doc(await live_workers(self.app), queues)

    async def stats(self, request: Request) -> Response:
        """``{"ts", "queues": {queue: {ready, in_flight, delayed, dead, rates, error}},
        "series": {queue: [[at, ready, in_flight, delayed, dead, enq/s, done/s, failed/s]]},
        "workers": {live, throttled, by_queue, outcomes}}``: the numbers of ``aioworkers
        stats --json``, and the history the charts draw."""
        wanted = request.query_params.get("queue")
        queues = [q for q in self.app.queues() if wanted is None or q == wanted]
        rows = await self.history.poll(queues)
        return JSONResponse(
            {
                "ts": time.time(),
                "queues": {q: _row_json(row) for q, row in rows.items()},
                "series": {q: self.history.series(q) for q in queues},
                "workers": await self._workers_doc(self.app.queues()),
            }
        )

    async def queue(self, request: Request) -> Response:
        queue = self._known(request)
        if queue is None:
            return self.not_found(request, "No such queue in this app.")
        row = (await self.history.poll([queue], fresh=True))[queue]
        failures = await _dead.read_page(
            self.app,
            queue,
            _dead.View(size=_dead.RECENT),
            show_args=False,
            total=row.depth.dead if row.depth else None,
        )
        return self.render(
            request, "queue.html", title=f"Queue {queue}", queue=queue, row=row, dead=failures
        )

    async def dead(self, request: Request) -> Response:
        queue = self._known(request)
        if queue is None:
            return self.not_found(request, "No such queue in this app.")
        row = (await self.history.poll([queue], fresh=True))[queue]
        listing = await _dead.read_page(
            self.app,
            queue,
            _dead.View.of(request.query_params),
            show_args=self.show_args,
            total=row.depth.dead if row.depth else None,
        )
        return self.render(
            request,
            "dead.html",
            title=f"Dead letters of {queue}",
            queue=queue,
            dead=listing,
            max_browse=_dead.MAX_BROWSE,
            sizes=_dead.SIZES,
        )

    async def workers(self, request: Request) -> Response:
        try:
            registry = registry_for(self.app.store)
            found = await registry.workers() if registry is not None else None
            error = None if registry is not None else "this state store keeps no worker registry"
        except (AioworkersError, OSError) as exc:
            found, error = None, redact(str(exc), 500)
        return self.render(
            request, "workers.html", title="Workers", workers=found, error=error, now=time.time()
        )

    async def schedules(self, request: Request) -> Response:
        """Each periodic schedule, its next slot, and its last slot with the outcome (one
        store read each, as ``aioworkers schedules`` does)."""
        rows = [await schedule_row(self.app, s) for s in self.app.schedules.values()]
        return self.render(request, "schedules.html", title="Periodic schedules", rows=rows)

    async def job_lookup(self, request: Request) -> Response:
        job_id = request.query_params.get("id", "").strip()
        if job_id and _jobs.valid_id(job_id):
            return RedirectResponse(f"{_root(request)}/job/{quote(job_id, safe='')}", 303)
        error = "That is not a job id." if job_id else None
        return self.render(request, "job.html", title="Job", view=None, lookup_error=error)

    async def job(self, request: Request) -> Response:
        job_id = str(request.path_params["job_id"])
        if not _jobs.valid_id(job_id):
            return self.not_found(request, "That is not a job id.")
        view = await _jobs.read_job(self.app, job_id)
        return self.render(request, "job.html", title=f"Job {job_id}", view=view, lookup_error=None)

    # -- actions --------------------------------------------------------------------------

    async def form(self, request: Request) -> Form | Response:
        """The POSTed form, or the response that refuses it (read-only, too big, no CSRF)."""
        if self.read_only:
            return PlainTextResponse("this dashboard is read-only", status_code=403)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/x-www-form-urlencoded":
            return PlainTextResponse("expected an HTML form", status_code=415)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM:
                return PlainTextResponse("form too large", status_code=413)
        try:
            fields = parse_qs(body.decode(), keep_blank_values=True, max_num_fields=1000)
        except (UnicodeDecodeError, ValueError):
            return PlainTextResponse("malformed form", status_code=400)
        if not self.csrf.valid(request, _first(fields, FIELD)):
            return PlainTextResponse(
                "CSRF check failed: reload the page and submit the form again", status_code=403
            )
        return fields

    async def dead_action(self, request: Request) -> Response:
        fields = await self.form(request)
        if isinstance(fields, Response):
            return fields
        queue = self._known(request)
        action = str(request.path_params["action"])
        if queue is None or action not in ("replay", "purge"):
            return self.not_found(request, "No such queue or action.")
        scope = _first(fields, "scope")
        only = _first(fields, "only")  # a row's own button
        entries = [only] if only else [e for e in fields.get("entry", []) if e][: max(_dead.SIZES)]
        if only:
            scope = "selected"
        # The page the form was on, to come back to (its query string, read again).
        view = _dead.View.of({k: v[0] for k, v in parse_qs(_first(fields, "view")).items()})
        back = f"{_root(request)}/queues/{quote(queue, safe='')}/dead?{view.query()}"
        back += "&" if view.query() else ""
        if scope != "all" and not entries:
            return RedirectResponse(f"{back}done=none", 303)
        total = (await self.app.stats(queue)).dead
        if _first(fields, "confirmed") != "yes":
            return self.render(
                request,
                "confirm.html",
                title="Confirm",
                queue=queue,
                action=action,
                scope="all" if scope == "all" else "selected",
                entries=entries,
                view=view,
                total=total,
                expensive=_dead.expensive(self.app),
            )
        n = await self._apply(queue, action, entries if scope != "all" else None, view, total)
        done = "replayed" if action == "replay" else "purged"
        return RedirectResponse(f"{back}{urlencode({'done': done, 'n': n})}", 303)

    async def _apply(
        self, queue: str, action: str, entries: list[str] | None, view: _dead.View, total: int
    ) -> int:
        if action == "purge":
            return await _dead.purge(self.app, queue, entries)
        if entries is None:
            return await _dead.replay_all(self.app, queue, total)
        return await _dead.replay_some(self.app, queue, view, entries)

    async def job_cancel(self, request: Request) -> Response:
        fields = await self.form(request)
        if isinstance(fields, Response):
            return fields
        job_id = str(request.path_params["job_id"])
        if not _jobs.valid_id(job_id):
            return self.not_found(request, "That is not a job id.")
        try:
            cancelled = await _jobs.cancel(self.app, job_id)
        except ConfigError as exc:
            return self.render(request, "error.html", 409, title="Cannot cancel", error=str(exc))
        done = "cancelled" if cancelled else "not_cancelled"
        return RedirectResponse(f"{_root(request)}/job/{quote(job_id, safe='')}?done={done}", 303)


def _row_json(row: QueueNow) -> dict[str, Any]:
    depth = row.depth
    r = row.rates
    return {
        "ready": depth.ready if depth else None,
        "in_flight": depth.in_flight if depth else None,
        "delayed": depth.delayed if depth else None,
        "dead": depth.dead if depth else None,
        "rates": {"enqueued": r.enqueued, "done": r.done, "failed": r.failed},
        "error_rate": r.error_rate,
        "error": row.error,
    }


def _first(fields: Mapping[str, list[str]], name: str) -> str:
    values = fields.get(name)
    return values[0] if values else ""


def _int(value: str | None, default: int) -> int:
    return int(value) if value and value.isdigit() and len(value) < 7 else default
