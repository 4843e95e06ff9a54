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

__all__ = [
    "SHIPPED_BACKBONE",
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
