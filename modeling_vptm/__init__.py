"""vptm: VPTM (visual prompt learning as masked visual token modeling) for Hugging Face transformers.

Importing the package registers `VPTMConfig` and `VPTMForImageClassification` with the Auto classes, so
`AutoModelForImageClassification.from_pretrained(prompt_checkpoint)` works without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .backbones import SHIPPED_BACKBONE, shipped_backbone_path
from .checkpoint_io import load_mim_backbone
from .configuration_vptm import VPTMConfig
from .modeling_vptm import VPTMForImageClassification, VPTMImageClassifierOutput
from .prompted_backbone import PromptedBackbone, PromptedBackboneOutput, SequenceLayout, extend_relative_position_bias
from .vptm_task import PrototypicalVerbalizer, TaskHeadOutput, VPTMPromptEmbeddings, VPTMTask


__version__ = "0.1.0"

AutoConfig.register("vptm", VPTMConfig, exist_ok=True)
AutoModel.register(VPTMConfig, VPTMForImageClassification, exist_ok=True)
AutoModelForImageClassification.register(VPTMConfig, VPTMForImageClassification, exist_ok=True)

# Training (transformers' Trainer, and with it accelerate) and the PEFT methods are imported when first used, not by
# `import modeling_vptm`: serving and prediction never load them.
_LAZY = {
    "VPTMTrainer": "training",
    "PixelValuesCollator": "training",
    "prepare_images": "training",
    "label_names": "training",
    "apply_peft": "peft_methods",
    "lora_config": "peft_methods",
    "load_classifier": "peft_methods",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SHIPPED_BACKBONE",
    "PixelValuesCollator",
    "VPTMTrainer",
    "apply_peft",
    "label_names",
    "load_classifier",
    "lora_config",
    "prepare_images",
    "PromptedBackbone",
    "PromptedBackboneOutput",
    "PrototypicalVerbalizer",
    "SequenceLayout",
    "TaskHeadOutput",
    "VPTMConfig",
    "VPTMForImageClassification",
    "VPTMImageClassifierOutput",
    "VPTMPromptEmbeddings",
    "VPTMTask",
    "extend_relative_position_bias",
    "load_mim_backbone",
    "shipped_backbone_path",
]
