"""VPTM demo: what the [MASK] token predicts, and many tasks served on one loaded backbone.

    python space/app.py                                   # the shipped backbone and the tasks in space/tasks/
    python space/app.py --task fashion=runs/vptm --task digits=me/vptm-digits --port 7860
    VPTM_TASKS="fashion=runs/vptm;vpt=runs/vpt" python space/app.py

Every task is a prompt checkpoint (a folder or a Hub id) made on the same backbone. Requests of all users, for any
mix of tasks, are gathered into one batch on the single loaded backbone (Gradio's batched events over
`MultiTaskVPTM`), at most `--max_batch_size` requests per pass (each with one row per task it asks for); a request
waits at most for the pass in front of it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor

from modeling_vptm.hub_names import check_local_folder
from modeling_vptm.limits import listed
from modeling_vptm.pretraining import TOKENIZER_FILE, PatchKMeansTokenizer, load_visual_tokenizer
from modeling_vptm.serving import (
    MultiTaskVPTM,
    heatmap_overlay,
    image_processor_differences,
    patch_attention_map,
    patch_attention_share,
    processor_size,
    render_visual_token,
    top_visual_tokens,
)
from modeling_vptm.shipped import SHIPPED_BACKBONE, resolve_backbone_path
from modeling_vptm.standalone import read_image, run, top_predictions


HERE = Path(__file__).resolve().parent
BUNDLED_TASKS = HERE / "tasks"
EXAMPLES = HERE / "examples"
# Images are refused below this side before they are decoded (a 1x1 image carries nothing to classify); the package's
# image policy bounds them above (4096 x 4096 pixels) and decodes them no larger than the model needs.
MIN_SIDE = 8
DISPLAY_SIDE = 224  # model inputs are drawn at this size (the shipped backbone sees 28 x 28 pixels)
MAX_UPLOAD = "10mb"


class BadInput:
    """An input Gradio could not prepare (not an image, a value out of range), carried to the request's own answer:
    in a batched event an exception in one request's preprocessing would fail every request of the batch."""

    def __init__(self, message: str) -> None:
        self.message = message


def check_top_k(value) -> int:
    if isinstance(value, BadInput):
        raise ValueError(value.message)
    if not isinstance(value, (int, float)) or int(value) != value or not 1 <= value <= 10:
        raise ValueError(f"labels per task must be a whole number from 1 to 10, got {value!r}")
    return int(value)


def answer_alone(
    component: gr.components.Component, keep_unknown: bool = False, problem: str | None = None
) -> gr.components.Component:
    """Makes ``component`` hand a value it cannot prepare to the request's own answer instead of raising.

    In a batched event Gradio prepares every request of the batch in one call, so one upload that is not an image,
    one task that is not a choice or one top-k out of range would fail all the requests it was batched with. The
    value goes on to ``DemoService``, which answers that request with a message. (The instance's method is replaced,
    not the class: a Gradio component subclass needs a front end of its own.)
    """
    prepare = component.preprocess

    def preprocess(payload):
        if keep_unknown:  # task names are checked by DemoService.check_tasks, request by request
            return list(payload or [])
        try:
            value = prepare(payload)
        except Exception as error:  # noqa: BLE001  (whatever it is, it belongs to this request alone)
            what = problem or f"{component.label.lower()}: not a valid value"
            return BadInput(f"{what} ({type(error).__name__}: {error})")
        return value

    component.preprocess = preprocess
    return component


def parse_tasks(values: list[str]) -> dict[str, str]:
    """``NAME=SOURCE`` pairs (flags, or ``;``-separated in ``VPTM_TASKS``) -> ``{name: source}``."""
    tasks = {}
    for value in values:
        name, sep, source = value.strip().partition("=")
        if not sep or not name.strip() or not source.strip():
            raise ValueError(f"a task is given as NAME=FOLDER_OR_HUB_ID, got {value!r}")
        tasks[name.strip()] = source.strip()
    return tasks


def bundled_tasks(folder: Path = BUNDLED_TASKS) -> dict[str, str]:
    """The prompt checkpoints shipped with the Space, one sub-folder each, named by the folder."""
    if not folder.is_dir():
        return {}
    return {p.name: str(p) for p in sorted(folder.iterdir()) if (p / "config.json").is_file()}


class DemoService:
    """The model side of the Space, with no Gradio in it: one backbone, its tasks, input checks and the outputs.

    A task that cannot be loaded (another backbone, a corrupted file, a missing repository) is left out and its
    reason kept in ``refused``; the others serve.
    """

    def __init__(self, backbone: str, tasks: dict[str, str], revision: str | None = None, device: str = "cpu") -> None:
        self.server = MultiTaskVPTM(backbone, revision=revision)
        folder = resolve_backbone_path(backbone)
        self.processor = AutoImageProcessor.from_pretrained(folder, revision=revision)
        self.refused: dict[str, str] = {}
        self.accuracy: dict[str, float] = {}
        for name, source in tasks.items():
            try:
                check_local_folder(source, "prompt checkpoint")  # a mistyped folder is refused now, not after retries
                self.check_processor(source)
                self.server.add_task(name, source)
            except (OSError, ValueError, KeyError) as error:
                self.refused[name] = f"{type(error).__name__}: {error}"
                continue
            results = os.path.join(source, "all_results.json")
            if os.path.isfile(results):
                with open(results) as f:
                    scored = json.load(f).get("scored", {})
                if "accuracy" in scored.get("test", {}):  # scored once on the task's held-out test images
                    self.accuracy[name] = scored["test"]["accuracy"]
        self.server.to(device)
        self.tokenizer = None
        if os.path.isfile(os.path.join(folder, TOKENIZER_FILE)):
            tokenizer = load_visual_tokenizer(folder)
            self.tokenizer = tokenizer if isinstance(tokenizer, PatchKMeansTokenizer) else None
        self.device = device
        self.grid = self.server.backbone.grid_size

    def check_processor(self, source: str) -> None:
        """Every task is fed by the backbone's image processor (one pass for all tasks); a task saved with another
        one would be served inputs it was not trained on, so it is refused."""
        try:
            own = AutoImageProcessor.from_pretrained(source)
        except OSError:  # no processor saved with the task: it was made on the backbone's
            return
        differ = image_processor_differences(self.processor, own)
        if differ:
            raise ValueError(
                f"its image processor differs from the backbone's in {differ}; the Space feeds every task the "
                "backbone's processor"
            )

    @property
    def task_names(self) -> list[str]:
        return list(self.server.tasks)

    def describe_tasks(self) -> str:
        lines = []
        for name, task in self.server.tasks.items():
            config = task.config
            kind = "VPTM: reads [MASK]" if config.reads_mask_token else "VPT: reads CLS"
            accuracy = self.accuracy.get(name)
            scored = f", test accuracy {accuracy:.1%}" if accuracy is not None else ""
            lines.append(f"- **{name}**: {config.num_labels} classes, {kind}{scored}")
        lines += [f"- ~~{name}~~ not loaded: {reason}" for name, reason in self.refused.items()]
        return "\n".join(lines) or "No task is loaded."

    # ------------------------------------------------------------------------------------------------ inputs
    def read_image(self, path: str | BadInput | None) -> Image.Image:
        """The uploaded file as RGB, or a ``ValueError`` that says what was expected."""
        if isinstance(path, BadInput):
            raise ValueError(path.message)
        if not path:
            raise ValueError("no image: upload one or pick an example")
        # the package's image policy: a regular file, its size from the header within the pixel limit, decoded no
        # larger than the model needs
        return read_image(path, size=processor_size(self.processor), min_side=MIN_SIDE)

    def check_tasks(self, tasks: list[str] | None) -> list[str]:
        tasks = list(dict.fromkeys(tasks or []))  # each task once, in the order given
        if not tasks:
            raise ValueError(f"no task chosen; the tasks are {listed(self.task_names)}")
        unknown = [t for t in tasks if t not in self.server.tasks]
        if unknown:
            raise ValueError(f"unknown task(s) {listed(unknown)}; the tasks are {listed(self.task_names)}")
        return tasks

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        return self.processor(images, return_tensors="pt")["pixel_values"].to(self.device)

    # ------------------------------------------------------------------------------------------------- classify
    def classify_batch(
        self, paths: list[str | None], task_lists: list[list[str]], top_k: int | list[int] = 3
    ) -> list[dict]:
        """One answer per request: ``{task: [{"label", "score"}, ...]}`` (``top_k`` labels, one value or one per
        request), or ``{"error": message}`` for a request whose input is bad (the other requests of the batch are
        answered as if it were not there)."""
        top_ks = list(top_k) if isinstance(top_k, list) else [top_k] * len(paths)  # checked below, per request
        answers: list[dict] = [{} for _ in paths]
        images, rows = [], []  # one row per (request, task) pair
        for index, (path, tasks) in enumerate(zip(paths, task_lists, strict=True)):
            try:
                tasks = self.check_tasks(tasks)
                top_ks[index] = check_top_k(top_ks[index])
                image = self.read_image(path)
            except ValueError as error:
                answers[index] = {"error": str(error)}
                continue
            images.append(image)
            rows += [(index, len(images) - 1, task) for task in tasks]
        if rows:
            pixel_values = self.pixel_values(images)
            batch = pixel_values[torch.tensor([image for _, image, _ in rows])]
            predictions = self.server.predict(batch, [task for _, _, task in rows])
            for (index, _, task), prediction in zip(rows, predictions, strict=True):
                logits = prediction.logits.float().numpy()
                answers[index][task] = top_predictions(logits, prediction.id2label, top_ks[index])[0]
        return answers

    # ---------------------------------------------------------------------------------------------- look inside
    def look_inside(self, path: str | None, tasks: list[str] | None, num_tokens: int = 5) -> dict:
        """Per task: the read-out token's attention over the patches, drawn on the image the model sees, and for
        VPTM tasks the top visual tokens predicted at [MASK], drawn where the tokenizer is known."""
        tasks = self.check_tasks(tasks)
        image = self.read_image(path)
        pixel_values = self.pixel_values([image]).expand(len(tasks), -1, -1, -1)
        predictions = self.server.predict(pixel_values, tasks, output_readout_attention=True)
        seen = self.model_view(image)
        num_patches = self.grid[0] * self.grid[1]
        out = {"heatmaps": [], "tokens": [], "summary": []}
        for task, prediction in zip(tasks, predictions, strict=True):
            heatmap = patch_attention_map(prediction.readout_attention.cpu(), self.grid)
            share = patch_attention_share(prediction.readout_attention.cpu(), num_patches)
            top = top_predictions(prediction.logits.float().numpy(), prediction.id2label, 1)[0][0]
            reader = "[MASK]" if prediction.visual_token_logits is not None else "CLS"
            caption = (
                f"{task}: {top['label']} ({top['score']:.2f}); {reader} gives {share:.0%} of its attention to patches"
            )
            out["heatmaps"].append((heatmap_overlay(seen, heatmap), caption))
            line = f"**{task}** reads {reader}: top class {top['label']} ({top['score']:.3f})"
            if prediction.visual_token_logits is not None:
                tokens = top_visual_tokens(prediction.visual_token_logits.cpu(), num_tokens)
                line += "; visual tokens at [MASK]: " + ", ".join(f"#{t} ({p:.3f})" for t, p in tokens)
                if self.tokenizer is not None:  # codes that are pixels can be drawn; feature codes cannot
                    for token, prob in tokens:
                        out["tokens"].append((self.draw_token(token), f"{task}: token #{token}, p={prob:.3f}"))
            out["summary"].append(line)
        return out

    def model_view(self, image: Image.Image) -> np.ndarray:
        """The image as the model sees it (the processor's size and resampling), enlarged to ``DISPLAY_SIDE`` with
        square pixels, ``(DISPLAY_SIDE, DISPLAY_SIDE, 3)`` ``uint8``."""
        size = self.processor.size
        small = image.resize((size["width"], size["height"]), Image.Resampling(self.processor.resample))
        return np.asarray(small.resize((DISPLAY_SIDE, DISPLAY_SIDE), Image.Resampling.NEAREST))

    def draw_token(self, token: int) -> np.ndarray:
        """A visual token as an RGB picture of its k-means code (patch and context), enlarged with square pixels."""
        mean, std = float(np.mean(self.processor.image_mean)), float(np.mean(self.processor.image_std))
        patch = render_visual_token(self.tokenizer, token, mean, std)
        scale = max(1, 64 // patch.shape[0])
        return np.repeat(np.repeat(patch, scale, 0), scale, 1)[..., None].repeat(3, -1)


def format_answer(answer: dict) -> str:
    if "error" in answer:
        return f"**Cannot classify this image:** {answer['error']}"
    blocks = []
    for task, top in answer.items():
        blocks.append(f"**{task}**\n\n" + "\n".join(f"- {p['label']}: {p['score']:.3f}" for p in top))
    return "\n\n".join(blocks)


def build_demo(service: DemoService, max_batch_size: int = 16) -> gr.Blocks:
    names = service.task_names
    examples = sorted(str(p) for p in EXAMPLES.glob("*.png")) if EXAMPLES.is_dir() else []

    def classify(paths, task_lists, top_ks):  # batched: one list per input, one list per output
        answers = service.classify_batch(list(paths), [list(t or []) for t in task_lists], list(top_ks))
        return [format_answer(a) for a in answers], answers

    def look(path, tasks):
        try:
            out = service.look_inside(path, tasks)
        except (ValueError, TypeError) as error:
            return [], [], f"**Cannot look inside:** {error}"
        return out["heatmaps"], out["tokens"], "\n\n".join(out["summary"])

    # no analytics: the demo sends nothing anywhere but its answers (and runs where no network is)
    with gr.Blocks(title="VPTM: visual prompts as masked visual token modeling", analytics_enabled=False) as demo:
        gr.Markdown(
            "# VPTM: image classification as masked visual token modeling\n"
            "Prompts and a [MASK] token join a frozen BEiT; the BEiT's own pre-training head predicts a visual token "
            "at [MASK], and a small verbalizer maps it to labels. Every task below is a prompt checkpoint of a few "
            "kilobytes on **one loaded backbone**; requests of all visitors, for any mix of tasks, share its batches."
        )
        with gr.Row():
            with gr.Column(scale=1):
                # image_mode=None: Gradio passes the file through instead of decoding and re-encoding it, so the
                # size check below runs on the header before anything is decoded
                image = answer_alone(gr.Image(type="filepath", image_mode=None, label="Image", elem_id="image-input",
                                              height=240), problem="not an image that can be read")  # fmt: skip
                gr.Markdown(
                    "The shipped backbone was pre-trained on Fashion-MNIST: 28 x 28 grey images of a light object "
                    "on a dark background. Other pictures are resized to that and classified anyway."
                )
                tasks = answer_alone(gr.CheckboxGroup(names, value=names[:3], label="Tasks", elem_id="task-choice"),
                                     keep_unknown=True)  # fmt: skip
                top_k = answer_alone(gr.Slider(1, 10, value=3, step=1, label="Labels per task"))
                with gr.Row():
                    classify_button = gr.Button("Classify", variant="primary", elem_id="classify-button")
                    look_button = gr.Button("Look inside", elem_id="look-button")
                if examples:
                    names_shown = ", ".join(Path(e).stem.replace("-", " ") for e in examples)
                    gr.Examples(examples=examples, inputs=image, label=f"Examples: {names_shown}")
                gr.Markdown("### Tasks on this backbone\n" + service.describe_tasks())
            with gr.Column(scale=2):
                gr.Markdown("### Predictions")
                labels = gr.Markdown(elem_id="predictions")
                with gr.Accordion("As JSON", open=False):
                    answer = gr.JSON(label="Predictions")
                heatmaps = gr.Gallery(label="Where the read-out token looked (last block)", columns=3, height=300,
                                      elem_id="heatmaps")  # fmt: skip
                token_gallery = gr.Gallery(label="Visual tokens predicted at [MASK]", columns=5, height=180,
                                           elem_id="tokens")  # fmt: skip
                summary = gr.Markdown(elem_id="summary")
        classify_button.click(
            classify,
            inputs=[image, tasks, top_k],
            outputs=[labels, answer],
            batch=True,
            max_batch_size=max_batch_size,
            concurrency_limit=1,
            concurrency_id="backbone",  # one pass at a time on the shared backbone, for every event
            api_name="classify",
        )
        # a new image clears the answers about the previous one
        image.change(lambda: ("", None, [], [], ""), outputs=[labels, answer, heatmaps, token_gallery, summary],
                     queue=False, api_visibility="private")  # fmt: skip
        look_button.click(
            look,
            inputs=[image, tasks],
            outputs=[heatmaps, token_gallery, summary],
            concurrency_limit=1,
            concurrency_id="backbone",
            api_name="look_inside",
        )
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default=os.environ.get("VPTM_BACKBONE", SHIPPED_BACKBONE))
    parser.add_argument("--revision", default=os.environ.get("VPTM_BACKBONE_REVISION"))
    parser.add_argument("--task", action="append", default=[], help="NAME=prompt checkpoint folder or Hub id.")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--max_batch_size", type=int, default=16, help="Requests gathered into one pass.")
    parser.add_argument("--max_queue", type=int, default=256, help="Requests waiting at most; more are turned away.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from_env = [v for v in os.environ.get("VPTM_TASKS", "").split(";") if v.strip()]
    tasks = parse_tasks(args.task + from_env) or bundled_tasks()
    service = DemoService(args.backbone, tasks, revision=args.revision, device=args.device)
    demo = build_demo(service, args.max_batch_size).queue(max_size=args.max_queue)
    demo.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD)


if __name__ == "__main__":
    run(main)  # an anticipated error: one line and exit status 2, no traceback
