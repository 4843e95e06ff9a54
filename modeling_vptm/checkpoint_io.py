"""Checkpoint IO of VPTM, in one place: loading the backbone a prompt checkpoint names, the config of prompts on
a backbone, reading and checking a prompt checkpoint's tensors, and writing a folder atomically.

Used alike by `VPTMForImageClassification.from_backbone` / `from_pretrained` / `save_pretrained` and by
`MultiTaskVPTM.add_task`. Only safetensors files are ever read. This is a Hub code file: it imports only torch,
transformers and the standard library.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable

import torch
from transformers import BeitForMaskedImageModeling
from transformers.utils import is_peft_available
from transformers.utils import logging as hf_logging

from .prompted_backbone import backbone_fingerprint


# Name of the single weights file of a prompt checkpoint (not "adapter_model.safetensors": with peft installed
# the Auto classes would take the folder for a PEFT adapter).
WEIGHTS_NAME = "model.safetensors"
# The shipped backbone is named portably as "vptm:<name>" and resolved to the installed package's data folder.
SHIPPED_PREFIX = "vptm:"
# Architecture fields a prompt checkpoint and its backbone must agree on.
FIT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "patch_size", "image_size")


# ---------------------------------------------------------------------------------------------- names and paths
class CheckpointNotFoundError(FileNotFoundError):
    """A name that is neither an existing local folder nor a model the Hub has (or could be asked for); its message
    is one line that says both."""


# seconds the Hub is given to say whether it has a model, once, before any download with its retries is tried
HUB_PROBE_TIMEOUT_S = 5.0
# files that make a Hub snapshot in the cache a model: a config, or a PEFT adapter's
MODEL_FILES = ("config.json", "adapter_config.json")


def check_loadable(
    name_or_path: str | os.PathLike, what: str, revision: str | None = None, token: str | bool | None = None,
    cache_dir: str | None = None, local_files_only: bool = False, **_other_hub_kwargs,
) -> None:  # fmt: skip
    """Refuses, within seconds and in one line (`CheckpointNotFoundError`), a name that is neither an existing local
    folder nor a model the Hub has: a name meant as a folder at once (`check_local_folder`), a Hub id not in the
    cache when offline, else after one question to the Hub (`HUB_PROBE_TIMEOUT_S`, no retries). Without this, a
    download would retry for a minute and end in a traceback about connecting to the Hub. `what` names the thing."""
    path = os.fspath(name_or_path)
    if path.startswith(SHIPPED_PREFIX) or os.path.isdir(path):
        return
    check_local_folder(path, what)
    from huggingface_hub import HfApi, is_offline_mode, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    for name in MODEL_FILES:
        if isinstance(try_to_load_from_cache(path, name, cache_dir=cache_dir, revision=revision), str):
            return  # in the Hub cache: it loads offline
    at = f" at revision {revision!r}" if revision else ""

    def not_found(detail: str) -> CheckpointNotFoundError:
        return CheckpointNotFoundError(
            f"cannot load the {what} {path!r}{at}: no such local folder, and it could not be found on the Hub: "
            f"{detail}"
        )

    if is_offline_mode() or local_files_only:
        why = "offline (HF_HUB_OFFLINE)" if is_offline_mode() else "with local_files_only"
        raise not_found(f"{why} this Hub id is not in the cache; download it first with `hf download {path}` while "
                        "online, or pass a local folder")  # fmt: skip
    try:
        HfApi(token=token).model_info(path, revision=revision, timeout=HUB_PROBE_TIMEOUT_S)
    except RevisionNotFoundError as error:
        raise not_found("it has no such revision") from error
    except RepositoryNotFoundError as error:
        raise not_found("no such model there (or it is private or gated: pass a token)") from error
    except Exception as error:  # the HTTP client's own errors: no network, DNS, timeout, proxy
        reason = " ".join(str(error).split()) or type(error).__name__
        raise not_found(f"the Hub did not answer (offline? {reason})") from error


def check_local_folder(name_or_path: str | os.PathLike, what: str) -> None:
    """Refuses at once a name meant as a local folder that does not exist, instead of trying it as a Hub id.

    A name is meant as a folder when it starts with ``.``, ``/`` or ``~``, has more than one ``/`` (a Hub id has at
    most one), or names a folder that exists (``runs/vtpm`` when ``runs/`` does). Without this check a mistyped
    folder is sent to the Hub, which costs half a minute of retries without a network before an error about
    connecting to huggingface.co. `what` names the thing in the message ("prompt checkpoint", "backbone").
    """
    path = os.fspath(name_or_path)
    if path.startswith(SHIPPED_PREFIX) or os.path.isdir(path):
        return
    if os.path.exists(path):
        raise NotADirectoryError(f"{what} {path!r} is a file; expected a folder holding config.json, or a Hub id")
    parent = os.path.dirname(path.rstrip("/\\"))
    looks_local = (
        path.startswith((".", "/", "~", os.sep))
        or os.path.isabs(path)
        or path.count("/") > 1
        or "\\" in path
        or (parent != "" and os.path.isdir(os.path.expanduser(parent)))
    )
    if looks_local:
        raise CheckpointNotFoundError(
            f"{what} folder {path!r} not found (looked in {os.path.abspath(os.path.expanduser(path))}); expected an "
            "existing folder holding config.json, or a Hub id 'org/name'"
        )


def hub_error(what: str, name_or_path: str, revision: str | None, error: Exception) -> str:
    """One line saying why `name_or_path`, not a local folder, could not be loaded from the Hub, and what to do."""
    from huggingface_hub import is_offline_mode

    at = f" at revision {revision!r}" if revision else ""
    advice = f"download it first with `hf download {name_or_path}` while online, or pass a local folder"
    if is_offline_mode():  # the library's message would talk of connecting to the Hub, which was never tried
        return (
            f"cannot load the {what} {name_or_path!r}{at}: no such local folder, and offline (HF_HUB_OFFLINE) this "
            f"Hub id is not in the cache; {advice}"
        )
    reason = " ".join(str(error).split()).rstrip(".")
    return f"cannot load the {what} {name_or_path!r}{at}: no such local folder, and from the Hub: {reason}; {advice}"


# ------------------------------------------------------------------------------------------------- the backbone
def resolve_backbone_path(name_or_path: str) -> str:
    """Resolves `vptm:<name>` to the folder shipped inside the installed `vptm` package; other names pass through.

    Found by file lookup, without importing the package, so this Hub file keeps importing only torch and
    transformers.
    """
    if not name_or_path.startswith(SHIPPED_PREFIX):
        return name_or_path
    import importlib.util

    name = name_or_path[len(SHIPPED_PREFIX) :]
    spec = importlib.util.find_spec("modeling_vptm")
    if spec is None or not spec.submodule_search_locations:
        raise OSError(
            f"backbone {name_or_path!r} is the backbone shipped with the vptm package, which is not installed here; "
            "install it from its repository (`pip install -e .` in a checkout, or the wheel `pip wheel .` builds), "
            "or pass a local folder or Hub id as backbone_name_or_path"
        )
    folder = os.path.join(list(spec.submodule_search_locations)[0], "shipped", name)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise OSError(f"backbone {name_or_path!r}: the installed vptm package has no shipped backbone at {folder}")
    return folder


def load_mim_backbone(name_or_path: str, revision: str | None = None, **hub_kwargs) -> BeitForMaskedImageModeling:
    """Loads a `BeitForMaskedImageModeling` checkpoint, refusing anything that is not one (no random weights)."""
    from transformers import AutoConfig

    path = resolve_backbone_path(name_or_path)
    check_loadable(path, "backbone", revision, **hub_kwargs)
    try:
        backbone_config = AutoConfig.from_pretrained(path, revision=revision, **hub_kwargs)
    except OSError as error:
        if os.path.isdir(path):  # a local folder without a readable config.json
            reason = " ".join(str(error).split())
            raise OSError(f"cannot load the backbone {name_or_path!r} from the folder {path}: {reason}") from error
        raise OSError(hub_error("backbone", name_or_path, revision, error)) from error
    if backbone_config.model_type not in ("beit", "vptm") or not getattr(backbone_config, "use_mask_token", False):
        raise ValueError(
            f"{name_or_path!r} is not a BEiT masked-image-modeling checkpoint: expected model_type 'beit' with "
            f"use_mask_token=True and an lm_head, got model_type {backbone_config.model_type!r}, architectures "
            f"{getattr(backbone_config, 'architectures', None)}"
        )
    mim, info = BeitForMaskedImageModeling.from_pretrained(
        path, revision=revision, output_loading_info=True, **hub_kwargs
    )
    missing = [k for k in info["missing_keys"] if "relative_position_index" not in k]
    if missing:
        raise ValueError(
            f"{name_or_path!r} is not a complete BEiT masked-image-modeling checkpoint: {len(missing)} tensors would "
            f"be random, e.g. {sorted(missing)[:5]} (fine-tuned BEiT classifiers have no MIM head and cannot be used)"
        )
    return mim.eval()


def backbone_config_fields(backbone_config, backbone_name_or_path: str, revision: str | None, **fields) -> dict:
    """The fields of a `VPTMConfig` for prompts on this backbone: its architecture, where it is loaded from, and
    the given VPTM fields (its own labels and head are not carried over)."""
    merged = backbone_config.to_dict()
    for key in ("architectures", "auto_map", "id2label", "label2id", "num_labels", "transformers_version"):
        merged.pop(key, None)
    merged.update(fields)
    merged.update(backbone_name_or_path=backbone_name_or_path, backbone_revision=revision)
    return merged


# ------------------------------------------------------------------------------------------ a prompt checkpoint
def load_checkpoint_config(config_class, checkpoint: str | os.PathLike, **kwargs):
    """The config of a prompt checkpoint (folder or Hub id); a missing folder is refused at once, and a Hub id that
    cannot be loaded is explained in one line. `kwargs` are what the config's `from_pretrained` takes: the Hub
    arguments, and config fields with `return_unused_kwargs=True` (then `(config, the other kwargs)` is returned)."""
    check_loadable(checkpoint, "prompt checkpoint", **kwargs)
    try:
        return config_class.from_pretrained(checkpoint, **kwargs)
    except OSError as error:
        if os.path.isdir(checkpoint):  # the folder exists: the library's message names the missing file
            raise
        source = os.fspath(checkpoint)
        raise OSError(hub_error("prompt checkpoint", source, kwargs.get("revision"), error)) from error


def read_task_tensors(checkpoint, **hub_kwargs) -> dict[str, torch.Tensor]:
    """The task tensors of a prompt checkpoint (folder or Hub id). Only safetensors is read: a pickled
    `pytorch_model.bin` offered instead is never unpickled."""
    from safetensors.torch import load_file
    from transformers.utils.hub import cached_file

    weights = cached_file(checkpoint, WEIGHTS_NAME, **hub_kwargs)
    try:
        return load_file(weights)
    except Exception as error:  # safetensors raises its own error types for truncated or corrupted files
        raise ValueError(
            f"cannot read the prompt weights {weights}: the file is truncated or not a safetensors file ({error})"
        ) from error


def check_same_backbone(config, name_or_path: str, revision: str | None, source: str, holder: str) -> None:
    """Refuses prompts made on another backbone name or revision than `name_or_path` at `revision`, which `holder`
    ("this server holds") names in the message."""
    if (config.backbone_name_or_path, config.backbone_revision) != (name_or_path, revision):
        raise ValueError(
            f"{source} was made on backbone {config.backbone_name_or_path!r} (revision {config.backbone_revision}), "
            f"but {holder} {name_or_path!r} (revision {revision})"
        )


def check_fits_backbone(config, fingerprint: str, backbone_config, source: str) -> None:
    """Refuses prompts trained on other backbone weights than the ones loaded (`fingerprint`), or whose architecture
    fields disagree with the backbone's."""
    if config.backbone_fingerprint is not None and fingerprint != config.backbone_fingerprint:
        raise ValueError(
            f"{source} was trained on backbone {config.backbone_name_or_path!r} (revision "
            f"{config.backbone_revision}) with weights fingerprint {config.backbone_fingerprint[:16]}..., but the "
            f"weights loaded now have fingerprint {fingerprint[:16]}...: the prompts do not fit these weights"
        )
    diff = {
        f: (getattr(config, f), getattr(backbone_config, f))
        for f in FIT_FIELDS
        if getattr(config, f) != getattr(backbone_config, f)
    }
    if diff:
        detail = ", ".join(f"{f}: checkpoint {a} vs backbone {b}" for f, (a, b) in diff.items())
        raise ValueError(f"{source} does not fit the backbone {config.backbone_name_or_path!r}: {detail}")


def check_task_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    """Refuses task tensors that are missing, unexpected or wrongly shaped for the config they come with."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not hold this model's task tensors: missing {missing}, unexpected {unexpected}"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, but the config and backbone need "
                f"{tuple(expected[name].shape)}"
            )


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


# ---------------------------------------------------------------------------------------------------- writing
def give_default_permissions(folder: str) -> None:
    """Gives every file in `folder` the permissions a new file gets here (the umask's), as any other file a run
    writes has: safetensors writes its files readable by their owner only (0600), which hides a published checkpoint
    from the other users of a shared machine. The mode is read off a file made for the purpose, since reading the
    umask means changing it, for every thread of the process."""
    probe = os.path.join(folder, f".mode-{os.urandom(4).hex()}")
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    mode = stat.S_IMODE(os.stat(probe).st_mode)
    os.remove(probe)
    for root, _, names in os.walk(folder):
        for name in names:
            os.chmod(os.path.join(root, name), mode)


def write_atomically(save_directory: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Runs `write(folder)` on a fresh temporary folder beside `save_directory`, then moves what it wrote into place
    (the whole folder when `save_directory` is new, else file by file, keeping other files there): a failure while
    writing leaves no half-written checkpoint."""
    parent = os.path.dirname(os.path.abspath(save_directory))
    os.makedirs(parent, exist_ok=True)
    # made as os.makedirs makes folders (umask, inherited group), since a new checkpoint folder is this one renamed
    staging = os.path.join(parent, f".vptm-save-{os.urandom(8).hex()}")
    os.mkdir(staging)
    try:
        write(staging)
        give_default_permissions(staging)
        if not os.path.exists(save_directory):  # a new folder appears whole, in one rename
            try:
                os.replace(staging, save_directory)
                return
            except OSError:  # made by someone else meanwhile: move file by file below
                pass
        # into an existing folder file by file, the weights last: until then it holds the previous checkpoint's
        os.makedirs(save_directory, exist_ok=True)
        names = sorted(os.listdir(staging), key=lambda name: name.endswith(".safetensors"))
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(save_directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------------------------------- a PEFT adapter beside it
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


def remove_stale_adapter(folder: str) -> None:
    """Removes PEFT adapter files an earlier save left in `folder`: the checkpoint saved there now has none, and
    loading it would apply them."""
    for name in ADAPTER_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.remove(path)


# ------------------------------------------------------------------------- building, loading and saving the model
def config_on_backbone(config_class, backbone_name_or_path: str, labels: dict, hub: dict, fields: dict):
    """The config of fresh prompts on a BEiT MIM backbone, and the loaded backbone: its architecture, where it loads
    from, its weights' fingerprint, `labels` (`num_labels`, `id2label`, `label2id`, any of them) and `fields`."""
    num_labels, id2label, label2id = labels.get("num_labels"), labels.get("id2label"), labels.get("label2id")
    if id2label is not None:
        id2label = {int(k): v for k, v in id2label.items()}
        if num_labels is not None and num_labels != len(id2label):
            raise ValueError(f"num_labels={num_labels} disagrees with id2label, which has {len(id2label)} labels")
        num_labels = len(id2label)
        label2id = label2id or {v: k for k, v in id2label.items()}
    if num_labels is None or num_labels < 1:
        raise ValueError(f"from_backbone needs the labels: num_labels >= 1 or id2label, got num_labels={num_labels}")
    mim = load_mim_backbone(backbone_name_or_path, **hub)
    config = config_class(
        **backbone_config_fields(mim.config, backbone_name_or_path, hub.get("revision"), **fields),
        id2label=id2label or {i: f"LABEL_{i}" for i in range(num_labels)},
        label2id=label2id or {f"LABEL_{i}": i for i in range(num_labels)},
    )
    config.backbone_fingerprint = backbone_fingerprint(mim.state_dict())
    return config, mim


HUB_ARGUMENTS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder", "proxies")


def backbone_hub_kwargs(hub: dict) -> dict:
    """The Hub arguments of a checkpoint's load that apply to its backbone too (not its revision or subfolder)."""
    return {k: v for k, v in hub.items() if k in ("cache_dir", "token", "local_files_only", "proxies")}


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


def load_prompt_checkpoint(model_class, checkpoint, config, hub: dict, attn_implementation: str | None = None):
    """A model of `model_class` from a prompt checkpoint: the frozen backbone its config names (refused unless its
    weights and shapes are the ones the prompts were trained on), then the task tensors (refused unless they are
    exactly the task's)."""
    task_tensors = read_task_tensors(checkpoint, **hub)
    mim = load_mim_backbone(
        config.backbone_name_or_path, revision=config.backbone_revision, **backbone_hub_kwargs(hub)
    )
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    source = f"the prompt checkpoint {checkpoint}"
    check_fits_backbone(config, backbone_fingerprint(mim.state_dict()), mim.config, source)
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
        write_atomically(save_directory, write)
        if adapter is None:
            remove_stale_adapter(save_directory)
    finally:
        model._hf_peft_config_loaded = peft_loaded
        if bar:
            hf_logging.enable_progress_bar()
        if had_auto_map:
            config.auto_map = previous
        else:
            del config.auto_map
