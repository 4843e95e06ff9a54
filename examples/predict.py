"""Classifies image files with a saved or pushed prompt checkpoint and prints the top-k labels with scores.

    python examples/predict.py --model runs/vptm image1.png image2.jpg
    python examples/predict.py --model me/vptm-fashion --revision <commit> --trust_remote_code path/to/folder
    python examples/predict.py --model runs/vptm folder/ --top_k 3 --batch_size 64 --output predictions.jsonl

Without `--trust_remote_code` the installed `modeling_vptm` package provides the model classes. Images are read by
the package's image policy (regular files, at most 4096 x 4096 pixels, decoded no larger than the model needs);
`--skip_unreadable` skips and counts the files it refuses. `--output` is checked before any work and written whole at
the end; an existing file is replaced only with `--overwrite`.
"""

from __future__ import annotations

import argparse
import sys

import torch

from modeling_vptm.hub_names import check_loadable
from modeling_vptm.serving import processor_size
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
from modeling_vptm.training import load_classifier


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="Image files and/or folders (searched recursively).")
    parser.add_argument("--model", required=True, help="Folder or Hub id of a checkpoint from run_classification.py.")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--top_k", type=positive_int, default=5)
    parser.add_argument("--batch_size", type=positive_int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None, help="Also write one JSON line per image to this file.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output file.")
    parser.add_argument("--skip_unreadable", action="store_true", help="Skip (and count) unreadable files.")
    args = parser.parse_args(argv)
    output = OutputFile(args.output, args.overwrite)  # before any work: a bad path fails now, not after inference

    from tqdm.auto import tqdm
    from transformers import AutoImageProcessor

    if not args.trust_remote_code:
        import modeling_vptm  # noqa: F401  (registers the VPTM classes with the Auto classes)

    # a mistyped folder, or a name the Hub does not have, fails now in one line, not after a minute of Hub retries
    check_loadable(args.model, "prompt checkpoint", revision=args.revision)
    files = list_images(args.inputs)
    # a prompt checkpoint, full weights, or a PEFT classifier (its labels and adapter on the base model it names)
    model = load_classifier(args.model, revision=args.revision, trust_remote_code=args.trust_remote_code)
    model = model.to(args.device).eval()
    processor = AutoImageProcessor.from_pretrained(args.model, revision=args.revision)
    size = processor_size(processor)
    results, skipped = [], []
    for start in tqdm(range(0, len(files), args.batch_size), desc="classifying", unit="batch"):
        chunk = files[start : start + args.batch_size]
        images, read = read_image_files(chunk, size=size, skip_unreadable=args.skip_unreadable)
        kept = [chunk[i] for i in read]
        skipped += [chunk[i] for i in sorted(set(range(len(chunk))) - set(read))]
        if not images:
            continue
        pixel_values = processor(images, return_tensors="pt")["pixel_values"].to(args.device)
        with torch.no_grad():
            logits = model(pixel_values).logits.float().cpu().numpy()
        rows = [
            {"file": path, "predictions": top}
            for path, top in zip(kept, top_predictions(logits, model.config.id2label, args.top_k), strict=True)
        ]
        check_finite_scores(rows, f"the model {args.model!r}")
        for row in rows:
            print(text_line(row["file"], top=row["predictions"]))
        results += rows
    if skipped:
        names = ", ".join(escape(path) for path in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
        print(f"skipped {len(skipped)} unreadable file(s): {names}", file=sys.stderr)
    output.write_lines(json_line(row) for row in results)
    return results


if __name__ == "__main__":
    run(main)
