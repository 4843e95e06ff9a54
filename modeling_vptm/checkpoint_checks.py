"""The checks a prompt checkpoint passes before its task is built: the backbone it was made on, the architecture it
fits, and its tensors' names and shapes.

This is a Hub code file: it imports only torch, transformers and its siblings.
"""

from __future__ import annotations

import torch


# Architecture fields a prompt checkpoint and its backbone must agree on.
FIT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "patch_size", "image_size")


def check_same_backbone(config, name_or_path: str, revision: str | None, source: str, holder: str) -> None:
    """Refuses prompts made on another backbone name or revision than `name_or_path` at `revision`, which `holder`
    ("this server holds") names in the message."""
    if (config.backbone_name_or_path, config.backbone_revision) != (name_or_path, revision):
        raise ValueError(
            f"{source} was made on backbone {config.backbone_name_or_path!r} (revision {config.backbone_revision}), "
            f"but {holder} {name_or_path!r} (revision {revision})"
        )


def check_fits_backbone(config, fingerprint: str, backbone_config, source: str) -> None:
    """Refuses prompts trained on other backbone weights than the ones loaded (`fingerprint`), or whose architecture
    fields disagree with the backbone's."""
    if config.backbone_fingerprint is not None and fingerprint != config.backbone_fingerprint:
        raise ValueError(
            f"{source} was trained on backbone {config.backbone_name_or_path!r} (revision "
            f"{config.backbone_revision}) with weights fingerprint {config.backbone_fingerprint[:16]}..., but the "
            f"weights loaded now have fingerprint {fingerprint[:16]}...: the prompts do not fit these weights"
        )
    diff = {
        f: (getattr(config, f), getattr(backbone_config, f))
        for f in FIT_FIELDS
        if getattr(config, f) != getattr(backbone_config, f)
    }
    if diff:
        detail = ", ".join(f"{f}: checkpoint {a} vs backbone {b}" for f, (a, b) in diff.items())
        raise ValueError(f"{source} does not fit the backbone {config.backbone_name_or_path!r}: {detail}")


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


__all__ = ["check_fits_backbone", "check_same_backbone", "check_task_tensors"]
