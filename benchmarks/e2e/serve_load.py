"""Load test of `kontext-rt serve` on loopback: latency, throughput, 429s under a burst, and abandoned requests.

    python benchmarks/e2e/serve_load.py                          # the demo checkpoint: a new run folder in results/
    python benchmarks/e2e/serve_load.py --checkpoint DIR --device cuda --out ...   # a real one
    python benchmarks/e2e/serve_load.py --smoke --out /tmp/serve-load.json         # seconds: checks the script

The server runs in this process (uvicorn on 127.0.0.1, a free port) over one loaded pipeline; clients are threads
speaking HTTP (http.client), so nothing leaves the machine. Three parts, each writes its figures into one JSON:
- `mixed`: K clients x M requests each, edits and generations alternating (each client its own seeds), at
  --max-batch 1 and 4 in turn, on the same pipeline: every request must get an answer (none lost, no 5xx);
  p50/p99 latency and throughput per setting.
- `burst`: more requests at once than --max-queue holds (plus the one running): the extra ones must get 429 with
  Retry-After at once, none an error or a hang.
- `abandon`: a long request whose client hangs up once it runs, then a short one: the short one must end before
  the long one would have (its time alone, measured first), since the abandoned batch stops at a step.
On the CPU with the demo's tiny random model these are the server's own overheads and scheduling, not model speed.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent  # benchmarks/e2e/
sys.path.insert(0, str(HERE.parent))  # the timer and the results' run folders, by plain name
import run_folder  # noqa: E402
from timing import Stopwatch, percentile  # noqa: E402


def _post(port, path, body: bytes, content_type: str, timeout: float) -> tuple[int, dict, float]:
    import http.client

    watch = Stopwatch()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        r = conn.getresponse()
        data = r.read()
        return r.status, {"retry_after": r.getheader("retry-after"), "body": data[:200]}, watch.elapsed_s()
    except OSError as e:  # a timeout or a reset: a lost request
        return -1, {"error": f"{type(e).__name__}: {e}"}, watch.elapsed_s()
    finally:
        conn.close()


def _png(seed: int, size: tuple[int, int]) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _multipart(fields: dict, image: bytes) -> tuple[bytes, str]:
    b = "kontextrtloadboundary"
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    head = f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="i.png"\r\n'
    parts.append(head.encode() + b"Content-Type: image/png\r\n\r\n" + image + b"\r\n")
    return b"".join(parts) + f"--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


def request(port, kind: str, seed: int, size: int, steps: int, timeout: float):
    """One edit or generation at size x size."""
    if kind == "edit":
        fields = {
            "prompt": "make it red",
            "size": f"{size}x{size}",
            "steps": steps,
            "seed": seed,
            "auto_resize": "false",
        }
        body, ctype = _multipart(fields, _png(seed, (size, size)))
        return _post(port, "/v1/images/edits", body, ctype, timeout)
    body = json.dumps({"prompt": "a red fox", "size": f"{size}x{size}", "steps": steps, "seed": seed}).encode()
    return _post(port, "/v1/images/generations", body, "application/json", timeout)


def mixed(pipe, clients: int, per_client: int, max_batch: int, size: int, steps: int, timeout: float) -> dict:
    from kontext_rt.serve import Settings, create_app
    from kontext_rt.serve.background import serving

    app = create_app(pipe, Settings(max_queue=clients * per_client, max_batch=max_batch))
    with serving(app) as port:
        for kind in ("edit", "generate"):  # warm-up: the text encoders and the prompts' embeddings, first runs
            request(port, kind, 0, size, steps, timeout)

        def client(c):
            return [
                request(port, ("edit", "generate")[i % 2], 1000 * c + i, size, steps, timeout)
                for i in range(per_client)
            ]

        watch = Stopwatch()
        with ThreadPoolExecutor(clients) as pool:
            results = [r for rs in pool.map(client, range(clients)) for r in rs]
        wall = watch.elapsed_s()
        metrics = _metrics(port)
    statuses = [s for s, _, _ in results]
    latencies = [t for s, _, t in results if s == 200]
    return {
        "max_batch": max_batch,
        "requests": len(results),
        "ok": statuses.count(200),
        "lost": statuses.count(-1),
        "server_errors": sum(s >= 500 for s in statuses),
        "other": sorted({s for s in statuses if s not in (200, -1) and s < 500}),
        "wall_s": wall,
        "throughput_rps": len(latencies) / wall,
        "latency_p50_s": percentile(latencies, 0.5) if latencies else None,
        "latency_p99_s": percentile(latencies, 0.99) if latencies else None,
        "mean_batch_size": _mean_batch(metrics),
    }


def _metrics(port) -> str:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def _mean_batch(text: str) -> float | None:
    values = {}
    for line in text.splitlines():
        for name in ("kontext_rt_batch_size_sum", "kontext_rt_batch_size_count"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[-1])
    count = values.get("kontext_rt_batch_size_count", 0)
    return values.get("kontext_rt_batch_size_sum", 0) / count if count else None


def burst(pipe, max_queue: int, size: int, steps: int, timeout: float) -> dict:
    from kontext_rt.serve import Settings, create_app
    from kontext_rt.serve.background import serving

    n = 3 * (max_queue + 1)
    app = create_app(pipe, Settings(max_queue=max_queue, max_batch=1))
    with serving(app) as port:
        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(lambda i: request(port, "generate", i, size, steps, timeout), range(n)))
    statuses = [s for s, _, _ in results]
    rejected = [(r, t) for s, r, t in results if s == 429]
    return {
        "requests": n,
        "max_queue": max_queue,
        "ok": statuses.count(200),
        "rejected_429": len(rejected),
        "rejected_with_retry_after": sum(r["retry_after"] is not None for r, _ in rejected),
        "slowest_429_s": max((t for _, t in rejected), default=None),
        "lost": statuses.count(-1),
        "server_errors": sum(s >= 500 for s in statuses),
    }


def abandon(pipe, size: int, long_steps: int, timeout: float) -> dict:
    from kontext_rt.serve import Settings, create_app
    from kontext_rt.serve.background import serving

    app = create_app(pipe, Settings(max_batch=1, max_steps=long_steps))
    with serving(app) as port:
        request(port, "generate", 1, size, long_steps, timeout)  # warm-up: the text encoders, the first run
        _, _, alone = request(port, "generate", 1, size, long_steps, timeout)  # the long request's time alone
        body = json.dumps({"prompt": "a red fox", "size": f"{size}x{size}", "steps": long_steps, "seed": 2}).encode()
        watch = Stopwatch()  # from the long request's start
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(
                b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            time.sleep(min(0.5, alone / 4))  # let it start
        status, _, short = request(port, "generate", 3, size, 1, timeout)
        done = watch.elapsed_s()
        metrics = _metrics(port)
    disconnected = 0.0
    for line in metrics.splitlines():
        if line.startswith('kontext_rt_rejections_total{reason="disconnected"} '):
            disconnected = float(line.split()[-1])
    return {
        "long_steps": long_steps,
        "long_alone_s": alone,
        "short_status": status,
        "short_done_after_s": done,  # from the long request's start: less than long_alone_s when it was stopped
        "freed_before_the_long_would_have_ended": done < alone,
        "disconnected_counted": disconnected,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/<device>-serve-load-<date>/)")
    ap.add_argument(
        "--checkpoint", help="a checkpoint folder (default: the demo's tiny random one, written to a temp dir)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=6, help="per client")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--smoke", action="store_true", help="tiny numbers: checks the script in seconds")
    args = ap.parse_args(argv)
    if args.smoke:
        if args.out is None or run_folder.in_results(args.out):
            ap.error("--smoke measures nothing: give --out outside benchmarks/results")
        args.clients, args.requests, args.steps, args.size = 2, 2, 1, 32
    if args.out is not None:
        run_folder.check_out(args.out)
    started = run_folder.now_utc()
    import torch

    import kontext_rt as krt
    from kontext_toy.checkpoints import demo_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or demo_checkpoint(Path(tmp))
        pipe = krt.Pipeline.from_pretrained(checkpoint, device=args.device)
        timeout = 300.0
        data = {
            "what": __doc__.split("\n")[0],
            "checkpoint": "the demo's tiny random model" if args.checkpoint is None else str(args.checkpoint),
            "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(args.device),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "date": datetime.date.today().isoformat(),
            "smoke": args.smoke,
            "size": args.size,
            "steps": args.steps,
            "clients": args.clients,
            "requests_per_client": args.requests,
            "mixed": [mixed(pipe, args.clients, args.requests, b, args.size, args.steps, timeout) for b in (1, 4)],
            "burst": burst(pipe, 2, args.size, 1 if args.smoke else args.steps, timeout),
            "abandon": abandon(pipe, args.size, 30 if args.smoke else 100, timeout),
        }
    device = data["device"] if args.device != "cpu" else f"cpu-{os.cpu_count()}core"
    out = args.out or run_folder.default_path(device, "serve-load", "serve-load.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    machine = run_folder.host(device=data["device"], torch=torch.__version__)
    run_folder.record(out, data["what"], machine, started, __file__, argv)
    ok = all(m["lost"] == 0 and m["server_errors"] == 0 and m["ok"] == m["requests"] for m in data["mixed"])
    b = data["burst"]
    ok = ok and b["lost"] == 0 and b["server_errors"] == 0 and b["ok"] + b["rejected_429"] == b["requests"]
    ok = ok and b["rejected_429"] > 0 and data["abandon"]["short_status"] == 200
    print(json.dumps({k: data[k] for k in ("mixed", "burst", "abandon")}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
