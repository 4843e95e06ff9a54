"""VPTM: visual prompt learning as masked visual token modeling, on a frozen transformers BEiT.

Paper: Liao, Shi, Zhang, Cao, Yan, Tian, "Rethinking Visual Prompt Learning as Masked Visual Token Modeling",
arXiv 2303.04998. No public implementation of the paper exists; every choice its abstract leaves open is a
documented `VPTMConfig` field, so that the paper's ablations can be run.

Data flow of `VPTMForImageClassification` (`P` prompts, `N` patches, `D` hidden size, `V` visual vocabulary):

    pixels -> frozen BEiT patch embedding                        (batch, 1 + N, D)
           -> [CLS] + P prompts + [MASK] + patches               (batch, 1 + P + 1 + N, D)
           -> frozen BEiT blocks (deep prompts: each block its own P prompts; relative position bias extended
              to the added tokens, the CLS+patch block left as pre-trained)
           -> final state at [MASK] -> frozen layernorm -> frozen MIM head     (batch, V)
           -> prototypical verbalizer: projection to d, cosine with class prototypes, scaled   (batch, num_labels)

The model is two modules: `backbone`, the frozen `PromptedBackbone` (prompted_backbone.py: transformers' `BeitModel`
plus the MIM head, run with a task's added tokens; the base model, a `PreTrainedModel`), and `task`, the `VPTMTask`
(vptm_task.py: prompts, [MASK] embedding and head). Only the task is trained and saved; checkpoint IO lives in
checkpoint_io.py. These are Hub code files: they import only torch, transformers and each other.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.beit.modeling_beit import BeitPreTrainedModel
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple

from .adapter_io import load_adapter_beside
from .backbone_loading import config_on_backbone
from .checkpoint_checks import check_task_tensors
from .checkpoint_io import (
    load_checkpoint_config,
    load_prompt_checkpoint,
    prompt_checkpoint_options,
    write_prompt_checkpoint,
)
from .configuration_vptm import VPTMConfig
from .hub_names import HUB_ARGUMENTS
from .prompted_backbone import BACKBONE_MODULES, PromptedBackbone, PromptedBackboneOutput
from .vptm_task import PrototypicalVerbalizer, VPTMPromptEmbeddings, VPTMTask, check_training_batch


logger = logging.get_logger(__name__)


@dataclass
class VPTMImageClassifierOutput(ImageClassifierOutput):
    r"""
    Output of [`VPTMForImageClassification`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Cross-entropy over the class logits (for `head_input="ensemble"`, the mean of each path's
            cross-entropy) plus the weighted contrastive terms, when `labels` are given.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Class scores.
        visual_token_logits (`torch.FloatTensor` of shape `(batch_size, vocab_size)`, *optional*):
            The frozen MIM head's prediction at [MASK] (`None` for the `linear_cls` classifier).
        readout_hidden_state (`torch.FloatTensor` of shape `(batch_size, hidden_size)`, *optional*):
            The final state of the read-out token ([MASK], or CLS for `linear_cls`) after the MIM head's layer norm:
            what the MIM head and the verbalizer read.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Input of the first block (with its prompts when it is prompted) and output of every block,
            `(batch_size, sequence_length, hidden_size)` each, when `output_hidden_states` asks for them (`True`, or
            the indices of the ones wanted, the others `None`); tokens in the order `[CLS] + P prompts + [MASK] +
            patches` (no prompts before the first prompted block).
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            Each block's attention probabilities, `(batch_size, num_heads, sequence_length, sequence_length)`, tokens
            in the order of `hidden_states`, when `output_attentions=True` with `attn_implementation="eager"` (as
            BEiT's: under `"sdpa"` transformers warns and returns none).
        readout_attention (`torch.FloatTensor` of shape `(batch_size, num_heads, sequence_length)`, *optional*):
            The last block's attention from the read-out token ([MASK] or CLS) to every token, in the order of
            `hidden_states` (the last `num_patches` columns are the patches), when `output_readout_attention=True`.
    """

    visual_token_logits: torch.FloatTensor | None = None
    readout_hidden_state: torch.FloatTensor | None = None
    readout_attention: torch.FloatTensor | None = None


class VPTMPreTrainedModel(BeitPreTrainedModel):
    config: VPTMConfig
    config_class = VPTMConfig
    base_model_prefix = "backbone"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["BeitLayer", "PromptedBeitLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True
    _keys_to_ignore_on_load_unexpected = [r".*relative_position_index.*"]
    # the loss is a per-batch mean: Trainer must scale it for gradient accumulation (forward's **kwargs take no
    # num_items_in_batch)
    accepts_loss_kwargs = False
    # save_pretrained copies this file and its sibling Hub files and writes auto_map (see save_pretrained)
    _auto_class = "AutoModelForImageClassification"

    def _init_weights(self, module: nn.Module) -> None:
        # Backbone modules are initialised as BEiT does (they are overwritten by the checkpoint in practice).
        super()._init_weights(module)
        if isinstance(module, VPTMPromptEmbeddings):
            if self.config.prompt_init == "uniform":
                # VPT's init: fan-in of a patch (channels * patch_size**2) plus the hidden size
                patch = (
                    self.config.patch_size if isinstance(self.config.patch_size, int) else self.config.patch_size[0]
                )
                bound = math.sqrt(6.0 / (self.config.num_channels * patch**2 + self.config.hidden_size))
                init.uniform_(module.prompts, -bound, bound)
            else:
                init.normal_(module.prompts, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, PrototypicalVerbalizer):
            init.xavier_uniform_(module.projection.weight)
            init.normal_(module.prototypes, mean=0.0, std=1.0)
            init.constant_(module.logit_scale, module.logit_scale_init)
        elif isinstance(module, VPTMTask) and module.trainable_mask_token is not None:
            init.zeros_(module.trainable_mask_token)  # from_backbone copies the pre-trained mask token in


class VPTMForImageClassification(VPTMPreTrainedModel):
    """A frozen BEiT MIM backbone with visual prompts and a prototypical verbalizer (or the VPT baseline head)."""

    def __init__(self, config: VPTMConfig) -> None:
        super().__init__(config)
        if config.num_labels < 1:
            raise ValueError(f"VPTMForImageClassification needs num_labels >= 1, got {config.num_labels}")
        self.num_labels = config.num_labels
        self.backbone = PromptedBackbone(config)
        self.task = VPTMTask(config)
        self.post_init()
        self.backbone.freeze()
        # prompt checkpoints name the task's tensors without the "task." prefix (see task_state_dict)
        self.register_load_state_dict_pre_hook(_checkpoint_names_to_module_names)

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.beit.get_input_embeddings()

    # ----------------------------------------------------------------------------------------------- training state
    def train(self, mode: bool = True) -> VPTMForImageClassification:
        super().train(mode)
        self.backbone.eval()  # the frozen backbone never leaves eval mode
        return self

    def task_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that make up the task (prompts, verbalizer or head, trained mask token), by the names a prompt
        checkpoint gives them: all that is saved. Under a PEFT adapter that trains the task (`modules_to_save`), the
        task is wrapped; this model's own is then the original one, and the trained copy belongs to the adapter."""
        return getattr(self.task, "original_module", self.task).state_dict()

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """`(trainable, total)` parameter counts, as PEFT reports them."""
        return parameter_counts(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # ------------------------------------------------------------------------------------------------------ forward
    def forward_features(
        self,
        pixel_values: torch.Tensor,
        prompts: torch.Tensor | None = None,
        output_readout_attention: bool = False,
        **kwargs,
    ) -> PromptedBackboneOutput:
        """Runs the prompted backbone with this task's tokens: the read-out state and the MIM head's prediction at
        [MASK], and on request the hidden states and attentions (`output_hidden_states`, `output_attentions`; default:
        the config's) and the last block's attention from the read-out token.

        `prompts` replaces this task's prompts, for the whole batch `(num_prompted_blocks, P, D)` or per image
        `(batch, num_prompted_blocks, P, D)`.
        """
        return self.backbone(
            pixel_values,
            self.task.layout,
            prompts=self.task.prompts() if prompts is None else prompts,
            mask_embeddings=self.task.mask_embedding(),
            output_readout_attention=output_readout_attention,
            skip_unread_outputs=self.config.skip_unread_outputs,
            gradient_checkpointing=self.training,
            return_dict=True,  # the fields are read here, whatever the config says
            **kwargs,
        )

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        output_attentions: bool | None = None,
        output_readout_attention: bool = False,
        **kwargs,
    ) -> VPTMImageClassifierOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Images as the backbone's image processor prepares them. With `labels`, non-finite values raise a
            `ValueError`; without, a non-finite image gets non-finite logits and the other images are unaffected.
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices in `[0, num_labels)`; when given, the loss is computed.
        output_hidden_states (`bool`, `int` or `list[int]`, *optional*):
            Return the hidden states (all, or those of these indices, negative ones counting from the end); default:
            `config.output_hidden_states`.
        output_attentions (`bool`, *optional*):
            Return each block's attention (with `attn_implementation="eager"`); default: `config.output_attentions`.
        output_readout_attention (`bool`, *optional*, defaults to `False`):
            Also return the last block's attention from the read-out token (see `VPTMImageClassifierOutput`), with
            any attention implementation.
        return_dict (`bool`, *optional*):
            A `VPTMImageClassifierOutput`, or a tuple of its fields that are set; default: `config.return_dict`.
        """
        if pixel_values is None:
            raise ValueError("VPTMForImageClassification needs pixel_values")
        self.backbone.check_pixel_values(pixel_values)
        if labels is not None:
            check_training_batch(pixel_values, labels, self.num_labels)
        # float64 or float16 images for a float32 model (and the reverse) are cast to the backbone's dtype
        pixel_values = pixel_values.to(self.backbone.dtype)
        # flags left unset fall back to the config's, in the backbone's output capturing
        flags = {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions}
        kwargs.update({name: value for name, value in flags.items() if value is not None})
        readout = self.forward_features(pixel_values, output_readout_attention=output_readout_attention, **kwargs)
        head = self.task(readout, labels)
        return VPTMImageClassifierOutput(
            loss=head.loss,
            logits=head.logits,
            hidden_states=readout.hidden_states,
            attentions=readout.attentions,
            visual_token_logits=readout.visual_token_logits,
            readout_hidden_state=readout.readout_hidden_state,
            readout_attention=readout.readout_attention,
        )

    @torch.no_grad()
    def initialize_prototypes(self, batches, max_batches: int | None = None) -> None:
        """The `class_mean` prototype init: one pass over `(pixel_values, labels)` batches (or dicts with those
        keys), each prototype set to the mean projected feature of its class."""
        if self.task.verbalizer is None:
            raise ValueError(
                f"initialize_prototypes needs the prototypical verbalizer, not classifier={self.config.classifier!r}"
            )
        was_training = self.training
        self.eval()
        device = self.backbone.lm_head.weight.device
        features: list[list[torch.Tensor]] = []  # per verbalizer path, one tensor per batch
        labels = []
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            pixel_values, y = (batch["pixel_values"], batch["labels"]) if isinstance(batch, dict) else batch
            paths = self.task.head_inputs(self.forward_features(pixel_values.to(device, self.backbone.dtype)))
            features = features or [[] for _ in paths]
            for kept, (_, path_features) in zip(features, paths, strict=True):
                kept.append(path_features.float())  # exactly what `forward` projects
            labels.append(y.to(device))
        self.task.set_class_mean_prototypes([torch.cat(kept) for kept in features], torch.cat(labels))
        self.train(was_training)

    # ---------------------------------------------------------------------------------------- building and loading
    @classmethod
    def from_backbone(
        cls,
        backbone_name_or_path: str,
        *,
        num_labels: int | None = None,
        id2label: dict[int, str] | None = None,
        label2id: dict[str, int] | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        **vptm_config_fields,
    ) -> VPTMForImageClassification:
        """Loads a BEiT MIM checkpoint (Hub id, local folder or `vptm:<shipped name>`), freezes it and adds fresh
        prompts and a fresh verbalizer. `vptm_config_fields` are `VPTMConfig` fields (prompt_length, ...)."""
        hub = {"revision": revision, "cache_dir": cache_dir, "token": token, "local_files_only": local_files_only}
        labels = {"num_labels": num_labels, "id2label": id2label, "label2id": label2id}
        config, mim = config_on_backbone(VPTMConfig, backbone_name_or_path, labels, hub, vptm_config_fields)
        model = cls(config)
        model.backbone.load_mim_weights(mim)
        if model.task.trainable_mask_token is not None:  # trained from the pre-trained one
            with torch.no_grad():
                model.task.trainable_mask_token.copy_(model.backbone.pretrained_mask_token)
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Loads a prompt checkpoint: rebuilds the frozen backbone it names, then loads the task tensors.

        Honoured: `config`, the Hub arguments (`revision`, `cache_dir`, `token`, `local_files_only`,
        `force_download`, `subfolder`), `dtype`, `attn_implementation`, `device_map` (a device, or `"auto"`: the
        first CUDA device if there is one, else the CPU; the model is small enough for one device),
        `output_loading_info`, and, without `config`, config fields (`output_hidden_states=True`, ...), which update
        the loaded config as transformers' `from_pretrained` does. Any other argument is refused by name rather than
        silently dropped. A folder whose config names no backbone holds full weights and loads the ordinary way.

        A prompt checkpoint is untrusted input: its config and weights are checked before anything they describe is
        allocated (docs/security.md), and one that names no backbone fingerprint is refused unless
        `allow_unverified_backbone=True` (then loaded with a warning, on whatever weights its backbone name gives).
        """
        allow_unverified_backbone = bool(kwargs.pop("allow_unverified_backbone", False))
        config = kwargs.pop("config", None)
        if config is not None and getattr(config, "model_type", None) != VPTMConfig.model_type:
            raise TypeError(f"{cls.__name__}.from_pretrained needs config=VPTMConfig, got {type(config).__name__}")
        hub = {k: kwargs.pop(k) for k in HUB_ARGUMENTS if k in kwargs}
        dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
        attn_implementation = kwargs.pop("attn_implementation", None)
        if config is None:  # the arguments that are config fields set them; the others are left in kwargs
            config, kwargs = load_checkpoint_config(
                VPTMConfig, pretrained_model_name_or_path, return_unused_kwargs=True, **hub, **kwargs
            )
        if config.backbone_name_or_path is None:  # a folder holding the backbone too
            if attn_implementation is not None:  # (passing None would replace the config's with the default)
                kwargs["attn_implementation"] = attn_implementation
            model = super().from_pretrained(
                pretrained_model_name_or_path,
                *model_args,
                config=config,
                dtype=dtype,
                key_mapping=FULL_CHECKPOINT_NAMES,
                **hub,
                **kwargs,
            )
            loaded = model[0] if isinstance(model, tuple) else model
            loaded.backbone.freeze()
            return model
        options = prompt_checkpoint_options(cls.__name__, pretrained_model_name_or_path, hub, kwargs, model_args)
        model = load_prompt_checkpoint(
            cls, pretrained_model_name_or_path, config, hub, attn_implementation, allow_unverified_backbone
        )
        if dtype == "auto":  # the dtype the checkpoint was saved in
            dtype = config.dtype
        if dtype is not None:
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        if options["device"] is not None:
            model = model.to(options["device"])
        if options["adapter"] is not None:  # a PEFT adapter on this model (LoRA in the backbone, the trained task)
            load_adapter_beside(model, options["adapter"], options["adapter_kwargs"])
        model.eval()
        if options["output_loading_info"]:  # every tensor came from the backbone or the checkpoint, checked
            return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return model

    def load_task_state_dict(self, tensors: dict[str, torch.Tensor], source: str = "the checkpoint") -> None:
        """Loads prompts and verbalizer tensors (by their checkpoint names), refusing missing, unexpected or wrongly
        shaped ones."""
        self.task.load_checkpoint_tensors(tensors, source)

    def save_pretrained(self, save_directory, *args, state_dict: dict | None = None, **kwargs) -> None:
        """Saves the config, the Hub code files and **only the task tensors** (never the backbone's), atomically:
        everything is written to a temporary folder that then replaces `save_directory`'s files."""
        if self.config.backbone_name_or_path is None:
            # nothing to rebuild the backbone from: this folder must hold it
            return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)
        task = self.task_state_dict()
        if state_dict is not None:  # e.g. Trainer's (synced) values: the model's names, or a prompt checkpoint's
            task = {k.removeprefix("task."): v for k, v in state_dict.items() if not k.startswith("backbone.")}
            check_task_tensors(task, self.task_state_dict(), "the state_dict given to save_pretrained")
        if kwargs.get("push_to_hub") and "repo_id" not in kwargs:  # named after the folder, not the staging one
            kwargs["repo_id"] = os.path.basename(os.path.abspath(save_directory))
        write_prompt_checkpoint(
            self,
            save_directory,
            lambda folder: super(VPTMForImageClassification, self).save_pretrained(
                folder, *args, state_dict=task, **kwargs
            ),
        )


def _checkpoint_names_to_module_names(module, state_dict, prefix, *args) -> None:
    """`load_state_dict` pre-hook: a prompt checkpoint (as Trainer reloads it to resume or to pick the best one)
    names the task's tensors as the task does, `prompt_embeddings.prompts`; the model holds them under `task.`.
    Backbone names of `BeitForMaskedImageModeling` (`beit.*`, `layernorm.*`, `lm_head.*`) go under `backbone.`."""
    task_names = set(module.task._modules) | set(module.task._parameters)
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        first = key[len(prefix) :].split(".")[0]
        home = "task." if first in task_names else "backbone." if first in BACKBONE_MODULES else None
        if home is not None:
            state_dict[prefix + home + key[len(prefix) :]] = state_dict.pop(key)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameters of any model (a VPTM model, a PEFT model, a fully fine-tuned BEiT)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# Full checkpoints (a config without backbone_name_or_path) saved before the model had its two parts named their
# tensors as a prompt checkpoint and BeitForMaskedImageModeling do; transformers renames them on load.
FULL_CHECKPOINT_NAMES = {
    r"^(prompt_embeddings|verbalizer|hidden_verbalizer|classifier|trainable_mask_token)": r"task.\1",
    r"^(beit|layernorm|lm_head)\.": r"backbone.\1.",
}


__all__ = ["VPTMForImageClassification", "VPTMImageClassifierOutput", "VPTMPreTrainedModel", "parameter_counts"]
