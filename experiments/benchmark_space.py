"""Concurrent load on the demo Space: many clients, three tasks, one backbone, against one request at a time.

    python experiments/benchmark_space.py --output_dir benchmarks/space-load

Launches ``space/app.py`` on loopback with the shipped backbone and the bundled tasks, then sends the same
``--requests`` classification requests (images from ``space/examples``, tasks in turn) twice through
``gradio_client``: once from ``--clients`` concurrent clients, once from a single client waiting for each answer.
Checks that every concurrent answer equals the single-request answer, and reports both throughputs, their ratio
and the sizes of the batches the backbone ran. Needs the ``demo`` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "space"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max_batch_size", type=int, default=16)
    args = parser.parse_args(argv)

    import app
    from gradio_client import Client, handle_file

    from modeling_vptm import SHIPPED_BACKBONE

    service = app.DemoService(SHIPPED_BACKBONE, app.bundled_tasks())
    batch_sizes: list[int] = []
    classify = service.classify_batch

    def recording(paths, task_lists, top_k=3):
        batch_sizes.append(len(paths))
        return classify(paths, task_lists, top_k)

    service.classify_batch = recording
    demo = app.build_demo(service, max_batch_size=args.max_batch_size).queue()
    _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    images = sorted(str(p) for p in (REPO / "space" / "examples").glob("*.png"))
    tasks = service.task_names
    requests = [(images[k % len(images)], tasks[k % len(tasks)]) for k in range(args.requests)]
    scratch = Path(tempfile.mkdtemp(prefix="vptm-space-load-"))  # what the clients download; not kept

    def new_client(name: str) -> Client:
        return Client(url, verbose=False, download_files=str(scratch / name), analytics_enabled=False)

    try:
        single = new_client("single")
        single.predict(handle_file(images[0]), [tasks[0]], 3, api_name="/classify")  # warm-up, not timed
        batch_sizes.clear()
        start = time.perf_counter()
        alone = [single.predict(handle_file(i), [t], 3, api_name="/classify")[1] for i, t in requests]
        sequential_s = time.perf_counter() - start
        sequential_batches = list(batch_sizes)

        clients = [new_client(f"client{c}") for c in range(args.clients)]
        results: list[dict | None] = [None] * len(requests)
        batch_sizes.clear()

        def user(c: int) -> None:
            jobs = [(k, clients[c].submit(handle_file(i), [t], 3, api_name="/classify"))
                    for k, (i, t) in enumerate(requests) if k % args.clients == c]  # fmt: skip
            for k, job in jobs:
                results[k] = job.result(timeout=600)[1]

        threads = [threading.Thread(target=user, args=(c,)) for c in range(args.clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        concurrent_s = time.perf_counter() - start
    finally:
        demo.close()

    mismatches = 0
    for got, expected in zip(results, alone, strict=True):
        same = got is not None and list(got) == list(expected)
        for task in expected if same else []:
            labels_equal = [p["label"] for p in got[task]] == [p["label"] for p in expected[task]]
            scores_close = all(
                abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(got[task], expected[task], strict=True)
            )
            same = same and labels_equal and scores_close
        mismatches += not same
    summary = {
        "requests": args.requests,
        "clients": args.clients,
        "tasks": tasks,
        "max_batch_size": args.max_batch_size,
        "answered": sum(r is not None for r in results),
        "mismatches": mismatches,
        "sequential_seconds": round(sequential_s, 2),
        "concurrent_seconds": round(concurrent_s, 2),
        "sequential_requests_per_s": round(args.requests / sequential_s, 2),
        "concurrent_requests_per_s": round(args.requests / concurrent_s, 2),
        "throughput_ratio": round(sequential_s / concurrent_s, 2),
        "mean_batch_concurrent": round(sum(batch_sizes) / max(len(batch_sizes), 1), 2),
        "max_batch_concurrent": max(batch_sizes, default=0),
        "mean_batch_sequential": round(sum(sequential_batches) / max(len(sequential_batches), 1), 2),
        "machine": machine(),
        "backbone": SHIPPED_BACKBONE,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    if mismatches or summary["answered"] != args.requests:
        raise SystemExit(f"{mismatches} answers differ from the single-request answer; {summary['answered']} answered")
    return summary


if __name__ == "__main__":
    main()
