"""Classifies images with an exported VPTM/VPT graph in ONNX Runtime, without PyTorch or transformers.

Reads what `modeling_vptm.deploy.onnx_export` writes (and `examples/export_onnx.py` runs):

* a **task graph** folder: `model.onnx` (`pixel_values -> logits`, plus `visual_token_logits` for tasks that read
  [MASK]), `config.json` (the labels), `preprocessor_config.json`, `onnx_config.json`;
* a **backbone graph** folder (`--backbone_only`): `backbone.onnx` (`pixel_values`, a task's `prompts` and
  `mask_embedding` -> `readout_hidden_state`, `visual_token_logits`) shared by every task of its sequence layout,
  and per task `tasks/<name>/task.npz` (prompts, [MASK] embedding, head weights) and `tasks/<name>/config.json`; the
  task heads (verbalizer or linear head) run here, in numpy, as `VPTMTask` runs them in PyTorch.

This file imports only numpy, Pillow, onnxruntime and the standard library, and is copied beside every export, so

    python onnx-export/onnx_runtime.py --model onnx-export image.png            # a task graph
    python onnx-export/onnx_runtime.py --model onnx-backbone --task fashion image.png

work on a machine with no PyTorch. Preprocessing follows `preprocessor_config.json` as transformers'
`BeitImageProcessor` (PIL backend) does: RGB, resize with the saved resampling filter, optional centre crop,
rescale, normalise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image


try:
    from .cli import check_finite_scores, json_line, positive_int, run
    from .image_input import read_image, resized_size
    from .predictions import softmax, top_predictions
except ImportError:  # the standalone copy beside an export: its siblings are the files beside it
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cli import check_finite_scores, json_line, positive_int, run
    from image_input import read_image, resized_size
    from predictions import softmax, top_predictions


FORMAT = "vptm-onnx"
MANIFEST = "onnx_config.json"


class ImagePreprocessor:
    """`BeitImageProcessor`'s inference path in numpy, from its saved `preprocessor_config.json`."""

    def __init__(self, config: dict) -> None:
        self.config = config
        size = config.get("size") or {}
        if config.get("do_resize", True) and not ({"height", "width"} <= set(size) or "shortest_edge" in size):
            raise ValueError(f"preprocessor size must give height and width, or shortest_edge, got {size}")
        self.mean = np.asarray(config.get("image_mean", 0.5), dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(config.get("image_std", 0.5), dtype=np.float32).reshape(-1, 1, 1)

    @classmethod
    def from_folder(cls, folder: str) -> ImagePreprocessor:
        with open(os.path.join(folder, "preprocessor_config.json")) as f:
            return cls(json.load(f))

    @property
    def size(self) -> dict | None:
        """The resize setting (what `read_image` needs to read no more pixels than the model uses), or None."""
        return self.config.get("size") if self.config.get("do_resize", True) else None

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        """`pixel_values` `(batch, 3, height, width)`, float32."""
        return np.stack([self.one(image) for image in images])

    def one(self, image: Image.Image) -> np.ndarray:
        config = self.config
        image = image.convert("RGB")
        if config.get("do_resize", True):
            image = image.resize(
                resized_size(config["size"], *image.size), Image.Resampling(config.get("resample", 3))
            )
        array = np.asarray(image).transpose(2, 0, 1)  # (3, height, width), uint8
        if config.get("do_center_crop", False):
            crop = config["crop_size"]
            height, width = array.shape[1:]
            if crop["height"] > height or crop["width"] > width:
                raise ValueError(f"centre crop {crop} is larger than the resized image ({height}x{width})")
            top, left = (height - crop["height"]) // 2, (width - crop["width"]) // 2
            array = array[:, top : top + crop["height"], left : left + crop["width"]]
        # as transformers rescales: in float64, then float32
        pixels = array.astype(np.float64)
        if config.get("do_rescale", True):
            pixels = pixels * config.get("rescale_factor", 1 / 255)
        pixels = pixels.astype(np.float32)
        if config.get("do_normalize", True):
            pixels = (pixels - self.mean) / self.std
        return pixels.astype(np.float32)


# ----------------------------------------------------------------------------------------------- reading files
def read_json(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no {name}: not a folder written by modeling_vptm.deploy.onnx_export")
    with open(path) as f:
        return json.load(f)


def labels_of(config: dict) -> dict[int, str]:
    return {int(k): v for k, v in config["id2label"].items()}


def session(path: str, threads: int | None = None):
    """An ONNX Runtime CPU session (imported here, so that `read_image` and the preprocessing need only Pillow)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: the exporter's graphs draw harmless constant-folding warnings
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


class ExportedGraph:
    """What both folder kinds share: the manifest, the image checks and the preprocessing."""

    graph_kind = ""

    def __init__(self, folder: str, threads: int | None = None) -> None:
        self.folder = folder
        self.manifest = read_json(folder, MANIFEST)
        if self.manifest.get("format") != FORMAT or self.manifest.get("graph") != self.graph_kind:
            raise ValueError(
                f"{folder} holds a {self.manifest.get('graph')!r} graph ({self.manifest.get('format')!r}); "
                f"{type(self).__name__} reads a {self.graph_kind!r} graph ({FORMAT!r})"
            )
        self.session = session(os.path.join(folder, self.manifest["model"]), threads)
        self.preprocessor = ImagePreprocessor.from_folder(folder)
        self.image_shape = (self.manifest["num_channels"], *self.manifest["image_size"])

    def check_pixel_values(self, pixel_values: np.ndarray) -> np.ndarray:
        """Refuses what the graph cannot read, naming expected and received shapes (ONNX Runtime's own message
        names neither)."""
        pixel_values = np.asarray(pixel_values)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != self.image_shape:
            raise ValueError(
                f"pixel_values must have shape (batch, {', '.join(map(str, self.image_shape))}) (the backbone's "
                f"channels and image size), got {tuple(pixel_values.shape)}; preprocess the images with "
                "preprocessor_config.json"
            )
        if len(pixel_values) == 0:
            raise ValueError("pixel_values is an empty batch (batch size 0)")
        if not np.issubdtype(pixel_values.dtype, np.floating):
            raise ValueError(f"pixel_values must be floating point, got dtype {pixel_values.dtype}")
        return pixel_values.astype(np.float32, copy=False)

    def pixel_values(self, images: list) -> np.ndarray:
        """Images (paths, bytes, base64 strings or PIL images) preprocessed as the backbone's processor does."""
        return self.preprocessor([read_image(image, size=self.preprocessor.size) for image in images])


# ---------------------------------------------------------------------------------------- one-task graph
class OnnxImageClassifier(ExportedGraph):
    """A task graph: `pixel_values -> logits` (and `visual_token_logits`) with its labels and preprocessing."""

    graph_kind = "task"

    def __init__(self, folder: str, threads: int | None = None) -> None:
        super().__init__(folder, threads)
        self.config = read_json(folder, "config.json")
        self.id2label = labels_of(self.config)

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the graph by name: `logits` `(batch, num_labels)` and, for tasks reading [MASK],
        `visual_token_logits` `(batch, vocab_size)`."""
        pixel_values = self.check_pixel_values(pixel_values)
        names = [output.name for output in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, {"pixel_values": pixel_values}), strict=True))

    def __call__(self, images: list, top_k: int = 5) -> list[list[dict]]:
        """Top-k `{"label", "score"}` per image."""
        return top_predictions(self.run(self.pixel_values(images))["logits"], self.id2label, top_k)


# ------------------------------------------------------------------------------------ one backbone, many tasks
def normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """`torch.nn.functional.normalize` over the last axis."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def standardize(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """`layer_norm` over the last axis without weights (per-row z-score, biased variance)."""
    x = x.astype(np.float32)
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)


class TaskHead:
    """A task's tensors and head in numpy: `VPTMTask`'s read-out choice, prototypical verbalizer(s) or linear head."""

    def __init__(self, folder: str) -> None:
        self.config = read_json(folder, "config.json")
        self.id2label = labels_of(self.config)
        with np.load(os.path.join(folder, "task.npz")) as tensors:
            self.tensors = {name: tensors[name] for name in tensors.files}

    @property
    def prompts(self) -> np.ndarray | None:
        """`(num_prompted_blocks, P, D)`, or `None` for a task without prompts."""
        return self.tensors.get("prompt_embeddings.prompts")

    @property
    def mask_embedding(self) -> np.ndarray | None:
        """The trained [MASK] embedding `(1, 1, D)`, or `None` for the backbone's pre-trained one."""
        return self.tensors.get("trainable_mask_token")

    def verbalize(self, prefix: str, features: np.ndarray) -> np.ndarray:
        """`PrototypicalVerbalizer`: scale x cosine of the projected features with each class's best prototype."""
        t = self.tensors
        projected = normalize(features @ t[prefix + "projection.weight"].T)
        cosine = projected @ normalize(t[prefix + "prototypes"]).T  # (batch, num_labels * M)
        per_class = self.config.get("prototypes_per_class", 1)
        cosine = cosine.reshape(len(features), -1, per_class).max(-1)  # (batch, num_labels)
        return t[prefix + "logit_scale"] * cosine

    def __call__(self, readout_hidden_state: np.ndarray, visual_token_logits: np.ndarray | None) -> np.ndarray:
        """Class logits `(batch, num_labels)` from the backbone graph's outputs."""
        config, t = self.config, self.tensors
        if config["classifier"] == "linear_cls" or config["head_input"] == "hidden":
            features = readout_hidden_state
        elif config["head_input"] == "probs":
            features = softmax(visual_token_logits).astype(np.float32)
        elif config["head_input"] == "normalized_logits":
            features = standardize(visual_token_logits)
        else:  # "logits", and the token path of "ensemble"
            features = visual_token_logits
        if config["classifier"] != "prototypical_verbalizer":
            return features @ t["classifier.weight"].T + t["classifier.bias"]
        logits = self.verbalize("verbalizer.", features)
        if config["head_input"] == "ensemble":  # ProtoVerb's ensemble: the mean of per-image standardised logits
            hidden = self.verbalize("hidden_verbalizer.", readout_hidden_state)
            logits = (standardize(logits) + standardize(hidden)) / 2
        return logits


class OnnxMultiTask(ExportedGraph):
    """A backbone graph and its tasks: each image with its own task's prompts and [MASK] embedding in one pass, the
    heads applied in numpy (what `MultiTaskVPTM` does in PyTorch)."""

    graph_kind = "backbone"

    def __init__(self, folder: str, threads: int | None = None) -> None:
        super().__init__(folder, threads)
        with np.load(os.path.join(folder, "backbone.npz")) as tensors:
            self.pretrained_mask_token = tensors["pretrained_mask_token"]
        self.inputs = [i.name for i in self.session.get_inputs()]
        # the manifest's list, not the folder's listing: a stray folder in tasks/ is not a task
        tasks = os.path.join(folder, "tasks")
        self.tasks = {name: TaskHead(os.path.join(tasks, name)) for name in self.manifest["tasks"]}

    def check_tasks(self, tasks: list[str]) -> None:
        unknown = sorted(set(tasks) - set(self.tasks))
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; tasks are {sorted(self.tasks)}")

    def run(self, pixel_values: np.ndarray, tasks: list[str]) -> list[np.ndarray]:
        """Class logits of each image under its own task: one `(num_labels_of_its_task,)` array per image."""
        pixel_values = self.check_pixel_values(pixel_values)
        if len(tasks) != len(pixel_values):
            raise ValueError(f"one task per image: got {len(tasks)} task names for {len(pixel_values)} images")
        self.check_tasks(tasks)
        heads = [self.tasks[name] for name in tasks]
        feed = {"pixel_values": pixel_values}
        if "prompts" in self.inputs:  # (batch, blocks, P, D), each image its task's
            feed["prompts"] = np.stack([head.prompts for head in heads]).astype(np.float32)
        if "mask_embedding" in self.inputs:  # (batch, 1, D), the pre-trained one for tasks without their own
            masks = [self.pretrained_mask_token if h.mask_embedding is None else h.mask_embedding for h in heads]
            feed["mask_embedding"] = np.concatenate(masks).astype(np.float32)
        outputs = dict(zip([o.name for o in self.session.get_outputs()], self.session.run(None, feed), strict=True))
        hidden, token_logits = outputs["readout_hidden_state"], outputs.get("visual_token_logits")
        out: list[np.ndarray | None] = [None] * len(tasks)
        for name in dict.fromkeys(tasks):  # each head once, on its task's images
            rows = [i for i, task in enumerate(tasks) if task == name]
            logits = self.tasks[name](hidden[rows], None if token_logits is None else token_logits[rows])
            for row, row_logits in zip(rows, logits, strict=True):
                out[row] = row_logits
        return out

    def __call__(self, images: list, tasks: list[str], top_k: int = 5) -> list[list[dict]]:
        """Top-k `{"label", "score"}` per image, each under its own task."""
        logits = self.run(self.pixel_values(images), tasks)
        return [top_predictions(row, self.tasks[t].id2label, top_k)[0] for row, t in zip(logits, tasks, strict=True)]


def load(folder: str, threads: int | None = None) -> OnnxImageClassifier | OnnxMultiTask:
    """The classifier an export folder holds, whichever graph it is."""
    kind = read_json(folder, MANIFEST).get("graph")
    return OnnxMultiTask(folder, threads) if kind == "backbone" else OnnxImageClassifier(folder, threads)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", help="Image files.")
    parser.add_argument("--model", default=os.path.dirname(os.path.abspath(__file__)), help="The export folder.")
    parser.add_argument("--task", default=None, help="The task to run (backbone graphs; default: every task).")
    parser.add_argument("--top_k", type=positive_int, default=5)
    args = parser.parse_args(argv)
    model = load(args.model)
    results = []
    if isinstance(model, OnnxMultiTask):
        for task in [args.task] if args.task else list(model.tasks):
            for path, top in zip(args.images, model(args.images, [task] * len(args.images), args.top_k), strict=True):
                results.append({"file": path, "task": task, "predictions": top})
    else:
        for path, top in zip(args.images, model(args.images, args.top_k), strict=True):
            results.append({"file": path, "predictions": top})
    check_finite_scores(results, f"the export {args.model}")
    for result in results:
        print(json_line(result))
    return results


__all__ = [
    "ImagePreprocessor",
    "OnnxImageClassifier",
    "OnnxMultiTask",
    "TaskHead",
    "load",
]


if __name__ == "__main__":
    run(main)
