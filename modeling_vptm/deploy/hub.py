"""Publishing to the Hub so that prompt checkpoints load anywhere.

A prompt checkpoint names its frozen backbone. A packaged name (`vptm:...`) resolves only where vptm is installed,
and a local folder only on the machine that holds it; before such a checkpoint is pushed, the backbone is pushed
(`push_backbone`) and the checkpoint's config is pointed at that Hub copy (`point_at_hub_backbone`). Loading checks
the backbone's fingerprint, so a Hub copy with other weights is refused, never silently used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

from ..adapter_io import ADAPTER_CONFIG
from ..backbone_loading import load_mim_backbone
from ..prompted_backbone import backbone_fingerprint
from ..shipped import SHIPPED_PREFIX, resolve_backbone_path
from .model_card import LICENSE


# what a backbone folder may hold: the MIM model, its image processor, and the project's own extras
BACKBONE_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "visual_tokenizer.safetensors",
                  "evaluation.json", "pretrain_summary.json")  # fmt: skip


def backbone_card(folder: str, source: str, repo_id: str, fingerprint: str):
    """The card of a pushed backbone: where it came from, its fingerprint, how to prompt it."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(license=LICENSE, library_name="transformers", tags=["vptm", "beit", "masked-image-modeling"])
    config = json.load(open(os.path.join(folder, "config.json")))
    text = f"""---
{data.to_yaml()}
---

# {repo_id.split("/")[-1]}

A BEiT masked-image-modeling backbone (`BeitForMaskedImageModeling`: hidden size {config.get("hidden_size")},
{config.get("num_hidden_layers")} blocks, {config.get("image_size")}-pixel images in {config.get("patch_size")}-pixel
patches, {config.get("vocab_size")} visual tokens), published from `{source}` so that VPTM prompt checkpoints
trained on it load anywhere. Weights fingerprint (vptm's SHA-256 over the backbone tensors): `{fingerprint}`.

```python
from modeling_vptm import VPTMForImageClassification

model = VPTMForImageClassification.from_backbone("{repo_id}", revision="<commit>", num_labels=10)
```
"""
    return ModelCard(text)


def push_backbone(
    backbone: str, repo_id: str, *, token: str | None = None, private: bool | None = None,
    revision: str | None = None, card_path: str | None = None, source: str | None = None,
) -> str:  # fmt: skip
    """Uploads a backbone folder (packaged `vptm:` name, converted or local folder) with a card; returns the commit.

    The model is loaded first, so that a folder that is not a BEiT MIM checkpoint is refused before any upload.
    `source` names where the weights came from in the card (default: `backbone`).
    """
    from huggingface_hub import HfApi

    folder = resolve_backbone_path(backbone) if backbone.startswith(SHIPPED_PREFIX) else backbone
    if not os.path.isdir(folder):
        raise ValueError(
            f"push_backbone needs a packaged name ({SHIPPED_PREFIX}...) or a local folder, got {backbone!r}"
        )
    fingerprint = backbone_fingerprint(load_mim_backbone(folder).state_dict())  # refuses non-MIM checkpoints
    files = [name for name in BACKBONE_FILES if os.path.isfile(os.path.join(folder, name))]
    with tempfile.TemporaryDirectory(prefix="vptm-backbone-") as staging:
        for name in files:
            shutil.copy(os.path.join(folder, name), os.path.join(staging, name))
        if card_path is not None:
            shutil.copy(card_path, os.path.join(staging, "README.md"))
        else:
            card = backbone_card(folder, source or backbone, repo_id, fingerprint)
            card.save(os.path.join(staging, "README.md"))
        api = HfApi(token=token)
        api.create_repo(repo_id, exist_ok=True, private=private)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=staging, revision=revision, commit_message=f"Upload backbone from {backbone}"
        )
    return getattr(commit, "oid", None) or revision or "main"


def point_at_hub_backbone(folder: str, hub_id: str, hub_revision: str | None) -> None:
    """Rewrites the config in `folder` (a staging copy of a prompt checkpoint) to load its backbone from the Hub."""
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    config.update(backbone_name_or_path=hub_id, backbone_revision=hub_revision)
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def point_adapter_at(folder: str | os.PathLike, base_model: str, revision: str | None = None) -> None:
    """Rewrites the adapter config in `folder` (a staging copy) to name `base_model` (a Hub id) as its base."""
    path = os.path.join(folder, ADAPTER_CONFIG)
    with open(path) as f:
        config = json.load(f)
    config.update(base_model_name_or_path=base_model, revision=revision)
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def push_folder(
    folder: str, repo_id: str, token: str | None, files: list[str], private: bool | None = None,
    revision: str | None = None,
) -> str:  # fmt: skip
    """Uploads exactly `files` of `folder` (the prompt checkpoint, code, processor and card) to `repo_id`, on the
    branch `revision` (created if needed) of a repository created `private` if it does not exist yet."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True, private=private)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=folder, allow_patterns=files, revision=revision,
        commit_message="Upload VPTM prompt checkpoint",
    )  # fmt: skip
    return getattr(commit, "oid", None) or "main"


def push_checkpoint(
    out: str, card, token: str | None = None, private: bool | None = None, revision: str | None = None,
    backbone_hub_id: str | None = None, backbone_hub_revision: str | None = None,
) -> dict:  # fmt: skip
    """Pushes a trained folder (`card`: its `model_card.CardInfo`, naming the method and the repository) to the Hub:
    the checkpoint, code, processor and labels, then the card that pins the commit holding them (the run's own
    records stay local). When it was trained on a local or packaged backbone, what is pushed names the backbone's Hub
    copy `backbone_hub_id` instead (pushed with `push_backbone`): the prompt checkpoint's config, or the adapter's
    base. Returns the files and the commit."""
    from ..training.runs import RUN_ARGS_FILE
    from .model_card import prompt_checkpoint_card

    files = sorted(
        f for f in os.listdir(out) if os.path.isfile(os.path.join(out, f)) and f != RUN_ARGS_FILE
        and not f.endswith("_results.json") and not f.startswith(("training_args", "trainer_state"))
    )  # fmt: skip
    hub = {"private": private, "revision": revision}
    if backbone_hub_id:
        card = dataclasses.replace(card, backbone=backbone_hub_id, backbone_revision=backbone_hub_revision)
    with tempfile.TemporaryDirectory(prefix="vptm-push-") as staging:
        for name in files:
            shutil.copy(os.path.join(out, name), os.path.join(staging, name))
        has_adapter = ADAPTER_CONFIG in files
        # a prompt checkpoint names its backbone in its config (a PEFT classifier's config holds only labels)
        has_config = "config.json" in files and json.load(open(os.path.join(out, "config.json"))).get(
            "model_type"
        ) == ("vptm")
        if backbone_hub_id and has_config:
            point_at_hub_backbone(staging, backbone_hub_id, backbone_hub_revision)
        if has_config and has_adapter:
            point_adapter_at(staging, card.repo_id)  # the adapter's base is the prompt checkpoint beside it
        elif backbone_hub_id and has_adapter:
            point_adapter_at(staging, backbone_hub_id, backbone_hub_revision)
        prompt_checkpoint_card(card).save(os.path.join(staging, "README.md"))
        commit = push_folder(staging, card.repo_id, token, files, **hub)
        # the card's loading snippet pins the commit that holds these files; a second commit adds that card
        prompt_checkpoint_card(dataclasses.replace(card, revision=commit)).save(os.path.join(staging, "README.md"))
        push_folder(staging, card.repo_id, token, ["README.md"], **hub)
    return {"pushed_files": files, "pushed_commit": commit}


__all__ = [
    "BACKBONE_FILES",
    "push_backbone",
    "push_checkpoint",
]
