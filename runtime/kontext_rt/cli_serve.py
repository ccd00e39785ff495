"""`kontext-rt serve`: load one pipeline and serve it over HTTP (kontext_rt.serve) until SIGTERM or Ctrl-C.

The port is bound and every flag checked before the checkpoint loads. SIGTERM drains: the server stops accepting
connections, the queued and running requests finish and are answered, then the process exits 0.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from pathlib import Path

from kontext_rt.cli_args import UsageError, checkpoint_options, finite_float, load_options, nonneg_int, positive_int

SERVE_MODULES = {"fastapi", "starlette", "uvicorn", "multipart", "python_multipart", "prometheus_client", "pydantic"}


def _port(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a port number") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port {v} is not in 0..65535")
    return v


def _positive_float(s: str) -> float:
    v = finite_float(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{s!r} must be a positive number")
    return v


def _serve_parser(sub):
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for edits and generations (loopback default)")
    checkpoint_options(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000; 0: any free port)")
    load_options(s)
    s.add_argument("--text-cache-dir", help="keep text embeddings on disk here too (default: in memory only)")
    s.add_argument(
        "--context-cache",
        type=nonneg_int,
        default=16,
        metavar="N",
        help="context images' latents kept by content, so a photo edited many times is encoded once (default 16; "
        "0: off)",
    )
    s.add_argument("--max-queue", type=positive_int, default=16, help="queued requests before 429 (default 16)")
    s.add_argument("--max-batch", type=positive_int, default=4, help="requests run together (default 4)")
    s.add_argument("--max-upload-mb", type=_positive_float, default=50.0, help="request body limit (default 50)")
    s.add_argument(
        "--timeout-s", type=_positive_float, default=600.0, help="a request queued this long gets 503 (default 600)"
    )
    s.add_argument("--max-images", type=positive_int, default=4, help="context images per edit (default 4)")
    s.add_argument("--max-steps", type=positive_int, default=100, help="denoising steps per request (default 100)")
    s.add_argument(
        "--safety",
        metavar="MODULE:CALLABLE",
        help="run CALLABLE(image) -> (allowed, reason) on every output; a flagged image is not returned",
    )
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    r = s.add_argument_group("scale-out on Ray Serve (the ray extra)")
    r.add_argument("--ray", action="store_true", help="serve N Ray Serve replicas, one pipeline (and GPU) each")
    r.add_argument("--replicas", type=positive_int, help="replicas with --ray (default 1)")
    r.add_argument("--autoscale-min", type=nonneg_int, help="with --ray: let Ray scale between min and max")
    r.add_argument("--autoscale-max", type=positive_int, help="with --ray: the most replicas Ray may start")
    r.add_argument("--ray-address", help="with --ray: a running Ray cluster to join (default: a local instance)")
    r.add_argument(
        "--gpus-per-replica",
        type=positive_int,
        default=1,
        metavar="N",
        help="with --ray: each replica is one sequence-parallel group of N ranks, one GPU each on one node (N divides "
        "the attention heads: 24 -> 2, 3, 4, 6, 8, 12, 24; on the CPU, N processes); default 1",
    )
    r.add_argument(
        "--rank-timeout-s",
        type=_positive_float,
        help="with --gpus-per-replica N > 1: how long a rank waits for the others (a collective, the end of a batch) "
        "before the request fails and the replica is replaced (default 300)",
    )


def _serve(args) -> int:
    try:
        import uvicorn

        from kontext_rt.serve import Settings, create_app
        from kontext_rt.serve import safety as serve_safety
    except ModuleNotFoundError as e:
        if e.name not in SERVE_MODULES:
            raise
        raise UsageError(
            f'serve needs the serve extra ({e.name} is missing): pip install "kontext-rt[serve]"'
        ) from None
    import kontext_rt as krt
    from kontext_rt.cli import load_spec
    from kontext_rt.cli_args import check_writable, quiet_libraries, speed_summary
    from kontext_rt.load_checks import check_device
    from kontext_rt.placement import Placement

    settings = Settings(
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        max_upload_mb=args.max_upload_mb,
        timeout_s=args.timeout_s,
        max_images=args.max_images,
        max_steps=args.max_steps,
        safety=None if args.safety is None else serve_safety.load(args.safety),
    )
    if args.device is not None:
        check_device(args.device)
    Placement.parse(args.placement)
    if args.text_cache_dir is not None:
        folder = Path(args.text_cache_dir)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--text-cache-dir {folder}: cannot create it ({e.strerror or e})") from None
        check_writable(folder, f"--text-cache-dir {folder}")
    if args.ray:
        return _serve_ray(args, settings)
    if args.replicas or args.autoscale_min is not None or args.autoscale_max or args.ray_address:
        raise UsageError("--replicas, --autoscale-min, --autoscale-max and --ray-address need --ray")
    for flag, given in (("--gpus-per-replica", args.gpus_per_replica > 1), ("--rank-timeout-s", args.rank_timeout_s)):
        if given:
            raise UsageError(f"{flag} needs --ray (without it, serve runs one pipeline in one process)")
    sock = _bind(args.host, args.port)  # a port in use is refused before minutes of loading
    quiet_libraries()
    spec = load_spec(args, args.text_cache_dir, args.variant, context_cache_size=args.context_cache)
    pipe = krt.Pipeline.load(spec)
    config = uvicorn.Config(create_app(pipe, settings), log_level=args.log_level)
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    speed = speed_summary(spec.optimize, spec.loras)
    where = f"http://{host}:{port} ({pipe.backend}, {spec.device}; {speed})"
    print(f"serving {args.checkpoint} on {where}", file=sys.stderr)
    # uvicorn restores the handlers it found and raises the signal it stopped on again: a SIGTERM that was
    # handled (the queue drained) then reaches this no-op instead of killing the process, and the exit status is 0
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if server.started else 1


def _serve_ray(args, settings) -> int:
    """Run the app as Ray Serve replicas behind Ray's HTTP proxy on --host/--port until SIGTERM (exit 0) or Ctrl-C
    (130), then take the app down: serve.shutdown() on the local instance, only this app on a joined cluster."""
    autoscaling = None
    if args.autoscale_min is not None or args.autoscale_max is not None:
        if args.autoscale_min is None or args.autoscale_max is None or args.replicas is not None:
            raise UsageError("autoscaling takes both --autoscale-min and --autoscale-max, and no --replicas")
        if args.autoscale_max < args.autoscale_min:
            raise UsageError(f"--autoscale-max {args.autoscale_max} is below --autoscale-min {args.autoscale_min}")
        autoscaling = {"min_replicas": args.autoscale_min, "max_replicas": args.autoscale_max}
    if args.rank_timeout_s is not None and args.gpus_per_replica == 1:
        raise UsageError("--rank-timeout-s is for --gpus-per-replica N > 1 (the ranks of one replica)")
    from kontext_rt.cli import load_spec

    spec = load_spec(args, args.text_cache_dir, args.variant, context_cache_size=args.context_cache)
    if args.gpus_per_replica > 1:
        spec.check_sharded(args.gpus_per_replica)
    if args.ray_address is None:  # the replicas load from this machine: a bad path is refused before Ray starts
        from kontext_rt.weights.formats import detect

        found = detect(args.checkpoint, ae=args.ae, text_encoders=args.text_encoders)
        if args.gpus_per_replica > 1:  # the heads it must divide, with the pipeline's own refusal
            from kontext_rt import Parallel, load_checks

            cfg = load_checks.checkpoint(found, None, None, args.variant)[1]
            Parallel(args.gpus_per_replica).check_model(cfg.num_heads)
    try:
        import ray
        from ray import serve

        from kontext_rt.serve import ray_app
    except ModuleNotFoundError as e:
        if e.name != "ray" and not (e.name or "").startswith("ray."):
            raise
        raise UsageError('--ray needs Ray Serve: pip install "kontext-rt[ray]"') from None
    from kontext_rt.cli_args import quiet_libraries, speed_summary

    sock = _bind(args.host, args.port)  # Ray's proxy binds it; this refuses a port in use, and picks one for 0
    host, port = sock.getsockname()[:2]
    sock.close()
    quiet_libraries()
    ray.init(address=args.ray_address, runtime_env={"env_vars": ray_app.proxy_env()}, logging_level=args.log_level)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        try:
            ray_app.deploy(
                spec,
                settings,
                args.replicas or 1,
                autoscaling,
                host,
                port,
                gpus_per_replica=args.gpus_per_replica,
                rank_timeout_s=args.rank_timeout_s or ray_app.RANK_TIMEOUT_S,
            )
        except RuntimeError as e:  # a replica could not load: Ray has logged its traceback above
            raise UsageError(f"the Ray Serve replicas did not start ({e})") from None
        count = f"{autoscaling['min_replicas']}..{autoscaling['max_replicas']}" if autoscaling else args.replicas or 1
        ranks = f" of {args.gpus_per_replica} ranks" if args.gpus_per_replica > 1 else ""
        print(
            f"serving {args.checkpoint} on http://{host}:{port} ({count} Ray Serve replicas{ranks}, {spec.device}; "
            f"{speed_summary(spec.optimize, spec.loras)})",
            file=sys.stderr,
        )
        while not stop.wait(1.0):  # Ctrl-C raises KeyboardInterrupt here: main() exits 130
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if args.ray_address is None:
            serve.shutdown()
        else:
            serve.delete(ray_app.APP_NAME)
        ray.shutdown()
    return 0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock
