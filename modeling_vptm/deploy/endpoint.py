"""Hugging Face Inference Endpoints: a custom handler that serves prompt checkpoints on one backbone, and the
repository that holds it.

The serving toolkit (huggingface-inference-toolkit) installs the repository's `requirements.txt`, puts the
repository folder first on `sys.path`, imports its `handler.py`, builds `EndpointHandler(path)` once, and calls it
with the deserialized request body: `{"inputs": <PIL image>}` for an image content type (query parameters added as
`"parameters"`, digits turned into ints), the parsed JSON for `application/json`. An exception becomes an HTTP 400
with its message; this handler answers bad input with `{"error": message}` itself, so that one bad image in a list
does not cost the others their answers.

Request: `{"inputs": <image bytes | base64 string | PIL image | a list of them>, "parameters": {"top_k": k,
"tasks": [...]}}`. Answer, as `pipeline("image-classification")` gives it: `[{"label", "score"}, ...]` per image
(top_k labels, default 5), or `{task: [...]}` per image when several tasks are asked for (default: every task of the
endpoint); a list of answers for a list of images, computed in one `MultiTaskVPTM` pass.

Two repository shapes, both written by `write_endpoint_repository` (and `examples/make_endpoint.py`):

* one task: the prompt checkpoint itself at the root (so the repository also loads with `pipeline`), plus
  `handler.py`, `requirements.txt`, `endpoint.json` and the `modeling_vptm/` package;
* several tasks: `tasks/<name>/` prompt checkpoints made on one backbone, plus the same files.

Two backends. `onnx` (the default) exports one backbone graph per sequence layout into `onnx/<layout>/` and serves
them with `standalone.onnx_endpoint.OnnxEndpointHandler`, which needs only numpy, Pillow and onnxruntime: it runs on
the stock container, whose toolkit pins transformers 4.51 and does not start under the transformers 5 this package
needs (see `onnx_endpoint`). `pytorch` serves the checkpoints with `MultiTaskVPTM`; it needs a container with
transformers >= 5.17, so a custom image. The package is not on PyPI, so the repository carries what its handler
imports: the files of `modeling_vptm/standalone/` at the root (onnx), or the `modeling_vptm/` package with the
shipped backbones (pytorch), beside `handler.py` (the toolkit puts that folder on `sys.path` before the import);
`requirements.txt` lists the backend's dependencies: by name for onnx (the stock container's compiled packages are
kept), with the installed package's version bounds for pytorch.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import tempfile

from ..atomic_write import write_atomically
from ..hub_names import is_hub_id
from ..serving.multitask import MultiTaskVPTM
from ..serving.processors import processor_size, same_image_processor
from ..serving.service import TaskService
from ..serving.task_cache import TaskSources
from ..serving.task_names import check_task_name
from ..shipped import SHIPPED_PREFIX, is_shipped_name
from ..standalone import ENDPOINT_FILES, copy_standalone
from ..standalone.endpoint_requests import ENDPOINT_CONFIG, RequestHandler, read_endpoint_config
from ..standalone.onnx_endpoint import OnnxEndpointHandler


PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the modeling_vptm folder
BACKENDS = ("onnx", "pytorch")
# the handler needs the code and the shipped backbones, not the shipped training data or bytecode
PACKAGE_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "fashion-mnist-1k")
# what each backend's handler imports (not the training, data or evaluation dependencies)
SERVING_REQUIREMENTS = {
    "pytorch": ("transformers", "torch", "safetensors", "huggingface_hub", "huggingface-hub", "numpy", "pillow"),
    "onnx": ("onnxruntime", "numpy", "pillow"),
}

HANDLER_SOURCE = {
    "pytorch": '''"""Inference Endpoints handler for VPTM prompt checkpoints (written by examples/make_endpoint.py).

The logic is `modeling_vptm.deploy.endpoint.EndpointHandler` (PyTorch); the package is bundled beside this file.
"""

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the bundled modeling_vptm package

from modeling_vptm.deploy.endpoint import EndpointHandler  # noqa: E402


__all__ = ["EndpointHandler"]
''',
    "onnx": '''"""Inference Endpoints handler for VPTM prompt checkpoints (written by examples/make_endpoint.py).

The logic is `onnx_endpoint.OnnxEndpointHandler` (ONNX Runtime, no torch or transformers), beside this file.
"""

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # onnx_endpoint.py and the files it imports

from onnx_endpoint import OnnxEndpointHandler as EndpointHandler  # noqa: E402


__all__ = ["EndpointHandler"]
''',
}


class EndpointHandler(TaskService):
    """The PyTorch handler: every task of the repository at `path` on one `MultiTaskVPTM`, all loaded at start."""

    def __init__(self, path: str = "", device: str | None = None) -> None:
        path = path or "."
        config = read_endpoint_config(path)
        self.folders = {name: os.path.join(path, folder) for name, folder in config["tasks"].items()}
        if not self.folders:
            raise ValueError(f"{os.path.join(path, ENDPOINT_CONFIG)} lists no tasks")
        backbone, revision = config.get("backbone"), config.get("backbone_revision")
        if backbone is None:  # a prompt checkpoint with handler.py copied in: its own backbone
            from ..configuration_vptm import VPTMConfig

            first = VPTMConfig.from_pretrained(next(iter(self.folders.values())))
            backbone, revision = first.backbone_name_or_path, first.backbone_revision
        server = MultiTaskVPTM(backbone, revision=revision)
        # the repository's tasks, every one loaded now (a task that does not load stops the endpoint from starting)
        super().__init__(server, TaskSources(self.folders), processor=None, cache_bytes=2**63, device=device)
        errors = self.cache.ensure(self.folders)
        if errors:
            name, message = next(iter(errors.items()))
            raise ValueError(f"task {name!r} of the endpoint repository does not load: {message}")
        configs = {name: task.config for name, task in self.server.tasks.items()}
        self.processor = same_image_processor(self.folders, configs)
        self.image_size = processor_size(self.processor)


def load_endpoint(path: str) -> RequestHandler:
    """The handler an endpoint repository's `handler.py` builds, whichever its backend."""
    backend = read_endpoint_config(path).get("backend", "pytorch")
    return OnnxEndpointHandler(path) if backend == "onnx" else EndpointHandler(path)


# ------------------------------------------------------------------------------------------- the repository
def serving_requirements(backend: str) -> list[str]:
    """The dependencies a backend's handler imports: for pytorch with the installed vptm package's version bounds
    (read from its metadata, so they follow pyproject.toml); for onnx by name only, because that repository runs on
    the stock container, whose compiled numpy and Pillow (and anything built on them) a floor would upgrade under it,
    while the handler needs nothing newer than what the container holds."""
    try:
        requires = importlib.metadata.requires("vptm") or []
    except importlib.metadata.PackageNotFoundError as error:
        raise OSError("the vptm package is not installed (pip install -e . in its repository)") from error
    kept = {}
    for requirement in requires:
        requirement, _, marker = (part.strip() for part in requirement.partition(";"))
        if marker and marker.replace('"', "'") != "extra == 'onnx'":  # another extra's requirement
            continue
        name = re.split(r"[<>=!~\[ ]", requirement, maxsplit=1)[0]
        if name.lower() in SERVING_REQUIREMENTS[backend]:
            kept.setdefault(name.lower(), name if backend == "onnx" else requirement)
    return list(kept.values())


def copy_checkpoint(source: str, target: str, revision: str | None = None) -> None:
    """A prompt checkpoint's files (folder, or Hub id downloaded at `revision`) into `target`."""
    from .onnx_export import check_vptm_checkpoint

    check_vptm_checkpoint(source, **({"revision": revision} if revision else {}))
    if not os.path.isdir(source):
        from huggingface_hub import snapshot_download

        source = snapshot_download(source, revision=revision)
    os.makedirs(target, exist_ok=True)
    for name in os.listdir(source):
        path = os.path.join(source, name)
        if os.path.isfile(path):  # checkpoints are flat; Trainer's checkpoint-* folders are not the task
            shutil.copy(path, os.path.join(target, name))


def write_endpoint_repository(
    folder: str,
    tasks: dict[str, str],
    multi_task: bool | None = None,
    revision: str | None = None,
    backend: str = "onnx",
) -> dict:
    """Lays out an endpoint repository in `folder` for `tasks` (`{name: prompt checkpoint folder or Hub id}`): one
    task at the root, or several (or `multi_task=True`) in `tasks/<name>/`, served by `backend` ("onnx": one
    exported backbone graph per sequence layout; "pytorch": `MultiTaskVPTM`); then loads it with its handler, so
    that a repository that would not serve is refused here. Returns the written `endpoint.json`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if not tasks:
        raise ValueError("an endpoint needs at least one prompt checkpoint")
    for name in tasks:
        check_task_name(name)
    multi_task = len(tasks) > 1 if multi_task is None else multi_task
    if not multi_task and len(tasks) > 1:
        raise ValueError(f"a single-task endpoint holds one checkpoint, got {len(tasks)}")
    if os.path.isdir(folder) and os.listdir(folder):
        raise ValueError(f"{folder} is not empty; an endpoint repository is written into a new or empty folder")
    written = {}

    def write(staging: str) -> None:
        written.update(write_repository_files(staging, tasks, multi_task, revision, backend))

    # written and loaded in a temporary folder beside `folder`, then moved into place: a refusal leaves nothing
    write_atomically(folder, write)
    return written


def write_repository_files(
    folder: str, tasks: dict[str, str], multi_task: bool, revision: str | None, backend: str
) -> dict:
    """`write_endpoint_repository`'s files, in the empty `folder`; the endpoint.json written."""
    layout = {}
    for name, source in tasks.items():
        layout[name] = f"tasks/{name}" if multi_task else "."
        copy_checkpoint(source, os.path.join(folder, layout[name]), revision)
    folders = {name: os.path.join(folder, path) for name, path in layout.items()}
    configs = check_one_backbone(folders, tasks)
    same_image_processor(folders, configs)
    first = next(iter(configs.values()))
    if backend == "pytorch":
        check_backbone_on_endpoint(first.backbone_name_or_path)
    config = {"backend": backend, "backbone": first.backbone_name_or_path, "backbone_revision":
              first.backbone_revision, "tasks": layout}  # fmt: skip
    if backend == "onnx":
        config.update(export_graphs(folder, folders, configs))
        copy_standalone(folder, ENDPOINT_FILES)  # what handler.py imports, as top-level modules
    else:
        shutil.copytree(PACKAGE, os.path.join(folder, "modeling_vptm"), ignore=PACKAGE_IGNORE)
    with open(os.path.join(folder, ENDPOINT_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "handler.py"), "w") as f:
        f.write(HANDLER_SOURCE[backend])
    with open(os.path.join(folder, "requirements.txt"), "w") as f:
        f.write("\n".join(serving_requirements(backend)) + "\n")
    if backend == "onnx":
        OnnxEndpointHandler(folder)
    else:
        EndpointHandler(folder, device="cpu")
    return config


def check_backbone_on_endpoint(name_or_path: str) -> None:
    """Refuses a backbone the endpoint could not load: the pytorch handler loads it by the name the tasks record, so
    that name must be a shipped backbone (`vptm:<name>`, bundled with the package) or a Hub id, not a folder of this
    machine."""
    if is_shipped_name(name_or_path):
        return
    if not is_hub_id(name_or_path):  # a name that exists here, or is no Hub id, is this machine's folder
        raise ValueError(
            f"backend 'pytorch' loads the backbone the tasks were made on, {name_or_path!r}, which is a local "
            f"folder the endpoint does not have; expected a shipped backbone '{SHIPPED_PREFIX}<name>' or a Hub id "
            "'org/name' (push the backbone with examples/push_backbone.py and make the tasks on that id), or use "
            "backend 'onnx', whose graphs hold the backbone"
        )


def check_one_backbone(folders: dict[str, str], sources: dict[str, str]) -> dict:
    """The tasks' configs, refusing tasks made on another backbone (name, revision or weights) than the first."""
    from ..checkpoint_checks import check_fingerprint_given, check_fits_backbone, check_same_backbone
    from ..checkpoint_io import load_checkpoint_config
    from ..configuration_vptm import VPTMConfig

    configs = {name: load_checkpoint_config(VPTMConfig, path) for name, path in folders.items()}
    first_name, first = next(iter(configs.items()))
    for name, config in configs.items():
        source = f"task {name!r} ({sources[name]})"
        holder = f"this endpoint serves {first_name!r}'s,"
        check_same_backbone(config, first.backbone_name_or_path, first.backbone_revision, source, holder)
        check_fingerprint_given(config, source)  # the first task's fingerprint stands for the weights of all
        check_fits_backbone(config, first.backbone_fingerprint, first, source)
    return configs


def export_graphs(folder: str, folders: dict[str, str], configs: dict) -> dict:
    """One backbone graph per sequence layout of the tasks, in `onnx/layout-<i>/`; the endpoint.json entries."""
    from ..prompted_backbone import SequenceLayout
    from .onnx_export import export_backbone_graph

    groups: dict[SequenceLayout, list[str]] = {}
    for name, config in configs.items():
        groups.setdefault(SequenceLayout.from_config(config), []).append(name)
    graphs, onnx_tasks = {}, {}
    for i, names in enumerate(groups.values()):
        graphs[f"layout-{i}"] = f"onnx/layout-{i}"
        export_backbone_graph({name: folders[name] for name in names}, os.path.join(folder, "onnx", f"layout-{i}"))
        onnx_tasks.update(dict.fromkeys(names, f"layout-{i}"))
    return {"graphs": graphs, "onnx_tasks": {name: onnx_tasks[name] for name in configs}}


def push_endpoint_repository(
    repo_id: str, tasks: dict[str, str], multi_task: bool | None = None, private: bool = False, **kwargs
) -> str:
    """Writes the repository (see `write_endpoint_repository`) and uploads it as one commit; returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    with tempfile.TemporaryDirectory() as folder:
        write_endpoint_repository(folder, tasks, multi_task, **kwargs)
        api.create_repo(repo_id, private=private, exist_ok=True)
        # files of an earlier push that this one does not bring are removed, so no stale task or code is served
        api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            delete_patterns=["tasks/**", "onnx/**", "modeling_vptm/**"],
            commit_message="VPTM Inference Endpoint: handler, tasks and what the handler imports",
        )
    return f"https://huggingface.co/{repo_id}"


__all__ = ["EndpointHandler", "load_endpoint", "push_endpoint_repository", "write_endpoint_repository"]
