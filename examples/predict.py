"""Classifies image files with a saved or pushed prompt checkpoint and prints the top-k labels with scores.

    python examples/predict.py --model runs/vptm image1.png image2.jpg
    python examples/predict.py --model me/vptm-fashion --revision <commit> --trust_remote_code path/to/folder
    python examples/predict.py --model runs/vptm folder/ --top_k 3 --batch_size 64 --output predictions.jsonl

Without `--trust_remote_code` the installed `modeling_vptm` package provides the model classes.
"""

from __future__ import annotations

import argparse
import sys

import torch

from modeling_vptm.hub_names import CheckpointNotFoundError, check_loadable
from modeling_vptm.standalone.image_input import list_images, read_rgb
from modeling_vptm.standalone.predictions import format_top, top_predictions, write_jsonl
from modeling_vptm.training import load_classifier


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="Image files and/or folders (searched recursively).")
    parser.add_argument("--model", required=True, help="Folder or Hub id of a checkpoint from run_classification.py.")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None, help="Also write one JSON line per image to this file.")
    parser.add_argument("--skip_unreadable", action="store_true", help="Skip (and count) unreadable files.")
    args = parser.parse_args(argv)

    from tqdm.auto import tqdm
    from transformers import AutoImageProcessor

    if not args.trust_remote_code:
        import modeling_vptm  # noqa: F401  (registers the VPTM classes with the Auto classes)

    # a mistyped folder, or a name the Hub does not have, fails now in one line, not after a minute of Hub retries
    check_loadable(args.model, "prompt checkpoint", revision=args.revision)
    # a prompt checkpoint, full weights, or a PEFT classifier (its labels and adapter on the base model it names)
    model = load_classifier(args.model, revision=args.revision, trust_remote_code=args.trust_remote_code).to(
        args.device
    )
    model.eval()
    processor = AutoImageProcessor.from_pretrained(args.model, revision=args.revision)
    files = list_images(args.inputs)
    results, skipped = [], []
    for start in tqdm(range(0, len(files), args.batch_size), desc="classifying", unit="batch"):
        images, kept = [], []
        for path in files[start : start + args.batch_size]:
            try:
                images.append(read_rgb(path))
                kept.append(path)
            except ValueError as error:
                if not args.skip_unreadable:
                    raise ValueError(f"{error} (pass --skip_unreadable to skip it)") from error
                skipped.append(path)
        if not images:
            continue
        pixel_values = processor(images, return_tensors="pt")["pixel_values"].to(args.device)
        with torch.no_grad():
            logits = model(pixel_values).logits
        for path, top in zip(kept, top_predictions(logits, model.config.id2label, args.top_k), strict=True):
            results.append({"file": path, "predictions": top})
            print(f"{path}\t{format_top(top)}")
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s): {skipped}", file=sys.stderr)
    write_jsonl(args.output, results)
    return results


if __name__ == "__main__":
    try:
        main()
    except CheckpointNotFoundError as error:  # a name that is neither a folder nor on the Hub: one line, no traceback
        raise SystemExit(f"error: {error}") from None
