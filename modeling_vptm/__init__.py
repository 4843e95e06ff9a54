"""vptm: VPTM (visual prompt learning as masked visual token modeling) for Hugging Face transformers.

Importing the package registers `VPTMConfig` and `VPTMForImageClassification` with the Auto classes, so
`AutoModelForImageClassification.from_pretrained(prompt_checkpoint)` works without `trust_remote_code`.

The package's folders, from the bottom up (each imports only from those below it):

* this folder: the model and its checkpoints, the files `save_pretrained` copies beside a prompt checkpoint (they
  import only torch, transformers and each other);
* `standalone/`: what runs without torch (image input, answers, the ONNX runtime, the endpoint's request side);
* `data/`: datasets, the uint8 image path, augmentation;
* `training/`, `pretraining/`, `serving/`: training and its methods; the backbones, teacher and tokenizers; many
  tasks on one backbone;
* `deploy/`: the Hub, model cards, ONNX export, Inference Endpoints.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable, Mapping

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .backbone_loading import load_mim_backbone
from .configuration_vptm import VPTMConfig
from .modeling_vptm import VPTMForImageClassification, VPTMImageClassifierOutput
from .peft_classifier import PeftClassifier, PeftClassifierConfig
from .prompted_backbone import PromptedBackbone, PromptedBackboneOutput, SequenceLayout, extend_relative_position_bias
from .shipped import SHIPPED_BACKBONE, shipped_backbone_path
from .vptm_task import PrototypicalVerbalizer, TaskHeadOutput, VPTMPromptEmbeddings, VPTMTask


__version__ = "0.2.0"

AutoConfig.register("vptm", VPTMConfig, exist_ok=True)
AutoModel.register(VPTMConfig, VPTMForImageClassification, exist_ok=True)
AutoModelForImageClassification.register(VPTMConfig, VPTMForImageClassification, exist_ok=True)
# a PEFT classifier run folder (--method lora / peft) loads through the Auto classes and pipeline too
AutoConfig.register(PeftClassifierConfig.model_type, PeftClassifierConfig, exist_ok=True)
AutoModelForImageClassification.register(PeftClassifierConfig, PeftClassifier, exist_ok=True)


def lazy_exports(package: str, exports: Mapping[str, tuple[str, ...]]) -> tuple[Callable, Callable, list[str]]:
    """A package's `__getattr__`, `__dir__` and `__all__` for names that live in its submodules (`{submodule:
    names}`): each is imported when first used, so importing the package stays cheap, and `dir()` (tab completion)
    lists them all."""
    home = {name: submodule for submodule, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name in home:
            return getattr(importlib.import_module(f"{package}.{home[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *home})

    return __getattr__, __dir__, sorted(home)


# Training (transformers' Trainer, and with it accelerate) and the PEFT methods are imported when first used, not by
# `import modeling_vptm`: serving and prediction never load them.
__getattr__, __dir__, _LAZY = lazy_exports(
    __name__,
    {
        "training.trainer": ("VPTMTrainer", "PixelValuesCollator", "prepare_images", "label_names"),
        "training.peft_methods": ("apply_peft", "lora_config", "load_classifier"),
        "serving.multitask": ("MultiTaskVPTM",),
    },
)


# Where the modules of 0.1 went (0.2 put them in folders by concern): the old import paths keep working, and give the
# very same module (see CHANGELOG.md).
MOVED_MODULES = {
    "backbones": "shipped",
    "convert": "pretraining.convert",
    "endpoint": "deploy.endpoint",
    "endpoint_requests": "standalone.endpoint_requests",
    "evaluation": "training.evaluation",
    "hub": "deploy.hub",
    "image_batches": "data.batches",
    "images": "standalone.image_input",
    "inspection": "serving.inspection",
    "masking": "pretraining.masking",
    "methods": "training.methods",
    "model_card": "deploy.model_card",
    "onnx_export": "deploy.onnx_export",
    "onnx_runtime": "standalone.onnx_runtime",
    "peft_methods": "training.peft_methods",
    "teacher": "pretraining.teacher",
    "tokenizer": "pretraining.tokenizers",
    "training_args": "training.arguments",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves `modeling_vptm.<old name>` to the module now at its new place: the same module object, so classes keep
    their identity (isinstance, pickle) whichever path imported them."""

    def __init__(self) -> None:
        self._specs: dict[str, object] = {}

    def find_spec(self, fullname: str, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{MOVED_MODULES[spec.name.rpartition('.')[2]]}")
        self._specs[spec.name] = module.__spec__  # the import system sets the alias's spec on it; put it back
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self._specs.pop(module.__spec__.name, module.__spec__)


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())


__all__ = [
    "SHIPPED_BACKBONE",
    "MultiTaskVPTM",
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
