"""VPTM configuration: a BEiT configuration plus the fields of the visual prompts and the verbalizer.

VPTM (Liao et al., "Rethinking Visual Prompt Learning as Masked Visual Token Modeling", arXiv 2303.04998) adapts
a frozen masked-image-modeling BEiT to classification by adding prompt tokens and a [MASK] token to its input and
mapping the MIM head's prediction at [MASK] to class labels with a prototypical verbalizer. This file is a Hub
code file: it imports only transformers, the standard library and its sibling `limits`.
"""

from __future__ import annotations

import re

from transformers import BeitConfig

from .limits import MAX_PROTOTYPE_DIM, MAX_PROTOTYPES_PER_CLASS, PROMPT_LENGTH_FACTOR, check_labels, listed


# prompt locations named independently of depth, so that one value means the same on a 6-block and a 12-block backbone
PROMPT_LAYER_PRESETS = ("deep", "shallow", "first_half", "second_half", "every_other")
PROMPT_INITS = ("uniform", "normal")
MASK_TOKEN_MODES = ("append", "replace")
EXTRA_TOKEN_BIASES = ("cls", "zero")
CLASSIFIERS = ("prototypical_verbalizer", "linear_cls", "linear_mask")
HEAD_INPUTS = ("logits", "normalized_logits", "probs", "hidden", "ensemble")
# ProtoVerb's contrastive terms as its reference implementation weights them (both at 1, exp of the plain cosine)
PROTOVERB_LOSSES = {
    "prototype_contrastive_weight": 1.0,
    "instance_contrastive_weight": 1.0,
    "contrastive_temperature": 1.0,
}


class VPTMConfig(BeitConfig):
    r"""
    Configuration of [`VPTMForImageClassification`]. Holds the frozen backbone's BEiT fields (its architecture must
    match the checkpoint named by `backbone_name_or_path`) and the following VPTM fields.

    Every field has a working default: `VPTMConfig()` is a valid configuration (a BEiT-base-shaped backbone with a
    mask token, as transformers builds configs with no arguments when it saves one).

    Args:
        use_mask_token (`bool`, *optional*, defaults to `True`):
            BEiT's field, whose default VPTM changes: the backbone has the `[MASK]` embedding of masked-image-modeling
            pre-training, which every classifier but `"linear_cls"` reads.
        backbone_name_or_path (`str`, *optional*):
            Hub id or local folder of the `BeitForMaskedImageModeling` checkpoint the prompts are trained on. A
            prompt checkpoint loads its backbone from here. `None` builds a backbone from this config alone (tests).
        backbone_revision (`str`, *optional*):
            Git revision (branch, tag or commit) of `backbone_name_or_path` on the Hub.
        backbone_fingerprint (`str`, *optional*):
            SHA-256 over the backbone tensors the prompts were trained on, written by `from_backbone`. Loading a
            prompt checkpoint on different backbone weights is refused when it is set.
        prompt_length (`int`, *optional*, defaults to 10):
            Number of learnable prompt tokens P per prompted block; 0 disables prompts.
        prompt_layers (`str` or `list[int]`, *optional*, defaults to `"first_half"`):
            Which blocks get prompts: `"deep"` (every block its own P prompts), `"shallow"` (block 0 only),
            `"first_half"` (blocks 0 to n/2 - 1 of n, rounded down: 0-2 of 6, 0-5 of 12), `"second_half"` (the other
            blocks), `"every_other"` (blocks 0, 2, 4, ...) — locations that mean the same whatever the depth — or a
            list of block indices (the prompt-location ablation). Before a prompted block i > 0 the prompt slice of
            the sequence is overwritten with block i's prompts; unprompted blocks carry the previous outputs on. The
            default was chosen on validation data on two backbones (the VPT baseline's best there is `"deep"`);
            configs saved before it was `"first_half"` name their location and keep it.
        prompt_init (`str`, *optional*, defaults to `"uniform"`):
            `"uniform"`: U(-v, v) with v = sqrt(6 / (3 * patch_size**2 + hidden_size)), as VPT does; `"normal"`:
            N(0, initializer_range).
        mask_token_mode (`str`, *optional*, defaults to `"append"`):
            `"append"`: the backbone's pre-trained mask token is inserted as an extra token after the prompts
            (sequence `[CLS] + prompts + [MASK] + patches`); `"replace"`: it replaces the patch at
            `mask_token_position`, exactly as in pre-training. Only used by the `prototypical_verbalizer` and
            `linear_mask` classifiers.
        mask_token_position (`int`, *optional*):
            Patch index (raster order) replaced by the mask token when `mask_token_mode="replace"`; defaults to
            the centre patch.
        extra_token_bias (`str`, *optional*, defaults to `"cls"`):
            Relative position bias of the added tokens (prompts, appended [MASK]): `"cls"` reuses BEiT's three CLS
            entries (extra→patch as CLS→patch, patch→extra as patch→CLS, extra↔extra and extra↔CLS as CLS→CLS);
            `"zero"` gives them zero bias. The CLS+patch block is always the pre-trained bias, unchanged.
        train_mask_token (`bool`, *optional*, defaults to `False`):
            Also train a copy of the mask token (initialised from the pre-trained one).
        classifier (`str`, *optional*, defaults to `"prototypical_verbalizer"`):
            `"prototypical_verbalizer"` (VPTM): the MIM head's output at [MASK] is mapped to classes by
            prototypes. `"linear_cls"` (the VPT baseline): a linear head on the final CLS state, no [MASK], no MIM
            head. `"linear_mask"` (an ablation): a linear head on the same [MASK] readout as the verbalizer.
        head_input (`str`, *optional*, defaults to `"hidden"`):
            What the task head (the verbalizer, or the `linear_mask` head) reads at [MASK]; configs saved before this
            name carry it as `verbalizer_input`, which is read as this field. The normalised `"hidden"` state that the
            MIM head decodes (the default: ProtoVerb's choice, and the best read-out on validation data carved from the
            shipped training images), the MIM head's `"logits"` over the visual vocabulary, the same logits
            standardised per image over the vocabulary (`"normalized_logits"`: zero mean, unit variance, so the
            per-image offset and spread of the logits no longer sway the cosine), their softmax `"probs"`, or
            `"ensemble"`: two verbalizers, one on the MIM logits and one on the hidden state, whose class logits are
            each standardised per image (z-scored over the classes) and averaged, as ProtoVerb ensembles its prototypes
            with a manual verbalizer. The token path keeps the prediction of the pre-training task in use; the
            hidden-state path carries what the visual tokens lose. Each path is trained with its own cross-entropy
            and contrastive terms.
        prototype_dim (`int`, *optional*, defaults to 64):
            Dimension d of the projection (no bias) into which the verbalizer input and the prototypes are put.
        prototypes_per_class (`int`, *optional*, defaults to 1):
            M prototypes per class; a class scores the maximum cosine over its prototypes.
        logit_scale_init (`float`, *optional*, defaults to 10.0):
            Initial scale s of the class logits `s * cosine`.
        learn_logit_scale (`bool`, *optional*, defaults to `True`):
            Whether s is trained.
        prototype_contrastive_weight (`float`, *optional*, defaults to 0.0):
            Weight of ProtoVerb's instance–prototype loss, added to the cross-entropy: InfoNCE of each projected
            feature against the class prototypes, `-log(exp(cos(v, p_y) / t) / sum_k exp(cos(v, p_k) / t))`, averaged
            over the batch (a class scores its best prototype). 0 disables it. Only used by the prototypical
            verbalizer.
        instance_contrastive_weight (`float`, *optional*, defaults to 0.5):
            Weight of ProtoVerb's instance–instance loss: for every pair (i, j) of distinct images of the same class
            in the batch, `-log(exp(cos(v_i, v_j) / t) / (exp(cos(v_i, v_j) / t) + sum_{k: y_k != y_i}
            exp(cos(v_i, v_k) / t)))`, averaged over the pairs. 0 disables it. Only used by the prototypical
            verbalizer. The default (0.5 at t = 0.1) was chosen on validation data.
        contrastive_temperature (`float`, *optional*, defaults to 0.1):
            Temperature t of both contrastive terms (ProtoVerb uses exp of the plain cosine, t = 1; 0.1 was better
            on validation data for the instance term).
        skip_unread_outputs (`bool`, *optional*, defaults to `True`):
            Compute only the outputs something reads, in training and inference alike (exact: the logits do not
            change): the last block computes the read-out token only, and a block followed by a prompted block skips
            its prompt slots' outputs, which that block overwrites. Off when hidden states or attentions are asked
            for (`output_hidden_states`, `output_attentions`, or the config's). Configs saved before this name carry
            it as `fast_inference`, which is read as this field.
    """

    model_type = "vptm"
    # save_pretrained copies this file beside the weights and maps AutoConfig to it in auto_map
    _auto_class = "AutoConfig"

    # BeitConfig's default is False (a classifier has none); a VPTM backbone is a MIM checkpoint, which has one
    use_mask_token: bool = True
    backbone_name_or_path: str | None = None
    backbone_revision: str | None = None
    backbone_fingerprint: str | None = None
    prompt_length: int = 10
    prompt_layers: str | list[int] = "first_half"
    prompt_init: str = "uniform"
    mask_token_mode: str = "append"
    mask_token_position: int | None = None
    extra_token_bias: str = "cls"
    train_mask_token: bool = False
    classifier: str = "prototypical_verbalizer"
    head_input: str = "hidden"
    prototype_dim: int = 64
    prototypes_per_class: int = 1
    logit_scale_init: float = 10.0
    learn_logit_scale: bool = True
    prototype_contrastive_weight: float = 0.0
    instance_contrastive_weight: float = 0.5
    contrastive_temperature: float = 0.1
    skip_unread_outputs: bool = True

    def __post_init__(self, **kwargs):
        # A dict taken from a BEiT config carries model_type="beit"; this config is always "vptm".
        kwargs.pop("model_type", None)
        # configs saved before the two ProtoVerb terms had a single supervised instance–instance weight
        legacy = kwargs.pop("contrastive_weight", None)
        if legacy and not self.instance_contrastive_weight:
            self.instance_contrastive_weight = legacy
        # earlier names of skip_unread_outputs and head_input; the new name wins when it was set too
        for old, new in (("fast_inference", "skip_unread_outputs"), ("verbalizer_input", "head_input")):
            legacy = kwargs.pop(old, None)
            if legacy is not None and getattr(self, new) == getattr(type(self), new):
                setattr(self, new, legacy)
        # BEiT's default drop_path_rate (0.1) would matter only in train mode, which the frozen backbone never
        # enters; keep the stored value, it is the checkpoint's.
        super().__post_init__(**kwargs)
        self._check_vptm_fields()

    def _check_vptm_fields(self) -> None:
        def choice(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"VPTMConfig.{name} must be one of {list(allowed)}, got {value!r:.80}")

        def integer(name: str, low: int, high: int | None = None, why: str = "") -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
                bounds = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]{why}"
                raise ValueError(f"VPTMConfig.{name} must be {bounds}, got {value!r:.80}")

        self._check_geometry()
        check_labels(self.id2label, "VPTMConfig")
        sequence = 1 + self.num_patches
        integer("prompt_length", 0, PROMPT_LENGTH_FACTOR * sequence,
                f" ({PROMPT_LENGTH_FACTOR} x the backbone's sequence of 1 + {self.num_patches} patches)")  # fmt: skip
        integer("prototype_dim", 1, MAX_PROTOTYPE_DIM)
        integer("prototypes_per_class", 1, MAX_PROTOTYPES_PER_CLASS)
        if self.backbone_fingerprint is not None and not (
            isinstance(self.backbone_fingerprint, str) and re.fullmatch(r"[0-9a-f]{64}", self.backbone_fingerprint)
        ):
            raise ValueError(
                f"VPTMConfig.backbone_fingerprint must be a SHA-256 (64 hexadecimal digits), got "
                f"{self.backbone_fingerprint!r:.80}"
            )
        choice("prompt_init", PROMPT_INITS)
        choice("mask_token_mode", MASK_TOKEN_MODES)
        choice("extra_token_bias", EXTRA_TOKEN_BIASES)
        choice("classifier", CLASSIFIERS)
        choice("head_input", HEAD_INPUTS)
        self._check_prompt_layers()
        num_patches = self.num_patches
        if self.mask_token_position is not None and not (
            isinstance(self.mask_token_position, int) and 0 <= self.mask_token_position < num_patches
        ):
            raise ValueError(
                f"VPTMConfig.mask_token_position must be a patch index in [0, {num_patches}) for image_size="
                f"{self.image_size} and patch_size={self.patch_size}, got {self.mask_token_position!r:.80}"
            )
        for name in ("logit_scale_init", "contrastive_temperature"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"VPTMConfig.{name} must be a number > 0, got {value!r:.80}")
        for name in ("prototype_contrastive_weight", "instance_contrastive_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"VPTMConfig.{name} must be a number >= 0, got {value!r:.80}")
        if self.head_input == "ensemble" and self.classifier != "prototypical_verbalizer":
            raise ValueError(
                "VPTMConfig.head_input='ensemble' combines two prototypical verbalizers, so classifier must be "
                f"'prototypical_verbalizer', got classifier={self.classifier!r}"
            )
        if not self.use_mask_token and self.classifier != "linear_cls":
            raise ValueError(
                f"VPTMConfig.classifier={self.classifier!r} reads the backbone's mask token, so use_mask_token must "
                "be True (a BEiT masked-image-modeling checkpoint), got use_mask_token=False"
            )

    def _check_geometry(self) -> None:
        """The backbone's sizes that the checks below compute with: whole numbers >= 1."""
        for name in ("image_size", "patch_size", "hidden_size", "num_hidden_layers"):
            value = getattr(self, name)
            values = value if isinstance(value, (list, tuple)) and name in ("image_size", "patch_size") else [value]
            if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
                raise ValueError(f"VPTMConfig.{name} must be a whole number >= 1, got {value!r:.80}")

    def _check_prompt_layers(self) -> None:
        """`prompt_layers`: a preset name, or distinct block indices in range (kept sorted)."""
        if isinstance(self.prompt_layers, str):
            if self.prompt_layers not in PROMPT_LAYER_PRESETS:
                presets = list(PROMPT_LAYER_PRESETS)
                raise ValueError(f"VPTMConfig.prompt_layers must be one of {presets}, got {self.prompt_layers!r:.80}")
        elif not isinstance(self.prompt_layers, (list, tuple)):
            raise ValueError(
                f"VPTMConfig.prompt_layers must be one of {list(PROMPT_LAYER_PRESETS)} or a list of block indices, "
                f"got {self.prompt_layers!r:.80}"
            )
        else:
            layers = list(self.prompt_layers)
            bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int)]
            bad += [i for i in layers if isinstance(i, int) and not 0 <= i < self.num_hidden_layers]
            if not layers or bad or len(set(layers)) != len(layers):
                raise ValueError(
                    f"VPTMConfig.prompt_layers must be one of {list(PROMPT_LAYER_PRESETS)} or a non-empty list of "
                    f"distinct block indices in [0, {self.num_hidden_layers}) (num_hidden_layers="
                    f"{self.num_hidden_layers}), got {listed(layers)}"
                )
            self.prompt_layers = sorted(layers)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid ``(rows, columns)`` of the configured image size."""
        return patch_grid(self)

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid_size
        return rows * cols

    @property
    def prompted_layers(self) -> list[int]:
        """Block indices that receive prompts (empty when `prompt_length` is 0)."""
        if self.prompt_length == 0:
            return []
        blocks, half = self.num_hidden_layers, self.num_hidden_layers // 2
        presets = {
            "deep": range(blocks),
            "shallow": range(1),
            "first_half": range(max(half, 1)),  # a one-block backbone: its block is the first half
            "second_half": range(half, blocks),
            "every_other": range(0, blocks, 2),
        }
        if isinstance(self.prompt_layers, str):
            return list(presets[self.prompt_layers])
        return list(self.prompt_layers)

    @property
    def reads_mask_token(self) -> bool:
        """Whether the model reads out at a [MASK] token (every classifier but the VPT baseline)."""
        return self.classifier != "linear_cls"


def patch_grid(config: BeitConfig) -> tuple[int, int]:
    """Patch grid ``(rows, columns)`` of a BEiT config's image size (sizes may be ints or pairs)."""
    size = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
    patch = config.patch_size if isinstance(config.patch_size, (list, tuple)) else (config.patch_size,) * 2
    return size[0] // patch[0], size[1] // patch[1]


__all__ = ["PROTOVERB_LOSSES", "VPTMConfig"]
