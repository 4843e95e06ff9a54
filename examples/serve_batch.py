"""Batch inference for many tasks on one loaded backbone: folders of images, each folder under its own task.

Images of all tasks are mixed into the same batches and run through the backbone once (`MultiTaskVPTM`); every
image gets its own task's prompts, mask token and head.

    python examples/serve_batch.py --backbone vptm:tiny-beit-fashion-mnist \
        --task fashion=runs/vptm --task fashion-vpt=runs/vpt \
        --input fashion=images/a --input fashion-vpt=images/b --top_k 3 --output predictions.jsonl

Images are read by the package's image policy; `--skip_unreadable` skips and counts the files it refuses. `--output`
is checked before any work and written whole at the end; an existing file is replaced only with `--overwrite`.
"""

from __future__ import annotations

import argparse
import sys

import torch

from modeling_vptm.serving import MultiTaskVPTM, processor_size
from modeling_vptm.shipped import resolve_backbone_path
from modeling_vptm.standalone import (
    OutputFile,
    check_finite_scores,
    escape,
    json_line,
    list_images,
    positive_int,
    read_image_files,
    run,
    text_line,
    top_predictions,
)


def pairs(values: list[str], what: str) -> list[tuple[str, str]]:
    out = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--{what} takes NAME=PATH, got {value!r:.200}")
        out.append((name, path))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", required=True, help="The backbone every task was trained on.")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--task", action="append", required=True, help="NAME=prompt checkpoint (repeatable).")
    parser.add_argument("--input", action="append", required=True, help="TASK=image file or folder (repeatable).")
    parser.add_argument("--batch_size", type=positive_int, default=64)
    parser.add_argument("--top_k", type=positive_int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None, help="Also write one JSON line per image.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output file.")
    parser.add_argument("--skip_unreadable", action="store_true", help="Skip (and count) unreadable files.")
    args = parser.parse_args(argv)
    output = OutputFile(args.output, args.overwrite)  # before any work: a bad path fails now, not after inference
    tasks, inputs = pairs(args.task, "task"), pairs(args.input, "input")
    given = [name for name, _ in tasks]
    for name, _ in inputs:
        if name not in given:
            raise ValueError(f"--input names task {name!r:.80}, but the tasks are {given[:10]}")

    from tqdm.auto import tqdm
    from transformers import AutoImageProcessor

    server = MultiTaskVPTM(args.backbone, revision=args.revision)
    for name, path in tasks:
        server.add_task(name, path)
    server.to(args.device)
    jobs = [(file, name) for name, path in inputs for file in list_images([path])]
    processor = AutoImageProcessor.from_pretrained(resolve_backbone_path(args.backbone), revision=args.revision)
    size = processor_size(processor)
    results, skipped = [], []
    for start in tqdm(range(0, len(jobs), args.batch_size), desc="serving", unit="batch"):
        chunk = jobs[start : start + args.batch_size]
        images, read = read_image_files([file for file, _ in chunk], size=size, skip_unreadable=args.skip_unreadable)
        batch = [chunk[i] for i in read]
        skipped += [chunk[i][0] for i in sorted(set(range(len(chunk))) - set(read))]
        if not images:
            continue
        pixel_values = processor(images, return_tensors="pt")["pixel_values"].to(args.device)
        predictions = server.predict(pixel_values, tasks=[task for _, task in batch])
        for (file, task), prediction in zip(batch, predictions, strict=True):
            top = top_predictions(prediction.logits.float().cpu().numpy(), prediction.id2label, args.top_k)[0]
            row = {"file": file, "task": task, "predictions": top}
            check_finite_scores([row], f"task {task!r}")
            print(text_line(file, task, top=top))
            results.append(row)
    if skipped:
        names = ", ".join(escape(path) for path in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
        print(f"skipped {len(skipped)} unreadable file(s): {names}", file=sys.stderr)
    output.write_lines(json_line(row) for row in results)
    return results


if __name__ == "__main__":
    run(main)
