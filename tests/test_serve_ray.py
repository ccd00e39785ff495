"""`kontext-rt serve --ray`: the app as two Ray Serve replicas on a local CPU Ray instance, behind Ray's HTTP proxy.

The pixels come back equal to the same Pipeline called directly in this process; requests reach both replicas (each
names itself in x-kontext-replica); a replica killed while it runs requests is replaced, and every request in flight
gets an answer: its image, or a 5xx with a JSON error body. The Ray tests are slow (Ray starts in ~10 s, each replica
loads its own pipeline) and skip without ray installed; the CLI's refusals run everywhere.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from kontext_rt import Pipeline
from kontext_rt.serve import Settings
from kontext_rt.serve.metrics import Metrics
from kontext_rt.serve.scheduler import Scheduler
from tests.test_serve import PROMPT, call, client, decoded, pixels, png, wait_for

REPLICAS = 2
CPUS_PER_REPLICA = 1
SLOW = {"prompt": "a slow fox", "size": "256x256", "steps": 48, "seed": 11}  # seconds on one CPU
FAST = {"prompt": "a red fox", "size": "32x32", "steps": 2}


@contextlib.contextmanager
def replica_threads():
    """Torch on as many threads as a replica: Ray gives a 1-CPU actor OMP_NUM_THREADS=1, and a CPU matmul split over
    another thread count may round differently (seen: 1 in 255 on a pixel), so the direct reference runs alike."""
    before = torch.get_num_threads()
    torch.set_num_threads(CPUS_PER_REPLICA)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_actors(ray) -> dict[str, dict]:
    """{replica id: its named actor} of the running Serve replicas (Serve names them SERVE_REPLICA::app#dep#id)."""
    named = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"].rsplit("#", 1)[-1]: a for a in named if a["name"].startswith("SERVE_REPLICA::")}


def ongoing_requests(ray, actors: dict[str, dict]) -> dict[str, int]:
    """{replica id: the requests it has accepted and not finished}, as Serve counts them (its replicas answer this on
    a thread of their own, so a replica busy with a batch answers at once)."""
    handles = {rid: ray.get_actor(a["name"], namespace=a["namespace"]) for rid, a in actors.items()}
    return {rid: ray.get(h.get_num_ongoing_requests.remote(), timeout=30) for rid, h in handles.items()}


def generate(port, body: dict, timeout: float = 120):
    return call(port, "POST", "/v1/images/generations", json.dumps(body).encode(), {"Content-Type": "application/json"},
                timeout)  # fmt: skip


def fast_pixels(pipe) -> list[np.ndarray]:
    with replica_threads():
        return [pixels(pipe.generate(FAST["prompt"], width=32, height=32, steps=2, seed=i)) for i in range(4)]


def concurrently(fn, args_list):
    with concurrent.futures.ThreadPoolExecutor(len(args_list)) as pool:
        return list(pool.map(lambda a: fn(*a), args_list))


@pytest.fixture(scope="module")
def ray_port(kontext_dir):
    ray = pytest.importorskip("ray")
    from ray import serve

    from kontext_rt.serve import ray_app

    ray.init(
        num_cpus=REPLICAS
        * CPUS_PER_REPLICA,  # one CPU per replica: a replacement fits once the killed one's CPU is freed
        include_dashboard=False,
        logging_level="warning",
        runtime_env={"env_vars": ray_app.proxy_env()},
    )
    try:
        port = free_port()
        settings = Settings(max_steps=64)
        ray_app.deploy({"path": str(kontext_dir)}, settings, REPLICAS, port=port, num_cpus=CPUS_PER_REPLICA)
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def pipe(kontext_dir):
    return Pipeline.from_pretrained(kontext_dir)


@pytest.fixture(scope="module")
def picture():
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))


@pytest.mark.slow
def test_openai_client_through_the_ray_proxy_equals_the_pipeline(ray_port, pipe, picture):
    c = client(ray_port)
    extra = {"steps": 2, "seed": 3, "auto_resize": False}
    r = c.images.edit(image=("a.png", png(picture), "image/png"), prompt=PROMPT, size="64x48", extra_body=extra)
    with replica_threads():
        want = pipe.edit(picture, PROMPT, width=64, height=48, steps=2, seed=3, auto_resize=False)
    assert np.array_equal(pixels(decoded(r.data[0].b64_json)), pixels(want))

    r = c.images.generate(prompt="a red fox", size="32x32", extra_body={"steps": 2, "seed": 7})
    with replica_threads():
        want = pipe.generate("a red fox", width=32, height=32, steps=2, seed=7)
    assert np.array_equal(pixels(decoded(r.data[0].b64_json)), pixels(want))


@pytest.mark.slow
def test_concurrent_requests_are_spread_over_both_replicas(ray_port, pipe):
    import ray

    running = set(replica_actors(ray))
    assert len(running) == REPLICAS
    fast = fast_pixels(pipe)
    seen = set()
    # Ray's proxy routes each to the replica reporting the shorter queue, from probes and a cache of them: four at once
    # usually reach both, yet a round may put all four on one (seen 4 in 12 rounds on a busy 2-core machine)
    for _ in range(20):
        answers = concurrently(generate, [(ray_port, {**FAST, "seed": i}) for i in range(4)])
        for i, (status, headers, body) in enumerate(answers):
            assert status == 200, body
            assert np.array_equal(pixels(decoded(body["data"][0]["b64_json"])), fast[i])
            seen.add(headers["x-kontext-replica"])
        if seen == running:
            break
    assert seen == running, f"20 rounds of 4 concurrent requests reached only {seen} of {running}"


@pytest.mark.slow
def test_a_killed_replica_is_replaced_and_its_requests_are_answered(ray_port, pipe):
    import ray
    from ray import serve

    before = replica_actors(ray)
    counts = {}

    def accepted():  # every slow request is on a replica (not still in Ray's proxy, being routed)
        counts.update(ongoing_requests(ray, before))
        return sum(counts.values()) == 4

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(generate, ray_port, SLOW) for _ in range(4)]
        wait_for(accepted, "the replicas to accept the 4 slow requests", timeout=60)
        assert not any(f.done() for f in futures), "the slow requests ended before the kill: make them slower"
        # the victim is a replica running some: Ray's proxy spreads them by the queue lengths the replicas report,
        # usually 2 and 2, but on a busy machine a replica slow to answer gets fewer, or none
        victim = max(sorted(counts), key=counts.get)
        ray.kill(ray.get_actor(before[victim]["name"], namespace=before[victim]["namespace"]), no_restart=True)
        answers = [f.result(timeout=120) for f in futures]  # every request answered, none hangs
    with replica_threads():
        want = pixels(pipe.generate(SLOW["prompt"], width=256, height=256, steps=48, seed=11))
    failed = 0
    for status, headers, body in answers:
        if status == 200:
            assert headers["x-kontext-replica"] != victim
            assert np.array_equal(pixels(decoded(body["data"][0]["b64_json"])), want)
        else:
            assert status >= 500 and isinstance(body, dict), (status, body)  # parsed JSON, not plain text
            assert body["error"]["type"] == "server_error" and body["error"]["message"]
            failed += 1
    assert failed >= 1, f"no request was running on the killed replica {victim} (requests on each: {counts})"

    seen = {}

    def replaced():
        seen["replicas"] = sorted(replica_actors(ray))
        seen["states"] = serve.status().applications["kontext-rt"].deployments["KontextDeployment"].replica_states
        return (
            victim not in seen["replicas"]
            and len(seen["replicas"]) == REPLICAS
            and seen["states"] == {"RUNNING": REPLICAS}
        )

    # Serve sees the death at its next health check (every 5 s), then starts a process that loads a pipeline: seconds
    # on an idle machine, a minute or more on a busy one
    try:
        wait_for(replaced, f"Ray Serve to replace the killed replica {victim}", timeout=240)
    except AssertionError as e:
        raise AssertionError(f"{e}; last seen: {seen}") from None
    answers = concurrently(generate, [(ray_port, {**FAST, "seed": i}) for i in range(4)])
    fast = fast_pixels(pipe)
    for i, (status, headers, body) in enumerate(answers):
        assert status == 200, body
        assert headers["x-kontext-replica"] in replica_actors(ray)
        assert np.array_equal(pixels(decoded(body["data"][0]["b64_json"])), fast[i])


@pytest.mark.slow
def test_health_check_raises_unless_the_worker_runs():
    pytest.importorskip("ray")
    from kontext_rt.serve.ray_app import check_worker

    sched = Scheduler(object(), max_queue=1, max_batch=1, metrics=Metrics())
    with pytest.raises(RuntimeError, match="worker thread is not running"):
        check_worker(sched, "r1")  # not started
    sched.start()
    check_worker(sched, "r1")
    sched.close()
    with pytest.raises(RuntimeError, match="worker thread is not running"):
        check_worker(sched, "r1")  # finished


# ---- the command line: these need no Ray ------------------------------------------------------------------------


def test_ray_without_ray_installed_is_one_error_line(kontext_dir):
    code = "import sys\nsys.modules['ray'] = None  # as if ray were not installed\nfrom kontext_rt.cli import main\n"
    argv = ["serve", "--ray", "--replicas", "2", "--checkpoint", str(kontext_dir)]
    r = subprocess.run([sys.executable, "-c", code + "sys.exit(main(sys.argv[1:]))", *argv], capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == 'error: --ray needs Ray Serve: pip install "kontext-rt[ray]"'


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--replicas", "2"], "need --ray"),
        (["--ray", "--autoscale-min", "1"], "both --autoscale-min and --autoscale-max"),
        (["--ray", "--autoscale-min", "3", "--autoscale-max", "2"], "below --autoscale-min"),
        (["--ray", "--replicas", "2", "--autoscale-min", "1", "--autoscale-max", "2"], "no --replicas"),
        (["--ray", "--replicas", "0"], "--replicas"),
        (["--gpus-per-replica", "2"], "--gpus-per-replica needs --ray"),
        (["--rank-timeout-s", "5"], "--rank-timeout-s needs --ray"),
        (["--ray", "--rank-timeout-s", "5"], "--rank-timeout-s is for --gpus-per-replica N > 1"),
        (["--ray", "--gpus-per-replica", "3"], "parallel=3 does not divide the model's 2 attention heads"),
        (["--ray", "--gpus-per-replica", "2", "--backend", "tensorrt"], "no place for the all-to-alls"),
        (["--ray", "--gpus-per-replica", "0"], "--gpus-per-replica"),
    ],
)
def test_ray_flags_are_checked_before_ray_starts(kontext_dir, flags, message, monkeypatch, capsys):
    from kontext_rt.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # refused before ray is imported
    assert main(["serve", "--checkpoint", str(kontext_dir), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
