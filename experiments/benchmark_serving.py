"""Serving many tasks over HTTP, measured: VPTM's Ray Serve application (each task a prompt checkpoint loaded by name,
the requests of every client gathered into mixed-task batches, one backbone pass each) against PEFT's LoRA served the
best way PEFT allows (every adapter loaded in one `PeftModel`, a mixed batch in one forward with `adapter_names`), on
the same backbone, behind the same Ray Serve batching, under the same load client and task counts.

    python experiments/benchmark_serving.py --output_dir benchmarks/serving-cpu-2core --tasks 1 10 100 1000 \
        --lora_tasks 1 10 100 300 1000    # the published run: about 80 minutes on 2 cores, 50 of them LoRA's start-up
    python experiments/benchmark_serving.py --output_dir /tmp/serving-quick --quick

For each number of distinct tasks, the client sends `--requests` requests (each `--images_per_request` shipped test
images under one task, the task drawn uniformly at random among the tasks, seeded: a client with a batch of its own
images, as a platform's customer sends them) from `--concurrency` threads on 127.0.0.1, after a warm-up that touches
every task once, and stops early at `--max_seconds`; it reports images/s and the p50 and p99 latency of a request.
The LoRA server loads all its adapters when it starts (PEFT's `load_adapter` walks every module of the model, so that
start-up grows with the square of the number of adapters; its time is reported). Writes `results.json`,
`results.md` and (with matplotlib) `serving.png`. Needs the serve and peft extras.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request


os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local Ray: no token written to ~/.ray
os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")

NUM_LABELS = 10


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


# ------------------------------------------------------------------------------------------------------ the tasks
def make_vptm_tasks(root: str, count: int) -> None:
    """`count` distinct prompt checkpoints on the shipped backbone: one trained-looking task, each copy's tensors moved
    by its own seeded noise (config.json and model.safetensors; the server has the package, so no code files)."""
    import torch
    from safetensors.torch import save_file

    from modeling_vptm import SHIPPED_BACKBONE, VPTMForImageClassification

    torch.manual_seed(0)
    model = VPTMForImageClassification.from_backbone(SHIPPED_BACKBONE, num_labels=NUM_LABELS)
    model.save_pretrained(os.path.join(root, "base"))
    tensors = model.task_state_dict()
    for i in range(count):
        folder = os.path.join(root, f"t{i:04d}")
        os.makedirs(folder)
        shutil.copy(os.path.join(root, "base", "config.json"), folder)
        generator = torch.Generator().manual_seed(i)
        moved = {k: (v + 0.3 * torch.randn(v.shape, generator=generator)).contiguous() for k, v in tensors.items()}
        save_file(moved, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def make_lora_adapters(root: str, distinct: int = 3) -> list[str]:
    """`distinct` LoRA adapters of the LoRA baseline (its targets, rank 8, the head in modules_to_save) with moved
    tensors, saved as PEFT saves them; the server loads them again and again under other names."""
    import torch

    from modeling_vptm import SHIPPED_BACKBONE
    from modeling_vptm.training import METHODS, apply_peft, classifier_from_mim, lora_config

    folders = []
    for i in range(distinct):
        torch.manual_seed(i)
        base = classifier_from_mim(SHIPPED_BACKBONE, {k: str(k) for k in range(NUM_LABELS)})
        model = apply_peft(base, lora_config(target_modules=METHODS["lora"].lora_targets))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        folders.append(os.path.join(root, f"lora{i}"))
        model.save_pretrained(folders[-1])
    return folders


# ----------------------------------------------------------------------------------------------- the LoRA server
def lora_deployment():
    """A Ray Serve deployment of PEFT's LoRA adapters on the shipped backbone, with the batching and the request form
    (an image's bytes, `?tasks=<adapter>&top_k=k`) of VPTM's application."""
    import asyncio

    import torch
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(name="lora", max_ongoing_requests=128)
    class LoraServer:
        def __init__(self, folders: list[str], count: int, torch_threads: int, max_batch_size: int, wait: float):
            import peft
            from transformers import AutoImageProcessor

            from modeling_vptm import SHIPPED_BACKBONE, shipped_backbone_path
            from modeling_vptm.serving import processor_size
            from modeling_vptm.training import classifier_from_mim

            torch.set_num_threads(torch_threads)
            start = time.perf_counter()
            base = classifier_from_mim(SHIPPED_BACKBONE, {k: str(k) for k in range(NUM_LABELS)})
            self.model = peft.PeftModel.from_pretrained(base, folders[0], adapter_name="t0000").eval()
            for i in range(1, count):
                self.model.load_adapter(folders[i % len(folders)], adapter_name=f"t{i:04d}")
            self.load_seconds = time.perf_counter() - start
            self.processor = AutoImageProcessor.from_pretrained(shipped_backbone_path())
            self.size = processor_size(self.processor)
            self.run_rows.set_max_batch_size(max_batch_size)
            self.run_rows.set_batch_wait_timeout_s(wait)
            self.batches = self.rows = 0

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
        async def run_rows(self, rows: list[tuple[torch.Tensor, str]]) -> list:
            self.batches, self.rows = self.batches + 1, self.rows + len(rows)

            def forward():
                with torch.no_grad():
                    pixels = torch.stack([pixel for pixel, _ in rows])
                    return self.model(pixel_values=pixels, adapter_names=[task for _, task in rows]).logits

            logits = await asyncio.to_thread(forward)
            return list(logits.unbind(0))

        async def __call__(self, http: Request) -> JSONResponse:
            from modeling_vptm.standalone import read_image, top_predictions

            if http.url.path.rstrip("/") == "/tasks":
                return JSONResponse({"load_seconds": self.load_seconds, "batches": self.batches, "rows": self.rows})
            body = json.loads(await http.body())  # the request form of VPTM's application
            (task,), top_k = body["parameters"]["tasks"], body["parameters"].get("top_k", 1)
            images = [read_image(item, allow_paths=False, size=self.size) for item in body["inputs"]]
            pixels = self.processor(images, return_tensors="pt")["pixel_values"]
            logits = await asyncio.gather(*(self.run_rows((pixel, task)) for pixel in pixels))
            labels = {k: str(k) for k in range(NUM_LABELS)}
            return JSONResponse([top_predictions(row.float().numpy(), labels, top_k)[0] for row in logits])

    return LoraServer


# ------------------------------------------------------------------------------------------------- the load client
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_images(count: int) -> list[str]:
    """Shipped test images as base64 PNGs."""
    import base64

    from modeling_vptm.data import shipped_dataset

    images = []
    for image in shipped_dataset()["test"]["image"][:count]:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        images.append(base64.b64encode(buffer.getvalue()).decode())
    return images


def post(port: int, images: list[str], task: str) -> None:
    """One request: base64 images under one task, as the Inference Endpoints format carries them."""
    body = json.dumps({"inputs": images, "parameters": {"tasks": [task], "top_k": 1}}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.loads(response.read())
    if len(answer) != len(images) or not all(isinstance(a, list) and "label" in a[0] for a in answer):
        raise RuntimeError(f"no prediction for task {task}: {str(answer)[:200]}")


def load(port: int, jobs: list[tuple[list[str], str]], concurrency: int, max_seconds: float) -> dict:
    """Sends `jobs` from `concurrency` threads, each taking the next job as soon as its last one is answered, until
    all are sent or `max_seconds` pass; images/s and latencies of the answered ones."""
    latencies: list[float] = []
    errors: list[str] = []
    next_job, lock = [0], threading.Lock()
    start = time.perf_counter()

    def client() -> None:
        while time.perf_counter() - start < max_seconds:
            with lock:
                if next_job[0] >= len(jobs):
                    return
                images, task = jobs[next_job[0]]
                next_job[0] += 1
            sent = time.perf_counter()
            try:
                post(port, images, task)
            except Exception as error:  # counted, not fatal: the figure is what was answered
                errors.append(f"{type(error).__name__}: {error}")
                continue
            with lock:
                latencies.append(time.perf_counter() - sent)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    latencies.sort()
    images = len(latencies) * len(jobs[0][0])
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "seconds": round(seconds, 2),
        "images_per_s": round(images / seconds, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "p99_ms": round(1000 * p99, 1) if p99 is not None else None,
    }


def measure(app, port: int, tasks: int, args, images: list[bytes]) -> dict:
    """Deploys `app`, warms it up (every task once, then a short load), measures, and tears it down."""
    from ray import serve

    start = time.perf_counter()
    serve.run(app, name="bench", route_prefix="/", blocking=False)
    ready = time.perf_counter() - start
    names = [f"t{i:04d}" for i in range(tasks)]
    rng = random.Random(tasks)

    def draw() -> list[str]:
        return rng.sample(images, args.images_per_request)

    warm = [(draw(), name) for name in names]
    warm += [(draw(), rng.choice(names)) for _ in range(4 * args.concurrency)]
    load(port, warm, args.concurrency, max_seconds=600)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/tasks") as response:
        before = json.loads(response.read())
    jobs = [(draw(), rng.choice(names)) for _ in range(args.requests)]
    result = load(port, jobs, args.concurrency, args.max_seconds)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/tasks") as response:
        after = json.loads(response.read())
    serve.delete("bench")
    rows, batches = after["rows"] - before["rows"], after["batches"] - before["batches"]
    result.update(tasks=tasks, deploy_seconds=round(ready, 1), mean_batch=round(rows / max(batches, 1), 1))
    if "load_seconds" in after:
        result["adapter_load_seconds"] = round(after["load_seconds"], 1)
    return result


# ------------------------------------------------------------------------------------------------------ reporting
def write_report(out: str, results: dict) -> None:
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    vptm, lora = results["vptm"], {r["tasks"]: r for r in results["lora"]}
    one = vptm[0]["images_per_s"]
    lines = [
        "# Serving many tasks over HTTP: VPTM on Ray Serve against PEFT's LoRA",
        "",
        f"Machine: {results['machine']}; {results['date']}; `python experiments/benchmark_serving.py "
        f"{' '.join(results['argv'])}`. One replica each (torch threads {results['settings']['torch_threads']}), "
        f"batches of up to {results['settings']['max_batch_size']} rows waiting at most "
        f"{results['settings']['batch_wait_timeout_s']} s, {results['settings']['concurrency']} concurrent clients on "
        f"127.0.0.1, each request {results['settings']['images_per_request']} 28-pixel PNGs under one task drawn at "
        "random.",
        "",
        "| tasks | VPTM images/s | vs 1 task | p50 / p99 ms | mean batch | LoRA images/s | VPTM / LoRA "
        "| LoRA p50 / p99 ms | LoRA adapters loaded in |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_tasks = {r["tasks"]: r for r in vptm}
    for count in sorted(set(by_tasks) | set(lora)):
        row, other = by_tasks.get(count), lora.get(count)
        vptm_cells = (
            f"{row['images_per_s']} | {row['images_per_s'] / one:.2f}x | {row['p50_ms']} / {row['p99_ms']} | "
            f"{row['mean_batch']}"
            if row
            else "not measured | | |"
        )
        if other:
            ratio = f"{row['images_per_s'] / other['images_per_s']:.2f}x" if row else ""
            lora_cells = (
                f"{other['images_per_s']} | {ratio} | {other['p50_ms']} / {other['p99_ms']} | "
                f"{other['adapter_load_seconds']} s"
            )
        else:
            lora_cells = f"not measured | | | {results['lora_not_measured'].get(str(count), '')}"
        lines.append(f"| {count} | {vptm_cells} | {lora_cells} |")
    most, largest = max(lora, default=None), max(by_tasks)
    lines += ["", f"{largest} tasks: VPTM at {by_tasks[largest]['images_per_s'] / one:.2f}x its one-task throughput"]
    if most is not None:
        lines[-1] += (
            f"; {by_tasks[largest]['images_per_s'] / lora[most]['images_per_s']:.2f}x LoRA with {most} adapters, the "
            "most measured"
        )
    lines[-1] += "."
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([r["tasks"] for r in vptm], [r["images_per_s"] for r in vptm], "o-", label="VPTM (prompt checkpoints)")
    axis.plot(sorted(lora), [lora[n]["images_per_s"] for n in sorted(lora)], "s-", label="LoRA (adapter_names)")
    axis.set_xscale("log")
    axis.set_xlabel("distinct tasks in the request stream")
    axis.set_ylabel("images/s")
    axis.set_ylim(bottom=0)
    axis.legend()
    axis.set_title(results["machine"], fontsize=8)
    figure.tight_layout()
    figure.savefig(os.path.join(out, "serving.png"), dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--lora_tasks", type=int, nargs="*", default=[1, 10, 100])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--images_per_request", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max_seconds", type=float, default=120)
    parser.add_argument("--max_batch_size", type=int, default=32)
    parser.add_argument("--batch_wait_timeout_s", type=float, default=0.01)
    parser.add_argument(
        "--torch_threads", type=int, default=1, help="Per replica (the HTTP proxy and client need a core)"
    )
    parser.add_argument("--quick", action="store_true", help="A tiny run for the tests.")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.lora_tasks, args.requests, args.concurrency = [1, 3], [1, 2], 24, 4
        args.images_per_request = 2
    import logging

    import ray
    from ray import serve

    from modeling_vptm.serving.ray_app import build

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # not a line per deployment

    os.makedirs(args.output_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="vptm-serving-", dir="/tmp")  # short: Ray's socket paths stay under 107 bytes
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:] if argv is None else argv,
               "settings": {k: getattr(args, k) for k in ("max_batch_size", "batch_wait_timeout_s", "torch_threads",
                                                          "concurrency", "requests", "images_per_request",
                                                          "max_seconds")},
               "vptm": [], "lora": [], "lora_not_measured": {}}  # fmt: skip
    try:
        make_vptm_tasks(os.path.join(work, "tasks"), max(args.tasks))
        folders = make_lora_adapters(os.path.join(work, "lora")) if args.lora_tasks else []
        images = test_images(64)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 _temp_dir=os.path.join(work, "ray"))  # fmt: skip
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        batching = {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s}
        for count in args.tasks:
            app = build({"task_root": os.path.join(work, "tasks"), "torch_threads": args.torch_threads,
                         "num_cpus": 1, "max_ongoing_requests": 4 * args.max_batch_size, **batching})  # fmt: skip
            results["vptm"].append(measure(app, port, count, args, images))
            print("vptm", results["vptm"][-1], flush=True)
        server = lora_deployment()
        for count in args.lora_tasks:
            app = server.bind(folders, count, args.torch_threads, args.max_batch_size, args.batch_wait_timeout_s)
            results["lora"].append(measure(app, port, count, args, images))
            print("lora", results["lora"][-1], flush=True)
        measured = {r["tasks"]: r["adapter_load_seconds"] for r in results["lora"]}
        for count in sorted(set(args.tasks) - set(args.lora_tasks)):
            most = max(measured, default=None)
            guess = f", about {measured[most] * (count / most) ** 2 / 60:,.0f} min at the square law" if most else ""
            results["lora_not_measured"][str(count)] = (
                f"start-up: each load_adapter walks every module, so loading {count} adapters grows with their "
                f"square{guess}"
            )
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    write_report(args.output_dir, results)
    return results


if __name__ == "__main__":
    main()
