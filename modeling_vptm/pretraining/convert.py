"""Converts original BEiT v2 (and BEiT v1) pre-training checkpoints into transformers' BeitForMaskedImageModeling.

The authors release BEiT v2 masked-image-modeling checkpoints (with the `lm_head` over the VQ-KD vocabulary that
VPTM reads) only in their own PyTorch format: a `.pth` whose `model` entry holds `cls_token`, `mask_token`,
`patch_embed.proj.*`, an optional `pos_embed`, `rel_pos_bias.relative_position_bias_table` (shared bias) or per-block
`blocks.{i}.attn.relative_position_bias_table`, and per block `norm1`, `attn.qkv.weight` (fused, no bias) with
`attn.q_bias` / `attn.v_bias`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`, `gamma_1`, `gamma_2`; then `norm` and
`lm_head`. BEiT v2's `cls_pt_layers` branch (the patch-aggregation head used only in pre-training) is dropped, as
are the index buffers. BEiT v1 pre-training checkpoints use the same layout and convert with the same function.

The architecture is read off the tensors (hidden size, depth, patch size, vocabulary, window size from the bias
table); heads are `hidden_size // 64`, as in every BEiT size. The file is read with `torch.load(weights_only=True)`:
no pickled code runs. Written from the key layout and the architecture description above, not from the authors' code.
"""

from __future__ import annotations

import math
import os
import re

import torch
from transformers import BeitConfig, BeitForMaskedImageModeling, BeitImageProcessor

from ..atomic_write import give_default_permissions


# ImageNet statistics, which BEiT v2 pre-training normalises with
IMAGENET_DEFAULT_MEAN = [0.485, 0.456, 0.406]
IMAGENET_DEFAULT_STD = [0.229, 0.224, 0.225]
DROPPED_PREFIXES = ("cls_pt_layers.",)
DROPPED_SUFFIXES = ("relative_position_index",)


def _state_dict(checkpoint) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, dict):
        for key in ("model", "module", "state_dict"):
            if key in checkpoint and isinstance(checkpoint[key], dict):
                return checkpoint[key]
        if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return checkpoint
    raise ValueError(
        "expected an original BEiT checkpoint: a dict with a 'model' entry (or a plain state dict) of tensors, got "
        f"{type(checkpoint).__name__} with keys {list(checkpoint)[:8] if isinstance(checkpoint, dict) else None}"
    )


def config_from_original(state: dict[str, torch.Tensor], **overrides) -> BeitConfig:
    """The `BeitConfig` of an original checkpoint, read off its tensor shapes."""
    required = ("cls_token", "mask_token", "patch_embed.proj.weight", "norm.weight", "lm_head.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"not an original BEiT pre-training checkpoint: missing {missing}")
    hidden = state["cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    patch = state["patch_embed.proj.weight"].shape[-1]
    shared = "rel_pos_bias.relative_position_bias_table" in state
    per_block = "blocks.0.attn.relative_position_bias_table" in state
    table = state.get(
        "rel_pos_bias.relative_position_bias_table", state.get("blocks.0.attn.relative_position_bias_table")
    )
    if table is not None:
        window = int(round((math.sqrt(table.shape[0] - 3) + 1) / 2))  # (2W - 1)^2 + 3 entries
        image_size = window * patch
    elif "pos_embed" in state:
        image_size = int(round(math.sqrt(state["pos_embed"].shape[1] - 1))) * patch
    else:
        image_size = 224
    fields = dict(
        hidden_size=hidden,
        num_hidden_layers=depth,
        num_attention_heads=hidden // 64,
        intermediate_size=state["blocks.0.mlp.fc1.weight"].shape[0],
        patch_size=patch,
        image_size=image_size,
        num_channels=state["patch_embed.proj.weight"].shape[1],
        vocab_size=state["lm_head.weight"].shape[0],
        use_mask_token=True,
        use_absolute_position_embeddings="pos_embed" in state,
        use_shared_relative_position_bias=shared,
        use_relative_position_bias=per_block,
        layer_scale_init_value=0.1 if "blocks.0.gamma_1" in state else 0.0,
        layer_norm_eps=1e-6,  # the original models build LayerNorm(eps=1e-6)
        hidden_act="gelu",
        use_mean_pooling=True,  # the MIM head's norm is BeitForMaskedImageModeling.layernorm
        drop_path_rate=0.0,
        architectures=["BeitForMaskedImageModeling"],
    )
    fields.update(overrides)
    return BeitConfig(**fields)


def convert_original_state_dict(state: dict[str, torch.Tensor], config: BeitConfig) -> dict[str, torch.Tensor]:
    """Maps original tensors onto `BeitForMaskedImageModeling` names; every key is used or deliberately dropped."""
    hidden = config.hidden_size
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(src: str, dst: str) -> None:
        out[dst] = state[src]
        used.add(src)

    take("cls_token", "beit.embeddings.cls_token")
    take("mask_token", "beit.embeddings.mask_token")
    take("patch_embed.proj.weight", "beit.embeddings.patch_embeddings.projection.weight")
    take("patch_embed.proj.bias", "beit.embeddings.patch_embeddings.projection.bias")
    if "pos_embed" in state:
        take("pos_embed", "beit.embeddings.position_embeddings")
    if config.use_shared_relative_position_bias:
        take("rel_pos_bias.relative_position_bias_table", "beit.shared_position_bias.relative_position_bias_table")
    for i in range(config.num_hidden_layers):
        src, dst = f"blocks.{i}.", f"beit.layers.{i}."
        take(src + "norm1.weight", dst + "layernorm_before.weight")
        take(src + "norm1.bias", dst + "layernorm_before.bias")
        qkv = state[src + "attn.qkv.weight"]  # (3 * hidden, hidden): query, key, value stacked
        used.add(src + "attn.qkv.weight")
        out[dst + "attention.q_proj.weight"] = qkv[:hidden]
        out[dst + "attention.k_proj.weight"] = qkv[hidden : 2 * hidden]
        out[dst + "attention.v_proj.weight"] = qkv[2 * hidden :]
        take(src + "attn.q_bias", dst + "attention.q_proj.bias")  # the key projection has no bias
        take(src + "attn.v_bias", dst + "attention.v_proj.bias")
        take(src + "attn.proj.weight", dst + "attention.o_proj.weight")
        take(src + "attn.proj.bias", dst + "attention.o_proj.bias")
        take(src + "norm2.weight", dst + "layernorm_after.weight")
        take(src + "norm2.bias", dst + "layernorm_after.bias")
        for name in ("fc1", "fc2"):
            take(src + f"mlp.{name}.weight", dst + f"mlp.{name}.weight")
            take(src + f"mlp.{name}.bias", dst + f"mlp.{name}.bias")
        if config.layer_scale_init_value > 0:
            take(src + "gamma_1", dst + "lambda_1")
            take(src + "gamma_2", dst + "lambda_2")
        if config.use_relative_position_bias:
            take(
                src + "attn.relative_position_bias_table", dst + "relative_position_bias.relative_position_bias_table"
            )
    take("norm.weight", "layernorm.weight")
    take("norm.bias", "layernorm.bias")
    take("lm_head.weight", "lm_head.weight")
    take("lm_head.bias", "lm_head.bias")

    leftover = sorted(
        k for k in state if k not in used and not k.startswith(DROPPED_PREFIXES) and not k.endswith(DROPPED_SUFFIXES)
    )
    if leftover:
        raise ValueError(f"the checkpoint holds {len(leftover)} tensors this converter does not know: {leftover[:10]}")
    return out


def convert_beit_checkpoint(checkpoint_path: str | os.PathLike, output_dir: str | os.PathLike, **config_overrides):
    """Converts an original BEiT v2/v1 pre-training `.pth` into a `BeitForMaskedImageModeling` folder (config,
    safetensors weights, image processor with ImageNet mean/std) and returns the model."""
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler refuses anything that is not plain tensors and containers
        raise ValueError(f"cannot read {checkpoint_path} as a weights-only PyTorch checkpoint: {error}") from error
    state = _state_dict(checkpoint)
    config = config_from_original(state, **config_overrides)
    tensors = convert_original_state_dict(state, config)
    model = BeitForMaskedImageModeling(config).eval()
    own = model.state_dict()
    for name, tensor in tensors.items():
        if name not in own:
            raise ValueError(f"converted tensor {name} has no place in BeitForMaskedImageModeling")
        if own[name].shape != tensor.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} vs model shape {tuple(own[name].shape)}")
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise ValueError(f"the checkpoint leaves {len(missing)} model tensors unset, e.g. {missing[:5]}")
    model.load_state_dict(tensors, strict=True)
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    BeitImageProcessor(
        size={"height": config.image_size, "width": config.image_size}, do_center_crop=False,
        image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD, do_convert_rgb=True,
    ).save_pretrained(output_dir)  # fmt: skip
    give_default_permissions(output_dir)  # a backbone to publish: readable as any other file (safetensors: 0600)
    return model


__all__ = [
    "config_from_original",
    "convert_beit_checkpoint",
    "convert_original_state_dict",
]
