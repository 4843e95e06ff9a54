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

from .configuration_vptm import VPTMConfig
from .modeling_vptm import (
    VPTMForImageClassification,
    backbone_config_fields,
    backbone_fingerprint,
    build_task_modules,
    check_backbone_fits,
    check_fingerprint,
    check_task_tensors,
    load_mim_backbone,
    read_task_tensors,
    run_task_head,
)


LAYOUT_FIELDS = ("prompt_length", "prompt_layers", "mask_token_mode", "mask_token_position", "extra_token_bias",
                 "classifier")  # fmt: skip


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


class VPTMTask(nn.Module):
    """The small tensors of one task, under the same names as in `VPTMForImageClassification`."""

    def __init__(self, config: VPTMConfig) -> None:
        super().__init__()
        self.config = config
        for name, module in build_task_modules(config).items():
            setattr(self, name, module)

    def layout(self) -> tuple:
        """Tasks with equal layouts share one backbone pass (the [MASK] read-out vs CLS is part of it)."""
        config = self.config
        return tuple(str(getattr(config, f)) if f != "classifier" else config.reads_mask_token for f in LAYOUT_FIELDS)


class MultiTaskVPTM(nn.Module):
    """A frozen BEiT MIM backbone and any number of prompt checkpoints made on it."""

    def __init__(self, backbone_name_or_path: str, revision: str | None = None, **hub_kwargs) -> None:
        super().__init__()
        mim = load_mim_backbone(backbone_name_or_path, revision=revision, **hub_kwargs)
        fields = backbone_config_fields(mim.config, backbone_name_or_path, revision, prompt_length=0,
                                        classifier="linear_cls", num_labels=1)  # fmt: skip
        # a task-less VPTM model: the backbone and the prompted forward every task goes through
        self.prompted_backbone = VPTMForImageClassification(VPTMConfig(**fields))
        self.prompted_backbone._load_backbone_weights(mim)
        self.prompted_backbone.eval()
        self.backbone_name_or_path, self.revision = backbone_name_or_path, revision
        self.fingerprint = backbone_fingerprint(mim.state_dict())
        self.tasks = nn.ModuleDict()

    # --------------------------------------------------------------------------------------------------- tasks
    def add_task(self, name: str, checkpoint: str | os.PathLike | VPTMForImageClassification, **hub_kwargs) -> None:
        """Adds a prompt checkpoint (folder, Hub id or loaded model) made on this backbone; the backbone is not
        reloaded. Refuses checkpoints made on another backbone, revision or weights."""
        if isinstance(checkpoint, VPTMForImageClassification):
            config, tensors, source = (
                checkpoint.config,
                checkpoint.task_state_dict(),
                f"task {name!r} (the given model)",
            )
        else:
            config = VPTMConfig.from_pretrained(checkpoint, **hub_kwargs)
            tensors, source = read_task_tensors(checkpoint, **hub_kwargs), f"task {name!r} ({checkpoint})"
        if (config.backbone_name_or_path, config.backbone_revision) != (self.backbone_name_or_path, self.revision):
            raise ValueError(
                f"{source} was made on backbone {config.backbone_name_or_path!r} (revision "
                f"{config.backbone_revision}), but this server holds {self.backbone_name_or_path!r} (revision "
                f"{self.revision})"
            )
        check_fingerprint(config, self.fingerprint, source)
        check_backbone_fits(config, self.prompted_backbone.config, source)
        task = VPTMTask(config)
        check_task_tensors(tensors, task.state_dict(), source)
        task.load_state_dict(tensors)
        param = next(self.prompted_backbone.parameters())
        self.tasks[name] = task.to(param.device, param.dtype).eval().requires_grad_(False)

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
        self.prompted_backbone._check_inputs(pixel_values, None)
        pixel_values = pixel_values.to(next(self.prompted_backbone.parameters()).dtype)
        groups: dict[tuple, list[int]] = {}
        for index, name in enumerate(tasks):
            groups.setdefault(self.tasks[name].layout(), []).append(index)
        out: list[TaskPrediction | None] = [None] * len(tasks)
        for rows in groups.values():
            members = [self.tasks[tasks[i]] for i in rows]
            layout = members[0].config
            prompts = None
            if layout.prompted_layers:
                prompts = torch.stack([t.prompt_embeddings.prompts for t in members])  # (rows, blocks, P, D)
            mask = None
            if any(t.trainable_mask_token is not None for t in members):
                default = self.prompted_backbone.beit.embeddings.mask_token
                mask = torch.cat([t.trainable_mask_token if t.trainable_mask_token is not None else default
                                  for t in members])  # (rows, 1, D)  # fmt: skip
            index = torch.tensor(rows, device=pixel_values.device)
            features = self.prompted_backbone.forward_features(
                pixel_values[index],
                prompts=prompts,
                mask_embeddings=mask,
                layout=layout,
                output_readout_attention=output_readout_attention,
            )
            normed = self.prompted_backbone.layernorm(features.readout_state)  # (rows, D)
            token_logits = self.prompted_backbone.lm_head(normed) if layout.reads_mask_token else None
            by_task: dict[str, list[int]] = {}
            for position, row in enumerate(rows):
                by_task.setdefault(tasks[row], []).append(position)
            for name, positions in by_task.items():  # each head runs once on its task's images
                task, select = self.tasks[name], torch.tensor(positions, device=normed.device)
                selected_tokens = None if token_logits is None else token_logits[select]
                logits = run_task_head(task, task.config, normed[select], selected_tokens).logits
                for position, row_logits in zip(positions, logits, strict=True):
                    out[rows[position]] = TaskPrediction(
                        task=name,
                        logits=row_logits,
                        visual_token_logits=None if token_logits is None else token_logits[position],
                        readout_attention=(
                            None if features.readout_attention is None else features.readout_attention[position]
                        ),
                    )
        return out
