"""Exports a prompt checkpoint to ONNX, for ONNX Runtime on machines without PyTorch, and checks it against PyTorch.

    # one task: model.onnx (pixel_values -> logits, visual_token_logits), config, image processor, runtime
    python examples/export_onnx.py --model runs/vptm --output onnx/vptm
    python onnx/vptm/onnx_runtime.py --model onnx/vptm image.png          # no PyTorch needed from here on

    # one backbone graph for every task of a sequence layout, the task heads in numpy (tasks/<name>/task.npz)
    python examples/export_onnx.py --backbone_only --model fashion=runs/vptm digits=runs/digits --output onnx/shared
    python onnx/shared/onnx_runtime.py --model onnx/shared --task digits image.png

`--model` takes folders or Hub ids (`--revision` pins one), as `NAME=SOURCE` or plain (named after the folder). The
export is checked on random images at batch sizes 1 and 7 (`--parity_batch_sizes`) and the largest |difference|
from PyTorch is printed; with `--tolerance` the script fails when it is exceeded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from modeling_vptm.standalone import run


@dataclass
class ExportArguments:
    model: list[str] = field(
        metadata={
            "help": "Prompt checkpoint(s): folder or Hub id, optionally NAME=SOURCE. One without "
            "--backbone_only; any number of one sequence layout with it."
        }  # fmt: skip
    )
    output: str = field(metadata={"help": "Folder to write the graph and its files to."})
    backbone_only: bool = field(
        default=False,
        metadata={
            "help": "Export the prompted backbone with the task tensors as inputs, and each task's tensors "
            "and head as tasks/<name>/task.npz, instead of one task's whole graph."
        },  # fmt: skip
    )
    revision: str | None = field(default=None, metadata={"help": "Revision of the Hub checkpoint(s)."})
    parity_batch_sizes: list[int] = field(
        default_factory=lambda: [1, 7], metadata={"help": "Batch sizes of the check against PyTorch (none: skip)."}
    )
    tolerance: float | None = field(
        default=None, metadata={"help": "Fail when an output differs from PyTorch's by more than this."}
    )


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(ExportArguments).parse_args_into_dataclasses(args=argv)
    from modeling_vptm.deploy.onnx_export import (
        backbone_graph_parity,
        export_backbone_graph,
        export_task_graph,
        load_checkpoint,
        task_graph_parity,
    )
    from modeling_vptm.serving import parse_named_sources

    sources = parse_named_sources(args.model)
    hub = {"revision": args.revision} if args.revision else {}
    if args.backbone_only:
        path = export_backbone_graph(sources, args.output, **hub)
    else:
        if len(sources) != 1:
            raise ValueError(
                f"a task graph holds one task, got {len(sources)} models; pass --backbone_only to export one backbone "
                "for several tasks"
            )
        path = export_task_graph(next(iter(sources.values())), args.output, **hub)
    errors = {}
    if args.parity_batch_sizes:
        models = {name: load_checkpoint(source, **hub) for name, source in sources.items()}
        if args.backbone_only:
            errors = backbone_graph_parity(models, args.output, tuple(args.parity_batch_sizes))
        else:
            errors = task_graph_parity(next(iter(models.values())), args.output, tuple(args.parity_batch_sizes))
    worst = max(errors.values(), default=0.0)
    report = {"graph": path, "bytes": os.path.getsize(path), "max_abs_error": worst, "errors": errors}
    print(json.dumps(report, indent=2))
    if args.tolerance is not None and worst > args.tolerance:
        raise SystemExit(f"the ONNX graph differs from PyTorch by {worst:.3g} > --tolerance {args.tolerance:g}")
    return report


if __name__ == "__main__":
    run(main)  # an anticipated error: one line and exit status 2, no traceback
