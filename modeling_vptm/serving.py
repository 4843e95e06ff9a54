"""One loaded backbone serving many VPTM/VPT tasks, mixed within one batch.

A task is only its prompts, its (optional) trained mask token and its head; all tasks made on the same backbone
share its weights, so `MultiTaskVPTM` loads the backbone once and adds or removes tasks without touching it. A
mixed batch (each image with its own task) runs through the backbone in one pass per *sequence layout* (prompt
length, prompted blocks, [MASK] placement and bias mode); tasks of the same layout share that pass.

    server = MultiTaskVPTM("vptm:tiny-beit-fashion-mnist")
    server.add_task("fashion", "runs/vptm")
    server.add_task("fashion-vpt", "runs/vpt")
    logits = server(pixel_values, tasks=["fashion", "fashion-vpt", "fashion"])   # a list, one tensor per image
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint_io import (
    check_fits_backbone,
    check_same_backbone,
    load_checkpoint_config,
    load_mim_backbone,
    read_task_tensors,
)
from .configuration_vptm import VPTMConfig
from .modeling_vptm import VPTMForImageClassification
from .prompted_backbone import PromptedBackbone, PromptedBackboneOutput, SequenceLayout
from .vptm_task import TaskHeadOutput, VPTMTask


@dataclass
class TaskPrediction:
    """What one image got under its task in a mixed batch.

    Attributes:
        task: the task's name.
        logits: class logits, `(num_labels,)`.
        visual_token_logits: the frozen MIM head's prediction at [MASK], `(vocab_size,)`; `None` for tasks that
            read CLS (VPT, linear probe).
        readout_attention: the last block's attention from the read-out token, `(num_heads, sequence_length)`,
            tokens ordered `[CLS] + prompts + [MASK]? + patches`; only when asked for.
    """

    task: str
    logits: torch.Tensor
    visual_token_logits: torch.Tensor | None = None
    readout_attention: torch.Tensor | None = None


class MultiTaskVPTM(nn.Module):
    """A frozen BEiT MIM backbone and any number of prompt checkpoints made on it."""

    def __init__(
        self,
        backbone_name_or_path: str | None,
        revision: str | None = None,
        backbone: PromptedBackbone | None = None,
        **hub_kwargs,
    ) -> None:
        """Loads the backbone `backbone_name_or_path` (Hub id, folder or `vptm:<name>`) at `revision`, or shares
        `backbone`, one already loaded under that name (see `from_model`)."""
        super().__init__()
        if backbone is None:
            mim = load_mim_backbone(backbone_name_or_path, revision=revision, **hub_kwargs)
            backbone = PromptedBackbone(mim.config)
            backbone.load_mim_weights(mim)
        self.backbone = backbone
        self.backbone_name_or_path, self.revision = backbone_name_or_path, revision
        self.fingerprint = self.backbone.fingerprint()
        self.tasks = nn.ModuleDict()
        self.eval()

    @classmethod
    def from_model(cls, model: VPTMForImageClassification, name: str) -> MultiTaskVPTM:
        """A server on the backbone of a loaded model, shared rather than loaded again, with the model's task added
        as `name`."""
        config = model.config
        server = cls(config.backbone_name_or_path, config.backbone_revision, backbone=model.backbone)
        server.add_task(name, model)
        return server

    # --------------------------------------------------------------------------------------------------- tasks
    def add_task(
        self, name: str, checkpoint: str | os.PathLike | VPTMForImageClassification | VPTMTask, **hub_kwargs
    ) -> None:
        """Adds a prompt checkpoint (folder, Hub id, loaded model or task) made on this backbone; the backbone is not
        reloaded. Refuses checkpoints made on another backbone, revision or weights."""
        if isinstance(checkpoint, (VPTMForImageClassification, VPTMTask)):
            source = f"task {name!r} (the given {type(checkpoint).__name__})"
            task = checkpoint.task if isinstance(checkpoint, VPTMForImageClassification) else checkpoint
            config, tensors = task.config, task.state_dict()
        else:
            source = f"task {name!r} ({checkpoint})"
            config, tensors = (
                load_checkpoint_config(VPTMConfig, checkpoint, **hub_kwargs),
                read_task_tensors(checkpoint, **hub_kwargs),
            )
        check_same_backbone(config, self.backbone_name_or_path, self.revision, source, "this server holds")
        check_fits_backbone(config, self.fingerprint, self.backbone.config, source)
        task = VPTMTask(config)
        task.load_checkpoint_tensors(tensors, source)
        self.tasks[name] = (
            task.to(self.backbone.lm_head.weight.device, self.backbone.dtype).eval().requires_grad_(False)
        )

    def remove_task(self, name: str) -> None:
        if name not in self.tasks:
            raise KeyError(f"no task {name!r}; tasks are {sorted(self.tasks)}")
        del self.tasks[name]

    # -------------------------------------------------------------------------------------------------- forward
    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, tasks: list[str]) -> list[torch.Tensor]:
        """Class logits for each image under its own task: a list of `(num_labels_of_its_task,)` tensors."""
        out: list[torch.Tensor | None] = [None] * len(tasks)
        for rows, _, _, head in self._task_runs(pixel_values, tasks):
            for row, logits in zip(rows, head.logits.unbind(0), strict=True):
                out[row] = logits
        return out

    @torch.no_grad()
    def predict(
        self, pixel_values: torch.Tensor, tasks: list[str], output_readout_attention: bool = False
    ) -> list[TaskPrediction]:
        """Each image under its own task, with the visual-token prediction at [MASK] and, on request, where the
        read-out token looked in the last block: one `TaskPrediction` per image, in input order."""
        out: list[TaskPrediction | None] = [None] * len(tasks)
        for rows, name, readout, head in self._task_runs(pixel_values, tasks, output_readout_attention):
            tokens, attention = unbind_rows(readout.visual_token_logits), unbind_rows(readout.readout_attention)
            for k, (row, logits) in enumerate(zip(rows, head.logits.unbind(0), strict=True)):
                out[row] = TaskPrediction(
                    task=name,
                    logits=logits,
                    visual_token_logits=None if tokens is None else tokens[k],
                    readout_attention=None if attention is None else attention[k],
                )
        return out

    def _task_runs(
        self, pixel_values: torch.Tensor, tasks: list[str], output_readout_attention: bool = False
    ) -> Iterator[tuple[list[int], str, PromptedBackboneOutput, TaskHeadOutput]]:
        """Runs a mixed batch: yields, for each task in it, the input rows of its images, its name, the backbone's
        read-out of those images and its head's output on them.

        The batch is reordered once, by layout and then by task (first appearance first, input order kept within a
        task), so that each layout's pass takes a slice of it and each head a slice of that pass: views, no
        per-group gathers. A batch already in that order (one task, or tasks in runs) is not copied at all. A task's
        prompts enter its pass as one `(blocks, P, D)` tensor, broadcast over its images, not one copy per image.
        """
        if len(tasks) != len(pixel_values):
            raise ValueError(f"one task per image: got {len(tasks)} task names for {len(pixel_values)} images")
        unknown = sorted(set(tasks) - set(self.tasks))
        if unknown:
            raise KeyError(f"unknown tasks {unknown}; tasks are {sorted(self.tasks)}")
        self.backbone.check_pixel_values(pixel_values)
        pixel_values = pixel_values.to(self.backbone.dtype)
        runs: dict[SequenceLayout, dict[str, list[int]]] = {}  # layout -> task -> input rows, in first-seen order
        layouts = {name: self.tasks[name].layout for name in dict.fromkeys(tasks)}  # once per task, not per image
        for row, name in enumerate(tasks):
            runs.setdefault(layouts[name], {}).setdefault(name, []).append(row)
        order = [row for by_task in runs.values() for rows in by_task.values() for row in rows]
        if order != list(range(len(tasks))):
            # built on the host and copied without waiting for the device: a blocking copy would stall the GPU
            index = torch.tensor(order, dtype=torch.long).to(pixel_values.device, non_blocking=True)
            pixel_values = pixel_values.index_select(0, index)
        start = 0
        for layout, by_task in runs.items():  # one backbone pass per layout, each image with its task's tokens
            members = [(self.tasks[name], len(rows)) for name, rows in by_task.items()]
            stop = start + sum(count for _, count in members)
            prompts, mask = self._task_tokens(layout, members)
            readout = self.backbone(
                pixel_values[start:stop],
                layout,
                prompts=prompts,
                mask_embeddings=mask,
                output_readout_attention=output_readout_attention,
            )
            offset = 0
            for name, rows in by_task.items():  # each head runs once, on its task's images
                part = slice_rows(readout, offset, offset + len(rows))
                yield rows, name, part, self.tasks[name](part)
                offset += len(rows)
            start = stop

    def _task_tokens(
        self, layout: SequenceLayout, members: list[tuple[VPTMTask, int]]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Prompts and [MASK] embeddings for one pass over consecutive runs of `(task, number of images)`: the task's
        own tensors when one task fills the pass (the backbone broadcasts them), else one row per image."""
        masks = [task.mask_embedding() for task, _ in members]  # (1, 1, D) or None (the pre-trained one)
        if len(members) == 1:
            return members[0][0].prompts(), masks[0]
        prompts = None
        if layout.prompted_layers:  # (images, blocks, P, D)
            prompts = torch.cat([task.prompts().expand(count, -1, -1, -1) for task, count in members])
        mask = None
        if any(m is not None for m in masks):  # (images, 1, D), the pre-trained one for tasks without their own
            pretrained = self.backbone.pretrained_mask_token
            mask = torch.cat([(pretrained if m is None else m).expand(count, -1, -1) for m, (_, count) in
                              zip(masks, members, strict=True)])  # fmt: skip
        return prompts, mask


def slice_rows(readout: PromptedBackboneOutput, start: int, stop: int) -> PromptedBackboneOutput:
    """Images `start:stop` of a pass's read-out (views): what one task's head reads, with its attention."""
    return PromptedBackboneOutput(
        readout_hidden_state=readout.readout_hidden_state[start:stop],
        visual_token_logits=None if readout.visual_token_logits is None else readout.visual_token_logits[start:stop],
        readout_attention=None if readout.readout_attention is None else readout.readout_attention[start:stop],
    )


def unbind_rows(tensor: torch.Tensor | None) -> tuple[torch.Tensor, ...] | None:
    return None if tensor is None else tensor.unbind(0)
