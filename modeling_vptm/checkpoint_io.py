"""Checkpoint IO of VPTM: reading a prompt checkpoint (its config, its task tensors) and building the model from
it on the frozen backbone it names, and writing one atomically, with a PEFT adapter beside it when the model has one.

Used alike by `VPTMForImageClassification.from_pretrained` / `save_pretrained` and by `MultiTaskVPTM.add_task`. The
pieces live in sibling files, one concept each: `hub_names` (what a name points at), `shipped` (the shipped names),
`backbone_loading`, `checkpoint_checks`, `atomic_write` and `adapter_io`. Only safetensors files are ever read. This is
a Hub code file: it imports only torch, transformers and its siblings.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from transformers.utils import is_peft_available
from transformers.utils import logging as hf_logging

from .adapter_io import ADAPTER_FILES, adapter_kind, find_adapter, load_adapter_beside, write_adapter
from .atomic_write import give_default_permissions, write_atomically
from .backbone_loading import backbone_config_fields, config_on_backbone, load_mim_backbone
from .checkpoint_checks import (
    check_config_file,
    check_fingerprint_given,
    check_finite,
    check_fits_backbone,
    check_safetensors_header,
    check_same_backbone,
    check_task_tensors,
)
from .hub_names import (
    HUB_ARGUMENTS,
    CheckpointNotFoundError,
    backbone_hub_kwargs,
    check_loadable,
    check_local_folder,
    hub_error,
)
from .prompted_backbone import backbone_fingerprint
from .shipped import resolve_backbone_path
from .vptm_task import task_tensor_shapes


# Name of the single weights file of a prompt checkpoint (not "adapter_model.safetensors": with peft installed
# the Auto classes would take the folder for a PEFT adapter).
WEIGHTS_NAME = "model.safetensors"


# ------------------------------------------------------------------------------------------ a prompt checkpoint
def load_checkpoint_config(config_class, checkpoint: str | os.PathLike, **kwargs):
    """The config of a prompt checkpoint (folder or Hub id), its file's size checked before it is parsed and its
    fields when it is (`VPTMConfig` validates and bounds them); a missing folder is refused at once, and a Hub id that
    cannot be loaded is explained in one line. `kwargs` are what the config's `from_pretrained` takes: the Hub
    arguments, and config fields with `return_unused_kwargs=True` (then `(config, the other kwargs)` is returned)."""
    from transformers.utils.hub import cached_file

    hub = {k: v for k, v in kwargs.items() if k in HUB_ARGUMENTS}
    check_loadable(checkpoint, "prompt checkpoint", **hub)
    try:
        path = cached_file(checkpoint, "config.json", **hub)
        check_config_file(path, f"the prompt checkpoint {checkpoint}")
        loaded = config_class.from_pretrained(checkpoint, **kwargs)
        # fields given as arguments are set after the config's own checks ran: they pass the same checks
        (loaded[0] if isinstance(loaded, tuple) else loaded)._check_vptm_fields()
        return loaded
    except OSError as error:
        if os.path.isdir(checkpoint):  # the folder exists: the library's message names the missing file
            raise
        source = os.fspath(checkpoint)
        raise OSError(hub_error("prompt checkpoint", source, kwargs.get("revision"), error)) from error


def read_task_tensors(checkpoint, config, source: str | None = None, **hub_kwargs) -> dict[str, torch.Tensor]:
    """The task tensors of a prompt checkpoint (folder or Hub id) whose config is `config`: their names, shapes and
    dtypes checked on the file's header against what the config needs before any tensor is read, their values
    (finite) after. Only safetensors is read: a pickled `pytorch_model.bin` offered instead is never unpickled."""
    from safetensors.torch import load_file
    from transformers.utils.hub import cached_file

    source = source or f"the prompt checkpoint {checkpoint}"
    weights = cached_file(checkpoint, WEIGHTS_NAME, **hub_kwargs)
    check_safetensors_header(weights, task_tensor_shapes(config), source)
    try:
        tensors = load_file(weights)
    except Exception as error:  # safetensors raises its own error types for truncated or corrupted files
        raise ValueError(
            f"cannot read the prompt weights {weights}: the file is truncated or not a safetensors file ({error})"
        ) from error
    check_finite(tensors, source)
    return tensors


def resolve_device_map(device_map) -> torch.device | None:
    """The one device a prompt-checkpoint model goes to: `device_map` as a device, a device index, `{"": device}`,
    or `"auto"` (the first CUDA device if there is one, else the CPU). Maps that split the model are refused."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError(
                "device_map must put the whole model on one device ({'': device}); a VPTM model is a frozen backbone "
                f"plus small task tensors and is not split, got {device_map!r}"
            )
        device_map = device_map[""]
    if device_map == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device_map must be a device, a device index, {{'': device}} or 'auto', got {device_map!r}"
        ) from error


# ------------------------------------------------------------------------- building, loading and saving the model
def prompt_checkpoint_options(name: str, checkpoint, hub: dict, kwargs: dict, model_args: tuple) -> dict:
    """What `from_pretrained` does beyond building a prompt checkpoint's model: the device, the loading info, a PEFT
    adapter to load; any other argument is refused by name rather than silently dropped."""
    device = resolve_device_map(kwargs.pop("device_map", None))
    output_loading_info = kwargs.pop("output_loading_info", False)
    # Passed by the Auto classes and pipelines; they change nothing for a prompt checkpoint (only safetensors is
    # ever read). Names with a leading underscore are transformers' own.
    for key in ("trust_remote_code", "code_revision"):
        kwargs.pop(key, None)
    if kwargs.get("use_safetensors") in (None, True):
        kwargs.pop("use_safetensors", None)
    passed = kwargs.pop("adapter_kwargs", None)
    adapter_kwargs = dict(passed or {})
    adapter = adapter_kwargs.pop("_adapter_model_path", None)
    if passed is None:  # the Auto classes pass what they found (with PEFT installed); otherwise it is looked for here
        adapter = find_adapter(checkpoint, hub, is_peft_available())
    unsupported = sorted(k for k in kwargs if not k.startswith("_"))
    if unsupported or model_args:
        raise TypeError(
            f"{name}.from_pretrained cannot honour {unsupported or list(model_args)} for a prompt checkpoint; it "
            "takes config, revision, cache_dir, token, local_files_only, force_download, subfolder, dtype, "
            "attn_implementation, device_map and output_loading_info"
        )
    return {"device": device, "output_loading_info": output_loading_info, "adapter": adapter,
            "adapter_kwargs": {**backbone_hub_kwargs(hub), **adapter_kwargs, **hub}}  # fmt: skip


def load_prompt_checkpoint(
    model_class, checkpoint, config, hub: dict, attn_implementation: str | None = None,
    allow_unverified_backbone: bool = False,
):  # fmt: skip
    """A model of `model_class` from a prompt checkpoint, each part checked before it is allocated: the frozen backbone
    its config names (refused unless the config names its fingerprint, and the weights and architecture are the ones
    the prompts were trained on), then the task tensors (refused unless the file's header holds exactly the task's
    names, shapes and floating-point dtypes, and their values are finite); only then is the model built."""
    source = f"the prompt checkpoint {checkpoint}"
    check_fingerprint_given(config, source, allow_unverified_backbone)
    mim = load_mim_backbone(
        config.backbone_name_or_path, revision=config.backbone_revision, **backbone_hub_kwargs(hub)
    )
    check_fits_backbone(config, backbone_fingerprint(mim.state_dict()), mim.config, source)
    task_tensors = read_task_tensors(checkpoint, config, source, **hub)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    model = model_class(config)
    model.backbone.load_mim_weights(mim)
    model.task.load_checkpoint_tensors(task_tensors, source)
    return model


def write_prompt_checkpoint(model: torch.nn.Module, save_directory, save: Callable[[str], None]) -> None:
    """Writes a prompt checkpoint atomically: `save(folder)` writes config, code files and task tensors into a
    temporary folder that then replaces `save_directory`'s files. The saved config maps the Auto classes to the saved
    code files (the model's own config is left as it was). An adapter loaded on the model is written beside it; a
    stale one from an earlier save there is removed."""
    config, adapter = model.config, adapter_kind(model)
    had_auto_map, previous = "auto_map" in config.__dict__, config.__dict__.get("auto_map")
    # _auto_class adds the AutoModelForImageClassification entry; the other two are set here
    config.auto_map = {**(previous or {}), "AutoConfig": "configuration_vptm.VPTMConfig",
                       "AutoModel": "modeling_vptm.VPTMForImageClassification"}  # fmt: skip
    # a checkpoint names the weights its prompts were trained on, so that loading can refuse others: a config built by
    # hand without a fingerprint is given the backbone's (of the weights loaded into it, or of the ones it holds)
    fingerprint_given = config.backbone_fingerprint is not None
    if not fingerprint_given:
        config.backbone_fingerprint = model.backbone.fingerprint()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one small file: a "Writing model shards" bar per Trainer save is noise
    peft_loaded = getattr(model, "_hf_peft_config_loaded", False)

    def write(folder: str) -> None:
        if adapter == "loaded":  # the adapter beside the prompt checkpoint, as it was loaded
            write_adapter(model, folder)
        # transformers would save only the loaded adapter's tensors (and rename the task's by the adapter's key
        # mapping); the prompt checkpoint holds the original task, by its own names
        model._hf_peft_config_loaded = False
        conversions = model.__dict__.pop("_weight_conversions", None)
        try:
            save(folder)
        finally:
            if conversions is not None:
                model._weight_conversions = conversions

    try:
        # an adapter an earlier save left there is not carried over when this checkpoint has none: loading it would
        # apply it
        write_atomically(save_directory, write, drop=ADAPTER_FILES if adapter is None else ())
    finally:
        model._hf_peft_config_loaded = peft_loaded
        if bar:
            hf_logging.enable_progress_bar()
        if had_auto_map:
            config.auto_map = previous
        else:
            del config.auto_map
        if not fingerprint_given:
            config.backbone_fingerprint = None


__all__ = [
    "WEIGHTS_NAME",
    "load_checkpoint_config",
    "load_prompt_checkpoint",
    "prompt_checkpoint_options",
    "read_task_tensors",
    "resolve_device_map",
    "write_prompt_checkpoint",
    # what this module held in 0.1, now in its siblings: imported from here by code written for 0.1
    "CheckpointNotFoundError",
    "backbone_config_fields",
    "check_fits_backbone",
    "check_loadable",
    "check_local_folder",
    "check_same_backbone",
    "check_task_tensors",
    "config_on_backbone",
    "give_default_permissions",
    "load_adapter_beside",
    "resolve_backbone_path",
    "write_atomically",
]
