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
from .vptm_task import VPTMTask


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
        return [prediction.logits for prediction in self.predict(pixel_values, tasks)]

    @torch.no_grad()
    def predict(
        self, pixel_values: torch.Tensor, tasks: list[str], output_readout_attention: bool = False
    ) -> list[TaskPrediction]:
        """Each image under its own task, with the visual-token prediction at [MASK] and, on request, where the
        read-out token looked in the last block: one `TaskPrediction` per image, in input order."""
        if len(tasks) != len(pixel_values):
            raise ValueError(f"one task per image: got {len(tasks)} task names for {len(pixel_values)} images")
        unknown = sorted(set(tasks) - set(self.tasks))
        if unknown:
            raise KeyError(f"unknown tasks {unknown}; tasks are {sorted(self.tasks)}")
        self.backbone.check_pixel_values(pixel_values)
        pixel_values = pixel_values.to(self.backbone.dtype)
        layouts = {name: self.tasks[name].layout for name in set(tasks)}  # once per task, not per image
        groups: dict[SequenceLayout, list[int]] = {}
        for index, name in enumerate(tasks):
            groups.setdefault(layouts[name], []).append(index)
        out: list[TaskPrediction | None] = [None] * len(tasks)
        for layout, rows in groups.items():  # one backbone pass per layout, each image with its task's tokens
            members = [self.tasks[tasks[i]] for i in rows]
            prompts = torch.stack([t.prompts() for t in members]) if layout.prompted_layers else None  # (rows, ...)
            masks = [t.mask_embedding() for t in members]
            mask = None
            if any(m is not None for m in masks):  # (rows, 1, D), the pre-trained one for tasks without their own
                mask = torch.cat([self.backbone.pretrained_mask_token if m is None else m for m in masks])
            index = torch.tensor(rows, device=pixel_values.device)
            readout = self.backbone(
                pixel_values[index],
                layout,
                prompts=prompts,
                mask_embeddings=mask,
                output_readout_attention=output_readout_attention,
            )
            by_task: dict[str, list[int]] = {}
            for position, row in enumerate(rows):
                by_task.setdefault(tasks[row], []).append(position)
            for name, positions in by_task.items():  # each head runs once on its task's images
                select = torch.tensor(positions, device=pixel_values.device)
                logits = self.tasks[name](readout_rows(readout, select)).logits
                for position, row_logits in zip(positions, logits, strict=True):
                    out[rows[position]] = TaskPrediction(
                        task=name,
                        logits=row_logits,
                        visual_token_logits=optional_row(readout.visual_token_logits, position),
                        readout_attention=optional_row(readout.readout_attention, position),
                    )
        return out


def readout_rows(readout: PromptedBackboneOutput, rows: torch.Tensor) -> PromptedBackboneOutput:
    """The read-out of some images of a batch (what a task head reads)."""
    return PromptedBackboneOutput(
        readout_hidden_state=readout.readout_hidden_state[rows],
        visual_token_logits=None if readout.visual_token_logits is None else readout.visual_token_logits[rows],
    )


def optional_row(tensor: torch.Tensor | None, row: int) -> torch.Tensor | None:
    return None if tensor is None else tensor[row]
