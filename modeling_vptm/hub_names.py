"""What a name given for a checkpoint or backbone points at: a shipped name, a local folder, or a Hub id; and a
one-line answer, within seconds, for a name that is none of them.

This is a Hub code file: it imports only the standard library at module level (huggingface_hub, which transformers
depends on, inside the functions that ask the Hub).
"""

from __future__ import annotations

import os
import re

from .shipped import is_shipped_name


class CheckpointNotFoundError(FileNotFoundError):
    """A name that is neither an existing local folder nor a model the Hub has (or could be asked for); its message
    is one line that says both."""


# the Hub arguments of `from_pretrained` that a prompt checkpoint's load honours
HUB_ARGUMENTS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder", "proxies")
# seconds the Hub is given to say whether it has a model, once, before any download with its retries is tried
HUB_PROBE_TIMEOUT_S = 5.0
# files that make a Hub snapshot in the cache a model: a config, or a PEFT adapter's
MODEL_FILES = ("config.json", "adapter_config.json")
# a Hub repository id: "name" or "namespace/name", letters, digits, '-', '_' and '.', at most 96 characters a part
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


def is_hub_id(name: object) -> bool:
    """Whether `name` can only mean a Hub repository: it has the form of a repository id and is neither a shipped
    ``vptm:`` name nor a path that exists here."""
    return (
        isinstance(name, str)
        and not is_shipped_name(name)
        and HUB_ID.fullmatch(name) is not None
        and ".." not in name
        and not os.path.exists(name)
    )


def backbone_hub_kwargs(hub: dict) -> dict:
    """The Hub arguments of a checkpoint's load that apply to its backbone too (not its revision or subfolder)."""
    return {k: v for k, v in hub.items() if k in ("cache_dir", "token", "local_files_only", "proxies")}


def check_loadable(
    name_or_path: str | os.PathLike, what: str, revision: str | None = None, token: str | bool | None = None,
    cache_dir: str | None = None, local_files_only: bool = False, **_other_hub_kwargs,
) -> None:  # fmt: skip
    """Refuses, within seconds and in one line (`CheckpointNotFoundError`), a name that is neither an existing local
    folder nor a model the Hub has: a name meant as a folder at once (`check_local_folder`), a Hub id not in the
    cache when offline, else after one question to the Hub (`HUB_PROBE_TIMEOUT_S`, no retries). Without this, a
    download would retry for a minute and end in a traceback about connecting to the Hub. `what` names the thing."""
    path = os.fspath(name_or_path)
    if is_shipped_name(path) or os.path.isdir(path):
        return
    check_local_folder(path, what)
    from huggingface_hub import try_to_load_from_cache

    for name in MODEL_FILES:
        if isinstance(try_to_load_from_cache(path, name, cache_dir=cache_dir, revision=revision), str):
            return  # in the Hub cache: it loads offline
    ask_hub(path, what, "model", revision, token, local_files_only)


def ask_hub(
    repo_id: str, what: str, repo_type: str = "model", revision: str | None = None, token: str | bool | None = None,
    local_files_only: bool = False,
) -> None:  # fmt: skip
    """Asks the Hub once (`HUB_PROBE_TIMEOUT_S`, no retries) whether it has the repository `repo_id` of `repo_type`
    ("model" or "dataset"); a `CheckpointNotFoundError` in one line when it has not, or is not asked (offline)."""
    from huggingface_hub import HfApi, is_offline_mode
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    at = f" at revision {revision!r}" if revision else ""

    def not_found(detail: str) -> CheckpointNotFoundError:
        return CheckpointNotFoundError(
            f"cannot load the {what} {repo_id!r}{at}: no such local folder, and it could not be found on the Hub: "
            f"{detail}"
        )

    if is_offline_mode() or local_files_only:
        why = "offline (HF_HUB_OFFLINE)" if is_offline_mode() else "with local_files_only"
        raise not_found(f"{why} this Hub id is not in the cache; download it first with `hf download {repo_id}"
                        f"{' --repo-type dataset' if repo_type == 'dataset' else ''}` while online, or pass a local "
                        "folder")  # fmt: skip
    if not is_hub_id(repo_id):
        raise not_found("it is not a Hub id ('name' or 'namespace/name')")
    api = HfApi(token=token)
    info = api.dataset_info if repo_type == "dataset" else api.model_info
    try:
        info(repo_id, revision=revision, timeout=HUB_PROBE_TIMEOUT_S)
    except RevisionNotFoundError as error:
        raise not_found("it has no such revision") from error
    except RepositoryNotFoundError as error:
        raise not_found(f"no such {repo_type} there (or it is private or gated: pass a token)") from error
    except Exception as error:  # the HTTP client's own errors: no network, DNS, timeout, proxy
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise not_found(f"the Hub did not answer (offline? {reason})") from error


def check_local_folder(name_or_path: str | os.PathLike, what: str) -> None:
    """Refuses at once a name meant as a local folder that does not exist, instead of trying it as a Hub id.

    A name is meant as a folder when it starts with ``.``, ``/`` or ``~``, has more than one ``/`` (a Hub id has at
    most one), or names a folder that exists (``runs/vtpm`` when ``runs/`` does). Without this check a mistyped
    folder is sent to the Hub, which costs half a minute of retries without a network before an error about
    connecting to huggingface.co. `what` names the thing in the message ("prompt checkpoint", "backbone").
    """
    path = os.fspath(name_or_path)
    if is_shipped_name(path) or os.path.isdir(path):
        return
    parent = os.path.dirname(path.rstrip("/\\"))
    looks_local = (
        os.path.lexists(path)  # a file gets the answer nothing there gets: a backbone name is not a probe
        or path.startswith((".", "/", "~", os.sep))
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


__all__ = ["CheckpointNotFoundError", "HUB_ARGUMENTS", "check_loadable", "check_local_folder", "is_hub_id"]
