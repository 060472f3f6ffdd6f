"""The ``ckptdb ui`` web application: Starlette routes rendering Jinja2 templates, GET only.

Pages: ``/`` (runs), ``/runs/{id}`` (chart, checkpoints, retention plan, events),
``/runs/{id}/steps/{step}`` (one checkpoint), ``/sql`` (the read-only query box of ``ckptdb sql``).
JSON: ``/api/marker`` (changes when the catalog does: pages poll it), ``/api/runs/{id}/curve``.
Nothing here writes: every route answers GET and HEAD only (anything else is 405), the catalog is
read through connections the database keeps read-only, and the SQL box runs
:func:`ckptdb.analysis.readonly_query`, the function behind ``ckptdb sql``.
"""

from __future__ import annotations

import csv
import io
import shlex
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Receive, Scope, Send

from ckptdb.analysis import readonly_query
from ckptdb.catalog.session import sqlite_url
from ckptdb.cli_output import human_bytes
from ckptdb.errors import CheckpointError, CheckpointNotFoundError
from ckptdb.storage import layout
from ckptdb.ui import cookbook
from ckptdb.ui.policy import parse_policy, policy_of_reason, to_flags
from ckptdb.ui.queries import PAGE, RUN_SORTS, UiCatalog, ts

HERE = Path(__file__).resolve().parent
SQL_PAGE_ROWS = 1000  # rows shown on the page; the CSV download has them all, as `ckptdb sql --csv`
PLAN_ROWS = 500  # plan rows listed (the counts cover every step)
POLL_MS = 2000
READ_METHODS = ("GET", "HEAD")
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:;"
    " frame-ancestors 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def seconds(v: Any) -> str:
    return "-" if v is None else f"{float(v):.3f}"


def cell(v: Any) -> Any:
    """A SQL result value as the CLI prints it (``ckptdb sql``)."""
    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, bytes | memoryview):
        return bytes(v).hex()
    if isinstance(v, datetime):
        return v.isoformat()
    return v


class ReadOnlyMiddleware:
    """Refuses every method but GET and HEAD before any route runs (405), and sets security headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] not in READ_METHODS:
            resp = PlainTextResponse("ckptdb ui is read-only", status_code=405, headers={"allow": "GET, HEAD"})
            await resp(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def qs(request: Request, **changes: Any) -> str:
    """The page's query string with ``changes`` applied (None or "" removes a parameter)."""
    params = dict(request.query_params)
    params.update({k: str(v) for k, v in changes.items() if v not in (None, "")})
    for k, v in changes.items():
        if v in (None, ""):
            params.pop(k, None)
    return urlencode(params)


def _int(request: Request, name: str, default: int = 1) -> int:
    try:
        return max(1, int(request.query_params.get(name, default)))
    except ValueError:
        return default


def create_app(url: str, *, allowed_hosts: list[str] | None = None) -> Starlette:
    """The application serving the catalog at ``url`` (``allowed_hosts``: Host headers answered; None: any)."""
    cat = UiCatalog(url)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    env = templates.env
    env.filters.update(bytes=human_bytes, ts=ts, seconds=seconds, shquote=shlex.quote)
    env.globals.update(catalog_url=cat.display_url, backend=cat.backend, poll_ms=POLL_MS, page_size=PAGE, qs=qs)

    def render(request: Request, template: str, status: int = 200, **ctx: Any) -> Response:
        return templates.TemplateResponse(request, template, {"marker": cat.marker(), **ctx}, status_code=status)

    def guarded(fn: Callable[[Request], Response]) -> Callable[[Request], Response]:
        def wrapper(request: Request) -> Response:
            try:
                return fn(request)
            except CheckpointNotFoundError as e:
                return render(request, "error.html", 404, title="not found", message=str(e))
            except CheckpointError as e:
                return render(request, "error.html", 500, title="catalog error", message=str(e))

        return wrapper

    @guarded
    def runs_page(request: Request) -> Response:
        name = request.query_params.get("name", "")
        sort = request.query_params.get("sort", "name")
        page = cat.runs(name=name, sort=sort, page=_int(request, "page"))
        return render(request, "runs.html", runs=page, name=name, sort=sort, sorts=list(RUN_SORTS))

    @guarded
    def run_page(request: Request) -> Response:
        run_id = int(request.path_params["run_id"])
        run = cat.run(run_id)
        metrics = cat.metrics(run_id)
        metric = request.query_params.get("metric") or ("score" if "score" in metrics else (metrics or ["score"])[0])
        state = request.query_params.get("state", "")
        return render(
            request,
            "run.html",
            run=run,
            metrics=metrics,
            metric=metric,
            state=state,
            curve=cat.curve(run_id, metric),
            pins=cat.pins(run_id),
            checkpoints=cat.checkpoints(run_id, metric=metric, state=state, page=_int(request, "page")),
            events=cat.events(run_id, page=_int(request, "events_page")),
            policy=request.query_params.get("policy", ""),
        )

    @guarded
    def plan_fragment(request: Request) -> Response:
        run_id = int(request.path_params["run_id"])
        run = cat.run(run_id)
        text = request.query_params.get("policy", "").strip()
        source = "entered"
        if not text:
            text, source = policy_of_reason(cat.last_policy_reason(run_id)) or "", "recorded"
        ctx: dict[str, Any] = {"policy_text": text, "source": source, "error": None, "plan": None, "rows": []}
        if not text:
            ctx["error"] = "no retention policy has pruned this run yet: enter one above"
        else:
            try:
                policy = parse_policy(text)
            except ValueError as e:
                ctx["error"] = str(e)
            else:
                plan = cat.plan(run_id, policy)
                model_only = set(plan.model_only)
                rows = [(s, "keep model" if s in model_only else "keep", plan.reason(s)) for s in plan.keep]
                why = f"pruned by {policy}"
                rows += [(s, "delete model" if s in model_only else "delete", why) for s in plan.delete]
                rows.sort()
                ctx.update(plan=plan, policy_str=str(policy), flags=to_flags(policy))
                ctx.update(run_arg=shlex.quote(run["run_name"]))
                ctx.update(rows=rows[:PLAN_ROWS], more=max(0, len(rows) - PLAN_ROWS))
        return templates.TemplateResponse(request, "_plan.html", ctx)

    @guarded
    def checkpoint_page(request: Request) -> Response:
        run_id = int(request.path_params["run_id"])
        step = int(request.path_params["step"])
        row = request.query_params.get("id")
        run = cat.run(run_id)
        detail = cat.checkpoint(run_id, step, int(row) if row and row.isdigit() else None)
        own = sqlite_url(Path(run["checkpoint_dir"]) / layout.CATALOG_FILE) == url
        url_arg = run["checkpoint_dir"] if own else cat.display_url
        cli = f"--dir {shlex.quote(url_arg)}" if own else f"--url {shlex.quote(url_arg)}"
        return render(
            request, "checkpoint.html", run=run, d=detail, c=detail["checkpoint"], url_arg=url_arg, cli_catalog=cli
        )

    def _sql(request: Request, max_rows: int | None) -> tuple[str, Any, str | None]:
        q = request.query_params.get("q", "").strip()
        if not q:
            return q, None, None
        try:
            return q, readonly_query(url, q, max_rows=max_rows), None
        except CheckpointError as e:
            return q, None, str(e)

    def sql_page(request: Request) -> Response:
        q, res, error = _sql(request, SQL_PAGE_ROWS + 1)
        rows = [[cell(v) for v in r] for r in res.rows[:SQL_PAGE_ROWS]] if res else []
        examples = cookbook.examples(cat.backend, run=cat.newest_run_name())
        return render(
            request,
            "sql.html",
            q=q,
            res=res,
            rows=rows,
            truncated=bool(res and len(res.rows) > SQL_PAGE_ROWS),
            error=error,
            examples=examples,
            status=400 if error else 200,
        )

    def sql_csv(request: Request) -> Response:
        _, res, error = _sql(request, None)
        if error or res is None:
            return PlainTextResponse(error or "no query (?q=SELECT ...)", status_code=400)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(res.columns)
        for r in res.rows:
            w.writerow(["" if v is None else cell(v) for v in r])
        return Response(
            buf.getvalue(),
            media_type="text/csv; charset=utf-8",
            headers={"content-disposition": 'attachment; filename="ckptdb-query.csv"'},
        )

    def api_marker(request: Request) -> Response:
        return JSONResponse({"marker": cat.marker()})

    @guarded
    def api_curve(request: Request) -> Response:
        run_id = int(request.path_params["run_id"])
        metric = request.query_params.get("metric", "score")
        return JSONResponse({"metric": metric, "points": cat.curve(run_id, metric)})

    routes = [
        Route("/", runs_page, methods=["GET"]),
        Route("/runs/{run_id:int}", run_page, methods=["GET"]),
        Route("/runs/{run_id:int}/plan", plan_fragment, methods=["GET"]),
        Route("/runs/{run_id:int}/steps/{step:int}", checkpoint_page, methods=["GET"]),
        Route("/sql", sql_page, methods=["GET"]),
        Route("/sql.csv", sql_csv, methods=["GET"]),
        Route("/api/marker", api_marker, methods=["GET"]),
        Route("/api/runs/{run_id:int}/curve", api_curve, methods=["GET"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    middleware = [Middleware(ReadOnlyMiddleware)]
    if allowed_hosts is not None:  # DNS rebinding: a page elsewhere cannot read a loopback-bound catalog
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        cat.close()

    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.catalog = cat
    return app


__all__ = ["create_app", "human_bytes"]
