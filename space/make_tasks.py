"""Trains the prompt checkpoints the Space ships in ``space/tasks/`` (offline, on the shipped backbone).

    python space/make_tasks.py            # about 8 minutes on 2 CPU cores

Three tasks on the one shipped backbone, each trained by ``examples/run_classification.py`` with the project's
defaults and seed 0, horizontal flips and prompt locations as stated (flips on and prompts in every block were the
defaults when the bundled tasks were made):
Fashion-MNIST with VPTM-deep and with VPT-deep, flips on (so the Space can compare [MASK] and CLS), and handwritten
digits with VPTM-deep (scikit-learn's 8x8 digits, 50 images per class, no flips). Only what a task
needs is kept: its config, its prompt tensors, its image processor, its model card and its metrics. It also writes
the example images of ``space/examples/``: the first test image of a few classes of both tasks (never trained on).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path


HERE = Path(__file__).resolve().parent
SCRIPT = HERE.parent / "examples" / "run_classification.py"
# the bundled fashion tasks were trained with horizontal flips (then the default), the digits without; both VPTM
# tasks with prompts in every block (then VPTM's default location)
TASKS = {
    "fashion-vptm": ["--method", "vptm", "--prompt_layers", "deep", "--augment_flip", "true"],
    "fashion-vpt": ["--method", "vpt", "--augment_flip", "true"],
    "digits-vptm": ["--method", "vptm", "--prompt_layers", "deep", "--dataset_name", "vptm:digits",
                    "--augment_flip", "false"],
}  # fmt: skip
KEEP = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "all_results.json")
FASHION_EXAMPLES = ("Ankle boot", "Trouser", "Bag", "Pullover")  # first test image of each, shipped test split
DIGIT_EXAMPLES = (3, 7)  # first held-out test image of each digit


def write_examples(folder: Path) -> list[Path]:
    """Example images for the page, as PNG files named by their true label."""
    from modeling_vptm.data import digits_dataset, shipped_dataset

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    fashion = shipped_dataset()["test"]
    names = fashion.features["label"].names
    for label in FASHION_EXAMPLES:
        row = fashion[fashion["label"].index(names.index(label))]
        written.append(folder / (label.lower().replace(" ", "-") + ".png"))
        row["image"].save(written[-1])
    digits = digits_dataset()["test"]
    for digit in DIGIT_EXAMPLES:
        written.append(folder / f"digit-{digit}.png")
        digits[digits["label"].index(digit)]["image"].save(written[-1])
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=str(HERE / "tasks"))
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--examples_dir", default=str(HERE / "examples"))
    args = parser.parse_args(argv)
    print("wrote", [str(p) for p in write_examples(Path(args.examples_dir))])
    for name in args.tasks:
        folder = Path(args.output_dir) / name
        shutil.rmtree(folder, ignore_errors=True)
        command = [sys.executable, str(SCRIPT), "--output_dir", str(folder), "--seed", "0", *TASKS[name]]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        for entry in folder.iterdir():
            if entry.name not in KEEP:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


if __name__ == "__main__":
    main()
