"""The checks a prompt checkpoint passes before its task is built, each before what it guards is allocated: the
backbone it was made on (named, and fingerprinted), the architecture it fits, its config file's size, and its
tensors' names, shapes and dtypes (read from the safetensors header before any tensor is) and values (finite).

This is a Hub code file: it imports only torch, transformers and its siblings.
"""

from __future__ import annotations

import json
import os
import struct

import torch
from transformers.utils import logging

from .limits import MAX_CONFIG_BYTES, MAX_HEADER_BYTES, listed


logger = logging.get_logger(__name__)

# The backbone fields a prompt checkpoint's config and its backbone must agree on: every one that shapes a tensor of
# the model built from the checkpoint's config, so that nothing is allocated but what the backbone itself holds.
FIT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "patch_size",
    "image_size",
    "num_channels",
    "use_mask_token",
    "use_absolute_position_embeddings",
    "use_relative_position_bias",
    "use_shared_relative_position_bias",
    "use_mean_pooling",
)
# safetensors' dtype names of the floating-point tensors a task may hold
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def check_same_backbone(config, name_or_path: str, revision: str | None, source: str, holder: str) -> None:
    """Refuses prompts made on another backbone name or revision than `name_or_path` at `revision`, which `holder`
    ("this server holds") names in the message."""
    if (config.backbone_name_or_path, config.backbone_revision) != (name_or_path, revision):
        raise ValueError(
            f"{source} was made on backbone {config.backbone_name_or_path!r} (revision {config.backbone_revision}), "
            f"but {holder} {name_or_path!r} (revision {revision})"
        )


def check_fingerprint_given(config, source: str, allow_unverified_backbone: bool = False) -> None:
    """Refuses, before its backbone is loaded, a prompt checkpoint that names no backbone fingerprint: nothing would
    tell the weights it was trained on from others. `allow_unverified_backbone=True` loads it anyway, with a
    warning."""
    if config.backbone_fingerprint is not None:
        return
    if not allow_unverified_backbone:
        raise ValueError(
            f"{source} names no backbone_fingerprint, so nothing tells whether backbone "
            f"{config.backbone_name_or_path!r} holds the weights its prompts were trained on; load it with "
            "allow_unverified_backbone=True only if you trust it, or save it again from a model built with "
            "from_backbone"
        )
    logger.warning(
        "%s names no backbone_fingerprint: loaded on the weights of %r unverified (allow_unverified_backbone=True)",
        source,
        config.backbone_name_or_path,
    )


def check_fits_backbone(config, fingerprint: str, backbone_config, source: str) -> None:
    """Refuses prompts trained on other backbone weights than the ones loaded (`fingerprint`), or whose architecture
    fields disagree with the backbone's. A checkpoint without a fingerprint is refused before this, by
    `check_fingerprint_given`, unless its loader allowed it."""
    if config.backbone_fingerprint is not None and fingerprint != config.backbone_fingerprint:
        raise ValueError(
            f"{source} was trained on backbone {config.backbone_name_or_path!r} (revision "
            f"{config.backbone_revision}) with weights fingerprint {config.backbone_fingerprint[:16]}..., but the "
            f"weights loaded now have fingerprint {fingerprint[:16]}...: the prompts do not fit these weights"
        )
    diff = {
        f: (getattr(config, f, None), getattr(backbone_config, f, None))
        for f in FIT_FIELDS
        if getattr(config, f, None) != getattr(backbone_config, f, None)
    }
    if diff:
        detail = ", ".join(f"{f}: checkpoint {a!r:.40} vs backbone {b!r:.40}" for f, (a, b) in diff.items())
        raise ValueError(f"{source} does not fit the backbone {config.backbone_name_or_path!r}: {detail}")


def check_task_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    """Refuses task tensors that are missing, unexpected or wrongly shaped for the config they come with."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not hold this model's task tensors: missing {listed(missing)}, unexpected "
            f"{listed(unexpected)}"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, but the config and backbone need "
                f"{tuple(expected[name].shape)}"
            )


def check_config_file(path: str, source: str) -> None:
    """Refuses a config file larger than `MAX_CONFIG_BYTES` before it is parsed."""
    size = os.path.getsize(path)
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{source}: its config.json has {size:,} bytes; at most {MAX_CONFIG_BYTES:,} are read")


def check_safetensors_header(path: str, expected: dict[str, torch.Size], source: str) -> None:
    """Refuses a prompt checkpoint's weights file from its header alone, before any tensor is read: a header larger
    than `MAX_HEADER_BYTES`, tensors missing or unexpected for the config, of another shape, not floating point, or
    data that is not the size the header announces."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 2 <= length <= MAX_HEADER_BYTES:
            raise ValueError(
                f"{source}: its weights file {os.path.basename(path)} is truncated or not a safetensors file of task "
                f"tensors: its header announces {length:,} bytes, at most {MAX_HEADER_BYTES:,} are read"
            )
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(
                f"{source}: its weights file is truncated or not a safetensors file (its header: {error})"
            ) from error
    if not isinstance(header, dict):
        raise ValueError(f"{source}: its weights file is truncated or not a safetensors file (header not an object)")
    header.pop("__metadata__", None)
    entries = {name: entry for name, entry in header.items() if _well_formed(entry)}
    malformed = sorted(set(header) - set(entries))
    if malformed:
        raise ValueError(f"{source}: its weights file's header has malformed entries {listed(malformed)}")
    shapes = {name: entry.get("shape") for name, entry in entries.items()}
    check_task_tensors(
        {name: _Shape(shape) for name, shape in shapes.items()}, {n: _Shape(s) for n, s in expected.items()}, source
    )
    not_float = {name: entry.get("dtype") for name, entry in entries.items() if entry.get("dtype") not in FLOAT_DTYPES}
    if not_float:
        name, dtype = next(iter(sorted(not_float.items())))
        raise ValueError(
            f"{source}: task tensors are floating point ({', '.join(FLOAT_DTYPES)}); {name} is {dtype!r:.20}"
            + (f" (and {len(not_float) - 1} more)" if len(not_float) > 1 else "")
        )
    end = max((entry.get("data_offsets", [0, 0])[1] for entry in entries.values()), default=0)
    if os.path.getsize(path) != 8 + length + end:
        raise ValueError(
            f"{source}: its weights file has {os.path.getsize(path):,} bytes, but its header announces "
            f"{8 + length + end:,}: truncated or padded"
        )


def _well_formed(entry) -> bool:
    """A safetensors header entry: a dtype name, a shape of sizes and two data offsets."""

    def sizes(value, length: int | None = None) -> bool:
        whole = isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
        )
        return whole and (length is None or len(value) == length)

    return (
        isinstance(entry, dict)
        and isinstance(entry.get("dtype"), str)
        and sizes(entry.get("shape"))
        and sizes(entry.get("data_offsets"), 2)
    )


class _Shape:
    """A shape as `check_task_tensors` compares it, for tensors known only from a header or a meta model."""

    def __init__(self, shape) -> None:
        self.shape = tuple(shape)


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuses task tensors holding NaN or infinite values: every prediction made with them would be NaN."""
    bad = sorted(name for name, tensor in tensors.items() if not torch.isfinite(tensor).all())
    if bad:
        raise ValueError(f"{source}: task tensors {listed(bad)} hold NaN or infinite values")


__all__ = [
    "FIT_FIELDS",
    "check_config_file",
    "check_fingerprint_given",
    "check_finite",
    "check_fits_backbone",
    "check_safetensors_header",
    "check_same_backbone",
    "check_task_tensors",
]
