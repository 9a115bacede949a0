"""The FastAPI app. Thin: it validates, writes jobs to the store and reads them back; the
dispatcher does the work. Everything it needs is on the `Service` it is created with."""
from __future__ import annotations

import hmac
import json
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import TypeAdapter, ValidationError

import experiments
from orchestrator import figures
from orchestrator.jobs import JobRequestError, plan_run, plan_sweep, plan_table
from orchestrator.report import report_html
from orchestrator.store import IdempotencyInProgress, IdempotencyMismatch, NotFound
from orchestrator.sweep_state import best_trial
from orchestrator.tables import FORMATS, render

from . import problems
from .problems import Problem, field_errors
from .schemas import JobRequest, RunJob, SweepJob, TableJob

MAX_BODY_BYTES = 1_000_000
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
KINDS = ("run", "table", "sweep")
MEDIA = {"md": "text/markdown", "csv": "text/csv", "latex": "application/x-latex",
         "html": "text/html", "json": "application/json"}
_job_request = TypeAdapter(JobRequest)


def create_app(service, manage_service: bool = False, on_started=None) -> FastAPI:
    """`service`: orchestrator.service.Service. With `manage_service` the app starts and stops it
    (what `certrepro serve` does), calling `on_started()` once it runs."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_service:
            service.start()
        if on_started is not None:
            on_started()
        try:
            yield
        finally:
            if manage_service:
                service.stop()

    app = FastAPI(title="certrepro", version="0.1.0", lifespan=lifespan)
    app.state.service = service
    problems.install(app)

    def require_key(x_api_key: str | None = Header(None)) -> None:
        expected = service.settings.api_key
        if expected and not hmac.compare_digest((x_api_key or "").encode(), expected.encode()):
            raise Problem(401, "Unauthorized", "this service needs its API key in the X-API-Key "
                          "header", headers={"WWW-Authenticate": "X-API-Key"})

    guarded = [Depends(require_key)]

    def require_key_for_browser(x_api_key: str | None = Header(None),
                                key: str | None = Query(None)) -> None:
        """Pages a browser opens (the report and its images) cannot send a header: they may
        carry the key as `?key=` instead."""
        require_key(x_api_key if x_api_key is not None else key)

    browser_guarded = [Depends(require_key_for_browser)]

    def job_or_404(job_id: str):
        try:
            return service.store.get_job(job_id)
        except NotFound:
            raise Problem(404, "Not found", f"there is no job {job_id!r}") from None

    def job_json(job) -> dict[str, Any]:
        data = job.to_dict()
        data["mlflow_url"] = service.run_link(job.mlflow_run_id)
        for row in data["rows"]:
            row["mlflow_url"] = service.run_link(row.get("mlflow_run_id"))
        if job.kind == "sweep":
            sweep = job.body.get("_sweep") or {}
            data["sweep"] = {key: sweep.get(key) for key in (
                "metric", "mode", "num_samples", "trials", "search_space", "scheduler")}
            data["best"] = best_trial(job.trials, sweep.get("metric", ""),
                                      sweep.get("mode", "max"))
        else:
            data.pop("trials", None)
        return data

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        state = service.readiness()
        return JSONResponse(state, status_code=200 if state["ready"] else 503)

    @app.post("/jobs", status_code=202, dependencies=guarded)
    async def submit(request: Request, idempotency_key: str | None = Header(None, max_length=200)):
        body = await _json_body(request)
        try:
            job_request = _job_request.validate_python(body)
        except ValidationError as error:
            # the first element of a location is the kind (the union's tag): not a field
            errors = [{"field": ".".join(str(p) for p in _field_path(e["loc"], body)) or "body",
                       "message": e["msg"]} for e in error.errors()]
            raise Problem(422, "Invalid job", "; ".join(f"{e['field']}: {e['message']}"
                                                        for e in errors), errors) from None
        # Validation and the store write are blocking work: off the event loop, so concurrent
        # requests are served while one waits on the database.
        return await run_in_threadpool(create, body, job_request, idempotency_key)

    def create(body: dict[str, Any], job_request, idempotency_key: str | None) -> JSONResponse:
        try:
            if isinstance(job_request, RunJob):
                plan, spec, profile = plan_run(job_request.config), None, None
            elif isinstance(job_request, TableJob):
                plan = plan_table(job_request.spec, job_request.rows, job_request.profile,
                                  job_request.seeds)
                spec, profile = job_request.spec, job_request.profile
            elif isinstance(job_request, SweepJob):
                plan = plan_sweep(job_request.model_dump())
                spec, profile = job_request.spec, job_request.profile
            else:  # the schema's discriminator admits no other kind
                raise AssertionError(f"unhandled job kind {job_request.kind!r}")
        except JobRequestError as error:
            raise Problem(422, "Invalid job", str(error), field_errors(error.problems)) from None
        stored_body = dict(body)
        if plan.sweep is not None:
            stored_body["_sweep"] = plan.sweep
        if plan.not_implemented or plan.dropped_certifiers:
            stored_body["_left_out"] = {"rows": plan.not_implemented,
                                        "certifiers": plan.dropped_certifiers}
        try:
            job, _created = service.store.create_job(
                job_request.kind, stored_body, plan.rows, spec=spec, profile=profile,
                idempotency_key=idempotency_key)
        except IdempotencyMismatch:
            raise Problem(422, "Idempotency key reused", "this Idempotency-Key was used with a "
                          "different body; use a new key for a new job") from None
        except IdempotencyInProgress:
            raise Problem(409, "Request in progress", "a request with this Idempotency-Key is "
                          "still being processed; retry shortly") from None
        return JSONResponse(job_json(job), status_code=202,
                            headers={"Location": f"/jobs/{job.id}"})

    @app.get("/jobs", dependencies=guarded)
    def list_jobs(status: str | None = Query(None), kind: str | None = Query(None),
                  limit: int = Query(20, ge=1, le=100), cursor: str | None = Query(None)):
        for name, value, allowed in (("status", status, STATUSES), ("kind", kind, KINDS)):
            if value is not None and value not in allowed:
                raise Problem(422, "Invalid query", f"{name} must be one of "
                              f"{', '.join(allowed)}, got {value!r}",
                              [{"field": name, "message": f"allowed: {', '.join(allowed)}"}])
        try:
            jobs, next_cursor = service.store.list_jobs(status=status, kind=kind, limit=limit,
                                                        cursor=cursor)
        except ValueError:
            raise Problem(422, "Invalid query", "cursor is not one this service gave out",
                          [{"field": "cursor", "message": "invalid cursor"}]) from None
        return {"jobs": [job_json(job) for job in jobs], "next_cursor": next_cursor}

    @app.get("/jobs/{job_id}", dependencies=guarded)
    def get_job(job_id: str):
        return job_json(job_or_404(job_id))

    @app.post("/jobs/{job_id}/cancel", dependencies=guarded)
    def cancel(job_id: str):
        job_or_404(job_id)
        return job_json(service.store.cancel_job(job_id))

    @app.get("/jobs/{job_id}/table", dependencies=guarded)
    def table(job_id: str, format: str = Query("md")):
        if format not in FORMATS:
            raise Problem(422, "Invalid query", f"format must be one of {', '.join(FORMATS)}, "
                          f"got {format!r}", [{"field": "format",
                                               "message": f"allowed: {', '.join(FORMATS)}"}])
        text = render(service.job_table(job_or_404(job_id)), format)
        return Response(text, media_type=MEDIA[format])

    def job_table_or_none(job):
        try:
            return service.job_table(job)
        except ValueError:  # e.g. a spec that no longer loads: the page still shows the rows
            return None

    @app.get("/jobs/{job_id}/report", dependencies=browser_guarded,
             response_class=HTMLResponse)
    def report(job_id: str, key: str | None = Query(None)):
        job = job_or_404(job_id)
        table = job_table_or_none(job)
        names = figures.available(job, table or {})
        page = report_html(job, table, names, key=key)
        return HTMLResponse(page)

    @app.get("/jobs/{job_id}/figures/{name}", dependencies=browser_guarded)
    def figure(job_id: str, name: str):
        job = job_or_404(job_id)
        if name not in figures.FIGURES:
            raise Problem(404, "Not found", f"there is no figure {name!r}; figures: "
                          f"{', '.join(figures.FIGURES.names())}")
        png = figures.render_png(name, job, job_table_or_none(job) or {})
        if png is None:
            raise Problem(404, "Not found", f"job {job_id} has nothing to draw in {name!r} yet")
        return Response(png, media_type="image/png")

    @app.get("/experiments", dependencies=guarded)
    def list_experiments():
        return {"experiments": [experiments.spec_summary(experiments.load_spec(name))
                                for name in experiments.list_specs()]}

    @app.get("/experiments/{name:path}", dependencies=guarded)
    def get_experiment(name: str):
        try:
            return experiments.spec_summary(experiments.load_spec(name))
        except ValueError as error:
            raise Problem(404, "Not found", str(error)) from None

    return app


def _field_path(loc: tuple, body: dict[str, Any]) -> tuple:
    return loc[1:] if loc and loc[0] == body.get("kind") else loc


async def _json_body(request: Request) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise Problem(413, "Body too large", f"a job body may be at most {MAX_BODY_BYTES} bytes")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise Problem(413, "Body too large",
                          f"a job body may be at most {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise Problem(400, "Malformed JSON", f"the body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise Problem(422, "Invalid job", "the body must be a JSON object with a `kind` field "
                      "(run, table, sweep)", [{"field": "body", "message": "expected an object"}])
    return body
