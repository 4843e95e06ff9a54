"""PEFT's methods beside VPTM, on the same frozen backbone, through PEFT's own API.

PEFT (https://github.com/huggingface/peft) is where Hugging Face users do parameter-efficient fine-tuning; it has no
visual prompt tuning of its own, and its registry of methods is an enum inside PEFT, so this package does not
register itself there. It meets PEFT users two ways:

* **PEFT as a baseline.** LoRA (or any PEFT config: LoHa, IA3, BOFT, ...) on `BeitForImageClassification`
  initialised from the same MIM checkpoint as VPTM's backbone, with a fresh classification head trained and saved in
  full (`modules_to_save`). What is saved is what PEFT writes (`adapter_config.json`, `adapter_model.safetensors`),
  plus a `config.json` of the class names the head was trained on that maps the Auto classes to
  `peft_classifier.PeftClassifier`: `AutoModelForImageClassification.from_pretrained(folder)` and
  `pipeline("image-classification", model=folder)` then build the base model with those labels and put the adapter
  on it (transformers alone, given a folder with a config.json and an adapter, would look for the base's weights in
  the folder).
* **PEFT on top of VPTM.** LoRA in the frozen backbone's attention and the VPTM task (`modules_to_save=["task"]`)
  trained together. The folder holds the VPTM prompt checkpoint of the untrained task (the base, whose loading
  rebuilds the backbone and checks its fingerprint) and the adapter (LoRA tensors and the trained task); loading the
  folder loads both (`VPTMForImageClassification.from_pretrained`).

Nothing in the core package imports this module; it needs PEFT (`pip install peft`, or the `peft` extra:
`pip install -e ".[peft]"` in a checkout).
"""

from __future__ import annotations

import copy
import json
import logging
import os

import torch
from transformers import BeitForImageClassification, PreTrainedModel

from .. import peft_classifier
from ..adapter_io import ADAPTER_CONFIG
from ..backbone_loading import load_mim_backbone
from ..peft_classifier import PeftClassifierConfig


logger = logging.getLogger(__name__)

PEFT_INSTALL = 'pip install peft (the peft extra: pip install -e ".[peft]" in a checkout)'
# where a PEFT classifier saved before 0.2 kept its labels (now in its config.json)
LABELS_FILE = "labels.json"
# BEiT's linear layers in transformers 5: the attention's query and value projections (LoRA's classic targets), all
# four of its projections, and those with the MLP's two layers
QUERY_VALUE = ("q_proj", "v_proj")
ATTENTION_AND_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
# LoRA's rank, alpha and dropout for `lora_config` and the script's PEFT methods, chosen on validation data carved
# from the training images (experiments/select_defaults.py; docs/results.md); each method's targets are in its entry
# of `methods.METHODS`
LORA_DEFAULTS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": QUERY_VALUE}


def require_peft(what: str):
    """The `peft` module, or an ImportError that names what needed it and the extra to install."""
    try:
        import peft
    except ImportError as error:
        raise ImportError(f"{what} needs PEFT, which is not installed: {PEFT_INSTALL}") from error
    return peft


def lora_config(
    r: int = LORA_DEFAULTS["r"],
    lora_alpha: float = LORA_DEFAULTS["lora_alpha"],
    lora_dropout: float = LORA_DEFAULTS["lora_dropout"],
    target_modules: tuple[str, ...] | list[str] = LORA_DEFAULTS["target_modules"],
    modules_to_save: list[str] | None = None,
):
    """A `peft.LoraConfig` for a BEiT backbone (its attention projections by default)."""
    peft = require_peft("LoRA")
    if r < 1:
        raise ValueError(f"LoRA's rank must be >= 1, got r={r}")
    return peft.LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=list(target_modules),
        modules_to_save=modules_to_save,
    )  # fmt: skip


def read_peft_config(path: str | os.PathLike):
    """The PEFT config a JSON file describes (as PEFT's own `adapter_config.json` does: `peft_type` and its fields).
    Refuses a missing or malformed file, or one PEFT does not read, naming the file and the reason."""
    peft = require_peft(f"the PEFT config {path}")
    if not os.path.isfile(path):
        raise ValueError(f"the PEFT config {path} does not exist (expected a JSON file with peft_type and its fields)")
    try:
        with open(path) as f:
            fields = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"the PEFT config {path} is not a JSON file: {error}") from error
    if not isinstance(fields, dict) or "peft_type" not in fields:
        kind = sorted(fields) if isinstance(fields, dict) else type(fields).__name__
        raise ValueError(f"the PEFT config {path} must be a JSON object with a peft_type (e.g. LORA), got {kind}")
    known = sorted(peft.PeftType.__members__)
    if str(fields["peft_type"]).upper() not in known:
        raise ValueError(f"the PEFT config {path} names peft_type {fields['peft_type']!r}; PEFT knows {known}")
    fields["peft_type"] = str(fields["peft_type"]).upper()
    if isinstance(fields.get("modules_to_save"), str):  # one module named, as PEFT's own configs allow
        fields["modules_to_save"] = [fields["modules_to_save"]]
    if fields.get("inference_mode"):  # a saved adapter_config.json says true: nothing would train
        logger.info("the PEFT config %s: inference_mode true ignored, the adapter is trained", path)
    fields["inference_mode"] = False
    try:
        config = peft.get_peft_config(fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"the PEFT config {path} is not one PEFT accepts: {error}") from error
    if config.is_prompt_learning:
        raise ValueError(
            f"the PEFT config {path} is {fields['peft_type']}, a prompt-learning method of PEFT's for language "
            "models; visual prompts on this backbone are --method vptm and --method vpt"
        )
    return config


def classifier_from_mim(
    backbone_name_or_path: str, id2label: dict[int, str], **hub_kwargs
) -> BeitForImageClassification:
    """`BeitForImageClassification` initialised from a BEiT MIM checkpoint (refusing any other), with a fresh pooler
    and classification head: the model of full fine-tuning, and the base of the PEFT baselines."""
    mim = load_mim_backbone(backbone_name_or_path, **hub_kwargs)
    config = mim.config
    config.update({"num_labels": len(id2label), "id2label": dict(id2label),
                   "label2id": {v: k for k, v in id2label.items()}})  # fmt: skip
    model = BeitForImageClassification(config)
    model.beit.load_state_dict(mim.beit.state_dict(), strict=False)  # the new pooler/classifier stay fresh
    # what PEFT records as base_model_name_or_path: a folder by its absolute path, so that it loads from anywhere
    name = mim.name_or_path
    model.name_or_path = os.path.abspath(name) if os.path.isdir(name) else name
    return model


def head_module_names(model: torch.nn.Module) -> list[str]:
    """The names of the modules a PEFT adapter of `model` must train and save in full: the task's head."""
    if getattr(model.config, "model_type", None) == "vptm":
        return ["task"]
    return ["classifier"]


def apply_peft(model: PreTrainedModel, peft_config, source: str = "the PEFT config", base_revision: str | None = None):
    """`peft.get_peft_model(model, peft_config)`, the model's head added to `modules_to_save` (a head left out would
    stay at its random initialisation and not be saved), and `base_revision` recorded as the base model's revision. A
    config PEFT cannot apply to this model is refused in one error naming `source` and PEFT's reason."""
    peft = require_peft(source)
    peft_config = copy.deepcopy(peft_config)
    kind = getattr(peft_config.peft_type, "value", peft_config.peft_type)
    heads = head_module_names(model)
    saved = list(getattr(peft_config, "modules_to_save", None) or [])
    if not hasattr(peft_config, "modules_to_save"):
        raise ValueError(f"{source} ({kind}) cannot train and save the model's head {heads}")
    if getattr(peft_config, "is_prompt_learning", False):
        raise ValueError(f"{source} ({kind}) is a prompt-learning method of PEFT's for language models")
    if base_revision is not None and getattr(peft_config, "revision", None) is None:
        peft_config.revision = base_revision
    missing = [name for name in heads if name not in saved]
    if missing:
        logger.info("%s: the head %s added to modules_to_save", source, missing)
        peft_config.modules_to_save = saved + missing
    # the names a target can match, as the model has them before PEFT wraps any
    linear = sorted({".".join(n.split(".")[-2:]) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    try:
        peft_model = peft.get_peft_model(model, peft_config)
    except (ValueError, TypeError, KeyError, AttributeError, NotImplementedError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) not in ("", "None") else type(error).__name__
        raise ValueError(f"{source} ({kind}) cannot be applied to {type(model).__name__}: {reason}") from error
    check_every_target_matched(peft_model, peft_config, source, kind, linear)
    return peft_model


def check_every_target_matched(peft_model, peft_config, source: str, kind: str, linear: list[str]) -> None:
    """PEFT applies a list of target modules as soon as one name matches; a misspelt name (or one of another
    architecture's, such as BERT's `intermediate.dense`) would leave those modules silently untouched."""
    targets = getattr(peft_config, "target_modules", None)
    if not isinstance(targets, (list, tuple, set)):
        return  # a regular expression, or all-linear: PEFT resolves it
    adapted = list(getattr(peft_model, "targeted_module_names", []))
    unmatched = sorted(t for t in targets if not any(n == t or n.endswith(f".{t}") for n in adapted))
    if unmatched:
        raise ValueError(
            f"{source} ({kind}): target modules {unmatched} match no module of "
            f"{type(peft_model.get_base_model()).__name__}; its linear layers end in {linear}"
        )


def repo_file(name_or_path: str, filename: str, revision: str | None = None, **hub_kwargs) -> str | None:
    """The path of `filename` in a folder or Hub repository (downloaded into the cache), or None when it has none."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        return path if os.path.isfile(path) else None
    from transformers.utils import cached_file

    return cached_file(name_or_path, filename, revision=revision, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False, **hub_kwargs)  # fmt: skip


def read_labels(name_or_path: str, revision: str | None = None, **hub_kwargs) -> dict[int, str] | None:
    """`id2label` of a PEFT classifier (folder or Hub id): its config.json's, or, for a folder saved before 0.2,
    its `labels.json`'s; None when it is no PEFT classifier."""
    config = repo_file(name_or_path, "config.json", revision, **hub_kwargs)
    if config is not None:
        with open(config) as f:
            fields = json.load(f)
        if fields.get("model_type") != PeftClassifierConfig.model_type:
            return None
        return {int(k): v for k, v in fields["id2label"].items()}
    path = repo_file(name_or_path, LABELS_FILE, revision, **hub_kwargs)
    if path is None:
        return None
    with open(path) as f:
        return {int(k): v for k, v in json.load(f)["id2label"].items()}


def load_peft_classifier(
    name_or_path: str, revision: str | None = None, id2label: dict[int, str] | None = None, **kwargs
) -> PreTrainedModel:
    """A PEFT classifier saved by this package (folder or Hub id): the base model its adapter names, at the revision
    it names, built with the saved labels (`id2label` when already read), then the adapter (its tensors and the head)
    on it (`peft_classifier.load_peft_classifier`). The result is a transformers model (what
    `pipeline("image-classification", model=...)` takes), in eval mode. Folders saved since 0.2 also load with
    `AutoModelForImageClassification.from_pretrained` and `pipeline(model=folder)` directly."""
    require_peft(f"the PEFT classifier {name_or_path}")
    hub = {k: kwargs[k] for k in ("cache_dir", "token", "local_files_only") if k in kwargs}
    id2label = id2label or read_labels(name_or_path, revision=revision, **hub)
    if id2label is None or repo_file(name_or_path, ADAPTER_CONFIG, revision, **hub) is None:
        raise ValueError(
            f"{name_or_path} holds no {ADAPTER_CONFIG} with a PEFT classifier's config.json (or, before 0.2, "
            f"{LABELS_FILE}): it is not a PEFT classifier saved by vptm (load a PEFT adapter of your own with "
            "peft.PeftModel.from_pretrained on its base model)"
        )
    return peft_classifier.load_peft_classifier(name_or_path, id2label, revision=revision, **hub)


def load_classifier(name_or_path: str, revision: str | None = None, **kwargs) -> PreTrainedModel:
    """Any classifier this package trains, by folder or Hub id, through `AutoModelForImageClassification` (prompt
    checkpoints, vptm_lora, full weights, PEFT classifiers), a PEFT classifier saved before 0.2 (`labels.json` beside
    its adapter) through `load_peft_classifier`."""
    from transformers import AutoModelForImageClassification

    hub = {k: kwargs[k] for k in ("cache_dir", "token", "local_files_only") if k in kwargs}
    id2label = read_labels(name_or_path, revision=revision, **hub)
    if id2label is not None:
        return load_peft_classifier(name_or_path, revision=revision, id2label=id2label, **kwargs)
    return AutoModelForImageClassification.from_pretrained(name_or_path, revision=revision, **kwargs)


__all__ = [
    "ATTENTION_AND_MLP",
    "LORA_DEFAULTS",
    "QUERY_VALUE",
    "apply_peft",
    "classifier_from_mim",
    "load_classifier",
    "load_peft_classifier",
    "lora_config",
    "read_peft_config",
]
