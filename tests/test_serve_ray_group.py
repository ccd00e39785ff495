"""`kontext-rt serve --ray --gpus-per-replica 2` on the CPU: one Ray Serve replica that is a gloo group of 2 ranks.

The command joins a Ray instance this test process started (--ray-address), so the test can reach the replica's rank
actor. An edit and a generation (no seed: rank 0 draws it for both ranks) answer the openai client with the pixels of
one process running the same requests, to one 8-bit level (tests/test_sequence_parallel.py's CLI bound: the latents
agree within float32 rounding, which the decoder's rounding to 8 bits may put on either side of a level). A rank that
does not run the call (a patch: its run sleeps) fails the request with a 503 rank_failed after --rank-timeout-s, not a
hang; the broken group fails the next request at once, and Ray replaces the replica, whose new group answers again.
A KontextError raised in the run on both ranks (a test's patch of each rank's pipe, through __ray_call__) is a 400
and the group serves the next request; so does a batch whose client goes away during its steps (rank 1 slowed by a
patch), which stops on both ranks at the same step, and a request rank 1's check refuses (a patch) where rank 0's
accepts it, which the check round before the run refuses at once. Slow (Ray, two loads per replica), skipped
without ray.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from kontext_rt import Pipeline
from tests.test_serve import PROMPT, call, client, decoded, pixels, png, wait_for
from tests.test_serve_ray import free_port, generate, replica_threads

RANKS = 2
RANK_TIMEOUT_S = 15  # the rank timeout the server runs with: how long a request waits for a rank that is not there
FAST = {"prompt": "a red fox", "size": "32x32", "steps": 2, "seed": 5}


def rank_actors(ray) -> dict[str, dict]:
    """{replica id: its rank-1 actor} (named kontext-rt-rank1::<replica id> by the replica that started it)."""
    named = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"].split("::", 1)[1]: a for a in named if a["name"].startswith("kontext-rt-rank1::")}


def within_one_level(got: Image.Image, want: Image.Image) -> None:
    a, b = (pixels(x).astype(np.int16) for x in (got, want))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1, np.abs(a - b).max()


@pytest.fixture(scope="module")
def group_port(kontext_dir, tmp_path_factory):
    ray = pytest.importorskip("ray")
    from kontext_rt.serve import ray_app

    ray.init(num_cpus=RANKS, include_dashboard=False, logging_level="warning",
             runtime_env={"env_vars": ray_app.proxy_env()})  # fmt: skip
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    port = free_port()
    argv = [
        "serve", "--checkpoint", str(kontext_dir), "--ray", "--gpus-per-replica", str(RANKS), "--rank-timeout-s",
        str(RANK_TIMEOUT_S), "--ray-address", ray.get_runtime_context().gcs_address, "--port", str(port),
        "--max-steps", "4", "--log-level", "warning",
    ]  # fmt: skip
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "kontext_rt.cli", *argv], stdout=out, stderr=out)
    try:

        def up():
            assert server.poll() is None, log.read_text()
            with contextlib.suppress(OSError):
                return call(port, "GET", "/health", timeout=5)[0] == 200
            return False

        wait_for(up, "the Ray Serve replica of 2 ranks to load", timeout=240)
        yield port
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            assert server.wait(60) == 0, log.read_text()
        finally:
            server.kill()
            ray.shutdown()


@pytest.fixture(scope="module")
def pipe(kontext_dir):
    return Pipeline.from_pretrained(kontext_dir)


@pytest.mark.slow
def test_a_replica_of_two_ranks_answers_the_pixels_of_one_process(group_port, pipe):
    import ray

    # 12 target tokens and 4 context tokens: each rank holds target tokens (rank 1: 4 of them), so its noise counts
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    c = client(group_port)
    extra = {"steps": 2, "seed": 3, "auto_resize": False}
    r = c.images.with_raw_response.edit(
        image=("a.png", png(picture), "image/png"), prompt=PROMPT, size="64x48", extra_body=extra
    )
    assert r.headers["x-kontext-replica"] in rank_actors(ray)  # answered by a replica that has a rank actor
    with replica_threads():
        want = pipe.edit(picture, PROMPT, width=64, height=48, steps=2, seed=3, auto_resize=False)
    within_one_level(decoded(r.parse().data[0].b64_json), want)

    r = c.images.generate(prompt="a red fox", size="32x32", extra_body={"steps": 2})  # rank 0 draws the seed
    with replica_threads():
        want = pipe.generate("a red fox", width=32, height=32, steps=2, seed=r.data[0].seed)
    within_one_level(decoded(r.data[0].b64_json), want)


def _stalling(pipe) -> None:
    """Patch this rank's pipe: its run takes no part in the collectives (it sleeps past the others' timeout)."""
    pipe.run_checked = lambda *args: time.sleep(4 * RANK_TIMEOUT_S)


REFUSED = "a prompt the run refuses"  # the prompt _refusing's run raises a KontextError for, on the rank it patches


def _refusing(pipe) -> None:
    """Patch this rank's pipe: its run raises an InputError (a KontextError) for a batch asking for REFUSED, as a
    pipeline refusing in the run would, on every rank alike."""
    from kontext_rt.errors import InputError

    run = type(pipe).run_checked.__get__(pipe)

    def run_checked(checked, reports, progress):
        if any(c.request.prompt == REFUSED for c in checked):
            raise InputError("refused in the run (a test's patch)")
        return run(checked, reports, progress)

    pipe.run_checked = run_checked


def _unpatch(pipe) -> None:
    pipe.__dict__.pop("run_checked", None)


def _on_rank1(fn):
    return lambda actor: fn(actor.pipe)


def _on_rank0(fn):  # the Serve replica actor -> its KontextDeployment (Ray Serve internals) -> the group's pipe
    return lambda actor: fn(actor._replica_impl._user_callable_wrapper._callable.group.pipe)


def both_ranks(ray, fn) -> str:
    """Run fn(pipe) on rank 0 (the replica) and rank 1 of the one replica; its id."""
    (replica, actor), *_ = rank_actors(ray).items()
    rank1 = ray.get_actor(actor["name"], namespace=actor["namespace"])
    (rank0,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(replica)
                and a["name"].startswith("SERVE_REPLICA::")]  # fmt: skip
    rank0 = ray.get_actor(rank0["name"], namespace=rank0["namespace"])
    ray.get([rank0.__ray_call__.remote(_on_rank0(fn)), rank1.__ray_call__.remote(_on_rank1(fn))], timeout=30)
    return replica


@pytest.mark.slow
def test_a_request_the_run_refuses_on_every_rank_leaves_the_group_serving(group_port, pipe):
    import ray

    replica = both_ranks(ray, _refusing)
    try:
        t0 = time.monotonic()
        status, headers, body = generate(group_port, {**FAST, "prompt": REFUSED})
        assert status == 400 and "refused in the run" in body["error"]["message"], (status, body)
        assert headers["x-kontext-replica"] == replica
        assert time.monotonic() - t0 < RANK_TIMEOUT_S / 3  # every rank refused: nobody waited for the others
        status, headers, body = generate(group_port, FAST)
        assert status == 200, body
        assert headers["x-kontext-replica"] == replica  # the same group, still serving
    finally:
        both_ranks(ray, _unpatch)
    with replica_threads():
        want = pipe.generate(FAST["prompt"], width=32, height=32, steps=2, seed=FAST["seed"])
    within_one_level(decoded(body["data"][0]["b64_json"]), want)


def _refusing_check(pipe) -> None:
    """Patch this rank's pipe: its check refuses a request asking for REFUSED (rank 0's accepts it)."""
    from kontext_rt.errors import InputError

    check = type(pipe).check.__get__(pipe)

    def refusing(request):
        if getattr(request, "prompt", None) == REFUSED:
            raise InputError("rank 1's check refuses it (a test's patch)")
        return check(request)

    pipe.check = refusing


def _unpatch_check(actor) -> None:
    actor.pipe.__dict__.pop("check", None)


@pytest.mark.slow
def test_a_rank_refusing_what_rank_0_accepted_fails_the_batch_at_once_and_the_group_serves(group_port):
    import ray

    (replica, actor), *_ = rank_actors(ray).items()
    rank1 = ray.get_actor(actor["name"], namespace=actor["namespace"])
    ray.get(rank1.__ray_call__.remote(_on_rank1(_refusing_check)), timeout=30)
    try:
        t0 = time.monotonic()
        status, headers, body = generate(group_port, {**FAST, "prompt": REFUSED}, timeout=4 * RANK_TIMEOUT_S)
        assert status == 400, (status, body)
        want = "rank 1 of the sequence-parallel group refuses the batch: rank 1's check refuses it"
        assert body["error"]["message"].startswith(want), body
        assert headers["x-kontext-replica"] == replica
        assert time.monotonic() - t0 < RANK_TIMEOUT_S / 3  # the check round refused it: no collective waited
    finally:
        ray.get(rank1.__ray_call__.remote(_unpatch_check), timeout=30)
    status, headers, body = generate(group_port, FAST)
    assert status == 200, body
    assert headers["x-kontext-replica"] == replica


STEP_S = 1.5  # how long _slow_steps makes each step last (rank 1 arrives late at each step's broadcast)


def _slow_steps(actor) -> None:
    """Patch rank 1: each step lasts STEP_S more (rank 0 waits for it in the step's broadcast), and actor.steps
    records the (done, total) of each step it followed and how its run ended."""
    pipe, actor.steps = actor.pipe, []
    run = type(pipe).run_checked.__get__(pipe)

    def run_checked(checked, reports, progress):
        def follow(done, total):
            time.sleep(STEP_S)
            actor.steps.append((done, total))
            progress(done, total)

        try:
            return run(checked, reports, follow)
        except Exception as e:
            actor.steps.append(type(e).__name__)
            raise

    pipe.run_checked = run_checked


def _steps(actor) -> list:
    _unpatch(actor.pipe)
    return actor.steps


@pytest.mark.slow
def test_a_batch_its_client_abandons_stops_on_every_rank_and_the_group_serves(group_port):
    import ray

    (replica, actor), *_ = rank_actors(ray).items()
    rank1 = ray.get_actor(actor["name"], namespace=actor["namespace"])
    ray.get(rank1.__ray_call__.remote(_slow_steps), timeout=30)
    with pytest.raises(TimeoutError):  # the client goes away during the second step (4 steps, STEP_S each)
        generate(group_port, {**FAST, "steps": 4}, timeout=1.5 * STEP_S)
    steps = ray.get(rank1.__ray_call__.remote(_steps), timeout=4 * STEP_S + RANK_TIMEOUT_S)  # once its run ended
    assert steps[-1] == "Stopped" and 1 <= len(steps) - 1 < 4, steps  # rank 0 stopped it after a step, not the last
    t0 = time.monotonic()
    status, headers, body = generate(group_port, FAST)
    assert status == 200, body
    assert headers["x-kontext-replica"] == replica  # the same group, in step
    assert time.monotonic() - t0 < RANK_TIMEOUT_S / 3


@pytest.mark.slow
def test_a_rank_that_does_not_run_the_call_fails_the_request_and_the_replica_is_replaced(group_port, pipe):
    import ray

    (replica, actor), *_ = rank_actors(ray).items()
    rank1 = ray.get_actor(actor["name"], namespace=actor["namespace"])
    ray.get(rank1.__ray_call__.remote(_on_rank1(_stalling)), timeout=30)  # it checks the batch, then does not run it
    t0 = time.monotonic()
    status, headers, body = generate(group_port, FAST, timeout=4 * RANK_TIMEOUT_S)
    waited = time.monotonic() - t0
    assert ray.get(rank1.ping.remote(), timeout=5)  # the health check's ping is answered while a call runs
    assert status == 503 and body["error"]["code"] == "rank_failed", (status, body)
    assert headers["x-kontext-replica"] == replica
    assert "out of step: rank 0 failed" in body["error"]["message"], body
    assert "timed out" in body["error"]["message"].lower(), body  # gloo's collective timeout, named
    assert RANK_TIMEOUT_S <= waited < 2 * RANK_TIMEOUT_S, waited
    # the group is broken: the next request fails at once, before Ray replaces the replica (3 failed health checks)
    t0 = time.monotonic()
    status, headers, again = generate(group_port, FAST, timeout=4 * RANK_TIMEOUT_S)
    assert status == 503 and again["error"]["code"] == "rank_failed", (status, again)
    assert headers["x-kontext-replica"] == replica
    assert again["error"]["message"] == body["error"]["message"]  # why the group broke, named again
    assert time.monotonic() - t0 < RANK_TIMEOUT_S / 3  # no second wait for the rank

    def replaced():  # the broken replica's health check raised; Ray started a new one with a new group
        now = rank_actors(ray)
        return replica not in now and len(now) == 1

    wait_for(replaced, "Ray Serve to replace the replica whose rank failed", timeout=180)
    wait_for(lambda: call(group_port, "GET", "/health", timeout=5)[0] == 200, "the new replica", timeout=60)
    status, headers, body = generate(group_port, FAST)
    assert status == 200, body
    assert headers["x-kontext-replica"] != replica
    with replica_threads():
        want = pipe.generate(FAST["prompt"], width=32, height=32, steps=2, seed=FAST["seed"])
    within_one_level(decoded(body["data"][0]["b64_json"]), want)
