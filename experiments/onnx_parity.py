"""ONNX Runtime (CPU) against PyTorch on real architectures: every read-out, both exported graphs, batch 1 and 7.

For each backbone (`shipped`: the shipped tiny BEiT; `base`: a BEiT-base-shaped MIM backbone, 224 pixels, 12
blocks, 8,192 visual tokens, random weights with non-zero relative position biases), one prompt checkpoint per
VPTM read-out (`head_input` hidden, logits, normalized_logits, probs, ensemble) and one VPT checkpoint
(`classifier="linear_cls"`), every trainable tensor perturbed as if trained. Each checkpoint is exported as a task
graph, and each layout once as a backbone graph serving its tasks in mixed batches (heads in numpy); the largest
|ONNX Runtime - PyTorch| over the class logits (and the visual-token logits of task graphs) is recorded. The
default tests run the same checks on tiny configurations; this runs them where the numbers are large.

    python experiments/onnx_parity.py --output_dir benchmarks/onnx-parity                 # both, ~10 min on 2 CPUs
    python experiments/onnx_parity.py --output_dir runs/parity --archs shipped            # ~2 min

Writes `parity.json` and `parity.md` to `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import torch
from measuring import make_backbone

from modeling_vptm import VPTMForImageClassification, shipped_backbone_path
from modeling_vptm.deploy import (
    backbone_graph_parity,
    export_backbone_graph,
    export_task_graph,
    task_graph_parity,
)


TOLERANCE = 1e-4
BATCH_SIZES = (1, 7)
TASKS = {
    **{f"vptm-{h}": dict(head_input=h) for h in ("hidden", "logits", "normalized_logits", "probs", "ensemble")},
    "vpt": dict(classifier="linear_cls"),
}


def make_tasks(backbone: str, processor_folder: str, root: str) -> dict[str, str]:
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(processor_folder)
    paths = {}
    for seed, (name, fields) in enumerate(TASKS.items()):
        torch.manual_seed(seed)
        model = VPTMForImageClassification.from_backbone(backbone, num_labels=10, **fields)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(torch.randn_like(parameter) * 0.1)
        paths[name] = os.path.join(root, name)
        model.save_pretrained(paths[name])
        processor.save_pretrained(paths[name])
    return paths


def run_arch(arch: str, work: str) -> list[dict]:
    backbone_folder = os.path.join(work, "backbone")
    backbone = make_backbone(arch, backbone_folder)
    processor_folder = shipped_backbone_path() if arch == "shipped" else backbone_folder
    paths = make_tasks(backbone, processor_folder, os.path.join(work, "tasks"))
    models = {name: VPTMForImageClassification.from_pretrained(path).eval() for name, path in paths.items()}
    rows = []
    for name, path in paths.items():
        folder = os.path.join(work, "graph")
        start = time.perf_counter()
        export_task_graph(path, folder)
        seconds = time.perf_counter() - start
        errors = task_graph_parity(models[name], folder, BATCH_SIZES)
        rows.append(dict(arch=arch, graph="task", tasks=[name], errors=errors, export_s=round(seconds, 1)))
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(folder)  # a BEiT-base graph is 370 MB
    for layout in ([n for n in TASKS if n.startswith("vptm")], ["vpt"]):
        folder = os.path.join(work, "graph")
        start = time.perf_counter()
        export_backbone_graph({name: paths[name] for name in layout}, folder)
        seconds = time.perf_counter() - start
        errors = backbone_graph_parity({name: models[name] for name in layout}, folder, BATCH_SIZES)
        rows.append(dict(arch=arch, graph="backbone", tasks=layout, errors=errors, export_s=round(seconds, 1)))
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(folder)
    return rows


def markdown(results: dict) -> str:
    lines = [
        f"ONNX Runtime {results['onnxruntime']} (CPU) vs PyTorch {results['torch']} eager, float32, random images, "
        f"batch sizes {', '.join(map(str, BATCH_SIZES))} (traced at 2); {results['date']}, {results['machine']}.",
        "",
        "| backbone | graph | tasks | max abs error, class logits | max abs error, visual-token logits | ≤ 1e-4 |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        logits = max(v for k, v in row["errors"].items() if not k.startswith("visual_token_logits"))
        tokens = [v for k, v in row["errors"].items() if k.startswith("visual_token_logits")]
        ok = max(row["errors"].values()) <= TOLERANCE
        lines.append(f"| {row['arch']} | {row['graph']} | {', '.join(row['tasks'])} | {logits:.2e} | "
                     f"{f'{max(tokens):.2e}' if tokens else '–'} | {'yes' if ok else '**no**'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--archs", nargs="+", default=["shipped", "base"], choices=["shipped", "base"])
    args = parser.parse_args(argv)
    import onnxruntime

    machine = f"{platform.machine()}, {os.cpu_count()} CPUs"
    results = dict(date=time.strftime("%Y-%m-%d"), machine=machine, torch=torch.__version__,
                   onnxruntime=onnxruntime.__version__, tolerance=TOLERANCE, rows=[])  # fmt: skip
    for arch in args.archs:
        with tempfile.TemporaryDirectory() as work:
            results["rows"] += run_arch(arch, work)
    results["max_abs_error"] = max(max(row["errors"].values()) for row in results["rows"])
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "parity.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = markdown(results)
    with open(os.path.join(args.output_dir, "parity.md"), "w") as f:
        f.write(table)
    print(table)
    return results


if __name__ == "__main__":
    main()
