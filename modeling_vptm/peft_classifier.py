"""A PEFT classifier run folder (`--method lora` or `--method peft`) as transformers loads it: `config.json` names the
run's labels and maps the Auto classes to `PeftClassifier`, whose `from_pretrained` builds the base model the
adapter names with those labels and puts the adapter (its tensors and the trained head) on it with PEFT's own
loading. So `AutoModelForImageClassification.from_pretrained(folder)` and `pipeline("image-classification",
model=folder)` give the trained classifier, a plain transformers `BeitForImageClassification` with the adapter in it.

The folder keeps what PEFT writes (`adapter_config.json`, `adapter_model.safetensors`), which PEFT alone loads on a
base model built with these labels. This is a Hub code file (copied into the folder, for `trust_remote_code=True`): it
imports only torch, transformers, the standard library and its siblings, and PEFT when a classifier is loaded.
"""

from __future__ import annotations

import contextlib
import json
import os

from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import logging

from .adapter_io import ADAPTER_CONFIG
from .hub_names import HUB_ARGUMENTS
from .limits import check_labels, listed


logger = logging.get_logger(__name__)

# the base model's tensors a PEFT classifier does not take from the base checkpoint (a BEiT masked-image-modeling
# one): its head, which the adapter holds (modules_to_save), and its pooler, frozen at its initial values in training
HEAD_PREFIXES = ("classifier.", "beit.pooler.")


class PeftClassifierConfig(PretrainedConfig):
    r"""
    `config.json` of a PEFT classifier run folder: the classes its head was trained on (`id2label`, `label2id`).
    The base model and its revision are the adapter's (`adapter_config.json`).
    """

    model_type = "vptm_peft_classifier"
    # save_pretrained copies this file (and the ones it imports) beside the config, for trust_remote_code
    _auto_class = "AutoConfig"


class PeftClassifier(PreTrainedModel):
    """Loads a PEFT classifier run folder (see the module's docstring); never built itself."""

    config_class = PeftClassifierConfig
    base_model_prefix = "model"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs) -> PreTrainedModel:
        """The base model the adapter names, at the revision it names, with the labels of `config.json`, and the
        adapter on it: a transformers model in eval mode, what `pipeline("image-classification")` takes."""
        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes no positional model arguments, got {model_args}")
        hub = {k: v for k, v in kwargs.items() if k in HUB_ARGUMENTS and k != "subfolder"}
        if config is None:
            config = PeftClassifierConfig.from_pretrained(pretrained_model_name_or_path, **hub)
        return load_peft_classifier(pretrained_model_name_or_path, config.id2label, **hub)


def read_adapter_config(name_or_path: str, revision: str | None = None, **hub_kwargs) -> dict:
    """`adapter_config.json` of a folder or Hub repository."""
    from transformers.utils import cached_file

    path = cached_file(name_or_path, ADAPTER_CONFIG, revision=revision, **hub_kwargs)
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def quiet_loading():
    """transformers' report of the tensors a checkpoint lacks, silenced: the base lacks the head and pooler on
    purpose (`HEAD_PREFIXES`), which the loader checks itself."""
    report = logging.get_logger("transformers.modeling_utils")
    level = report.level
    report.setLevel(logging.ERROR)
    try:
        yield
    finally:
        report.setLevel(level)


def load_peft_classifier(name_or_path: str, id2label: dict, revision: str | None = None, **hub_kwargs):
    """A PEFT classifier (folder or Hub id) on its base model, built with `id2label`: the base model's tensors but
    its head and pooler come from the base checkpoint (anything else missing is refused), the adapter and the head
    from the folder, with PEFT's own loading (transformers' `load_adapter` left the head in `modules_to_save` at its
    initial values in some releases, 5.17 among them: other logits, no error)."""
    from transformers import AutoModelForImageClassification

    try:
        import peft
    except ImportError as error:
        raise ImportError(
            f"the PEFT classifier {name_or_path} is a PEFT adapter, which needs PEFT: pip install peft (the peft "
            'extra: pip install -e ".[peft]" in a checkout)'
        ) from error
    try:  # the labels come from the folder's config.json: checked as a prompt checkpoint's are, before anything loads
        id2label = {int(k): v for k, v in (id2label or {}).items()}
    except (TypeError, ValueError):
        raise ValueError(
            f"the PEFT classifier {name_or_path}: id2label's keys must be class numbers, got {listed(id2label)}"
        ) from None
    check_labels(id2label, f"the PEFT classifier {name_or_path}")
    adapter = read_adapter_config(name_or_path, revision, **hub_kwargs)
    base_hub = {k: v for k, v in hub_kwargs.items() if k in ("cache_dir", "token", "local_files_only", "proxies")}
    with quiet_loading():
        model, info = AutoModelForImageClassification.from_pretrained(
            adapter["base_model_name_or_path"], revision=adapter.get("revision"), id2label=id2label,
            label2id={v: k for k, v in id2label.items()}, output_loading_info=True, **base_hub,
        )  # fmt: skip
    missing = [k for k in info["missing_keys"] if not k.startswith(HEAD_PREFIXES)]
    if missing or info["mismatched_keys"]:
        raise ValueError(
            f"the base model {adapter['base_model_name_or_path']!r} of the PEFT classifier {name_or_path} lacks "
            f"{len(missing)} tensors besides the head (e.g. {sorted(missing)[:5]}) or has others of other shapes "
            f"({[k for k, *_ in info['mismatched_keys']][:5]}): it is not the backbone the adapter was trained on"
        )
    peft.PeftModel.from_pretrained(model, name_or_path, revision=revision, **hub_kwargs)  # into `model` itself
    return model.eval()


def save_peft_classifier_config(folder: str | os.PathLike, id2label: dict) -> None:
    """Writes `config.json` (the labels, the Auto classes mapped to the code files) and the code files beside the
    adapter PEFT wrote in `folder`."""
    config = PeftClassifierConfig(id2label=dict(id2label), label2id={v: k for k, v in id2label.items()})
    config.auto_map = {"AutoConfig": "peft_classifier.PeftClassifierConfig",
                       "AutoModelForImageClassification": "peft_classifier.PeftClassifier"}  # fmt: skip
    config.save_pretrained(folder)


__all__ = ["PeftClassifier", "PeftClassifierConfig", "load_peft_classifier", "save_peft_classifier_config"]
