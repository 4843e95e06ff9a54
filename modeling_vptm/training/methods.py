"""The methods `examples/run_classification.py` trains, in one table: each method's name, how its model is built and
saved, the title its model card gives it, its defaults (learning rate, prompt location, LoRA's targets) and the flags
it reads.

VPTM and VPT are `VPTMForImageClassification`, as is the linear probe; full fine-tuning is `BeitForImageClassification`
from the MIM checkpoint; PEFT's methods put an adapter on one of those (`add_adapter`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..configuration_vptm import VPTMConfig
from ..modeling_vptm import VPTMForImageClassification
from ..peft_classifier import save_peft_classifier_config
from .peft_methods import (
    ATTENTION_AND_MLP,
    QUERY_VALUE,
    apply_peft,
    classifier_from_mim,
    lora_config,
    read_peft_config,
)


if TYPE_CHECKING:
    from transformers import Trainer


class ModelArguments(Protocol):
    """What a method reads of the command line's model arguments (`arguments.ModelArguments`, a dataclass, is the one
    the script passes). Declared here so that the table of methods does not import the command line that lists it."""

    method: str
    model_name_or_path: str
    model_revision: str | None
    cache_dir: str | None
    token: str | None
    peft_config: str | None
    lora_r: int
    lora_alpha: float
    lora_dropout: float

    def prompt_layer_list(self) -> str | list[int]: ...

    def lora_targets(self) -> list[str]: ...


# the ModelArguments fields each method reads; a flag outside its method's set is reported as ignored
PROMPT_FIELDS = frozenset({"prompt_length", "prompt_layers", "prompt_init", "extra_token_bias"})
VERBALIZER_FIELDS = frozenset({"prototype_dim", "prototypes_per_class", "logit_scale_init", "learn_logit_scale",
                               "prototype_contrastive_weight", "instance_contrastive_weight",
                               "contrastive_temperature", "prototype_init"})  # fmt: skip
MASK_FIELDS = frozenset({"mask_token_mode", "mask_token_position", "train_mask_token", "head_input", "classifier"})
LORA_FIELDS = frozenset({"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"})


def build_vptm_model(model_args: ModelArguments, id2label: dict[int, str]) -> VPTMForImageClassification:
    """A `VPTMForImageClassification` on the backbone with the method's config fields: VPTM's verbalizer, or for the
    other methods a linear head on CLS (VPT's prompts; the linear probe without prompts)."""
    config_fields = {f.name for f in dataclasses.fields(VPTMConfig)}  # the script's other arguments stay out
    fields = {f.name: getattr(model_args, f.name) for f in dataclasses.fields(model_args) if f.name in config_fields}
    fields["prompt_layers"] = model_args.prompt_layer_list()
    if model_args.method not in ("vptm", "vptm_lora"):
        fields["classifier"] = "linear_cls"
    if model_args.method == "linear":
        fields["prompt_length"] = 0
    return VPTMForImageClassification.from_backbone(
        model_args.model_name_or_path, id2label=id2label, revision=model_args.model_revision,
        cache_dir=model_args.cache_dir, token=model_args.token, **fields,
    )  # fmt: skip


def build_classifier(model_args: ModelArguments, id2label: dict[int, str]):
    """`BeitForImageClassification` from the MIM checkpoint (refusing any other): full fine-tuning's model, and the
    base of the PEFT classifiers."""
    hub = {"revision": model_args.model_revision, "cache_dir": model_args.cache_dir, "token": model_args.token}
    return classifier_from_mim(model_args.model_name_or_path, id2label, **hub)


def save_model(trainer: Trainer, model_args: ModelArguments, id2label: dict[int, str]) -> None:
    """Trainer's own save: a prompt-only checkpoint for the VPTM models, full weights for full fine-tuning."""
    trainer.save_model()


def save_peft_classifier(trainer: Trainer, model_args: ModelArguments, id2label: dict[int, str]) -> None:
    """PEFT's adapter folder, and the config.json (the labels its head was trained on) that makes it load through the
    Auto classes and `pipeline` (`peft_classifier.PeftClassifier`)."""
    trainer.save_model()
    if trainer.is_world_process_zero():
        save_peft_classifier_config(trainer.args.output_dir, id2label)


def save_vptm_with_adapter(trainer: Trainer, model_args: ModelArguments, id2label: dict[int, str]) -> None:
    """The VPTM prompt checkpoint the adapter goes on (its original task), then the adapter beside it, naming that
    checkpoint as its base."""
    output_dir = os.path.abspath(trainer.args.output_dir)
    if trainer.is_world_process_zero():
        trainer.model.get_base_model().save_pretrained(output_dir)
    for config in trainer.model.peft_config.values():
        config.base_model_name_or_path = output_dir
    trainer.save_model()


@dataclass(frozen=True)
class Method:
    """One way to train a classifier on the frozen backbone, as `--method` names it.

    Attributes:
        name: the `--method` value.
        title: how its model card names it.
        learning_rate: the peak learning rate when `--learning_rate` is not given (chosen on validation data).
        reads: the `ModelArguments` fields it reads (others given are reported as ignored).
        build: its model, untrained, from the arguments and the labels (before a PEFT adapter is added).
        save: writes the trained model into the run's folder.
        peft: whether it trains a PEFT adapter (`add_adapter` puts it on the built model).
        peft_classifier: whether its base is `BeitForImageClassification` (a folder of PEFT's files and a config.json
            of the labels, `peft_classifier.PeftClassifierConfig`); vptm_lora's base is a VPTM prompt checkpoint.
        prompt_layers: where its prompts go unless `--prompt_layers` says (prompt methods only).
        lora_targets: the modules its LoRA adapts unless `--lora_target_modules` says (LoRA methods only).
    """

    name: str
    title: str
    learning_rate: float
    reads: frozenset[str]
    build: Callable
    save: Callable
    peft: bool = False
    peft_classifier: bool = False
    prompt_layers: str | None = None
    lora_targets: tuple[str, ...] | None = None


# Defaults chosen on validation data carved from the training images (experiments/select_defaults.py, docs/method.md,
# docs/results.md): prompt locations on 3 splits of each shipped backbone (VPTM's is VPTMConfig's own default), LoRA's
# learning rate and targets (attention and MLP for the baseline, query and value inside VPTM); peft takes lora's rate.
METHODS = {
    method.name: method
    for method in (
        Method(
            "vptm",
            "VPTM",
            1e-2,
            PROMPT_FIELDS | MASK_FIELDS | VERBALIZER_FIELDS,
            build_vptm_model,
            save_model,
            prompt_layers=VPTMConfig.prompt_layers,
        ),  # fmt: skip
        Method("vpt", "VPT", 1e-2, PROMPT_FIELDS, build_vptm_model, save_model, prompt_layers="deep"),
        Method("linear", "linear-probe", 1e-2, frozenset(), build_vptm_model, save_model),
        Method("full", "fully fine-tuned", 1e-3, frozenset(), build_classifier, save_model),
        Method(
            "lora",
            "LoRA",
            3e-3,
            LORA_FIELDS,
            build_classifier,
            save_peft_classifier,
            peft=True,
            peft_classifier=True,
            lora_targets=ATTENTION_AND_MLP,
        ),  # fmt: skip
        Method(
            "peft",
            "PEFT",
            3e-3,
            frozenset({"peft_config"}),
            build_classifier,
            save_peft_classifier,
            peft=True,
            peft_classifier=True,
        ),  # fmt: skip
        Method(
            "vptm_lora",
            "VPTM + LoRA",
            1e-2,
            PROMPT_FIELDS | MASK_FIELDS | VERBALIZER_FIELDS | LORA_FIELDS,
            build_vptm_model,
            save_vptm_with_adapter,
            peft=True,
            prompt_layers=VPTMConfig.prompt_layers,
            lora_targets=QUERY_VALUE,
        ),  # fmt: skip
    )
}
# every flag some method reads: a given flag outside its method's `reads` is reported as ignored
METHOD_FLAGS = frozenset().union(*(method.reads for method in METHODS.values()))


def build_model(model_args: ModelArguments, id2label: dict[int, str]):
    """The method's model, untrained; the PEFT methods' before their adapter is added (`add_adapter`)."""
    return METHODS[model_args.method].build(model_args, id2label)


def add_adapter(model, model_args: ModelArguments):
    """The PEFT methods' model: PEFT's adapter (with the head in its modules_to_save) on the built model."""
    if not METHODS[model_args.method].peft:
        return model
    # the base of lora and peft is the backbone (at its revision); vptm_lora's, the VPTM checkpoint saved beside it
    revision = None if model_args.method == "vptm_lora" else model_args.model_revision
    if model_args.method == "peft":
        config, source = read_peft_config(model_args.peft_config), f"--peft_config {model_args.peft_config}"
    else:
        targets = model_args.lora_targets()
        config = lora_config(model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout, targets)
        source = f"--method {model_args.method} (LoRA on {targets})"
    return apply_peft(model, config, source, base_revision=revision)


def save_final_model(trainer: Trainer, model_args: ModelArguments, id2label: dict[int, str]) -> None:
    """The trained model in output_dir: a prompt checkpoint, full weights, or a PEFT adapter (and what loading it
    needs: the labels of a PEFT classifier, the VPTM base of vptm_lora)."""
    METHODS[model_args.method].save(trainer, model_args, id2label)


__all__ = ["METHODS", "METHOD_FLAGS", "Method", "add_adapter", "build_model", "save_final_model"]
