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

The backbone is composed, not forked: `self.beit` is transformers' `BeitModel` and `layernorm` / `lm_head` sit
beside it exactly as in `BeitForMaskedImageModeling`, so every BEiT MIM checkpoint maps onto it 1:1. Only the
prompts and the verbalizer are trained and saved. This is a Hub code file: it imports only torch, transformers
and its sibling `configuration_vptm.py`.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import BeitForMaskedImageModeling, BeitModel
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.beit.modeling_beit import BeitLayer, BeitPreTrainedModel, eager_attention_forward
from transformers.utils import ModelOutput, logging

from .configuration_vptm import VPTMConfig


logger = logging.get_logger(__name__)

# Name of the single weights file of a prompt checkpoint (not "adapter_model.safetensors": with peft installed
# the Auto classes would take the folder for a PEFT adapter).
WEIGHTS_NAME = "model.safetensors"
# Modules and parameters that make up a task; everything else is the frozen backbone.
TASK_MODULES = ("prompt_embeddings", "verbalizer", "hidden_verbalizer", "classifier", "trainable_mask_token")
BACKBONE_MODULES = ("beit", "layernorm", "lm_head")
# The shipped backbone is named portably as "vptm:<name>" and resolved to the installed package's data folder.
SHIPPED_PREFIX = "vptm:"


@dataclass
class VPTMImageClassifierOutput(ImageClassifierOutput):
    r"""
    Output of [`VPTMForImageClassification`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Cross-entropy over the class logits (for `verbalizer_input="ensemble"`, the mean of each path's
            cross-entropy) plus the weighted contrastive terms, when `labels` are given.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Class scores.
        visual_token_logits (`torch.FloatTensor` of shape `(batch_size, vocab_size)`, *optional*):
            The frozen MIM head's prediction at [MASK] (`None` for the `linear_cls` classifier).
        mask_hidden_state (`torch.FloatTensor` of shape `(batch_size, hidden_size)`, *optional*):
            The final [MASK] state after the backbone's final layer norm (the CLS state for `linear_cls`).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Input of the first block and output of every block, `(batch_size, sequence_length, hidden_size)` each,
            when `output_hidden_states=True`; tokens in the order `[CLS] + P prompts + [MASK] + patches` (no prompts
            before the first prompted block).
        readout_attention (`torch.FloatTensor` of shape `(batch_size, num_heads, sequence_length)`, *optional*):
            The last block's attention from the read-out token ([MASK] or CLS) to every token, in the order of
            `hidden_states` (the last `num_patches` columns are the patches), when `output_readout_attention=True`.
    """

    visual_token_logits: torch.FloatTensor | None = None
    mask_hidden_state: torch.FloatTensor | None = None
    readout_attention: torch.FloatTensor | None = None


@dataclass
class PromptedBackboneOutput(ModelOutput):
    r"""
    Output of [`VPTMForImageClassification.forward_features`]: what the prompted backbone computed.

    Args:
        readout_state (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            Final state of the read-out token ([MASK], or CLS for `linear_cls`), before the MIM head's layer norm.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            As in [`VPTMImageClassifierOutput`], when `output_hidden_states=True`.
        readout_attention (`torch.FloatTensor` of shape `(batch_size, num_heads, sequence_length)`, *optional*):
            The last block's attention from the read-out token to every token (each head's row sums to 1), tokens
            in the order of `hidden_states`, so the last `num_patches` columns are the image patches; when
            `output_readout_attention=True`.
    """

    readout_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    readout_attention: torch.FloatTensor | None = None


class VPTMPromptEmbeddings(nn.Module):
    """The learnable prompts: `prompt_length` tokens for each prompted block, `(num_prompted_blocks, P, D)`."""

    def __init__(self, config: VPTMConfig) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.zeros(len(config.prompted_layers), config.prompt_length, config.hidden_size))

    def forward(self) -> torch.Tensor:
        return self.prompts


class PrototypicalVerbalizer(nn.Module):
    """Maps a read-out vector to class logits by cosine similarity with learnable class prototypes.

    `(batch, input_dim)` -> projection without bias to `prototype_dim` -> cosine with `num_labels *
    prototypes_per_class` prototypes -> max over each class's prototypes -> times a scale `s`. Knows nothing of
    BEiT: any `(batch, input_dim)` tensor works.
    """

    def __init__(
        self,
        input_dim: int,
        num_labels: int,
        prototype_dim: int = 64,
        prototypes_per_class: int = 1,
        logit_scale_init: float = 10.0,
        learn_logit_scale: bool = True,
    ) -> None:
        super().__init__()
        self.num_labels, self.prototypes_per_class = num_labels, prototypes_per_class
        self.logit_scale_init = logit_scale_init
        self.projection = nn.Linear(input_dim, prototype_dim, bias=False)
        self.prototypes = nn.Parameter(torch.zeros(num_labels * prototypes_per_class, prototype_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)), requires_grad=learn_logit_scale)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Unit-norm projected features, `(batch, prototype_dim)`."""
        return F.normalize(self.projection(features), dim=-1)

    def class_cosine(self, projected: torch.Tensor) -> torch.Tensor:
        """Cosine of unit-norm projected features with each class's best prototype, `(batch, num_labels)`."""
        cosine = projected @ F.normalize(self.prototypes, dim=-1).T  # (batch, num_labels * M)
        return cosine.view(-1, self.num_labels, self.prototypes_per_class).amax(-1)  # (batch, num_labels)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns `(class_logits (batch, num_labels), projected (batch, prototype_dim))`."""
        projected = self.project(features)
        return self.logit_scale * self.class_cosine(projected), projected

    @torch.no_grad()
    def set_prototypes_from_features(self, features: torch.Tensor, labels: torch.Tensor) -> list[int]:
        """Sets every prototype of class k to the mean projected feature of class k (the `class_mean` init).

        Classes without examples keep their current prototypes; their indices are returned (and logged).
        """
        projected = self.project(features.to(self.projection.weight.dtype))
        missing = []
        for k in range(self.num_labels):
            chosen = labels == k
            if not chosen.any():
                missing.append(k)
                continue
            rows = slice(k * self.prototypes_per_class, (k + 1) * self.prototypes_per_class)
            self.prototypes[rows] = projected[chosen].mean(0)
        if missing:
            logger.warning("class-mean prototypes: no examples of classes %s; they keep their random init", missing)
        return missing


def extend_relative_position_bias(bias: torch.Tensor, num_extra: int, mode: str, leading: int = 0) -> torch.Tensor:
    """Extends a BEiT relative position bias `(1, heads, 1 + N, 1 + N)` to `num_extra` added tokens placed around
    CLS: `leading` of them before it, the rest right after it, the patches last.

    `mode="cls"` gives each added token the CLS entries: added->patch = CLS->patch, patch->added = patch->CLS,
    added<->added and added<->CLS = CLS->CLS. `mode="zero"` gives them zero bias. The CLS+patch block is copied
    unchanged. Returns `(1, heads, 1 + num_extra + N, 1 + num_extra + N)`.
    """
    if not 0 <= leading <= num_extra:
        raise ValueError(f"leading must be in [0, num_extra={num_extra}], got {leading}")
    if num_extra == 0:
        return bias
    length = bias.shape[-1]
    # position in the extended sequence -> position in the original one (added tokens act as CLS)
    index = torch.cat([torch.zeros(1 + num_extra, dtype=torch.long), torch.arange(1, length, dtype=torch.long)]).to(
        bias.device
    )
    extended = bias[:, :, index][:, :, :, index]  # (1, heads, 1 + E + N, 1 + E + N)
    if mode == "zero":
        added = [position for position in range(1 + num_extra) if position != leading]  # every slot but CLS
        extended = extended.clone()
        extended[:, :, added, :] = 0
        extended[:, :, :, added] = 0
    return extended


def backbone_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of the backbone tensors (float32 on the CPU)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        if not name.startswith(tuple(m + "." for m in BACKBONE_MODULES)):
            continue
        tensor = state_dict[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def resolve_backbone_path(name_or_path: str) -> str:
    """Resolves `vptm:<name>` to the folder shipped inside the installed `vptm` package; other names pass through.

    Found by file lookup, without importing the package, so this Hub file keeps importing only torch and
    transformers.
    """
    if not name_or_path.startswith(SHIPPED_PREFIX):
        return name_or_path
    import importlib.util

    name = name_or_path[len(SHIPPED_PREFIX) :]
    spec = importlib.util.find_spec("modeling_vptm")
    if spec is None or not spec.submodule_search_locations:
        raise OSError(
            f"backbone {name_or_path!r} is the backbone shipped with the vptm package, which is not installed here; "
            "install it from its repository (`pip install -e .` in a checkout, or the wheel `pip wheel .` builds), "
            "or pass a local folder or Hub id as backbone_name_or_path"
        )
    folder = os.path.join(list(spec.submodule_search_locations)[0], "shipped", name)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise OSError(f"backbone {name_or_path!r}: the installed vptm package has no shipped backbone at {folder}")
    return folder


def build_task_modules(config: VPTMConfig) -> dict[str, nn.Module | nn.Parameter | None]:
    """The modules that make up a task, by attribute name: prompts, trained mask token, verbalizer or linear head."""
    modules: dict[str, nn.Module | nn.Parameter | None] = {
        "prompt_embeddings": VPTMPromptEmbeddings(config) if config.prompted_layers else None,
        "trainable_mask_token": (
            nn.Parameter(torch.zeros(1, 1, config.hidden_size))
            if config.train_mask_token and config.reads_mask_token
            else None
        ),
        "verbalizer": None,
        "hidden_verbalizer": None,
        "classifier": None,
    }
    if config.classifier == "prototypical_verbalizer":

        def verbalizer(input_dim: int) -> PrototypicalVerbalizer:
            return PrototypicalVerbalizer(
                input_dim,
                config.num_labels,
                config.prototype_dim,
                config.prototypes_per_class,
                config.logit_scale_init,
                config.learn_logit_scale,
            )

        # "ensemble": `verbalizer` reads the MIM logits, `hidden_verbalizer` the hidden state
        modules["verbalizer"] = verbalizer(
            config.hidden_size if config.verbalizer_input == "hidden" else config.vocab_size
        )
        if config.verbalizer_input == "ensemble":
            modules["hidden_verbalizer"] = verbalizer(config.hidden_size)
    else:
        reads_logits = config.classifier == "linear_mask" and config.verbalizer_input != "hidden"
        modules["classifier"] = nn.Linear(config.vocab_size if reads_logits else config.hidden_size, config.num_labels)
    return modules


def readout_features(config: VPTMConfig, normed: torch.Tensor, token_logits: torch.Tensor | None) -> torch.Tensor:
    """What the task head reads: the normed read-out state, or the MIM head's logits (raw or standardised per image)
    or probabilities. For `"ensemble"` this is the token path's input (the raw logits); the hidden path reads
    `normed`."""
    if config.classifier == "linear_cls" or config.verbalizer_input == "hidden":
        return normed
    if config.verbalizer_input == "probs":
        return token_logits.float().softmax(-1).to(token_logits.dtype)
    if config.verbalizer_input == "normalized_logits":
        return F.layer_norm(token_logits.float(), token_logits.shape[-1:]).to(token_logits.dtype)
    return token_logits


@dataclass
class TaskHeadOutput:
    r"""
    What a task's head makes of the read-out.

    Attributes:
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Class scores (for `"ensemble"`, the mean of the two paths' per-image standardised class logits).
        path_logits (`tuple(torch.FloatTensor)`):
            Class logits of each verbalizer (one, or two for `"ensemble"`: token path, then hidden path), or of the
            linear head; each path is trained with its own cross-entropy.
        projected (`tuple(torch.FloatTensor)`):
            Unit-norm projected features `(batch_size, prototype_dim)` of each verbalizer (empty for a linear head).
        prototype_cosine (`tuple(torch.FloatTensor)`):
            Cosine of those features with each class's best prototype, `(batch_size, num_labels)` per verbalizer.
    """

    logits: torch.Tensor
    path_logits: tuple[torch.Tensor, ...] = ()
    projected: tuple[torch.Tensor, ...] = ()
    prototype_cosine: tuple[torch.Tensor, ...] = ()


def standardize_class_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-image z-score over the classes (zero mean, unit variance), so that verbalizers of different scales can be
    averaged, as ProtoVerb ensembles its verbalizers."""
    return F.layer_norm(logits.float(), logits.shape[-1:]).to(logits.dtype)


def run_task_head(
    task: nn.Module, config: VPTMConfig, normed: torch.Tensor, token_logits: torch.Tensor | None
) -> TaskHeadOutput:
    """Class logits of one task from the normed read-out state `(batch, D)` and the MIM head's logits `(batch, V)`.

    `task` is anything holding the task modules of `build_task_modules` as attributes (the classifier itself, or a
    task of the multi-task server), so that both classify with this one function.
    """
    if task.verbalizer is None:
        logits = task.classifier(readout_features(config, normed, token_logits))
        return TaskHeadOutput(logits=logits, path_logits=(logits,))
    paths = [(task.verbalizer, readout_features(config, normed, token_logits))]
    if task.hidden_verbalizer is not None:
        paths.append((task.hidden_verbalizer, normed))
    path_logits, projected, cosine = [], [], []
    for verbalizer, features in paths:
        feature = verbalizer.project(features)  # (batch, prototype_dim)
        cos = verbalizer.class_cosine(feature)  # (batch, num_labels)
        path_logits.append(verbalizer.logit_scale * cos)
        projected.append(feature)
        cosine.append(cos)
    if len(path_logits) == 1:
        logits = path_logits[0]
    else:
        logits = torch.stack([standardize_class_logits(l) for l in path_logits]).mean(0)  # (batch, num_labels)
    return TaskHeadOutput(
        logits=logits, path_logits=tuple(path_logits), projected=tuple(projected), prototype_cosine=tuple(cosine)
    )


def task_loss(config: VPTMConfig, head: TaskHeadOutput, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each path (averaged over paths) plus ProtoVerb's weighted contrastive terms."""
    loss = torch.stack([F.cross_entropy(l.float(), labels) for l in head.path_logits]).mean()
    temperature = config.contrastive_temperature
    for feature, cosine in zip(head.projected, head.prototype_cosine, strict=True):
        if config.prototype_contrastive_weight > 0:
            loss = loss + config.prototype_contrastive_weight * prototype_contrastive_loss(
                cosine.float(), labels, temperature
            )
        if config.instance_contrastive_weight > 0:
            loss = loss + config.instance_contrastive_weight * instance_contrastive_loss(
                feature.float(), labels, temperature
            )
    return loss


class VPTMPreTrainedModel(BeitPreTrainedModel):
    config: VPTMConfig
    config_class = VPTMConfig
    base_model_prefix = "beit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["BeitLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True
    _keys_to_ignore_on_load_unexpected = [r".*relative_position_index.*"]
    # save_pretrained copies this file and configuration_vptm.py and writes auto_map (see save_pretrained)
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
        elif isinstance(module, VPTMForImageClassification) and module.trainable_mask_token is not None:
            init.zeros_(module.trainable_mask_token)  # from_backbone copies the pre-trained mask token in


class VPTMForImageClassification(VPTMPreTrainedModel):
    """A frozen BEiT MIM backbone with visual prompts and a prototypical verbalizer (or the VPT baseline head)."""

    def __init__(self, config: VPTMConfig) -> None:
        super().__init__(config)
        if config.num_labels < 1:
            raise ValueError(f"VPTMForImageClassification needs num_labels >= 1, got {config.num_labels}")
        self.num_labels = config.num_labels
        self.beit = BeitModel(config, add_pooling_layer=False)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)

        for name, module in build_task_modules(config).items():
            setattr(self, name, module)
        self.post_init()
        self.freeze_backbone()
        self._bias_cache: dict[tuple, list[torch.Tensor | None]] = {}  # see _position_biases

    # ----------------------------------------------------------------------------------------------- training state
    def freeze_backbone(self) -> None:
        """Freezes every backbone tensor and puts the backbone in eval mode (no dropout, no drop-path)."""
        for name in BACKBONE_MODULES:
            getattr(self, name).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> VPTMForImageClassification:
        super().train(mode)
        for name in BACKBONE_MODULES:  # the frozen backbone never leaves eval mode
            getattr(self, name).eval()
        return self

    def task_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that make up the task (prompts, verbalizer or head, trained mask token): all that is saved."""
        return {k: v for k, v in self.state_dict().items() if k.split(".")[0] in TASK_MODULES}

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """`(trainable, total)` parameter counts, as PEFT reports them."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # ------------------------------------------------------------------------------------------------ the backbone
    def _check_inputs(self, pixel_values: torch.Tensor, labels: torch.Tensor | None) -> None:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"pixel_values must be a tensor (batch, channels, height, width), got {shape}")
        if pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must have {self.config.num_channels} channels (the backbone's num_channels), got "
                f"{pixel_values.shape[1]} in shape {tuple(pixel_values.shape)}"
            )
        height, width = pixel_values.shape[2:]
        expected = self.config.image_size
        expected = tuple(expected) if isinstance(expected, (list, tuple)) else (expected, expected)
        if (height, width) != expected:
            raise ValueError(
                f"pixel_values must be {expected[0]}x{expected[1]} (the backbone's image_size), got {height}x{width}; "
                "resize with the backbone's image processor"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be a floating-point tensor, got dtype {pixel_values.dtype}")
        if pixel_values.shape[0] == 0:
            raise ValueError("pixel_values is an empty batch (batch size 0)")
        if labels is not None:
            # Training on a non-finite image would silently turn the loss (and then the prompts) into NaN. In
            # inference a non-finite image only gives that image non-finite logits, so it is not checked there
            # (the check would cost a device sync per batch).
            if not torch.isfinite(pixel_values).all():
                bad = (~torch.isfinite(pixel_values)).flatten(1).any(1).nonzero().flatten().tolist()
                raise ValueError(f"pixel_values hold NaN or infinite values (images {bad} of the batch)")
            if labels.shape != pixel_values.shape[:1]:
                raise ValueError(f"labels must have shape ({pixel_values.shape[0]},), got {tuple(labels.shape)}")
            bad = labels[(labels < 0) | (labels >= self.num_labels)]
            if bad.numel():
                raise ValueError(f"labels must be in [0, {self.num_labels}), got {bad.unique().tolist()}")

    def _position_biases(
        self, pixel_values: torch.Tensor, num_extra: int, mode: str, leading: int = 0
    ) -> list[torch.Tensor | None]:
        """Per-block attention bias, `(1, heads, L, L)` each, for a sequence with `num_extra` added tokens, `leading`
        of them before CLS (see `extend_relative_position_bias`).

        The bias tables are frozen, so the biases are constants: they are kept for the next call (keyed by the
        tables' storage and version counters, which `.to()`, `load_state_dict` and in-place edits change) instead
        of being interpolated, gathered and extended again for every batch.
        """
        window = tuple(s // self.config.patch_size for s in pixel_values.shape[2:])
        tables = [module.relative_position_bias_table for module in self._bias_modules()]
        key = None
        if not torch.compiler.is_compiling() and not any(table.requires_grad for table in tables):
            key = (window, num_extra, mode, leading, torch.is_inference_mode_enabled())
            key += tuple((table.device, table.dtype, table.data_ptr(), table._version) for table in tables)
            if key in self._bias_cache:
                return self._bias_cache[key]
        biases = self._compute_position_biases(window, num_extra, mode, leading)
        if key is not None:
            if len(self._bias_cache) >= 8:  # a few layouts and image sizes at most; drop the oldest
                self._bias_cache.pop(next(iter(self._bias_cache)))
            self._bias_cache[key] = biases
        return biases

    def _apply(self, fn, *args, **kwargs):
        # .to(), .half(), .cuda() move or convert the tables; the kept biases would be stale copies holding memory
        self._bias_cache = {}
        return super()._apply(fn, *args, **kwargs)

    def _bias_modules(self) -> list[nn.Module]:
        modules = [self.beit.shared_position_bias] if self.beit.shared_position_bias is not None else []
        return modules + [l.relative_position_bias for l in self.beit.layers if l.relative_position_bias is not None]

    def _compute_position_biases(
        self, window: tuple[int, int], num_extra: int, mode: str, leading: int
    ) -> list[torch.Tensor | None]:
        num_tokens = 1 + window[0] * window[1]
        shared = None
        if self.beit.shared_position_bias is not None:
            shared = self.beit.shared_position_bias(window, dim_size=num_tokens)  # (1, heads, 1 + N, 1 + N)
            shared = extend_relative_position_bias(shared, num_extra, mode, leading)  # extended once for all blocks
        biases = []
        for layer in self.beit.layers:
            bias = shared
            if layer.relative_position_bias is not None:
                own = layer.relative_position_bias(window, dim_size=num_tokens)
                own = extend_relative_position_bias(own, num_extra, mode, leading)
                bias = own if bias is None else bias + own
            biases.append(bias)
        return biases

    @staticmethod
    def _block(
        layer: BeitLayer,
        hidden: torch.Tensor,
        bias: torch.Tensor | None,
        query_index: int | None = None,
        skip: int = 0,
    ) -> torch.Tensor:
        """One BEiT block with an explicit attention bias (the layer's own bias is in `bias` already).

        Every token stays a key and value; outputs nobody reads are not computed, which is exact: with
        `query_index`, only that token's output, `(batch, 1, D)`; with `skip`, every output but the first `skip`
        rows, `(batch, L - skip, D)` (the prompt slots that the next block overwrites).
        """
        normed = layer.layernorm_before(hidden)
        if query_index is None and not skip:
            attention, _ = layer.attention(normed, attention_mask=bias)
            residual = hidden
        else:
            start, stop = (query_index, query_index + 1) if query_index is not None else (skip, hidden.shape[1])
            queries, residual = normed[:, start:stop], hidden[:, start:stop]  # views, no copies
            rows = bias[:, :, start:stop] if bias is not None else None
            attention = _partial_attention(layer.attention, normed, queries, rows)
        hidden = layer.drop_path(layer.lambda_1 * layer.dropout(attention)) + residual
        mlp = layer.dropout(layer.mlp(layer.layernorm_after(hidden)))
        return layer.drop_path(layer.lambda_2 * mlp) + hidden

    def forward_features(
        self,
        pixel_values: torch.Tensor,
        prompts: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        mask_embeddings: torch.Tensor | None = None,
        layout: VPTMConfig | None = None,
        output_readout_attention: bool = False,
    ) -> PromptedBackboneOutput:
        """Runs the prompted backbone: the final state of the read-out token, `(batch, D)` (not normed), and on
        request every hidden state and the last block's attention from the read-out token.

        For multi-task serving, everything that belongs to a task can be given per image: `prompts` `(batch,
        num_prompted_blocks, P, D)` (or `(num_prompted_blocks, P, D)` for the whole batch; default: this model's),
        `mask_embeddings` `(batch, 1, D)` (default: this model's mask token), and `layout`, the config whose prompt
        and [MASK] fields lay out the sequence (default: this model's).
        """
        config = self.config if layout is None else layout
        batch = pixel_values.shape[0]
        if prompts is None and self.prompt_embeddings is not None:
            prompts = self.prompt_embeddings()
        prompted = config.prompted_layers
        if prompts is not None and prompts.ndim == 3:
            prompts = prompts.unsqueeze(0).expand(batch, -1, -1, -1)  # (batch, blocks, P, D), no copy
        num_prompts = config.prompt_length if prompted else 0
        append_mask = config.reads_mask_token and config.mask_token_mode == "append"
        replace_mask = config.reads_mask_token and config.mask_token_mode == "replace"

        if mask_embeddings is None and layout is None and self.trainable_mask_token is not None:
            mask_embeddings = self.trainable_mask_token
        mask_position = config.num_patches // 2 if config.mask_token_position is None else config.mask_token_position
        bool_masked_pos = None
        if replace_mask and mask_embeddings is None:
            bool_masked_pos = torch.zeros(batch, config.num_patches, dtype=torch.bool, device=pixel_values.device)
            bool_masked_pos[:, mask_position] = True
        embeddings = self.beit.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)  # (batch, 1 + N, D)
        if mask_embeddings is None:
            mask_embeddings = self.beit.embeddings.mask_token  # (1, 1, D), the pre-trained one
        mask = mask_embeddings.to(embeddings.dtype).expand(batch, 1, -1)  # (batch, 1, D)
        if replace_mask and bool_masked_pos is None:
            position = 1 + mask_position
            embeddings = torch.cat([embeddings[:, :position], mask, embeddings[:, position + 1 :]], dim=1)
        cls, patches = embeddings[:, :1], embeddings[:, 1:]
        mask_tokens = [mask] if append_mask else []

        # Sequence before the first prompted block: [CLS] + [MASK]? + patches. Prompts are inserted at the first
        # prompted block and overwritten at every later one. They are stored *before* CLS, P + [CLS] + [MASK]? +
        # patches, with the relative bias permuted to match, which is the same attention as the documented order
        # [CLS] + P + [MASK]? + patches (attention has no order but the bias), and makes the prompt slots a prefix:
        # skipping their outputs is then a view instead of three copies per block. Hidden states are returned in the
        # documented order.
        hidden = torch.cat([cls, *mask_tokens, patches], dim=1)  # (batch, 1 + 1? + N, D)
        num_extra_before = len(mask_tokens)
        biases_before = None
        if prompted and prompted[0] > 0:
            biases_before = self._position_biases(pixel_values, num_extra_before, config.extra_token_bias)
        biases_after = self._position_biases(
            pixel_values, num_extra_before + num_prompts, config.extra_token_bias, leading=num_prompts
        )

        # index of the read-out token in the final sequence: [MASK] (appended or in place of a patch), else CLS
        readout = num_prompts
        if append_mask:
            readout = num_prompts + 1
        elif replace_mask:
            readout = num_prompts + 1 + mask_position
        # Exact savings (config.fast_inference): the last block computes the read-out token only, and a block
        # followed by a prompted block skips the outputs of its prompt slots, which that block overwrites.
        fast = config.fast_inference and not output_hidden_states
        all_hidden = (hidden,) if output_hidden_states else None
        # gradient_checkpointing_enable() flags each BeitLayer; the layers themselves never checkpoint here because
        # the frozen backbone stays in eval mode, so the flag is honoured by this loop instead.
        checkpointing = (
            self.training and torch.is_grad_enabled() and any(l.gradient_checkpointing for l in self.beit.layers)
        )
        inserted = has_slots = False
        last = len(self.beit.layers) - 1
        readout_attention = None
        for i, layer in enumerate(self.beit.layers):
            if i in prompted:
                block_prompts = prompts[:, prompted.index(i)].to(hidden.dtype)  # (batch, P, D)
                rest = hidden[:, num_prompts:] if has_slots else hidden
                hidden = torch.cat([block_prompts, rest], dim=1)  # (batch, P + 1 + 1? + N, D)
                inserted = has_slots = True
            bias = biases_after[i] if inserted or not prompted else biases_before[i]
            query = readout if (fast and i == last) else None
            if output_readout_attention and i == last:
                readout_attention = _readout_attention(layer, hidden, bias, readout)  # (batch, heads, L)
                if inserted and num_prompts:  # stored order P + CLS + rest -> documented order CLS + P + rest
                    order = [num_prompts, *range(num_prompts), *range(num_prompts + 1, hidden.shape[1])]
                    readout_attention = readout_attention[..., order]
            skip = 0
            if fast and i < last and has_slots and (i + 1) in prompted and num_prompts:
                skip, has_slots = num_prompts, False
            if checkpointing:
                hidden = torch.utils.checkpoint.checkpoint(
                    self._block, layer, hidden, bias, query, skip, use_reentrant=False
                )
            else:
                hidden = self._block(layer, hidden, bias, query, skip)
            if all_hidden is not None:  # never fast, so once inserted the prompt slots are there: move CLS first
                if inserted:
                    cls_state = hidden[:, num_prompts : num_prompts + 1]
                    all_hidden += (torch.cat([cls_state, hidden[:, :num_prompts], hidden[:, num_prompts + 1 :]], 1),)
                else:
                    all_hidden += (hidden,)
        hidden = self.beit.layernorm(hidden)  # Identity for MIM checkpoints with mean pooling
        state = hidden[:, 0] if query is not None else hidden[:, readout]  # (batch, D)
        return PromptedBackboneOutput(
            readout_state=state, hidden_states=all_hidden, readout_attention=readout_attention
        )

    # ---------------------------------------------------------------------------------------------------- the head
    def classify(self, state: torch.Tensor) -> tuple[TaskHeadOutput, torch.Tensor | None, torch.Tensor]:
        """Read-out state `(batch, D)` -> `(head output, visual-token logits (batch, V) or None, normed state)`."""
        normed = self.layernorm(state)  # (batch, D)
        token_logits = self.lm_head(normed) if self.config.reads_mask_token else None  # (batch, V)
        return run_task_head(self, self.config, normed, token_logits), token_logits, normed

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_readout_attention: bool = False,
        **kwargs,
    ) -> VPTMImageClassifierOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Images as the backbone's image processor prepares them. With `labels`, non-finite values raise a
            `ValueError`; without, a non-finite image gets non-finite logits and the other images are unaffected.
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices in `[0, num_labels)`; when given, the loss is computed.
        output_readout_attention (`bool`, *optional*, defaults to `False`):
            Also return the last block's attention from the read-out token (see `VPTMImageClassifierOutput`).
        """
        if pixel_values is None:
            raise ValueError("VPTMForImageClassification needs pixel_values")
        self._check_inputs(pixel_values, labels)
        # float64 or float16 images for a float32 model (and the reverse) are cast to the backbone's dtype
        pixel_values = pixel_values.to(self.beit.embeddings.patch_embeddings.projection.weight.dtype)
        output_hidden_states = bool(output_hidden_states)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        features = self.forward_features(
            pixel_values, output_hidden_states=output_hidden_states, output_readout_attention=output_readout_attention
        )
        head, token_logits, normed = self.classify(features.readout_state)
        loss = task_loss(self.config, head, labels) if labels is not None else None
        output = VPTMImageClassifierOutput(
            loss=loss,
            logits=head.logits,
            hidden_states=features.hidden_states,
            visual_token_logits=token_logits,
            mask_hidden_state=normed,
            readout_attention=features.readout_attention,
        )
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def initialize_prototypes(self, batches, max_batches: int | None = None) -> None:
        """The `class_mean` prototype init: one pass over `(pixel_values, labels)` batches (or dicts with those
        keys), each prototype set to the mean projected feature of its class."""
        if self.verbalizer is None:
            raise ValueError(
                f"initialize_prototypes needs the prototypical verbalizer, not classifier={self.config.classifier!r}"
            )
        was_training = self.training
        self.eval()
        device = next(self.verbalizer.parameters()).device
        features: dict[str, list[torch.Tensor]] = {"verbalizer": [], "hidden_verbalizer": []}
        labels = []
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            pixel_values, y = (batch["pixel_values"], batch["labels"]) if isinstance(batch, dict) else batch
            normed = self.layernorm(self.forward_features(pixel_values.to(device)).readout_state)
            # exactly what `forward` projects and scores, for every verbalizer_input
            features["verbalizer"].append(readout_features(self.config, normed, self.lm_head(normed)).float())
            features["hidden_verbalizer"].append(normed.float())
            labels.append(y.to(device))
        for name, verbalizer in (("verbalizer", self.verbalizer), ("hidden_verbalizer", self.hidden_verbalizer)):
            if verbalizer is not None:
                verbalizer.set_prototypes_from_features(torch.cat(features[name]), torch.cat(labels))
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
        if id2label is not None:
            id2label = {int(k): v for k, v in id2label.items()}
            if num_labels is not None and num_labels != len(id2label):
                raise ValueError(f"num_labels={num_labels} disagrees with id2label, which has {len(id2label)} labels")
            num_labels = len(id2label)
            label2id = label2id or {v: k for k, v in id2label.items()}
        if num_labels is None or num_labels < 1:
            raise ValueError(
                f"from_backbone needs the labels: num_labels >= 1 or id2label, got num_labels={num_labels}"
            )
        hub = {"revision": revision, "cache_dir": cache_dir, "token": token, "local_files_only": local_files_only}
        mim = load_mim_backbone(backbone_name_or_path, **hub)
        fields = backbone_config_fields(mim.config, backbone_name_or_path, revision, **vptm_config_fields)
        config = VPTMConfig(
            **fields,
            id2label=id2label or {i: f"LABEL_{i}" for i in range(num_labels)},
            label2id=label2id or {f"LABEL_{i}": i for i in range(num_labels)},
        )
        config.backbone_fingerprint = backbone_fingerprint(mim.state_dict())
        model = cls(config)
        model._load_backbone_weights(mim)
        return model

    def _load_backbone_weights(self, mim: BeitForMaskedImageModeling) -> None:
        source = mim.state_dict()
        own = {k for k in self.state_dict() if k.split(".")[0] in BACKBONE_MODULES}
        missing = sorted(own - set(source))
        if missing:
            raise ValueError(f"the backbone checkpoint lacks {len(missing)} tensors VPTM needs, e.g. {missing[:5]}")
        with torch.no_grad():
            for name, tensor in self.state_dict().items():
                if name in own:
                    if tensor.shape != source[name].shape:
                        raise ValueError(
                            f"backbone tensor {name} has shape {tuple(source[name].shape)} in the checkpoint but "
                            f"{tuple(tensor.shape)} in this model's config"
                        )
                    tensor.copy_(source[name])
            if self.trainable_mask_token is not None:
                self.trainable_mask_token.copy_(source["beit.embeddings.mask_token"])
        self.freeze_backbone()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Loads a prompt checkpoint: rebuilds the frozen backbone it names, then loads the task tensors.

        Honoured: `config`, the Hub arguments (`revision`, `cache_dir`, `token`, `local_files_only`,
        `force_download`, `subfolder`), `dtype`, `attn_implementation`, `device_map` (a device, or `"auto"`: the
        first CUDA device if there is one, else the CPU; the model is small enough for one device) and
        `output_loading_info`. Any other argument is refused by name rather than silently dropped. A folder whose
        config names no backbone holds full weights and loads the ordinary way.
        """
        config = kwargs.pop("config", None)
        hub = {
            k: kwargs.pop(k)
            for k in ("revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder")
            if k in kwargs
        }
        dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
        attn_implementation = kwargs.pop("attn_implementation", None)
        if not isinstance(config, VPTMConfig):
            config = VPTMConfig.from_pretrained(pretrained_model_name_or_path, **hub)
        if config.backbone_name_or_path is None:
            return super().from_pretrained(
                pretrained_model_name_or_path,
                *model_args,
                config=config,
                dtype=dtype,
                attn_implementation=attn_implementation,
                **hub,
                **kwargs,
            )
        device_map = kwargs.pop("device_map", None)
        output_loading_info = kwargs.pop("output_loading_info", False)
        # Passed by the Auto classes and pipelines; they change nothing for a prompt checkpoint (only safetensors is
        # ever read, and there is no PEFT adapter to load). Names with a leading underscore are transformers' own.
        for key in ("trust_remote_code", "code_revision", "proxies"):
            kwargs.pop(key, None)
        for key, harmless in (("use_safetensors", (None, True)), ("adapter_kwargs", (None, {}))):
            if key in kwargs and kwargs[key] in harmless:
                del kwargs[key]
        unsupported = sorted(k for k in kwargs if not k.startswith("_"))
        if unsupported or model_args:
            raise TypeError(
                f"{cls.__name__}.from_pretrained cannot honour {unsupported or list(model_args)} for a prompt "
                "checkpoint; it takes config, revision, cache_dir, token, local_files_only, force_download, "
                "subfolder, dtype, attn_implementation, device_map and output_loading_info"
            )
        device = resolve_device_map(device_map)
        task_tensors = read_task_tensors(pretrained_model_name_or_path, **hub)
        backbone_hub = {k: v for k, v in hub.items() if k in ("cache_dir", "token", "local_files_only")}
        mim = load_mim_backbone(config.backbone_name_or_path, revision=config.backbone_revision, **backbone_hub)
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation
        check_fingerprint(
            config, backbone_fingerprint(mim.state_dict()), f"the prompt checkpoint {pretrained_model_name_or_path}"
        )
        check_backbone_fits(config, mim.config, pretrained_model_name_or_path)
        model = cls(config)
        model._load_backbone_weights(mim)
        model.load_task_state_dict(task_tensors, source=str(pretrained_model_name_or_path))
        if dtype not in (None, "auto"):
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        if device is not None:
            model = model.to(device)
        model.eval()
        if output_loading_info:  # every tensor came from the backbone or the checkpoint, checked above
            return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return model

    def load_task_state_dict(self, tensors: dict[str, torch.Tensor], source: str = "the checkpoint") -> None:
        """Loads prompts and verbalizer tensors, refusing missing, unexpected or wrongly shaped ones."""
        check_task_tensors(tensors, self.task_state_dict(), source)
        with torch.no_grad():
            for name, tensor in self.state_dict().items():
                if name in tensors:
                    tensor.copy_(tensors[name])

    def save_pretrained(self, save_directory, *args, state_dict: dict | None = None, **kwargs) -> None:
        """Saves the config, the Hub code files and **only the task tensors** (never the backbone's), atomically:
        everything is written to a temporary folder that then replaces `save_directory`'s files."""
        if self.config.backbone_name_or_path is None:
            # nothing to rebuild the backbone from: this folder must hold it
            return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)
        task = self.task_state_dict()
        if state_dict is not None:  # e.g. from Trainer: keep only the task tensors, with their (synced) values
            task = {k: v for k, v in state_dict.items() if k in task}
        parent = os.path.dirname(os.path.abspath(save_directory))
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".vptm-save-", dir=parent)
        # The saved config maps the Auto classes to the saved code files (_auto_class adds the
        # AutoModelForImageClassification entry, the other two are set here); the model's own config is left as it was.
        had_auto_map = "auto_map" in self.config.__dict__
        previous = self.config.__dict__.get("auto_map")
        auto_map = dict(previous or {})
        auto_map.update(
            AutoConfig="configuration_vptm.VPTMConfig", AutoModel="modeling_vptm.VPTMForImageClassification"
        )
        self.config.auto_map = auto_map
        bar = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()  # one small file: a "Writing model shards" bar per Trainer save is noise
        try:
            super().save_pretrained(staging, *args, state_dict=task, **kwargs)
            os.makedirs(save_directory, exist_ok=True)
            for name in os.listdir(staging):
                os.replace(os.path.join(staging, name), os.path.join(save_directory, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if bar:
                logging.enable_progress_bar()
            if had_auto_map:
                self.config.auto_map = previous
            else:
                del self.config.auto_map


# ------------------------------------------------------------------------------------- checkpoint IO, shared
def backbone_config_fields(backbone_config, backbone_name_or_path: str, revision: str | None, **fields) -> dict:
    """The fields of a `VPTMConfig` for prompts on this backbone: its architecture, where it is loaded from, and
    the given VPTM fields (its own labels and head are not carried over)."""
    merged = backbone_config.to_dict()
    for key in ("architectures", "auto_map", "id2label", "label2id", "num_labels", "transformers_version"):
        merged.pop(key, None)
    merged.update(fields)
    merged.update(backbone_name_or_path=backbone_name_or_path, backbone_revision=revision)
    return merged


def read_task_tensors(checkpoint, **hub_kwargs) -> dict[str, torch.Tensor]:
    """The task tensors of a prompt checkpoint (folder or Hub id). Only safetensors is read: a pickled
    `pytorch_model.bin` offered instead is never unpickled."""
    from safetensors.torch import load_file
    from transformers.utils.hub import cached_file

    weights = cached_file(checkpoint, WEIGHTS_NAME, **hub_kwargs)
    try:
        return load_file(weights)
    except Exception as error:  # safetensors raises its own error types for truncated or corrupted files
        raise ValueError(
            f"cannot read the prompt weights {weights}: the file is truncated or not a safetensors file ({error})"
        ) from error


def check_fingerprint(config: VPTMConfig, found: str, source: str) -> None:
    """Refuses prompts trained on other backbone weights than the ones loaded (`found`)."""
    if config.backbone_fingerprint is not None and found != config.backbone_fingerprint:
        raise ValueError(
            f"{source} was trained on backbone {config.backbone_name_or_path!r} (revision "
            f"{config.backbone_revision}) with weights fingerprint {config.backbone_fingerprint[:16]}..., but the "
            f"weights loaded now have fingerprint {found[:16]}...: the prompts do not fit these weights"
        )


def check_task_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    """Refuses task tensors that are missing, unexpected or wrongly shaped for the config they come with."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not hold this model's task tensors: missing {missing}, unexpected {unexpected}"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, but the config and backbone need "
                f"{tuple(expected[name].shape)}"
            )


def _readout_attention(layer: BeitLayer, hidden: torch.Tensor, bias: torch.Tensor | None, index: int) -> torch.Tensor:
    """Attention probabilities of token `index` over all tokens in `layer`, `(batch, heads, L)`; the same scores
    the block computes (scaled dot product plus the relative position bias), made explicit because fused attention
    kernels do not return them."""
    attention = layer.attention
    normed = layer.layernorm_before(hidden)
    batch, length, _ = normed.shape
    heads, head_dim = attention.num_attention_heads, attention.head_dim
    query = attention.q_proj(normed[:, index : index + 1]).view(batch, 1, heads, head_dim).transpose(1, 2)
    key = attention.k_proj(normed).view(batch, length, heads, head_dim).transpose(1, 2)
    scores = (query @ key.transpose(-1, -2)).float() * attention.scaling  # (batch, heads, 1, L)
    if bias is not None:
        scores = scores + bias[:, :, index : index + 1].float()
    return scores.softmax(-1)[:, :, 0]


def _partial_attention(
    attention, normed: torch.Tensor, queries: torch.Tensor, bias_rows: torch.Tensor | None
) -> torch.Tensor:
    """`BeitAttention` for a subset of query tokens `(batch, Lq, D)` against all `(batch, L, D)` keys and values."""
    batch, length, _ = normed.shape
    heads, head_dim = attention.num_attention_heads, attention.head_dim
    num_queries = queries.shape[1]
    query = attention.q_proj(queries).view(batch, num_queries, heads, head_dim).transpose(1, 2)
    key = attention.k_proj(normed).view(batch, length, heads, head_dim).transpose(1, 2)
    value = attention.v_proj(normed).view(batch, length, heads, head_dim).transpose(1, 2)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager_attention_forward)
    # bias_rows: (1, heads, Lq, L)
    out, _ = interface(attention, query, key, value, bias_rows, dropout=0.0, scaling=attention.scaling)
    return attention.o_proj(out.reshape(batch, num_queries, heads * head_dim))


def prototype_contrastive_loss(cosine: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """ProtoVerb's instance–prototype loss: InfoNCE of each instance against the class prototypes.

    `cosine` `(batch, num_labels)` holds each instance's cosine with each class's prototype; the loss is
    `-log(exp(cos_iy / t) / sum_k exp(cos_ik / t))` averaged over the batch.
    """
    return F.cross_entropy(cosine / temperature, labels)


def instance_contrastive_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """ProtoVerb's instance–instance loss on unit-norm `(batch, d)` features.

    Each ordered pair (i, j) of distinct instances of the same class is contrasted with the instances of the other
    classes only: `-log(e_ij / (e_ij + sum_{k: y_k != y_i} e_ik))` with `e_ij = exp(cos(v_i, v_j) / t)`, averaged over
    the pairs (unlike the supervised contrastive loss of Khosla et al., the other positives are not in the
    denominator). Zero when the batch holds no such pair.
    """
    similarity = features @ features.T / temperature  # (batch, batch)
    same = labels[:, None] == labels[None, :]
    positives = same & ~torch.eye(len(features), dtype=torch.bool, device=features.device)
    if not positives.any():
        return features.sum() * 0.0
    negatives = similarity.masked_fill(same, float("-inf")).logsumexp(dim=1, keepdim=True)  # (batch, 1)
    # -log(e^s / (e^s + e^n)) = log(1 + e^(n - s)) = softplus(n - s); exp(-inf) = 0 when a row has no negatives
    return F.softplus(negatives - similarity)[positives].mean()


def resolve_device_map(device_map) -> torch.device | None:
    """The one device a prompt-checkpoint model goes to: `device_map` as a device, a device index, `{"": device}`,
    or `"auto"` (the first CUDA device if there is one, else the CPU). Maps that split the model are refused."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError(
                "device_map must put the whole model on one device ({'': device}); a VPTM model is a frozen backbone "
                f"plus small task tensors and is not split, got {device_map!r}"
            )
        device_map = device_map[""]
    if device_map == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device_map must be a device, a device index, {{'': device}} or 'auto', got {device_map!r}"
        ) from error


def load_mim_backbone(name_or_path: str, revision: str | None = None, **hub_kwargs) -> BeitForMaskedImageModeling:
    """Loads a `BeitForMaskedImageModeling` checkpoint, refusing anything that is not one (no random weights)."""
    from transformers import AutoConfig

    path = resolve_backbone_path(name_or_path)
    try:
        backbone_config = AutoConfig.from_pretrained(path, revision=revision, **hub_kwargs)
    except OSError as error:
        raise OSError(
            f"cannot load the backbone {name_or_path!r} (revision {revision}): {error}. Offline, pass the path of a "
            "local folder holding its config.json and weights, or download it first with "
            "`hf download <id>` while online (HF_HUB_OFFLINE=1 then finds it in the cache)"
        ) from error
    if backbone_config.model_type not in ("beit", "vptm") or not getattr(backbone_config, "use_mask_token", False):
        raise ValueError(
            f"{name_or_path!r} is not a BEiT masked-image-modeling checkpoint: expected model_type 'beit' with "
            f"use_mask_token=True and an lm_head, got model_type {backbone_config.model_type!r}, architectures "
            f"{getattr(backbone_config, 'architectures', None)}"
        )
    mim, info = BeitForMaskedImageModeling.from_pretrained(
        path, revision=revision, output_loading_info=True, **hub_kwargs
    )
    missing = [k for k in info["missing_keys"] if "relative_position_index" not in k]
    if missing:
        raise ValueError(
            f"{name_or_path!r} is not a complete BEiT masked-image-modeling checkpoint: {len(missing)} tensors would "
            f"be random, e.g. {sorted(missing)[:5]} (fine-tuned BEiT classifiers have no MIM head and cannot be used)"
        )
    return mim.eval()


def check_backbone_fits(config: VPTMConfig, backbone_config, source: str) -> None:
    """Refuses a prompt checkpoint whose architecture fields disagree with the backbone it names."""
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "patch_size", "image_size")
    diff = {
        f: (getattr(config, f), getattr(backbone_config, f))
        for f in fields
        if getattr(config, f) != getattr(backbone_config, f)
    }
    if diff:
        detail = ", ".join(f"{f}: checkpoint {a} vs backbone {b}" for f, (a, b) in diff.items())
        raise ValueError(
            f"the prompt checkpoint {source} does not fit the backbone {config.backbone_name_or_path!r}: {detail}"
        )


__all__ = [
    "PrototypicalVerbalizer",
    "VPTMForImageClassification",
    "VPTMImageClassifierOutput",
    "VPTMPreTrainedModel",
    "VPTMPromptEmbeddings",
    "extend_relative_position_bias",
]
