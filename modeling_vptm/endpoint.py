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

The package is not on PyPI, so the repository carries it: `modeling_vptm/` beside `handler.py` (the toolkit has
put that folder on `sys.path` before the import), the shipped backbones inside it, and `requirements.txt` lists the
package's own serving dependencies with the installed package's version bounds.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile

import torch

from .images import top_predictions
from .onnx_runtime import read_image
from .serving import MultiTaskVPTM


ENDPOINT_CONFIG = "endpoint.json"
DEFAULT_TOP_K = 5  # pipeline("image-classification")'s default
MAX_IMAGES = 64  # per request: a longer list would hold the single worker for every other caller
PACKAGE = os.path.dirname(os.path.abspath(__file__))
# the handler needs the code and the shipped backbones, not the shipped training data or bytecode
PACKAGE_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "fashion-mnist-1k")
# what `import modeling_vptm` and serving import (not the training, data or evaluation dependencies)
SERVING_REQUIREMENTS = ("transformers", "torch", "safetensors", "huggingface_hub", "huggingface-hub", "numpy",
                        "pillow")  # fmt: skip
PROCESSOR_NAME_KEYS = {"processor_class", "image_processor_type", "_processor_class"}

HANDLER_SOURCE = '''"""Inference Endpoints handler for VPTM prompt checkpoints (written by examples/make_endpoint.py).

The logic is `modeling_vptm.endpoint.EndpointHandler`; the package is bundled beside this file.
"""

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the bundled modeling_vptm package

from modeling_vptm.endpoint import EndpointHandler  # noqa: E402


__all__ = ["EndpointHandler"]
'''


class EndpointHandler:
    """The custom handler: every task of the repository at `path` on one `MultiTaskVPTM`."""

    def __init__(self, path: str = "", device: str | None = None) -> None:
        path = path or "."
        config = read_endpoint_config(path)
        self.folders = {name: os.path.join(path, folder) for name, folder in config["tasks"].items()}
        if not self.folders:
            raise ValueError(f"{os.path.join(path, ENDPOINT_CONFIG)} lists no tasks")
        backbone, revision = config.get("backbone"), config.get("backbone_revision")
        if backbone is None:  # a prompt checkpoint with handler.py copied in: its own backbone
            from .configuration_vptm import VPTMConfig

            first = VPTMConfig.from_pretrained(next(iter(self.folders.values())))
            backbone, revision = first.backbone_name_or_path, first.backbone_revision
        self.server = MultiTaskVPTM(backbone, revision=revision)
        self.processor = same_image_processor(self.folders)
        for name, folder in self.folders.items():
            self.server.add_task(name, folder)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.server.to(self.device)

    @property
    def tasks(self) -> list[str]:
        return list(self.server.tasks)

    def __call__(self, data: dict) -> list | dict:
        """The answer to one request (see the module docstring), or `{"error": message}`."""
        try:
            return self.answer(data)
        except (ValueError, KeyError, TypeError) as error:
            # a KeyError's str() is its message in quotes
            return {"error": str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)}

    def answer(self, data: dict) -> list | dict:
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError(f'the request body must be {{"inputs": ..., "parameters": {{...}}}}, got {data!r:.80}')
        parameters = data.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ValueError(f"parameters must be an object, got {type(parameters).__name__}")
        unknown = sorted(set(parameters) - {"top_k", "tasks", "function_to_apply"})
        if unknown:
            raise ValueError(
                f"unknown parameters {unknown}; the parameters are ['function_to_apply', 'tasks', 'top_k']"
            )
        # InferenceClient.image_classification may send pipeline's parameter; the scores are its softmax
        if parameters.get("function_to_apply", "softmax") != "softmax":
            raise ValueError(
                f"function_to_apply must be 'softmax' (single-label tasks), got {parameters['function_to_apply']!r}"
            )
        top_k = check_top_k(parameters.get("top_k", DEFAULT_TOP_K))
        tasks = self.check_tasks(parameters.get("tasks"))
        inputs = data["inputs"]
        single = not isinstance(inputs, list)
        inputs = [inputs] if single else inputs
        if not 1 <= len(inputs) <= MAX_IMAGES:
            raise ValueError(f"inputs must hold 1 to {MAX_IMAGES} images, got {len(inputs)}")
        answers: list = [None] * len(inputs)
        images, rows = [], []  # one row per (image, task) pair: all in one pass over the backbone
        for index, item in enumerate(inputs):
            try:
                images.append(read_image(item, allow_paths=False))
            except ValueError as error:
                answers[index] = {"error": f"input {index}: {error}" if not single else str(error)}
                continue
            rows += [(index, len(images) - 1, task) for task in tasks]
        if rows:
            pixel_values = self.processor(images, return_tensors="pt")["pixel_values"].to(self.device)
            batch = pixel_values[torch.tensor([image for _, image, _ in rows], device=self.device)]
            predictions = self.server.predict(batch, [task for _, _, task in rows])
            for (index, _, task), prediction in zip(rows, predictions, strict=True):
                id2label = self.server.tasks[task].config.id2label
                top = top_predictions(prediction.logits[None], id2label, top_k)[0]
                if len(tasks) == 1:
                    answers[index] = top
                else:
                    answers[index] = {**(answers[index] or {}), task: top}
        return answers[0] if single else answers

    def check_tasks(self, tasks) -> list[str]:
        """The tasks asked for (a list, or a comma-separated string as query parameters give it); all by default."""
        if tasks is None:
            return self.tasks
        if isinstance(tasks, str):
            tasks = [t.strip() for t in tasks.split(",") if t.strip()]
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
            raise ValueError(
                f"tasks must be a non-empty list of task names, got {tasks!r}; the tasks are {self.tasks}"
            )
        unknown = [t for t in tasks if t not in self.server.tasks]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; the tasks are {self.tasks}")
        return list(dict.fromkeys(tasks))


def check_top_k(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"top_k must be a whole number >= 1, got {value!r}")
    return value  # above the number of labels, every label is returned (as pipeline does)


def read_endpoint_config(path: str) -> dict:
    """`endpoint.json`, or for a bare prompt checkpoint with the handler copied in, one task at the root."""
    config_path = os.path.join(path, ENDPOINT_CONFIG)
    if not os.path.isfile(config_path):
        return {"tasks": {"default": "."}}
    with open(config_path) as f:
        return json.load(f)


def same_image_processor(folders: dict[str, str]):
    """The image processor the tasks were saved with; tasks saved with different ones are refused, because one pass
    feeds every task the same pixels."""
    from transformers import AutoImageProcessor

    processors = {name: AutoImageProcessor.from_pretrained(folder) for name, folder in folders.items()}
    (first_name, first), *others = processors.items()
    mine = {k: v for k, v in first.to_dict().items() if k not in PROCESSOR_NAME_KEYS}
    for name, processor in others:
        theirs = {k: v for k, v in processor.to_dict().items() if k not in PROCESSOR_NAME_KEYS}
        differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        if differ:
            raise ValueError(
                f"task {name!r} was saved with an image processor that differs from {first_name!r}'s in {differ}; "
                "one backbone pass feeds every task the same pixels"
            )
    return first


# ------------------------------------------------------------------------------------------- the repository
def serving_requirements() -> list[str]:
    """The installed vptm package's serving dependencies, with its version bounds (read from its metadata, so they
    follow pyproject.toml)."""
    try:
        requires = importlib.metadata.requires("vptm") or []
    except importlib.metadata.PackageNotFoundError as error:
        raise OSError("the vptm package is not installed (pip install -e . in its repository)") from error
    kept = []
    for requirement in requires:
        if ";" in requirement:  # an extra's requirement
            continue
        name = requirement.split("<")[0].split(">")[0].split("=")[0].split("!")[0].split("~")[0].strip()
        if name.lower() in SERVING_REQUIREMENTS:
            kept.append(requirement)
    return kept


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
    folder: str, tasks: dict[str, str], multi_task: bool | None = None, revision: str | None = None
) -> dict:
    """Lays out an endpoint repository in `folder` for `tasks` (`{name: prompt checkpoint folder or Hub id}`): one
    task at the root, or several (or `multi_task=True`) in `tasks/<name>/`; then loads it with the handler, so that
    a repository that would not serve is refused here. Returns the written `endpoint.json`."""
    if not tasks:
        raise ValueError("an endpoint needs at least one prompt checkpoint")
    multi_task = len(tasks) > 1 if multi_task is None else multi_task
    if not multi_task and len(tasks) > 1:
        raise ValueError(f"a single-task endpoint holds one checkpoint, got {len(tasks)}")
    if os.path.isdir(folder) and os.listdir(folder):
        raise ValueError(f"{folder} is not empty; an endpoint repository is written into a new or empty folder")
    os.makedirs(folder, exist_ok=True)
    layout = {}
    for name, source in tasks.items():
        layout[name] = f"tasks/{name}" if multi_task else "."
        copy_checkpoint(source, os.path.join(folder, layout[name]), revision)
    from .configuration_vptm import VPTMConfig

    first = VPTMConfig.from_pretrained(os.path.join(folder, next(iter(layout.values()))))
    config = {"backbone": first.backbone_name_or_path, "backbone_revision": first.backbone_revision, "tasks": layout}
    with open(os.path.join(folder, ENDPOINT_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "handler.py"), "w") as f:
        f.write(HANDLER_SOURCE)
    with open(os.path.join(folder, "requirements.txt"), "w") as f:
        f.write("\n".join(serving_requirements()) + "\n")
    shutil.rmtree(os.path.join(folder, "modeling_vptm"), ignore_errors=True)
    shutil.copytree(PACKAGE, os.path.join(folder, "modeling_vptm"), ignore=PACKAGE_IGNORE)
    EndpointHandler(folder, device="cpu")  # refuses tasks of another backbone, processors that differ, ...
    return config


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
        api.upload_folder(repo_id=repo_id, folder_path=folder, delete_patterns=["tasks/**", "modeling_vptm/**"],
                          commit_message="VPTM Inference Endpoint: handler, tasks and the vptm package")  # fmt: skip
    return f"https://huggingface.co/{repo_id}"


__all__ = ["EndpointHandler", "push_endpoint_repository", "write_endpoint_repository"]
