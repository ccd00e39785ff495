"""`kontext-rt serve --ray`: the same HTTP app (create_app) as N Ray Serve replicas, one pipeline each.

Needs the ray extra (pip install "kontext-rt[ray]"); nothing else in the package imports this module. Each replica
loads its own Pipeline in its constructor (num_gpus=1 on CUDA, so Ray gives each one a GPU of its own) and serves
create_app's FastAPI app through Ray Serve's ASGI ingress; Ray's HTTP proxy routes each request to a replica with
room for it, and Ray's controller restarts a replica whose actor died or whose health check raised.

    app = build_app({"path": "/models/FLUX.1-Kontext-dev", "device": "cuda"}, Settings(), replicas=4)
    serve.run(app)   # or deploy(...), which also starts Serve's HTTP proxy on host:port

gpus_per_replica=N > 1 (`--gpus-per-replica N`): each replica is one sequence-parallel group of N ranks
(Pipeline.from_pretrained(..., parallel=N), kontext_rt.parallel). Ray Serve reserves a placement group of N bundles
per replica (one GPU and num_cpus each on CUDA, num_cpus each on the CPU; STRICT_PACK: one node). The replica actor
is rank 0: it starts N - 1 rank actors (_Rank) in its placement group (Serve captures the replica's child actors in
it), opens a torch TCPStore on its node at a port the OS picks, and every rank joins one process group through it
(nccl on CUDA, gloo on the CPU, the collectives' timeout rank_timeout_s) and loads the same LoadSpec with
parallel=N. The app is rank 0's alone: its scheduler checks each request once, as with one GPU, except that the
seed of a request without one is drawn there (RankGroup.check), so the check does no collective and every rank
sees the same Request. For each batch the worker thread first asks the rank actors to check its Requests (a check
round: a rank refusing what rank 0 accepted fails the batch at once, an InputError naming it, no collective started);
then it sends the checked Requests (seed included) to the rank actors (non-blocking remote calls), runs its own
run_checked, then waits for theirs: each rank actor checks the same Requests (the same noise from the same seed)
and runs them; only rank 0's images are returned. After each step rank 0 broadcasts whether the batch goes on, so
an abandoned batch stops on every rank at the same step.
Failures: a rank that does not take part makes the others' collectives time out after rank_timeout_s, and a rank
actor that has not finished rank_timeout_s after rank 0 did, or failed, or died, or that ended other than rank 0
did, fails the request (503 rank_failed) and marks the group broken: later calls fail at once, the health check
raises, and Ray replaces the replica (its rank actors die with it). A refusal (KontextError) or an abandoned batch
ends every rank alike and leaves the group in service. gpus_per_replica=1 is the one-process replica above.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from datetime import timedelta

import ray
from ray import serve

from kontext_rt.errors import InputError, KontextError
from kontext_rt.serve.scheduler import Abandoned, RankFailure
from kontext_rt.serve.schemas import ApiError, Settings

APP_NAME = "kontext-rt"  # the Ray Serve application's name
REPLICA_HEADER = "x-kontext-replica"  # which replica answered (its Ray Serve replica id)
AUTOSCALING_KEYS = {"min_replicas", "max_replicas", "initial_replicas", "target_ongoing_requests"}
RANK_TIMEOUT_S = 300.0  # default: how long a rank waits for the others (a collective, the end of a call)
RANK_START_S = 600.0  # how long a replica waits for its rank actors' processes to start (Ray may pull a runtime env)
PING_S = 10.0  # the health check's wait for each rank actor (Serve's own health-check timeout is 30 s)


@dataclasses.dataclass(frozen=True)
class Ranks:
    """A replica of `count` sequence-parallel ranks: rank 0 (the replica) and count - 1 rank actors."""

    count: int
    timeout_s: float = RANK_TIMEOUT_S  # the collectives' timeout, and rank 0's wait for the others after a call
    num_cpus: float = 1  # each rank actor's CPUs (and one GPU each on CUDA)


@serve.deployment(health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress()
class KontextDeployment:
    """One replica: a Pipeline loaded here (with ranks: rank 0 of a RankGroup, which the app serves), and
    create_app's app over it (its worker thread starts with the app's lifespan, which Ray runs when the replica
    starts and ends when it stops)."""

    def __init__(self, spec, settings: Settings, ranks: Ranks | None = None):
        import kontext_rt

        self.settings = settings
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.scheduler = None
        self.group = None
        if ranks is None:
            self.pipe = kontext_rt.Pipeline.load(spec)
        else:  # a sequence-parallel group: this replica is rank 0, and the app serves the group
            self.pipe = self.group = RankGroup.start(spec, ranks, self.replica)

    def __serve_build_asgi_app__(self):
        from kontext_rt.serve.app import create_app

        app = create_app(self.pipe, self.settings)
        app.add_middleware(_ReplicaHeader, replica=self.replica)
        self.scheduler = app.state.scheduler
        return app

    def check_health(self) -> None:
        """Ray Serve calls this every health_check_period_s; a raise has the replica replaced."""
        check_worker(self.scheduler, self.replica)
        if self.group is not None:
            self.group.check_health()


def check_worker(scheduler, replica: str) -> None:
    """Raise when the replica's pipeline worker thread is not running (never started, died, or closed)."""
    if scheduler is None or not scheduler.worker_alive:
        raise RuntimeError(f"replica {replica}: the pipeline worker thread is not running")


def _join_group(store, rank: int, ranks: int, timeout_s: float, device: str) -> None:
    """This process as `rank` of the replica's process group (nccl on CUDA, on the one GPU Ray made visible; gloo on
    the CPU), every collective timing out after timeout_s."""
    import torch
    import torch.distributed as dist

    on_cuda = str(device).startswith("cuda")
    if on_cuda:
        torch.cuda.set_device(0)
    dist.init_process_group(
        "nccl" if on_cuda else "gloo", store=store, rank=rank, world_size=ranks, timeout=timedelta(seconds=timeout_s)
    )


def _load_rank(spec, ranks: int):
    import kontext_rt

    return kontext_rt.Pipeline.load(dataclasses.replace(spec, parallel=ranks))


def _go_on(pipe, stop: bool) -> bool:
    """After a denoising step, on every rank: rank 0's `stop` broadcast to the others (one number per step)."""
    import torch
    import torch.distributed as dist

    group = pipe.parallel.group
    flag = torch.tensor([int(stop)], device=pipe.device)
    dist.broadcast(flag, src=dist.get_global_rank(group, 0), group=group)
    return not flag.item()


class Stopped(Exception):
    """On a rank actor: rank 0 stopped the batch after a step (every client of it went away)."""


class RankGroup:
    """Rank 0 of a replica's sequence-parallel group, with the rank actors: what create_app serves (check and
    run_checked, as kontext_rt.Pipeline). run_checked runs every call on all ranks and returns rank 0's outputs."""

    def __init__(self, pipe, workers: list, timeout_s: float, replica: str):
        self.pipe, self.workers, self.timeout_s, self.replica = pipe, workers, timeout_s, replica
        self.broken: str | None = None  # why the group is out of service; None while it serves

    @classmethod
    def start(cls, spec, ranks: Ranks, replica: str) -> RankGroup:
        """Start the rank actors (in this replica's placement group), join one process group with them through a
        TCPStore on this node, and load the pipeline on every rank."""
        import torch.distributed as dist

        on_cuda = str(spec.device).startswith("cuda")
        options = {"num_cpus": ranks.num_cpus, "num_gpus": 1 if on_cuda else 0}
        workers = [
            _Rank.options(**options, name=f"kontext-rt-rank{r}::{replica}").remote() for r in range(1, ranks.count)
        ]
        ray.get([w.ping.remote() for w in workers], timeout=RANK_START_S)  # their processes run
        host = ray.util.get_node_ip_address()
        timeout = timedelta(seconds=ranks.timeout_s)
        store = dist.TCPStore(host, 0, ranks.count, is_master=True, timeout=timeout, wait_for_workers=False)
        loads = [w.setup.remote(spec, r, ranks.count, host, store.port, ranks.timeout_s) for r, w in
                 enumerate(workers, 1)]  # fmt: skip
        _join_group(store, 0, ranks.count, ranks.timeout_s, spec.device)
        group = cls(_load_rank(spec, ranks.count), workers, ranks.timeout_s, replica)
        group._wait(loads, "load the pipeline")
        if group.broken:
            raise RuntimeError(group.broken)
        return group

    @property
    def text_cache(self):  # the metrics read rank 0's caches
        return self.pipe.text_cache

    @property
    def context_cache(self):
        return self.pipe.context_cache

    def check(self, request):
        """The pipeline's check, the seed of a request without one drawn here (not by a broadcast: the check runs on
        rank 0 alone), so the Request sent to every rank is the same."""
        from kontext_rt import Request

        if isinstance(request, Request) and request.seed is None:
            request = dataclasses.replace(request, seed=secrets.randbits(63))
        return self.pipe.check(request)

    def run_checked(self, checked: list, reports: list, progress) -> list:
        """Run a checked batch on every rank: the rank actors get its Requests first (they check them again: the
        same seeds give the same noise), then rank 0 runs its own; rank 0's outputs once every rank ended alike."""
        if self.broken:
            raise RankFailure(self.broken)
        requests = [c.request for c in checked]
        # a check round first: a rank refusing what rank 0 accepted fails the batch now, before any collective
        answers = self._results([w.check.remote(requests) for w in self.workers], "check the batch")
        self._raise_if_broken()
        for rank, why in enumerate(answers, 1):
            if why is not None:
                raise InputError(f"rank {rank} of the sequence-parallel group refuses the batch: {why}")
        calls = [w.run.remote(requests) for w in self.workers]

        def lead(done: int, total: int) -> None:  # the scheduler's progress decides; every rank learns it
            try:
                if progress is not None:
                    progress(done, total)
            except Abandoned as e:
                _go_on(self.pipe, stop=True)
                raise e
            _go_on(self.pipe, stop=False)

        try:
            outputs = self.pipe.run_checked(checked, reports, lead)
        except KontextError:
            self._wait(calls, "refuse the batch", "refused")
            self._raise_if_broken()
            raise
        except Abandoned:
            self._wait(calls, "stop the batch", "stopped")
            self._raise_if_broken()
            raise
        except Exception as e:  # a collective timed out (a rank did not take part), the device failed: out of step
            self._break(f"rank 0 failed ({type(e).__name__}: {' '.join(str(e).split())})")
            raise RankFailure(self.broken) from e
        self._wait(calls, "finish the batch", "done")
        self._raise_if_broken()
        return outputs

    def _wait(self, calls: list, what: str, ending: str = "done") -> None:
        """Wait up to timeout_s for the rank actors' calls; mark the group broken unless each ended with `ending`."""
        for rank, got in enumerate(self._results(calls, what), 1):
            if got != ending:
                return self._break(f"rank {rank} ended with {got!r} where rank 0 ended with {ending!r}")
        return None

    def _results(self, calls: list, what: str) -> list:
        """The rank actors' answers, waited for up to timeout_s; [] (the group marked broken) where one did not come
        (not in time, it raised, or its actor died)."""
        ready, _ = ray.wait(calls, num_returns=len(calls), timeout=self.timeout_s)
        answers = []
        for rank, call in enumerate(calls, 1):
            if call not in ready:
                self._break(f"rank {rank} did not {what} within {self.timeout_s:g} s of rank 0")
                return []
            try:
                answers.append(ray.get(call))
            except Exception as e:  # it raised, or its actor died
                self._break(f"rank {rank} failed ({type(e).__name__}: {' '.join(str(e).split())[:500]})")
                return []
        return answers

    def _break(self, why: str) -> None:
        self.broken = (
            f"replica {self.replica}: its sequence-parallel group of {len(self.workers) + 1} ranks is out of step: "
            f"{why}; the replica is being replaced, retry"
        )

    def _raise_if_broken(self) -> None:
        if self.broken:
            raise RankFailure(self.broken)

    def check_health(self) -> None:
        """Raise when the group is broken, or a rank actor does not answer (died, or its process hangs)."""
        if self.broken:
            raise RuntimeError(self.broken)
        pings = [w.ping.remote() for w in self.workers]
        ready, _ = ray.wait(pings, num_returns=len(pings), timeout=PING_S)
        for rank, ping in enumerate(pings, 1):
            try:
                if ping not in ready:
                    raise TimeoutError(f"no answer in {PING_S:g} s")
                ray.get(ping)
            except Exception as e:
                self._break(f"rank {rank} does not answer ({type(e).__name__}: {' '.join(str(e).split())[:500]})")
                raise RuntimeError(self.broken) from None


@ray.remote(concurrency_groups={"health": 1})
class _Rank:
    """Rank r > 0 of a replica's group: a process of its own (one GPU on CUDA), running what rank 0 sends it. Its
    calls run one at a time; ping has a thread of its own, so the health check is answered during a run."""

    def __init__(self):
        self.pipe = None

    def setup(self, spec, rank: int, ranks: int, host: str, port: int, timeout_s: float) -> str:
        import torch.distributed as dist

        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, ranks, is_master=False, timeout=timeout)
        _join_group(store, rank, ranks, timeout_s, spec.device)
        self.pipe = _load_rank(spec, ranks)
        return "done"

    def check(self, requests: list) -> str | None:
        """Why this rank refuses the Requests rank 0 accepted (its KontextError's message), or None: rank 0 asks before
        the run, so a refusal here fails the batch with no collective started. No seed is drawn (rank 0 sent them)."""
        try:
            for r in requests:
                self.pipe.check(r)
        except KontextError as e:
            return str(e)
        return None

    def run(self, requests: list) -> str:
        """Check and run the Requests rank 0 runs; how it ended: "done", "refused" (a KontextError: rank 0 refuses
        them too) or "stopped" (rank 0 stopped the batch). Its outputs stay here: rank 0 answers."""

        def follow(done: int, total: int) -> None:
            if not _go_on(self.pipe, stop=False):
                raise Stopped(f"rank 0 stopped the batch after step {done} of {total}")

        try:
            self.pipe.run_checked([self.pipe.check(r) for r in requests], None, follow)
        except KontextError:
            return "refused"
        except Stopped:
            return "stopped"
        return "done"

    @ray.method(concurrency_group="health")
    def ping(self) -> bool:
        return True


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
    gpus_per_replica: int = 1,
    rank_timeout_s: float = RANK_TIMEOUT_S,
):
    """The bound Ray Serve application (what serve.run takes): `replicas` replicas of KontextDeployment, each
    loading Pipeline.load(spec) (spec: a kontext_rt.LoadSpec, or a dict of from_pretrained's arguments), or, with
    `autoscaling` (Ray's autoscaling_config: min_replicas, max_replicas, initial_replicas,
    target_ongoing_requests), as many as Ray's autoscaler decides.

    A CUDA device takes one GPU per replica (Ray picks it and makes it the replica's only visible device, so the
    replica loads on "cuda"); a CPU replica takes `num_cpus` CPUs and no GPU. A replica accepts up to
    max_queue + max_batch requests (its own queue and one batch); more wait in Ray's proxy for a free replica.

    gpus_per_replica N > 1: each replica is a sequence-parallel group of N ranks (the module docstring), N GPUs on
    CUDA (one node), N ranks of num_cpus each on the CPU; rank_timeout_s: how long a rank waits for the others."""
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
    if isinstance(gpus_per_replica, bool) or not isinstance(gpus_per_replica, int) or gpus_per_replica < 1:
        raise InputError(f"gpus_per_replica must be a positive integer, got {gpus_per_replica!r}")
    if isinstance(rank_timeout_s, bool) or not isinstance(rank_timeout_s, (int, float)) or not rank_timeout_s > 0:
        raise InputError(f"rank_timeout_s must be a positive number of seconds, got {rank_timeout_s!r}")
    on_cuda = str(spec.device).startswith("cuda")
    if on_cuda:
        spec = dataclasses.replace(spec, device="cuda")  # the replica sees only the GPU Ray gave it
    options = {
        "ray_actor_options": {"num_gpus": 1 if on_cuda else 0, "num_cpus": num_cpus},
        "max_ongoing_requests": settings.max_queue + settings.max_batch,
    }
    ranks = None
    if gpus_per_replica > 1:
        spec.check_sharded(gpus_per_replica)  # TensorRT engines: before any replica starts
        ranks = Ranks(gpus_per_replica, float(rank_timeout_s), num_cpus)
        bundle = {"CPU": num_cpus, "GPU": 1} if on_cuda else {"CPU": num_cpus}
        options["placement_group_bundles"] = [bundle] * gpus_per_replica  # the first one is the replica's
        options["placement_group_strategy"] = "STRICT_PACK"  # one node: the all-to-alls of every layer stay on it
    if autoscaling is not None:
        options["autoscaling_config"] = _autoscaling(autoscaling)
    else:
        options["num_replicas"] = replicas
    return KontextDeployment.options(**options).bind(spec, settings, ranks)


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
    gpus_per_replica: int = 1,
    rank_timeout_s: float = RANK_TIMEOUT_S,
):
    """Start Serve's HTTP proxy on host:port (on a Ray instance already initialised: ray.init) and run the app
    there; returns once every replica has loaded its pipeline. serve.shutdown() stops it."""
    app = build_app(spec, settings, replicas, autoscaling, num_cpus, gpus_per_replica, rank_timeout_s)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(app, name=name, route_prefix=route_prefix)
