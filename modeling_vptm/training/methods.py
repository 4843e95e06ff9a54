"""The methods `examples/run_classification.py` trains, each built from its `ModelArguments`: VPTM and VPT
(`VPTMForImageClassification`), the linear probe, full fine-tuning (`BeitForImageClassification` from the MIM
checkpoint), and PEFT's methods on either (`add_adapter`); and how each trained model is saved.
"""

from __future__ import annotations

import dataclasses

from transformers import Trainer

from ..configuration_vptm import VPTMConfig
from ..modeling_vptm import VPTMForImageClassification
from .arguments import ModelArguments
from .peft_methods import (
    PEFT_CLASSIFIER_METHODS,
    PEFT_METHODS,
    apply_peft,
    classifier_from_mim,
    lora_config,
    read_peft_config,
    save_labels,
)


def build_model(model_args: ModelArguments, id2label: dict[int, str]):
    """The method's model, untrained; the PEFT methods' before their adapter is added (`add_adapter`)."""
    hub = {"revision": model_args.model_revision, "cache_dir": model_args.cache_dir, "token": model_args.token}
    if model_args.method in ("full", *PEFT_CLASSIFIER_METHODS):
        return classifier_from_mim(model_args.model_name_or_path, id2label, **hub)  # refuses non-MIM checkpoints
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


def add_adapter(model, model_args: ModelArguments):
    """The PEFT methods' model: PEFT's adapter (with the head in its modules_to_save) on the built model."""
    if model_args.method not in PEFT_METHODS:
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
    if model_args.method == "vptm_lora" and trainer.is_world_process_zero():
        # first the VPTM prompt checkpoint the adapter goes on (its original task), then the adapter beside it
        trainer.model.get_base_model().save_pretrained(trainer.args.output_dir)
    trainer.save_model()  # prompt-only for vptm/vpt/linear (VPTMForImageClassification.save_pretrained)
    if model_args.method in PEFT_CLASSIFIER_METHODS and trainer.is_world_process_zero():
        save_labels(trainer.args.output_dir, id2label)


__all__ = ["add_adapter", "build_model", "save_final_model"]
