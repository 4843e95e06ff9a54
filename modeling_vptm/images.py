"""Image files for inference: finding them, reading them as RGB, and writing the top-k predictions."""

from __future__ import annotations

import json
import os

import torch


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(inputs: list[str]) -> list[str]:
    """Image files given directly or found (recursively, sorted) in the given folders."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            for root, _, names in sorted(os.walk(item)):
                files += [os.path.join(root, n) for n in sorted(names) if is_image_file(n)]
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise FileNotFoundError(f"{item} is neither an image file nor a folder")
    if not files:
        raise ValueError(f"no images found in {inputs} (looked for {list(IMAGE_EXTENSIONS)})")
    return files


def read_rgb(path: str):
    """The image as 8-bit RGB (greyscale, palette, RGBA and 16-bit included); a clear error for anything else."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:  # truncated, corrupted or not an image
        raise ValueError(f"cannot read image {path}: {error}") from error


def top_predictions(logits: torch.Tensor, id2label: dict[int, str], k: int) -> list[list[dict]]:
    """Per row of class logits, the k most probable labels with their softmax scores."""
    probs = logits.float().softmax(-1)
    scores, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return [
        [{"label": id2label[i], "score": s} for i, s in zip(row_indices, row_scores, strict=True)]
        for row_scores, row_indices in zip(scores.tolist(), indices.tolist(), strict=True)
    ]


def format_top(top: list[dict]) -> str:
    return "\t".join(f"{p['label']}={p['score']:.4f}" for p in top)


def write_jsonl(path: str | None, rows: list[dict]) -> None:
    if path:
        with open(path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


# an image processor's bookkeeping fields, which do not change the pixels it makes
PROCESSOR_NAME_KEYS = {"processor_class", "image_processor_type", "_processor_class"}


def image_processor_differences(processor, other) -> list[str]:
    """The settings in which two image processors differ, bookkeeping aside: empty when they make the same pixels
    (what one backbone pass shared by several tasks needs)."""
    mine = {k: v for k, v in processor.to_dict().items() if k not in PROCESSOR_NAME_KEYS}
    theirs = {k: v for k, v in other.to_dict().items() if k not in PROCESSOR_NAME_KEYS}
    return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
