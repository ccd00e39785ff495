"""`kontext-rt serve --ray`: the same HTTP app (create_app) as N Ray Serve replicas, one pipeline each.

Needs the ray extra (pip install "kontext-rt[ray]"); nothing else in the package imports this module. Each replica
loads its own Pipeline in its constructor (num_gpus=1 on CUDA, so Ray gives each one a GPU of its own) and serves
create_app's FastAPI app through Ray Serve's ASGI ingress; Ray's HTTP proxy routes each request to a replica with
room for it, and Ray's controller restarts a replica whose actor died or whose health check raised.

    app = build_app({"path": "/models/FLUX.1-Kontext-dev", "device": "cuda"}, Settings(), replicas=4)
    serve.run(app)   # or deploy(...), which also starts Serve's HTTP proxy on host:port
"""

from __future__ import annotations

import dataclasses
import json

from ray import serve

from kontext_rt.errors import InputError
from kontext_rt.serve.schemas import ApiError, Settings

APP_NAME = "kontext-rt"  # the Ray Serve application's name
REPLICA_HEADER = "x-kontext-replica"  # which replica answered (its Ray Serve replica id)
AUTOSCALING_KEYS = {"min_replicas", "max_replicas", "initial_replicas", "target_ongoing_requests"}


@serve.deployment(health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress()
class KontextDeployment:
    """One replica: a Pipeline loaded here, and create_app's app over it (its worker thread starts with the app's
    lifespan, which Ray runs when the replica starts and ends when it stops)."""

    def __init__(self, spec, settings: Settings):
        import kontext_rt

        self.pipe = kontext_rt.Pipeline.load(spec)
        self.settings = settings
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.scheduler = None

    def __serve_build_asgi_app__(self):
        from kontext_rt.serve.app import create_app

        app = create_app(self.pipe, self.settings)
        app.add_middleware(_ReplicaHeader, replica=self.replica)
        self.scheduler = app.state.scheduler
        return app

    def check_health(self) -> None:
        """Ray Serve calls this every health_check_period_s; a raise has the replica replaced."""
        check_worker(self.scheduler, self.replica)


def check_worker(scheduler, replica: str) -> None:
    """Raise when the replica's pipeline worker thread is not running (never started, died, or closed)."""
    if scheduler is None or not scheduler.worker_alive:
        raise RuntimeError(f"replica {replica}: the pipeline worker thread is not running")


class _ReplicaHeader:
    """Name the answering replica in every response (x-kontext-replica), so a client or a test sees the spread."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged)


def proxy_env() -> dict[str, str]:
    """The environment Ray's HTTP proxy needs to answer in JSON when a replica fails mid-request: pass it to
    ray.init(runtime_env={"env_vars": proxy_env()}) (Ray reads it where the proxy starts)."""
    return {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": f"{__name__}.proxy_middlewares"}


def proxy_middlewares() -> list:
    """Ray's HTTP proxy calls this at start (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH) for its middlewares."""
    from starlette.middleware import Middleware

    return [Middleware(_JsonProxyErrors)]


class _JsonProxyErrors:
    """In Ray's HTTP proxy: its own errors as OpenAI-style JSON, like the app's. A replica that dies mid-request
    (killed, out of memory, its node lost) leaves the proxy with no response: uvicorn would answer a plain-text 500;
    this answers 500 {"error": {..., "code": "replica_failed"}}. A plain-text 5xx of the proxy (503: no replica
    available) gets the same JSON form, keeping its status and Retry-After."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, held, body = False, None, []

        async def watched(message):
            nonlocal started, held
            if message["type"] == "http.response.start":
                started = True
                ctype = dict(message.get("headers", [])).get(b"content-type", b"")
                if message["status"] >= 500 and b"json" not in ctype:
                    held = message  # the proxy's own plain-text error: its body becomes a JSON message
                    return
            elif message["type"] == "http.response.body" and held is not None:
                body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    text = b"".join(body).decode(errors="replace").strip() or "the server failed"
                    retry = [(k, v) for k, v in held.get("headers", []) if k.lower() == b"retry-after"]
                    await _send_error(send, held["status"], text, "proxy_error", retry)
                return
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:
            if started:
                raise
            started = False
        if not started:
            message = "the replica serving this request failed before it answered (it died or was replaced); retry"
            await _send_error(send, 500, message, "replica_failed", [])


async def _send_error(send, status: int, message: str, code: str, headers: list) -> None:
    body = json.dumps(ApiError(status, message, None, code, type="server_error").body()).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def build_app(
    spec,
    settings: Settings | None = None,
    replicas: int = 1,
    autoscaling: dict | None = None,
    num_cpus: float = 1,
):
    """The bound Ray Serve application (what serve.run takes): `replicas` replicas of KontextDeployment, each
    loading Pipeline.load(spec) (spec: a kontext_rt.LoadSpec, or a dict of from_pretrained's arguments), or, with
    `autoscaling` (Ray's autoscaling_config: min_replicas, max_replicas, initial_replicas,
    target_ongoing_requests), as many as Ray's autoscaler decides.

    A CUDA device takes one GPU per replica (Ray picks it and makes it the replica's only visible device, so the
    replica loads on "cuda"); a CPU replica takes `num_cpus` CPUs and no GPU. A replica accepts up to
    max_queue + max_batch requests (its own queue and one batch); more wait in Ray's proxy for a free replica."""
    settings = settings or Settings()
    from kontext_rt.load_spec import LoadSpec

    if isinstance(spec, dict):
        if "path" not in spec:
            raise InputError("the load arguments need 'path' (the checkpoint Pipeline.from_pretrained loads)")
        spec = LoadSpec(**spec)
    if not isinstance(spec, LoadSpec):
        raise InputError(f"spec must be a kontext_rt.LoadSpec, got {type(spec).__name__}")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise InputError(f"replicas must be a positive integer, got {replicas!r}")
    on_cuda = str(spec.device).startswith("cuda")
    if on_cuda:
        spec = dataclasses.replace(spec, device="cuda")  # the replica sees only the GPU Ray gave it
    options = {
        "ray_actor_options": {"num_gpus": 1 if on_cuda else 0, "num_cpus": num_cpus},
        "max_ongoing_requests": settings.max_queue + settings.max_batch,
    }
    if autoscaling is not None:
        options["autoscaling_config"] = _autoscaling(autoscaling)
    else:
        options["num_replicas"] = replicas
    return KontextDeployment.options(**options).bind(spec, settings)


def _autoscaling(config: dict) -> dict:
    unknown = set(config) - AUTOSCALING_KEYS
    if unknown:
        raise InputError(f"unknown autoscaling keys {sorted(unknown)}: use {sorted(AUTOSCALING_KEYS)}")
    low, high = config.get("min_replicas", 1), config.get("max_replicas", 1)
    for name, v in (("min_replicas", low), ("max_replicas", high)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InputError(f"autoscaling {name} must be a non-negative integer, got {v!r}")
    if high < max(low, 1):
        raise InputError(f"autoscaling max_replicas {high} must be at least min_replicas {low} and at least 1")
    return dict(config)


def deploy(
    spec,
    settings: Settings | None = None,
    replicas: int = 1,
    autoscaling: dict | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    route_prefix: str = "/",
    num_cpus: float = 1,
    name: str = APP_NAME,
):
    """Start Serve's HTTP proxy on host:port (on a Ray instance already initialised: ray.init) and run the app
    there; returns once every replica has loaded its pipeline. serve.shutdown() stops it."""
    app = build_app(spec, settings, replicas, autoscaling, num_cpus)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(app, name=name, route_prefix=route_prefix)
