"""Inference speed of an exported prompt checkpoint in ONNX Runtime (CPU) against PyTorch eager, side by side.

For each architecture (`tiny`: the shipped backbone; `base`: a BEiT-base-shaped MIM backbone with random weights,
speed does not depend on them), a VPTM-deep checkpoint with the defaults is run on the same random batch by:

* PyTorch eager (`VPTMForImageClassification`, float32, `torch.inference_mode`);
* ONNX Runtime on its task graph (`pixel_values -> logits`);
* ONNX Runtime on the shared backbone graph (the task's prompts and [MASK] embedding fed as inputs), plus the
  numpy verbalizer: what serving many tasks from one export costs.

The three are timed in interleaved rounds and each reports its median (`experiments/benchmark.py`'s
`measure_side_by_side`), with the same thread count for PyTorch and ONNX Runtime. Writes `benchmark_onnx.json` and
`benchmark_onnx.md` to `--output_dir`.

    python experiments/benchmark_onnx.py --output_dir benchmarks/onnx-cpu-2core            # ~6 min on 2 CPUs
    python experiments/benchmark_onnx.py --output_dir runs/onnx --quick --archs tiny       # under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch
from measuring import make_backbone, measure_side_by_side

from modeling_vptm import VPTMForImageClassification, shipped_backbone_path
from modeling_vptm.deploy import export_backbone_graph, export_task_graph
from modeling_vptm.standalone import OnnxImageClassifier, OnnxMultiTask


BATCH = {"tiny": 128, "base": 8}
BACKBONE = {"tiny": "shipped", "base": "base"}  # onnx_parity's names


def run_arch(arch: str, batch: int, steps: int, warmup: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as work:
        backbone = make_backbone(BACKBONE[arch], os.path.join(work, "backbone"))
        model = VPTMForImageClassification.from_backbone(backbone, num_labels=10, prompt_layers="deep").eval()
        checkpoint = os.path.join(work, "task")
        model.save_pretrained(checkpoint)
        processor = shipped_backbone_path() if arch == "tiny" else backbone
        from transformers import AutoImageProcessor

        AutoImageProcessor.from_pretrained(processor).save_pretrained(checkpoint)
        start = time.perf_counter()
        export_task_graph(checkpoint, os.path.join(work, "task-graph"))
        export_s = time.perf_counter() - start
        export_backbone_graph({"task": checkpoint}, os.path.join(work, "backbone-graph"))
        task_graph = OnnxImageClassifier(os.path.join(work, "task-graph"), threads=threads)
        backbone_graph = OnnxMultiTask(os.path.join(work, "backbone-graph"), threads=threads)
        size = model.config.image_size
        pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        array = pixels.numpy()
        tasks = ["task"] * batch

        def pytorch():
            with torch.inference_mode():
                model(pixels)

        steps_fns = {
            "pytorch_eager": pytorch,
            "onnxruntime_task_graph": lambda: task_graph.run(array),
            "onnxruntime_backbone_graph": lambda: backbone_graph.run(array, tasks),
        }
        timings = measure_side_by_side(steps_fns, "cpu", batch, steps, warmup)
        with torch.inference_mode():
            expected = model(pixels).logits.numpy()
        error = max(
            float(np.abs(task_graph.run(array)["logits"] - expected).max()),
            float(np.abs(np.stack(backbone_graph.run(array, tasks)) - expected).max()),
        )
        graph_bytes = os.path.getsize(os.path.join(work, "task-graph", "model.onnx"))
    return dict(batch=batch, timings=timings, max_abs_error=error, export_s=round(export_s, 1), bytes=graph_bytes)


def speedups(row: dict) -> dict[str, float]:
    """Each ONNX Runtime step's speed over PyTorch eager's, from the unrounded step times (the images/s in the JSON
    are rounded to 0.1, which at 2-3 images/s moves a ratio by several percent)."""
    step_ms = {name: timing["step_ms"] for name, timing in row["timings"].items()}
    return {name: step_ms["pytorch_eager"] / ms for name, ms in step_ms.items() if name != "pytorch_eager"}


def markdown(results: dict) -> str:
    lines = [
        f"{results['date']}, {results['machine']}; torch {results['torch']} (eager, float32), onnxruntime "
        f"{results['onnxruntime']} (CPUExecutionProvider), {results['threads']} threads each; {results['steps']} "
        "interleaved rounds, medians.",
        "",
        "| architecture | batch | PyTorch eager images/s | ONNX Runtime, task graph | ratio | ONNX Runtime, shared "
        "backbone graph + numpy head | ratio | max abs logit difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arch, row in results["archs"].items():
        speed = {name: timing["images_per_s"] for name, timing in row["timings"].items()}
        torch_speed, task_speed = speed["pytorch_eager"], speed["onnxruntime_task_graph"]
        shared_speed = speed["onnxruntime_backbone_graph"]
        ratio = speedups(row)
        task_ratio, shared_ratio = ratio["onnxruntime_task_graph"], ratio["onnxruntime_backbone_graph"]
        lines.append(f"| {arch} | {row['batch']} | {torch_speed} | {task_speed} | **{task_ratio:.2f}×** | "
                     f"{shared_speed} | {shared_ratio:.2f}× | {row['max_abs_error']:.1e} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--archs", nargs="+", default=["tiny", "base"], choices=list(BATCH))
    parser.add_argument("--quick", action="store_true", help="Fewer rounds (5 instead of 9).")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    import onnxruntime

    torch.set_num_threads(args.threads)
    steps = args.steps or (5 if args.quick else 9)  # odd: a true median
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs"
    results = dict(date=time.strftime("%Y-%m-%d"), machine=machine, torch=torch.__version__,
                   onnxruntime=onnxruntime.__version__, threads=args.threads, steps=steps, archs={})  # fmt: skip
    for arch in args.archs:
        results["archs"][arch] = run_arch(arch, BATCH[arch], steps, warmup=1, threads=args.threads)
        print(json.dumps({arch: results["archs"][arch]}), flush=True)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "benchmark_onnx.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = markdown(results)
    with open(os.path.join(args.output_dir, "benchmark_onnx.md"), "w") as f:
        f.write(table)
    print(table)
    return results


if __name__ == "__main__":
    main()
