"""Serves VPTM tasks on one backbone over HTTP with Ray Serve: tasks loaded by name on first use, the requests of every
client gathered into mixed-task batches (one backbone pass each), replicas and clusters as Ray Serve runs them.

    python examples/serve_ray.py --backbone vptm:tiny-beit-fashion-mnist --task fashion=runs/vptm --port 8000
    python examples/serve_ray.py --backbone vptm:tiny-beit-fashion-mnist --task_root tasks/ --replicas 2
    curl -s -X POST "http://127.0.0.1:8000/?tasks=fashion&top_k=3" --data-binary @space/examples/bag.png

It starts Ray on this machine (or joins the cluster at `--address`/`RAY_ADDRESS`), listens on `--host:--port` and
serves until interrupted. `serve run modeling_vptm.serving.ray_app:build backbone=... task_root=...`, or a Serve
config file, runs the same application (docs/serving.md). Needs Ray Serve: `pip install -e ".[serve]"`.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading

from modeling_vptm.shipped import SHIPPED_BACKBONE
from modeling_vptm.standalone import positive_int, run


def port(text: str) -> int:
    """An argparse type: a TCP port, 1 to 65535."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default=SHIPPED_BACKBONE, help="The backbone every task was trained on.")
    parser.add_argument("--revision", default=None, help="The backbone's revision on the Hub.")
    parser.add_argument("--task", action="append", default=[], help="NAME=prompt checkpoint (folder or Hub id).")
    parser.add_argument("--task_root", default=None, help="A folder of prompt checkpoints, each task its folder.")
    parser.add_argument(
        "--allow_hub_tasks", action="store_true", help="Also serve Hub repositories named 'namespace/name@<commit>'."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port, default=8000)
    parser.add_argument("--replicas", type=positive_int, default=1)
    parser.add_argument("--cpus_per_replica", type=positive_float, default=1.0)
    parser.add_argument("--max_batch_size", type=positive_int, default=32)
    parser.add_argument("--batch_wait_timeout_s", type=float, default=0.01)
    parser.add_argument("--task_cache_mb", type=float, default=256.0, help="Task tensors a replica keeps loaded.")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="A Ray cluster to join.")
    args = parser.parse_args(argv)
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ImportError(
            'serving with Ray needs Ray Serve: pip install -e ".[serve]" (or pip install "ray[serve]")'
        ) from None

    from modeling_vptm.serving import parse_named_sources
    from modeling_vptm.serving.ray_app import build

    tasks = parse_named_sources(args.task, names_required=True)
    app = build({"backbone": args.backbone, "revision": args.revision, "tasks": tasks, "task_root": args.task_root,
                 "allow_hub_tasks": args.allow_hub_tasks, "num_replicas": args.replicas,
                 "num_cpus": args.cpus_per_replica, "torch_threads": max(1, int(args.cpus_per_replica)),
                 "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s,
                 "task_cache_mb": args.task_cache_mb})  # fmt: skip
    if args.address is None:  # a Ray of our own on this machine: no usage report, no token to write in ~/.ray
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address=args.address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name="vptm", route_prefix="/", blocking=False)
        print(f"serving {args.backbone} on http://{args.host}:{args.port}/ (POST /, GET /tasks, GET /health)")
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    run(main)
