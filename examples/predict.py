"""Classifies image files with a saved or pushed prompt checkpoint and prints the top-k labels with scores.

    python examples/predict.py --model runs/vptm image1.png image2.jpg
    python examples/predict.py --model me/vptm-fashion --revision <commit> --trust_remote_code path/to/folder
    python examples/predict.py --model runs/vptm folder/ --top_k 3 --batch_size 64 --output predictions.jsonl

Without `--trust_remote_code` the installed `modeling_vptm` package provides the model classes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def list_images(inputs: list[str]) -> list[str]:
    files = []
    for item in inputs:
        if os.path.isdir(item):
            for root, _, names in sorted(os.walk(item)):
                files += [
                    os.path.join(root, n) for n in sorted(names) if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS
                ]
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise FileNotFoundError(f"{item} is neither an image file nor a folder")
    if not files:
        raise ValueError(f"no images found in {inputs} (looked for {sorted(IMAGE_EXTENSIONS)})")
    return files


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="Image files and/or folders (searched recursively).")
    parser.add_argument("--model", required=True, help="Folder or Hub id of a prompt checkpoint.")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None, help="Also write one JSON line per image to this file.")
    parser.add_argument("--skip_unreadable", action="store_true", help="Skip (and count) unreadable files.")
    args = parser.parse_args(argv)

    from PIL import Image
    from tqdm.auto import tqdm
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    if not args.trust_remote_code:
        import modeling_vptm  # noqa: F401  (registers the VPTM classes with the Auto classes)

    model = AutoModelForImageClassification.from_pretrained(
        args.model, revision=args.revision, trust_remote_code=args.trust_remote_code
    ).to(args.device)
    model.eval()
    processor = AutoImageProcessor.from_pretrained(args.model, revision=args.revision)
    files = list_images(args.inputs)
    top_k = min(args.top_k, model.config.num_labels)
    results, skipped = [], []
    for start in tqdm(range(0, len(files), args.batch_size), desc="classifying", unit="batch"):
        batch = files[start : start + args.batch_size]
        images, kept = [], []
        for path in batch:
            try:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))  # greyscale, palette, RGBA, 16-bit: all to 8-bit RGB
                kept.append(path)
            except (OSError, SyntaxError, ValueError) as error:  # truncated, corrupted or not an image
                if not args.skip_unreadable:
                    raise ValueError(
                        f"cannot read image {path}: {error} (pass --skip_unreadable to skip it)"
                    ) from error
                skipped.append(path)
        if not images:
            continue
        batch = kept
        pixel_values = processor(images, return_tensors="pt")["pixel_values"].to(args.device)
        with torch.no_grad():
            probs = model(pixel_values).logits.float().softmax(-1)
        scores, indices = probs.topk(top_k, dim=-1)
        for path, row_scores, row_indices in zip(batch, scores.tolist(), indices.tolist(), strict=True):
            top = [
                {"label": model.config.id2label[i], "score": s} for i, s in zip(row_indices, row_scores, strict=True)
            ]
            results.append({"file": path, "predictions": top})
            print(f"{path}\t{format_top(top)}")
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s): {skipped}", file=sys.stderr)
    write_jsonl(args.output, results)
    return results


def write_jsonl(path: str | None, rows: list[dict]) -> None:
    if path:
        with open(path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def format_top(top: list[dict]) -> str:
    return "\t".join(f"{p['label']}={p['score']:.4f}" for p in top)


if __name__ == "__main__":
    main()
