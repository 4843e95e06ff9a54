"""A PEFT adapter saved beside a prompt checkpoint (LoRA in the frozen backbone, the trained task as its
`modules_to_save`): finding it, loading it with PEFT's own loading, and writing it back as PEFT writes one.

Only a checkpoint that holds an adapter needs PEFT. This is a Hub code file: it imports only torch, transformers and
its siblings at module level (PEFT inside the functions that need it).
"""

from __future__ import annotations

import os

import torch

from .hub_names import HUB_ARGUMENTS


# A prompt checkpoint can also hold a PEFT adapter (LoRA in the frozen backbone, the trained task as its
# modules_to_save): PEFT's two files beside the prompt checkpoint of the original task.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = (ADAPTER_CONFIG, "adapter_model.safetensors", "adapter_model.bin")


def find_adapter(checkpoint, hub: dict, peft_available: bool) -> str | None:
    """The checkpoint itself when it also holds a PEFT adapter (`adapter_config.json`), else None. Refuses one when
    PEFT is not installed: loaded without its adapter, the model would give other logits and say nothing."""
    from transformers.utils import find_adapter_config_file

    if os.path.isdir(checkpoint):
        found = os.path.isfile(os.path.join(checkpoint, hub.get("subfolder") or "", ADAPTER_CONFIG))
    else:
        found = find_adapter_config_file(checkpoint, **hub) is not None
    if found and not peft_available:
        raise ImportError(
            f"the prompt checkpoint {checkpoint} holds a PEFT adapter ({ADAPTER_CONFIG}), which needs PEFT: "
            'pip install peft (the peft extra: pip install -e ".[peft]" in a checkout)'
        )
    return str(checkpoint) if found else None


# set on a model whose adapter `load_adapter_beside` loaded from its checkpoint: saving it writes the adapter back
ADAPTER_LOADED = "_vptm_adapter_loaded"


def load_adapter_beside(model: torch.nn.Module, adapter: str, adapter_kwargs: dict) -> None:
    """Loads the PEFT adapter saved beside a prompt checkpoint onto `model`, in place, with PEFT's own loading
    (transformers' `load_adapter` left a `modules_to_save` copy at its initial values in some releases, 5.17 among
    them: other logits, no error). Only reached for a checkpoint holding an adapter, which needs PEFT."""
    import peft

    hub = {k: v for k, v in adapter_kwargs.items() if k in HUB_ARGUMENTS}
    peft.PeftModel.from_pretrained(model, adapter, **hub)  # injects into `model` itself; the wrapper is not kept
    setattr(model, ADAPTER_LOADED, True)


def adapter_kind(model: torch.nn.Module) -> str | None:
    """How a PEFT adapter sits on `model`: "loaded" (from its checkpoint, by `from_pretrained`; or by transformers'
    `load_adapter`), "wrapped" (inside a `peft.PeftModel`, which saves the adapter itself), or None."""
    if getattr(model, ADAPTER_LOADED, False) or getattr(model, "_hf_peft_config_loaded", False):
        return "loaded"
    if any(hasattr(module, "base_layer") or hasattr(module, "original_module") for module in model.modules()):
        return "wrapped"
    return None


def write_adapter(model: torch.nn.Module, folder: str) -> None:
    """Writes the adapter `load_adapter` put on `model` as PEFT writes one (its config, its tensors named as a
    `PeftModel` names them), with PEFT itself: only reached for a model whose adapter PEFT loaded."""
    import peft
    from safetensors.torch import save_file

    names = list(model.peft_config)
    if len(names) != 1:
        raise ValueError(f"a prompt checkpoint holds one PEFT adapter; this model has {len(names)}: {names}")
    tensors = peft.get_peft_model_state_dict(model, adapter_name=names[0])
    tensors = {f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    model.peft_config[names[0]].save_pretrained(folder)


__all__ = ["ADAPTER_CONFIG", "ADAPTER_FILES", "adapter_kind", "find_adapter", "load_adapter_beside"]
