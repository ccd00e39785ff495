"""The HTTP face of a Pipeline: OpenAI-style image routes, /health and /metrics over one scheduler.

Routes: POST /v1/images/edits (multipart: image or image[], prompt, ...), POST /v1/images/generations (JSON),
POST /v1/images (native: multipart or JSON; images -> edit, none -> generate), GET /health, GET /metrics.
A bad request is a 4xx with {"error": {"message", "type", "param", "code"}} and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from kontext_rt.errors import KontextError
from kontext_rt.serve import safety
from kontext_rt.serve.metrics import Metrics
from kontext_rt.serve.scheduler import DeadlineExceeded, QueueFull, RankFailure, Scheduler, ShuttingDown
from kontext_rt.serve.schemas import (
    ApiError,
    EditFields,
    GenerateFields,
    Settings,
    decode_base64,
    decode_image,
    encode_png,
    parse_fields,
    to_request,
)

try:  # starlette parses forms with python-multipart: a missing one should stop the server at start, not per request
    import python_multipart  # noqa: F401
except ModuleNotFoundError:  # python-multipart before 0.0.13
    import multipart  # noqa: F401

log = logging.getLogger("kontext_rt.serve")
POLL_S = 0.1  # how often a waiting request checks its client and its deadline
IMAGE_FIELDS = ("image", "image[]")


class _BodyTooLarge(Exception):
    pass


def create_app(pipe, settings: Settings | None = None) -> FastAPI:
    """An ASGI app serving `pipe` (a loaded kontext_rt.Pipeline, or anything with its edit/generate). Its worker
    thread starts with the app's lifespan and, at shutdown, finishes the queued requests before it stops."""
    settings = settings or Settings()
    metrics = Metrics(pipe)
    scheduler = Scheduler(pipe, settings.max_queue, settings.max_batch, metrics)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.close)

    app = FastAPI(title="kontext-rt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings, app.state.metrics, app.state.scheduler, app.state.pipe = settings, metrics, scheduler, pipe
    app.add_middleware(_BodyLimit, max_bytes=settings.max_upload_bytes, metrics=metrics)
    _handlers(app, metrics)

    @app.get("/health")
    async def health():
        if scheduler.closing:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        if not _is_form(request):
            raise ApiError(400, "send the edit as multipart/form-data (image or image[] files, prompt, ...)")
        fields, files = await _read_form(request)
        if not files:
            raise ApiError(400, "an edit needs an image: upload it as 'image' (or several as 'image[]')", "image")
        return await _serve(request, "edits", fields, files, EditFields)

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        return await _serve(request, "generations", await _read_json(request), [], GenerateFields)

    @app.post("/v1/images")
    async def native(request: Request):
        if _is_form(request):
            fields, files = await _read_form(request)
        else:
            fields = await _read_json(request)
            files = _json_images(fields.pop("image", None)) if isinstance(fields, dict) else []
        return await _serve(request, "images", fields, files, EditFields if files else GenerateFields)

    return app


async def _serve(request: Request, route: str, fields, files: list, model) -> JSONResponse:
    """Check, decode, queue, wait, answer: the path every image request takes."""
    app = request.app
    settings, scheduler, metrics = app.state.settings, app.state.scheduler, app.state.metrics
    t0 = time.perf_counter()
    parsed = parse_fields(model, fields)
    req = to_request(parsed, [None] * len(files), settings)  # every field checked before any image is decoded
    try:
        images = await run_in_threadpool(_decode_all, files)
        req = dataclasses.replace(req, images=tuple(images))
        checked = await run_in_threadpool(app.state.pipe.check, req)  # the request's one check
    except KontextError as e:
        raise ApiError(400, str(e), *(("image", "invalid_image") if files else (None, "invalid_value"))) from None
    try:
        job = scheduler.submit(checked, settings.timeout_s)
    except QueueFull as e:
        raise ApiError(429, str(e), None, "queue_full", headers={"Retry-After": str(e.retry_after)}) from None
    except ShuttingDown as e:
        raise ApiError(503, str(e), None, "shutting_down", type="server_error", headers={"Retry-After": "5"}) from None
    image, report = await _wait(request, scheduler, job)
    if settings.safety is not None:
        try:
            allowed, reason = await run_in_threadpool(safety.check, settings.safety, image)
        except safety.SafetyCheckFailed as e:
            log.error("%s: the image is withheld", e)
            raise ApiError(
                500, f"{e}: the image is withheld", None, "safety_check_failed", type="server_error"
            ) from None
        if not allowed:
            metrics.rejected("safety")
            raise ApiError(
                400, f"the output was flagged by the safety check: {reason}", None, "content_policy_violation"
            )
    b64 = await run_in_threadpool(encode_png, image)
    metrics.stage("total", time.perf_counter() - t0)
    metrics.requests.labels(route=route, status="200").inc()
    timings = {"queue": job.started - job.enqueued, **report.timings}
    return JSONResponse(
        {"created": int(time.time()), "data": [{"b64_json": b64, "seed": report.seed}], "timings": timings}
    )


def _abandon(scheduler: Scheduler, job, waiting) -> None:
    scheduler.abandon(job)
    waiting.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody reads its outcome


async def _wait(request: Request, scheduler: Scheduler, job):
    """The job's (image, report), checking every POLL_S whether the client is gone (a queued job leaves the queue, a
    running one is abandoned) or the deadline has passed while it is still queued."""
    waiting = asyncio.wrap_future(job.future)
    try:
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=POLL_S)
            if done:
                break
            if await request.is_disconnected():
                if job.started is None and scheduler.cancel(job, "disconnected"):
                    raise ApiError(499, "the client closed the connection before the request started",
                                   code="disconnected")  # fmt: skip
                if job.started is not None:  # running: it stops at its next step once no client of its batch is left
                    _abandon(scheduler, job, waiting)
                    raise ApiError(499, "the client closed the connection while the request ran", code="disconnected")
            if scheduler.clock() > job.deadline and scheduler.cancel(job, "timeout"):
                raise _timeout(job)
    except asyncio.CancelledError:  # Ray Serve cancels the request when its client goes away (no http.disconnect)
        if not (job.started is None and scheduler.cancel(job, "disconnected")) and not job.future.done():
            _abandon(scheduler, job, waiting)
        raise
    try:
        return waiting.result()
    except DeadlineExceeded:
        raise _timeout(job) from None
    except ShuttingDown as e:
        raise ApiError(503, str(e), None, "shutting_down", type="server_error") from None
    except RankFailure as e:  # a rank of the replica's group failed: the worker has logged it; Ray replaces it
        raise ApiError(503, str(e), None, "rank_failed", type="server_error", headers={"Retry-After": "5"}) from None
    except torch.OutOfMemoryError:  # the worker has logged it with its traceback
        raise ApiError(
            503,
            "the device ran out of memory during this request: retry later, or with a smaller image or fewer "
            "images (the server's other requests go on)",
            None,
            "out_of_memory",
            type="server_error",
            headers={"Retry-After": "5"},
        ) from None
    # a KontextError (the pipeline refused the request) goes to the app's handler: 400 with its message


def _timeout(job) -> ApiError:
    waited = job.deadline - job.enqueued
    return ApiError(
        503,
        f"the request waited {waited:g} s in the queue without starting (the server's --timeout-s): the server is "
        "overloaded; retry later",
        None,
        "timeout",
        type="server_error",
        headers={"Retry-After": "5"},
    )


def _decode_all(files: list[tuple[str, bytes]]) -> list:
    return [decode_image(data, name) for name, data in files]


def _is_form(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("multipart/form-data")


async def _read_form(request: Request) -> tuple[dict, list[tuple[str, bytes]]]:
    """(text fields, [(name, bytes) of each image]) of a multipart body; files other than images are refused."""
    settings = request.app.state.settings
    fields, files = {}, []
    try:
        async with request.form(max_files=settings.max_images, max_fields=64) as form:  # closes its temporary files
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key not in IMAGE_FIELDS:
                        raise ApiError(400, f"unexpected file field {key!r}: only 'image' / 'image[]' (no masks)", key)
                    files.append((f"image {len(files)} ({value.filename or 'unnamed'})", await value.read()))
                elif key in IMAGE_FIELDS:
                    raise ApiError(400, f"{key} must be an uploaded file, not a text field", "image")
                elif key in fields:
                    raise ApiError(400, f"parameter {key!r} is given twice", key)
                else:
                    fields[key] = value
    except HTTPException as e:  # starlette's refusal of a malformed body, or of more files than max_images
        raise ApiError(400, f"multipart body refused: {e.detail}", None, "invalid_form") from None
    return fields, files


async def _read_json(request: Request):
    body = await request.body()
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None


def _json_images(value) -> list[tuple[str, bytes]]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [(f"image {i}", decode_base64(v, f"image {i}")) for i, v in enumerate(values)]


# ---- errors and limits ------------------------------------------------------------------------------------------


def _handlers(app: FastAPI, metrics: Metrics) -> None:
    def respond(request: Request, err: ApiError) -> JSONResponse:
        metrics.error(err.code)
        route = request.url.path.rsplit("/", 1)[-1] or "root"
        metrics.requests.labels(route=route, status=str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return respond(request, exc)

    @app.exception_handler(KontextError)
    async def kontext_error(request, exc: KontextError):
        return respond(request, ApiError(400, str(exc)))

    @app.exception_handler(_BodyTooLarge)
    async def too_large(request, exc):
        return respond(request, _too_large(app.state.settings.max_upload_mb))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):  # starlette's own: 404, 405, a malformed multipart body
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return respond(request, ApiError(exc.status_code, str(exc.detail), None, f"http_{exc.status_code}", type=kind))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return respond(request, ApiError(400, str(exc)))

    @app.exception_handler(Exception)
    async def bug(request, exc: Exception):
        log.error("internal error", exc_info=exc)
        return respond(request, ApiError(500, "internal server error", None, "internal_error", type="server_error"))


def _too_large(max_mb: float) -> ApiError:
    return ApiError(
        413, f"the request body is over the server's {max_mb:g} MB limit (--max-upload-mb)", None, "too_large"
    )


class _BodyLimit:
    """Refuse a body over max_bytes: from its Content-Length before reading it, and by counting the bytes as they
    arrive (chunked bodies, or a Content-Length that lies)."""

    def __init__(self, app, max_bytes: int, metrics: Metrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:  # h11 refuses a malformed one
            err = _too_large(self.max_bytes / 2**20)
            self.metrics.error(err.code)
            return await JSONResponse(err.body(), status_code=413)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        await self.app(scope, counted, send)
