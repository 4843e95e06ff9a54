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
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from ..backbone_loading import load_mim_backbone
from ..checkpoint_checks import check_fingerprint_given, check_fits_backbone, check_same_backbone
from ..checkpoint_io import load_checkpoint_config, read_task_tensors
from ..configuration_vptm import VPTMConfig
from ..limits import listed
from ..modeling_vptm import VPTMForImageClassification
from ..prompted_backbone import PromptedBackbone, PromptedBackboneOutput, SequenceLayout
from ..vptm_task import VPTMTask, head_logits


# A server reads the read-out fields only: no hidden states or attentions, whatever a shared model's config asks for
READOUT_ONLY = {"output_hidden_states": False, "output_attentions": False, "return_dict": True}


@dataclass
class TaskPrediction:
    """What one image got under its task in a mixed batch.

    Attributes:
        task: the task's name.
        logits: class logits, `(num_labels,)`.
        id2label: the names of those classes, of the task as it was when the call ran (a task that is replaced
            meanwhile cannot relabel this prediction).
        visual_token_logits: the frozen MIM head's prediction at [MASK], `(vocab_size,)`; `None` for tasks that
            read CLS (VPT, linear probe).
        readout_attention: the last block's attention from the read-out token, `(num_heads, sequence_length)`,
            tokens ordered `[CLS] + prompts + [MASK]? + patches`; only when asked for.
    """

    task: str
    logits: torch.Tensor
    id2label: dict[int, str]
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
        self,
        name: str,
        checkpoint: str | os.PathLike | VPTMForImageClassification | VPTMTask,
        allow_unverified_backbone: bool = False,
        **hub_kwargs,
    ) -> None:
        """Adds a prompt checkpoint (folder, Hub id, loaded model or task) made on this backbone; the backbone is not
        reloaded. Refuses checkpoints made on another backbone, revision or weights, and, before their tensors are
        read, checkpoints that name no fingerprint (unless `allow_unverified_backbone`) or whose config and tensors
        do not fit (see `VPTMForImageClassification.from_pretrained`)."""
        if isinstance(checkpoint, (VPTMForImageClassification, VPTMTask)):
            source = f"task {name!r} (the given {type(checkpoint).__name__})"
            task = checkpoint.task if isinstance(checkpoint, VPTMForImageClassification) else checkpoint
            config, tensors = task.config, task.state_dict()
            check_same_backbone(config, self.backbone_name_or_path, self.revision, source, "this server holds")
            check_fits_backbone(config, self.fingerprint, self.backbone.config, source)
        else:
            source = f"task {name!r} ({checkpoint})"
            config = load_checkpoint_config(VPTMConfig, checkpoint, **hub_kwargs)
            check_same_backbone(config, self.backbone_name_or_path, self.revision, source, "this server holds")
            check_fingerprint_given(config, source, allow_unverified_backbone)
            check_fits_backbone(config, self.fingerprint, self.backbone.config, source)
            tensors = read_task_tensors(checkpoint, config, source, **hub_kwargs)
        task = VPTMTask(config)
        task.load_checkpoint_tensors(tensors, source)
        self.tasks[name] = (
            task.to(self.backbone.lm_head.weight.device, self.backbone.dtype).eval().requires_grad_(False)
        )

    def remove_task(self, name: str) -> None:
        if name not in self.tasks:
            raise KeyError(f"no task {name!r:.80}; tasks are {listed(sorted(self.tasks))}")
        del self.tasks[name]

    # -------------------------------------------------------------------------------------------------- forward
    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, tasks: list[str]) -> list[torch.Tensor]:
        """Class logits for each image under its own task: a list of `(num_labels_of_its_task,)` tensors."""
        out: list[torch.Tensor | None] = [None] * len(tasks)
        for group, _, logits in self._task_runs(pixel_values, tasks):
            for row, row_logits in zip(group.rows, logits.unbind(0), strict=True):
                out[row] = row_logits
        return out

    @torch.no_grad()
    def predict(
        self, pixel_values: torch.Tensor, tasks: list[str], output_readout_attention: bool = False
    ) -> list[TaskPrediction]:
        """Each image under its own task, with the visual-token prediction at [MASK] and, on request, where the
        read-out token looked in the last block: one `TaskPrediction` per image, in input order."""
        out: list[TaskPrediction | None] = [None] * len(tasks)
        for group, readout, logits in self._task_runs(pixel_values, tasks, output_readout_attention):
            tokens, attention = unbind_rows(readout.visual_token_logits), unbind_rows(readout.readout_attention)
            for k, (row, name, row_logits) in enumerate(zip(group.rows, group.names, logits.unbind(0), strict=True)):
                out[row] = TaskPrediction(
                    task=name,
                    logits=row_logits,
                    id2label=group.tasks[name][0].config.id2label,
                    visual_token_logits=None if tokens is None else tokens[k],
                    readout_attention=None if attention is None else attention[k],
                )
        return out

    def _look_up(self, tasks: list[str]) -> dict[str, VPTMTask]:
        """The tasks a call runs with, by name, each once, looked up together."""
        try:
            return {name: self.tasks[name] for name in dict.fromkeys(tasks)}
        except KeyError:
            unknown = sorted({name for name in tasks if name not in self.tasks})
            raise KeyError(f"unknown tasks {listed(unknown)}; tasks are {listed(sorted(self.tasks))}") from None

    def _task_runs(
        self, pixel_values: torch.Tensor, tasks: list[str], output_readout_attention: bool = False
    ) -> Iterator[tuple[HeadGroup, PromptedBackboneOutput, torch.Tensor]]:
        """Runs a mixed batch: yields, for each group of its images whose tasks share a backbone pass and a head
        shape, the group (its tasks and their input rows), the backbone's read-out of its images and their class
        logits.

        The batch is reordered once, by layout, then head group, then task (first appearance first, input order
        kept within a task), so that each layout's pass takes a slice of it and each head group a slice of that pass
        (views). A batch already in that order (one task, or tasks in runs) is not copied at all. A task's prompts
        enter its pass as one `(blocks, P, D)` tensor, broadcast over its images, not one copy per image. The heads of
        a group of several tasks run stacked (`vptm_task.head_logits`): a constant number of operations for the group,
        not one set per task. The tasks are looked up once, when the call starts: a task added, replaced or removed
        while it runs (by another thread) changes the next call, not this one.
        """
        if len(tasks) != len(pixel_values):
            raise ValueError(f"one task per image: got {len(tasks)} task names for {len(pixel_values)} images")
        chosen = self._look_up(tasks)
        self.backbone.check_pixel_values(pixel_values)
        pixel_values = pixel_values.to(self.backbone.dtype)
        passes = plan_passes(chosen, tasks)
        groups = [group for heads in passes.values() for group in heads]
        order = [row for group in groups for row in group.rows]
        reorder = order != list(range(len(tasks)))
        picks = [pick for group in groups if group.stacked for pick in group.own_outputs()]
        pick_index = None
        if reorder or picks:
            # one copy per call, built on the host and made without waiting for the device: a blocking copy would
            # stall the GPU
            host_index = (order if reorder else []) + picks
            index = torch.tensor(host_index, dtype=torch.long).to(pixel_values.device, non_blocking=True)
            pick_index = index[len(host_index) - len(picks) :]
            if reorder:
                pixel_values = pixel_values.index_select(0, index[: len(order)])
        start = picked = 0
        for layout, heads in passes.items():  # one backbone pass per layout, each image with its task's tokens
            members = [(task, len(rows)) for group in heads for task, rows in group.tasks.values()]
            stop = start + sum(count for _, count in members)
            prompts, mask = self._task_tokens(layout, members)
            readout = self.backbone(
                pixel_values[start:stop],
                layout,
                prompts=prompts,
                mask_embeddings=mask,
                output_readout_attention=output_readout_attention,
                **READOUT_ONLY,
            )
            offset = 0
            for group in heads:  # each group's heads run once, on its tasks' images
                rows = group.rows
                part = slice_rows(readout, offset, offset + len(rows))
                if group.stacked:
                    own = pick_index[picked : picked + len(rows)]
                    logits = head_logits([task for task, _ in group.tasks.values()], part, own).logits
                    picked += len(rows)
                else:
                    ((task, _),) = group.tasks.values()
                    logits = task(part).logits
                yield group, part, logits
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


# Every image of a stacked group goes through each of the group's heads: the heads' arithmetic grows with the number
# of tasks stacked (it stays far below the backbone's at this many), while the operations saved grow with it too
MAX_STACKED_HEADS = 8


@dataclass
class HeadGroup:
    """Tasks of one backbone pass whose heads run together, in order: name -> `(task, its input rows)`."""

    tasks: dict[str, tuple[VPTMTask, list[int]]]

    @property
    def stacked(self) -> bool:
        return len(self.tasks) > 1

    @cached_property
    def rows(self) -> list[int]:
        """The input rows of the group's images, task after task."""
        return [row for _, rows in self.tasks.values() for row in rows]

    @cached_property
    def names(self) -> list[str]:
        """The task of each image, in `rows` order."""
        return [name for name, (_, rows) in self.tasks.items() for _ in rows]

    def own_outputs(self) -> list[int]:
        """For each image (`rows` order), where its own task's output is among the stacked heads' outputs,
        flattened `(image, task)` as `image * number of tasks + task`."""
        positions = [k for k, (_, rows) in enumerate(self.tasks.values()) for _ in rows]
        return [image * len(self.tasks) + k for image, k in enumerate(positions)]


def plan_passes(tasks: dict[str, VPTMTask], names: list[str]) -> dict[SequenceLayout, list[HeadGroup]]:
    """How a mixed batch runs: for each layout (one backbone pass), its head groups: tasks of equal `head_signature`,
    at most `MAX_STACKED_HEADS` to a group. First appearance first throughout, input order kept within a task.
    `tasks` maps each name in `names` to its task; the plan holds those tasks, so the run uses them and no others."""
    spec = {name: (task.layout, task.head_signature) for name, task in tasks.items()}  # once per task, not per image
    plan: dict[SequenceLayout, dict[Hashable, dict[str, list[int]]]] = {}
    for row, name in enumerate(names):
        layout, signature = spec[name]
        plan.setdefault(layout, {}).setdefault(signature, {}).setdefault(name, []).append(row)
    passes = {}
    for layout, by_signature in plan.items():
        passes[layout] = [
            HeadGroup({name: (tasks[name], by_task[name]) for name in chunk})
            for by_task in by_signature.values()
            for chunk in batched(list(by_task), MAX_STACKED_HEADS)
        ]
    return passes


def batched(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def slice_rows(readout: PromptedBackboneOutput, start: int, stop: int) -> PromptedBackboneOutput:
    """Images `start:stop` of a pass's read-out (views): what one head group reads, with its attention."""
    return PromptedBackboneOutput(
        readout_hidden_state=readout.readout_hidden_state[start:stop],
        visual_token_logits=None if readout.visual_token_logits is None else readout.visual_token_logits[start:stop],
        readout_attention=None if readout.readout_attention is None else readout.readout_attention[start:stop],
    )


def unbind_rows(tensor: torch.Tensor | None) -> tuple[torch.Tensor, ...] | None:
    return None if tensor is None else tensor.unbind(0)


__all__ = [
    "MAX_STACKED_HEADS",
    "MultiTaskVPTM",
    "TaskPrediction",
]
