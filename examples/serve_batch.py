"""Batch inference for many tasks on one loaded backbone: folders of images, each folder under its own task.

Images of all tasks are mixed into the same batches and run through the backbone once (`MultiTaskVPTM`); every
image gets its own task's prompts, mask token and head.

    python examples/serve_batch.py --backbone vptm:tiny-beit-fashion-mnist \
        --task fashion=runs/vptm --task fashion-vpt=runs/vpt \
        --input fashion=images/a --input fashion-vpt=images/b --top_k 3 --output predictions.jsonl
"""

from __future__ import annotations

import argparse

import torch

from modeling_vptm.hub_names import CheckpointNotFoundError
from modeling_vptm.serving import MultiTaskVPTM
from modeling_vptm.shipped import resolve_backbone_path
from modeling_vptm.standalone.image_input import list_images, read_rgb
from modeling_vptm.standalone.predictions import format_top, top_predictions, write_jsonl


def pairs(values: list[str], what: str) -> list[tuple[str, str]]:
    out = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--{what} takes NAME=PATH, got {value!r}")
        out.append((name, path))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", required=True, help="The backbone every task was trained on.")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--task", action="append", required=True, help="NAME=prompt checkpoint (repeatable).")
    parser.add_argument("--input", action="append", required=True, help="TASK=image file or folder (repeatable).")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--top_k", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None, help="Also write one JSON line per image.")
    args = parser.parse_args(argv)

    from tqdm.auto import tqdm
    from transformers import AutoImageProcessor

    server = MultiTaskVPTM(args.backbone, revision=args.revision)
    for name, path in pairs(args.task, "task"):
        server.add_task(name, path)
    server.to(args.device)
    jobs = []
    for name, path in pairs(args.input, "input"):
        if name not in server.tasks:
            raise ValueError(f"--input names task {name!r}, but the tasks are {sorted(server.tasks)}")
        jobs += [(file, name) for file in list_images([path])]
    processor = AutoImageProcessor.from_pretrained(resolve_backbone_path(args.backbone), revision=args.revision)
    results = []
    for start in tqdm(range(0, len(jobs), args.batch_size), desc="serving", unit="batch"):
        batch = jobs[start : start + args.batch_size]
        images = [read_rgb(file) for file, _ in batch]
        pixel_values = processor(images, return_tensors="pt")["pixel_values"].to(args.device)
        predictions = server.predict(pixel_values, tasks=[task for _, task in batch])
        for (file, task), prediction in zip(batch, predictions, strict=True):
            top = top_predictions(prediction.logits[None], prediction.id2label, args.top_k)[0]
            results.append({"file": file, "task": task, "predictions": top})
            print(f"{file}\t{task}\t{format_top(top)}")
    write_jsonl(args.output, results)
    return results


if __name__ == "__main__":
    try:
        main()
    except CheckpointNotFoundError as error:  # a name that is neither a folder nor on the Hub: one line, no traceback
        raise SystemExit(f"error: {error}") from None
