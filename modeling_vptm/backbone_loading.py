"""The frozen backbone a prompt checkpoint names: loading a BEiT masked-image-modeling checkpoint (refusing anything
else, so no weight is ever left random), and the config of prompts on it.

This is a Hub code file: it imports only torch, transformers and its siblings.
"""

from __future__ import annotations

import os

from transformers import BeitForMaskedImageModeling

from .hub_names import check_loadable, hub_error
from .prompted_backbone import backbone_fingerprint
from .shipped import resolve_backbone_path


def load_mim_backbone(name_or_path: str, revision: str | None = None, **hub_kwargs) -> BeitForMaskedImageModeling:
    """Loads a `BeitForMaskedImageModeling` checkpoint (Hub id, folder or shipped `vptm:` name), refusing anything that
    is not one (no random weights)."""
    from transformers import AutoConfig

    path = resolve_backbone_path(name_or_path)
    check_loadable(path, "backbone", revision, **hub_kwargs)
    try:
        backbone_config = AutoConfig.from_pretrained(path, revision=revision, **hub_kwargs)
    except OSError as error:
        if os.path.isdir(path):  # a local folder without a readable config.json
            reason = " ".join(str(error).split())
            raise OSError(f"cannot load the backbone {name_or_path!r} from the folder {path}: {reason}") from error
        raise OSError(hub_error("backbone", name_or_path, revision, error)) from error
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


def backbone_config_fields(backbone_config, backbone_name_or_path: str, revision: str | None, **fields) -> dict:
    """The fields of a `VPTMConfig` for prompts on this backbone: its architecture, where it is loaded from, and
    the given VPTM fields (its own labels and head are not carried over)."""
    merged = backbone_config.to_dict()
    # nor where the backbone was loaded from: a model built on it is no checkpoint of its own yet
    for key in ("architectures", "auto_map", "id2label", "label2id", "num_labels", "transformers_version",
                "_name_or_path"):  # fmt: skip
        merged.pop(key, None)
    merged.update(fields)
    merged.update(backbone_name_or_path=backbone_name_or_path, backbone_revision=revision)
    return merged


def config_on_backbone(config_class, backbone_name_or_path: str, labels: dict, hub: dict, fields: dict):
    """The config of fresh prompts on a BEiT MIM backbone, and the loaded backbone: its architecture, where it loads
    from, its weights' fingerprint, `labels` (`num_labels`, `id2label`, `label2id`, any of them) and `fields`."""
    num_labels, id2label, label2id = labels.get("num_labels"), labels.get("id2label"), labels.get("label2id")
    if id2label is not None:
        id2label = {int(k): v for k, v in id2label.items()}
        if num_labels is not None and num_labels != len(id2label):
            raise ValueError(f"num_labels={num_labels} disagrees with id2label, which has {len(id2label)} labels")
        num_labels = len(id2label)
        label2id = label2id or {v: k for k, v in id2label.items()}
    if num_labels is None or num_labels < 1:
        raise ValueError(f"from_backbone needs the labels: num_labels >= 1 or id2label, got num_labels={num_labels}")
    mim = load_mim_backbone(backbone_name_or_path, **hub)
    config = config_class(
        **backbone_config_fields(mim.config, backbone_name_or_path, hub.get("revision"), **fields),
        id2label=id2label or {i: f"LABEL_{i}" for i in range(num_labels)},
        label2id=label2id or {f"LABEL_{i}": i for i in range(num_labels)},
    )
    config.backbone_fingerprint = backbone_fingerprint(mim.state_dict())
    return config, mim


__all__ = ["backbone_config_fields", "config_on_backbone", "load_mim_backbone"]
