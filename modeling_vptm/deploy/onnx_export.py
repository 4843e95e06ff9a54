"""Exports prompt checkpoints to ONNX graphs that `modeling_vptm.standalone.onnx_runtime` runs without PyTorch.

Two graphs, both float32 with a dynamic batch, traced by `torch.onnx.export` (the `torch.export` path; the
TorchScript exporter cannot trace the per-image layer norm of the ensemble head, and optimum does not support
transformers 5):

* `export_task_graph`: one task, `pixel_values -> logits` (and `visual_token_logits` when the task reads [MASK]).
* `export_backbone_graph`: the prompted backbone with the task's tensors as graph *inputs* (`prompts` `(batch,
  blocks, P, D)` and `mask_embedding` `(batch, 1, D)`, per image) and the read-out as output, so one exported
  backbone serves every task of its sequence layout, each task's prompts, [MASK] embedding and head kept in a small
  `tasks/<name>/task.npz`; the heads run in numpy. This is `MultiTaskVPTM` without PyTorch.

Each folder also gets the image processor, the task config(s), an `onnx_config.json` manifest and a copy of
`onnx_runtime.py`, so it is self-contained. Trace-time branches (layout, prompted blocks, skipped outputs) depend
only on the configuration, never on the batch, which is why one trace serves every batch size (tested with batch
sizes other than the example's).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict

import numpy as np
import torch
from torch import nn

from ..configuration_vptm import VPTMConfig
from ..modeling_vptm import VPTMForImageClassification
from ..prompted_backbone import PromptedBackbone, SequenceLayout
from ..serving.multitask import READOUT_ONLY, MultiTaskVPTM
from ..serving.processors import image_processor_of, same_image_processor
from ..serving.task_names import check_task_name
from ..standalone import copy_standalone


OPSET = 18  # the exporter's default and what every onnxruntime >= 1.14 runs
EXAMPLE_BATCH = 2  # the trace's batch; the batch dimension is exported as dynamic (not 1, which would specialise)
FORMAT, MANIFEST = "vptm-onnx", "onnx_config.json"


class TaskGraph(nn.Module):
    """One task as a graph: `pixel_values -> logits` (and `visual_token_logits` when the task reads [MASK])."""

    def __init__(self, model: VPTMForImageClassification) -> None:
        super().__init__()
        self.model = model
        self.output_names = ["logits"] + (["visual_token_logits"] if model.task.layout.mask_token else [])

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(pixel_values, **READOUT_ONLY)
        return (out.logits, out.visual_token_logits) if len(self.output_names) == 2 else (out.logits,)


class BackboneGraph(nn.Module):
    """The prompted backbone for one sequence layout, with a task's tensors per image as inputs:
    `(pixel_values, prompts?, mask_embedding?) -> (readout_hidden_state, visual_token_logits?)`."""

    def __init__(self, backbone: PromptedBackbone, layout: SequenceLayout) -> None:
        super().__init__()
        self.backbone, self.layout = backbone, layout
        self.input_names = ["pixel_values"]
        self.input_names += ["prompts"] if layout.prompted_layers else []
        self.input_names += ["mask_embedding"] if layout.mask_token else []
        self.output_names = ["readout_hidden_state"] + (["visual_token_logits"] if layout.mask_token else [])

    def forward(self, pixel_values: torch.Tensor, *task_tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        named = dict(zip(self.input_names[1:], task_tensors, strict=True))
        self.backbone.check_pixel_values(pixel_values)
        out = self.backbone(
            pixel_values,
            self.layout,
            prompts=named.get("prompts"),
            mask_embeddings=named.get("mask_embedding"),
            **READOUT_ONLY,
        )
        if self.layout.mask_token:
            return out.readout_hidden_state, out.visual_token_logits
        return (out.readout_hidden_state,)


def check_vptm_checkpoint(source: str, **hub_kwargs) -> VPTMConfig:
    """The checkpoint's config, refusing anything that is not a VPTM prompt checkpoint (with what it is)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, **hub_kwargs)
    if config.model_type != VPTMConfig.model_type:
        raise ValueError(
            f"{source} is not a VPTM prompt checkpoint: its config has model_type={config.model_type!r}, expected "
            f"{VPTMConfig.model_type!r} (a folder or Hub id written by VPTMForImageClassification.save_pretrained)"
        )
    return config


def load_checkpoint(source: str, **hub_kwargs) -> VPTMForImageClassification:
    """A prompt checkpoint (folder or Hub id) loaded for export: float32, eval mode."""
    check_vptm_checkpoint(source, **hub_kwargs)
    return VPTMForImageClassification.from_pretrained(source, **hub_kwargs).float().eval()


def export_graph(module: nn.Module, inputs: tuple, input_names: list[str], output_names: list[str], path: str) -> None:
    """`torch.onnx.export` of `module(pixel_values, *task_tensors)` with the batch dimension of every input and
    output dynamic."""
    batch = torch.export.Dim("batch", min=1)
    dynamic_shapes = ({0: batch},)  # structured as forward's arguments: the varargs are one tuple
    if len(inputs) > 1:
        dynamic_shapes += (tuple({0: batch} for _ in inputs[1:]),)
    with warnings.catch_warnings():
        # the exporter's own deprecation chatter (pytree, torchvision ops it skips), nothing about this graph
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape constraints")
        torch.onnx.export(
            module.eval(),
            inputs,
            path,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            dynamo=True,
            external_data=False,  # one file: the graphs are small (BEiT-base: 350 MB, under protobuf's 2 GB)
            verbose=False,
        )


def write_manifest(folder: str, backbone: PromptedBackbone, **fields) -> None:
    config = backbone.config
    image_size = config.image_size if isinstance(config.image_size, (list, tuple)) else [config.image_size] * 2
    manifest = dict(format=FORMAT, opset=OPSET, num_channels=config.num_channels, image_size=list(image_size),
                    torch_version=torch.__version__, **fields)  # fmt: skip
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    copy_standalone(folder)  # onnx_runtime.py and what it imports


def example_pixels(model: PromptedBackbone) -> torch.Tensor:
    channels, (height, width) = model.config.num_channels, model.grid_size
    patch = model.config.patch_size
    return torch.randn(
        EXAMPLE_BATCH, channels, height * patch, width * patch, generator=torch.Generator().manual_seed(0)
    )


def export_task_graph(source: str, output_dir: str, **hub_kwargs) -> str:
    """Exports one prompt checkpoint as `model.onnx` (`pixel_values -> logits`, `visual_token_logits`) with its
    config, image processor, manifest and runtime; returns the graph's path."""
    model = load_checkpoint(source, **hub_kwargs)
    processor = image_processor_of(source, model.config, **hub_kwargs)  # before writing: a failure leaves nothing
    os.makedirs(output_dir, exist_ok=True)
    graph = TaskGraph(model)
    path = os.path.join(output_dir, "model.onnx")
    export_graph(graph, (example_pixels(model.backbone),), ["pixel_values"], graph.output_names, path)
    model.config.to_json_file(os.path.join(output_dir, "config.json"), use_diff=False)
    processor.save_pretrained(output_dir)
    write_manifest(output_dir, model.backbone, graph="task", model="model.onnx", source=str(source),
                   outputs=graph.output_names)  # fmt: skip
    return path


def write_task(folder: str, model: VPTMForImageClassification) -> None:
    """A task's config and tensors (prompts, [MASK] embedding, head) for the numpy side, by checkpoint names."""
    os.makedirs(folder, exist_ok=True)
    model.config.to_json_file(os.path.join(folder, "config.json"), use_diff=False)  # every field the heads read
    tensors = {name: t.detach().float().cpu().numpy() for name, t in model.task_state_dict().items()}
    np.savez(os.path.join(folder, "task.npz"), **tensors)


def export_backbone_graph(sources: dict[str, str], output_dir: str, **hub_kwargs) -> str:
    """Exports the prompted backbone shared by the prompt checkpoints `sources` (`{task name: folder or Hub id}`) as
    `backbone.onnx`, with each task's tensors in `tasks/<name>/`; returns the graph's path.

    The tasks must be made on the same backbone (name, revision and weights) and share one sequence layout (prompt
    length, prompted blocks, [MASK] placement and bias mode): the layout is fixed in the graph.
    """
    if not sources:
        raise ValueError("export_backbone_graph needs at least one prompt checkpoint")
    for name in sources:
        check_task_name(name)
    models = {name: load_checkpoint(source, **hub_kwargs) for name, source in sources.items()}
    first_name, first = next(iter(models.items()))
    server = MultiTaskVPTM.from_model(first, first_name)  # checks every other task against this backbone
    layout = first.task.layout
    for name, model in models.items():
        if model.task.layout != layout:
            raise ValueError(
                f"task {name!r} has sequence layout {model.task.layout}, but {first_name!r} has {layout}: one "
                "backbone graph serves one layout; export them separately"
            )
        if name != first_name:
            server.add_task(name, model)
    # every check before the first file is written, so that a refused export leaves nothing behind
    processor = same_image_processor(sources, {name: model.config for name, model in models.items()}, **hub_kwargs)
    graph = BackboneGraph(first.backbone, layout)
    pixels = example_pixels(first.backbone)
    inputs = [pixels]
    hidden = first.config.hidden_size
    if layout.prompted_layers:
        prompts = first.task.prompts().detach()
        inputs.append(prompts.unsqueeze(0).expand(EXAMPLE_BATCH, -1, -1, -1).contiguous())  # (batch, blocks, P, D)
    if layout.mask_token:
        inputs.append(first.backbone.pretrained_mask_token.detach().expand(EXAMPLE_BATCH, 1, hidden).contiguous())
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "backbone.onnx")
    export_graph(graph, tuple(inputs), graph.input_names, graph.output_names, path)
    np.savez(os.path.join(output_dir, "backbone.npz"),
             pretrained_mask_token=first.backbone.pretrained_mask_token.detach().float().numpy())  # fmt: skip
    for name, model in models.items():
        write_task(os.path.join(output_dir, "tasks", name), model)
    processor.save_pretrained(output_dir)
    config = first.config
    write_manifest(output_dir, first.backbone, graph="backbone", model="backbone.onnx", layout=asdict(layout),
                   inputs=graph.input_names, outputs=graph.output_names,
                   backbone_name_or_path=config.backbone_name_or_path, backbone_revision=config.backbone_revision,
                   backbone_fingerprint=first.backbone.fingerprint(), tasks=sorted(models))  # fmt: skip
    return path


# ---------------------------------------------------------------------------------------------------- parity
def random_pixels(model: VPTMForImageClassification, batch: int, seed: int = 0) -> torch.Tensor:
    shape = (model.config.num_channels, *example_pixels(model.backbone).shape[2:])
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def task_graph_parity(model: VPTMForImageClassification, folder: str, batch_sizes=(1, 7)) -> dict[str, float]:
    """Max |ONNX Runtime - PyTorch| of each output of a task graph, over random images at each batch size."""
    from ..standalone.onnx_runtime import OnnxImageClassifier

    runtime = OnnxImageClassifier(folder)
    errors: dict[str, float] = {}
    for batch in batch_sizes:
        pixels = random_pixels(model, batch, seed=batch)
        expected = model(pixels)
        for name, value in runtime.run(pixels.numpy()).items():
            error = float(np.abs(value - getattr(expected, name).numpy()).max())
            errors[f"{name}@{batch}"] = error
    return errors


@torch.no_grad()
def backbone_graph_parity(
    models: dict[str, VPTMForImageClassification], folder: str, batch_sizes=(1, 7)
) -> dict[str, float]:
    """Max |ONNX Runtime + numpy heads - PyTorch| of the class logits of each task, for batches mixing the tasks
    (image i under task i mod T), at each batch size."""
    from ..standalone.onnx_runtime import OnnxMultiTask

    runtime = OnnxMultiTask(folder)
    names = list(models)
    errors: dict[str, float] = {}
    for batch in batch_sizes:
        pixels = random_pixels(next(iter(models.values())), batch, seed=batch)
        tasks = [names[i % len(names)] for i in range(batch)]
        logits = runtime.run(pixels.numpy(), tasks)
        for name in names:
            rows = [i for i, task in enumerate(tasks) if task == name]
            if not rows:
                continue
            expected = models[name](pixels[rows]).logits.numpy()
            errors[f"{name}@{batch}"] = float(np.abs(np.stack([logits[i] for i in rows]) - expected).max())
    return errors


__all__ = [
    "BackboneGraph",
    "TaskGraph",
    "backbone_graph_parity",
    "check_vptm_checkpoint",
    "export_backbone_graph",
    "export_task_graph",
    "task_graph_parity",
]
