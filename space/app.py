"""VPTM demo: what the [MASK] token predicts, and many tasks served on one loaded backbone.

    python space/app.py                                   # the shipped backbone and the tasks in space/tasks/
    python space/app.py --task fashion=runs/vptm --task digits=me/vptm-digits --port 7860
    VPTM_TASKS="fashion=runs/vptm;vpt=runs/vpt" python space/app.py

Every task is a prompt checkpoint (a folder or a Hub id) made on the same backbone. Requests of all users, for any
mix of tasks, are gathered into one batch on the single loaded backbone (Gradio's batched events over
`MultiTaskVPTM`), at most `--max_batch_size` images per pass; a request waits at most for the pass in front of it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor

from modeling_vptm.backbones import SHIPPED_BACKBONE
from modeling_vptm.images import read_rgb, top_predictions
from modeling_vptm.inspection import (
    heatmap_overlay,
    patch_attention_map,
    patch_attention_share,
    render_visual_token,
    top_visual_tokens,
)
from modeling_vptm.modeling_vptm import resolve_backbone_path
from modeling_vptm.serving import MultiTaskVPTM
from modeling_vptm.tokenizer import TOKENIZER_FILE, PatchKMeansTokenizer, load_visual_tokenizer


HERE = Path(__file__).resolve().parent
BUNDLED_TASKS = HERE / "tasks"
EXAMPLES = HERE / "examples"
# Images are refused outside these bounds before they are decoded: a 1x1 image carries nothing to classify, and a
# huge one would hold the shared backbone (and every other user) while it is decoded and resized.
MIN_SIDE, MAX_SIDE = 8, 4096
DISPLAY_SIDE = 224  # model inputs are drawn at this size (the shipped backbone sees 28 x 28 pixels)


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
        self.refused: dict[str, str] = {}
        for name, source in tasks.items():
            try:
                self.server.add_task(name, source)
            except (OSError, ValueError, KeyError) as error:
                self.refused[name] = f"{type(error).__name__}: {error}"
        self.server.to(device)
        folder = resolve_backbone_path(backbone)
        self.processor = AutoImageProcessor.from_pretrained(folder, revision=revision)
        self.tokenizer = None
        if os.path.isfile(os.path.join(folder, TOKENIZER_FILE)):
            tokenizer = load_visual_tokenizer(folder)
            self.tokenizer = tokenizer if isinstance(tokenizer, PatchKMeansTokenizer) else None
        self.device = device
        config = self.server.prompted_backbone.config
        self.grid = (config.image_size // config.patch_size,) * 2

    @property
    def task_names(self) -> list[str]:
        return list(self.server.tasks)

    def describe_tasks(self) -> str:
        lines = []
        for name, task in self.server.tasks.items():
            config = task.config
            kind = "VPTM: reads [MASK]" if config.reads_mask_token else "VPT: reads CLS"
            lines.append(f"- **{name}**: {config.num_labels} classes, {kind}")
        lines += [f"- ~~{name}~~ not loaded: {reason}" for name, reason in self.refused.items()]
        return "\n".join(lines) or "No task is loaded."

    # ------------------------------------------------------------------------------------------------ inputs
    def read_image(self, path: str | None) -> Image.Image:
        """The uploaded file as RGB, or a ``ValueError`` that says what was expected."""
        if not path:
            raise ValueError("no image: upload one or pick an example")
        try:
            with Image.open(path) as probe:  # reads the header only
                width, height = probe.size
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"not an image that can be read ({type(error).__name__}: {error})") from error
        if min(width, height) < MIN_SIDE or max(width, height) > MAX_SIDE:
            raise ValueError(
                f"image of {width} x {height} pixels; expected each side between {MIN_SIDE} and {MAX_SIDE} pixels"
            )
        return read_rgb(path)

    def check_tasks(self, tasks: list[str] | None) -> list[str]:
        tasks = list(tasks or [])
        if not tasks:
            raise ValueError(f"no task chosen; the tasks are {self.task_names}")
        unknown = [t for t in tasks if t not in self.server.tasks]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; the tasks are {self.task_names}")
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
        top_ks = [int(k) for k in top_k] if isinstance(top_k, list) else [top_k] * len(paths)
        answers: list[dict] = [{} for _ in paths]
        images, rows = [], []  # one row per (request, task) pair
        for index, (path, tasks) in enumerate(zip(paths, task_lists, strict=True)):
            try:
                tasks = self.check_tasks(tasks)
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
                id2label = self.server.tasks[task].config.id2label
                answers[index][task] = top_predictions(prediction.logits[None], id2label, top_ks[index])[0]
        return answers

    # ---------------------------------------------------------------------------------------------- look inside
    def look_inside(self, path: str | None, tasks: list[str] | None, num_tokens: int = 5) -> dict:
        """Per task: the read-out token's attention over the patches, drawn on the image the model sees, and for
        VPTM tasks the top visual tokens predicted at [MASK], drawn where the tokenizer is known."""
        tasks = self.check_tasks(tasks)
        image = self.read_image(path)
        pixel_values = self.pixel_values([image]).expand(len(tasks), -1, -1, -1)
        predictions = self.server.predict(pixel_values, tasks, output_readout_attention=True)
        seen = np.asarray(image.resize((DISPLAY_SIDE, DISPLAY_SIDE), Image.Resampling.BILINEAR))
        num_patches = self.grid[0] * self.grid[1]
        out = {"heatmaps": [], "tokens": [], "summary": []}
        for task, prediction in zip(tasks, predictions, strict=True):
            heatmap = patch_attention_map(prediction.readout_attention.cpu(), self.grid)
            share = patch_attention_share(prediction.readout_attention.cpu(), num_patches)
            top = top_predictions(prediction.logits[None], self.server.tasks[task].config.id2label, 1)[0][0]
            reader = "[MASK]" if prediction.visual_token_logits is not None else "CLS"
            caption = (
                f"{task}: {top['label']} ({top['score']:.2f}); {reader} gives {share:.0%} of its attention to patches"
            )
            out["heatmaps"].append((heatmap_overlay(seen, heatmap), caption))
            line = f"**{task}** reads {reader}: top class {top['label']} ({top['score']:.3f})"
            if prediction.visual_token_logits is not None:
                tokens = top_visual_tokens(prediction.visual_token_logits.cpu(), num_tokens)
                line += "; visual tokens at [MASK]: " + ", ".join(f"#{t} ({p:.3f})" for t, p in tokens)
                for token, prob in tokens:
                    out["tokens"].append((self.draw_token(token), f"{task}: token #{token}, p={prob:.3f}"))
            out["summary"].append(line)
        return out

    def draw_token(self, token: int) -> np.ndarray:
        """A visual token as an RGB picture (its k-means code), or a grey tile where codes are not pixels."""
        if self.tokenizer is None:
            return np.full((64, 64, 3), 128, dtype=np.uint8)
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
        except ValueError as error:
            return [], [], f"**Cannot look inside:** {error}"
        return out["heatmaps"], out["tokens"], "\n\n".join(out["summary"])

    with gr.Blocks(title="VPTM: visual prompts as masked visual token modeling") as demo:
        gr.Markdown(
            "# VPTM: image classification as masked visual token modeling\n"
            "Prompts and a [MASK] token join a frozen BEiT; the BEiT's own pre-training head predicts a visual token "
            "at [MASK], and a small verbalizer maps it to labels. Every task below is a prompt checkpoint of a few "
            "kilobytes on **one loaded backbone**; requests of all visitors, for any mix of tasks, share its batches."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="Image", elem_id="image-input", height=240)
                tasks = gr.CheckboxGroup(choices=names, value=names[:3], label="Tasks", elem_id="task-choice")
                top_k = gr.Slider(1, 10, value=3, step=1, label="Labels per task")
                with gr.Row():
                    classify_button = gr.Button("Classify", variant="primary", elem_id="classify-button")
                    look_button = gr.Button("Look inside", elem_id="look-button")
                if examples:
                    gr.Examples(examples=examples, inputs=image, label="Examples")
                gr.Markdown("### Tasks on this backbone\n" + service.describe_tasks())
            with gr.Column(scale=2):
                labels = gr.Markdown(label="Predictions", elem_id="predictions")
                answer = gr.JSON(label="Predictions (JSON)", visible=False)
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
    parser.add_argument("--max_batch_size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from_env = [v for v in os.environ.get("VPTM_TASKS", "").split(";") if v.strip()]
    tasks = parse_tasks(args.task + from_env) or bundled_tasks()
    service = DemoService(args.backbone, tasks, revision=args.revision, device=args.device)
    build_demo(service, args.max_batch_size).queue().launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
