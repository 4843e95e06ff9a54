"""The training path against the model: `run_classification.py`'s Trainer images/s over the model's own training step,
per method, in one run (same machine, backbone, batch and dtype).

Makes a JPEG image folder (`--image_size` pixels, 10 classes, smooth random images) and a BEiT MIM backbone with
random weights in the layout of `--arch` (`base`: microsoft/beit-base-patch16-224-pt22k's; `tiny`: the shipped
backbone's), saved as a folder `from_backbone` loads, with its image processor. Then, for each method (`vptm`, `vpt`,
`linear`, `full`):

* **Trainer images/s**: the real `examples/run_classification.py` (`main()`, in-process) trains on the folder for
  `--warmup_steps + --steps` steps at `--batch`, with the arguments a user would give (on a GPU the script's own
  GPU defaults apply: loader workers, pinned memory, bf16). A callback clocks the steps: the figure is the images of
  the `--steps` steps after the warm-up over their wall time (the device synchronised at both ends), so start-up,
  decoding the images, the first steps, the final evaluation and the save are excluded. Trainer's own
  `train_samples_per_second`, which includes the start-up, is reported beside it. `host_wait_s` and `host_step_s`
  split the measured steps' host time into waiting for the next batch and running the step (with asynchronous
  CUDA, a step's host time is its kernel launches, unless it waits for the device).
* **model images/s**: the same model as the script builds, on random tensors already on the device, timed by
  `experiments/benchmark.py`'s training step (AdamW; bf16 autocast on CUDA) and step timing (median).
* **ratio** = Trainer / model (the project's target on a GPU: >= 0.80 for every method).

Writes `benchmark_training.json` and `benchmark_training.md` to `--output_dir`, and prints the table.

    python experiments/benchmark_training.py --output_dir runs/bench-training       # GPU: base, 224 px, batch 128
    python experiments/benchmark_training.py --quick --output_dir runs/bench-training-quick   # CPU, about a minute
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import time

import numpy as np
import torch
from example_scripts import run_classification
from measuring import ARCHS, COMMON, measure, training_step
from transformers import TrainerCallback

from modeling_vptm.training import add_adapter, build_model, parse_arguments


# PEFT's LoRA too where PEFT is installed (the peft extra)
METHODS = ("vptm", "vpt", "linear", "full") + (("lora",) if importlib.util.find_spec("peft") else ())
NUM_CLASSES = 10


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock(TrainerCallback):
    """Clocks the optimiser steps of one training: wall time from the end of step `warmup` to the end of the last
    step (the device synchronised at those two points only, so the steps in between run as they would), and host time
    spent between steps (fetching the next batch) and in them."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = None
        self.steps = 0
        self.wait_seconds = self.step_seconds = 0.0
        self._last_end = self._begin = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._begin = time.perf_counter()
        if self.start is not None and self._last_end is not None:
            self.wait_seconds += self._begin - self._last_end

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self.start is not None:
            self.step_seconds += now - self._begin
            self.steps += 1
        if state.global_step == self.warmup or state.global_step == state.max_steps:
            sync()
            now = time.perf_counter()
            if state.global_step == self.warmup:
                self.start = now
            else:
                self.end = now
        self._last_end = now

    def images_per_s(self, batch: int) -> float:
        if self.start is None or self.end is None or not self.steps:
            raise RuntimeError("the clock saw no measured steps (is --steps at least 1?)")
        return batch * self.steps / (self.end - self.start)


def make_image_folder(folder: str, count: int, size: int, seed: int = 0) -> None:
    """`count` JPEG images of `size` pixels in 10 class folders: smooth random colour fields (upsampled noise), so
    that they compress like photographs rather than like noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        label_dir = os.path.join(folder, f"class{i % NUM_CLASSES}")
        os.makedirs(label_dir, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        coarse.resize((size, size), Image.BICUBIC).save(os.path.join(label_dir, f"{i:05d}.jpg"), quality=90)


def make_backbone(folder: str, arch: str) -> None:
    """A BEiT MIM backbone with random weights in the layout of `arch`, and its image processor (resize to the
    backbone's size, no centre crop)."""
    from transformers import BeitConfig, BeitForMaskedImageModeling, BeitImageProcessor

    torch.manual_seed(0)
    BeitForMaskedImageModeling(BeitConfig(**ARCHS[arch], **COMMON)).save_pretrained(folder)
    size = ARCHS[arch]["image_size"]
    BeitImageProcessor(size={"height": size, "width": size}, do_center_crop=False, image_mean=[0.5] * 3,
                       image_std=[0.5] * 3).save_pretrained(folder)  # fmt: skip


def model_images_per_s(argv: list[str], batch: int, steps: int, warmup: int) -> tuple[float, float, int]:
    """The model `run_classification.py` builds for `argv`, timed on its own training step (median step time)."""
    model_args, _, _ = parse_arguments(argv)
    model = add_adapter(build_model(model_args, {i: f"class{i}" for i in range(NUM_CLASSES)}), model_args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    size = model.config.image_size
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    step, trainable = training_step(model.to(device).train(), x, y, device, dtype)
    row = measure(step, device, batch, steps, warmup)
    return row["images_per_s"], row["step_ms"], trainable


def run_method(method: str, common: list[str], output_dir: str, batch: int, steps: int, warmup: int) -> dict:
    argv = ["--method", method, "--output_dir", os.path.join(output_dir, "runs", method), *common]
    clock = StepClock(warmup)
    start = time.perf_counter()
    results = run_classification.main(argv, callbacks=[clock])
    run_seconds = time.perf_counter() - start
    with open(os.path.join(output_dir, "runs", method, "train_results.json")) as f:
        trainer_metrics = json.load(f)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trainer = round(clock.images_per_s(batch), 1)
    model, step_ms, trainable = model_images_per_s(argv, batch, max(steps // 2, 3) | 1, warmup)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    row = {
        "trainer_images_per_s": trainer,
        "trainer_train_samples_per_second": trainer_metrics["train_samples_per_second"],
        "model_images_per_s": model,
        "ratio": round(trainer / model, 3),  # of the figures reported
        "model_step_ms": step_ms,
        "measured_steps": clock.steps,
        "host_wait_s": round(clock.wait_seconds, 3),
        "host_step_s": round(clock.step_seconds, 3),
        "run_seconds": round(run_seconds, 1),
        "trainable": trainable,
        "eval_accuracy": results["accuracy"],
    }
    print(f"[{method}] {row}", flush=True)
    return row


def markdown(report: dict) -> str:
    lines = [
        f"Device: {report['device']}; torch {report['torch']}, transformers {report['transformers']}; "
        f"{report['dtype']}; {report['arch']} layout at {report['image_size']} px, from {report['images']:,} JPEGs of "
        f"{report['jpeg_size']} px; batch "
        f"{report['batch']}, {report['steps']} measured steps after {report['warmup_steps']}; loader workers "
        f"{report['dataloader_num_workers']}.",
        "",
        "| method | Trainer images/s (steady) | Trainer train_samples_per_second (with start-up) | model images/s | "
        "ratio | host wait / step s |",
        "|---|---|---|---|---|---|",
    ]
    for method, row in report["methods"].items():
        lines.append(
            f"| {method} | {row['trainer_images_per_s']:,} | {row['trainer_train_samples_per_second']:,} | "
            f"{row['model_images_per_s']:,} | **{row['ratio']}** | {row['host_wait_s']} / {row['host_step_s']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--arch", choices=sorted(ARCHS), default=None, help="Default: base (tiny with --quick).")
    parser.add_argument("--image_size", type=int, default=None, help="Of the JPEGs; default 224 (32 with --quick).")
    parser.add_argument("--images", type=int, default=None, help="Default: 2,560 on CUDA, 256 on CPU (48 quick).")
    parser.add_argument("--batch", type=int, default=None, help="Default: 128 on CUDA, 8 on CPU and quick.")
    parser.add_argument("--steps", type=int, default=None, help="Steps measured: 60 on CUDA, 8 on CPU (3 quick).")
    parser.add_argument("--warmup_steps", type=int, default=None, help="Default: 10 on CUDA, 2 on CPU (1 quick).")
    parser.add_argument("--quick", action="store_true", help="Tiny layout, small images, few steps (CPU, CI).")
    parser.add_argument("--output_dir", default="runs/benchmark_training")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    arch = args.arch or ("tiny" if args.quick else "base")
    image_size = args.image_size or (32 if args.quick else 224)
    images = args.images or (48 if args.quick else (2560 if cuda else 256))
    batch = args.batch or (8 if args.quick or not cuda else 128)
    steps = args.steps or (3 if args.quick else (60 if cuda else 8))
    warmup = args.warmup_steps if args.warmup_steps is not None else (1 if args.quick else (10 if cuda else 2))
    if warmup < 1 or steps < 1:
        parser.error(f"--warmup_steps and --steps must be at least 1, got {warmup} and {steps}")
    os.makedirs(args.output_dir, exist_ok=True)
    data, backbone = os.path.join(args.output_dir, "images"), os.path.join(args.output_dir, "backbone")
    if not os.path.isdir(data):  # kept between runs: a rerun also reuses the decoded images cached beside them
        make_image_folder(data, images, image_size)
    make_backbone(backbone, arch)

    common = [
        "--model_name_or_path", backbone, "--train_dir", data, "--cache_dir", os.path.join(args.output_dir, "cache"),
        "--max_steps", str(warmup + steps), "--per_device_train_batch_size", str(batch), "--train_val_split", "0.1",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--overwrite_output_dir", "true",
    ]  # fmt: skip
    if arch != "tiny":  # the README's recipe for 224-pixel backbones: random resized crops and flips, no shift
        common += ["--augment_shift", "0", "--augment_crop_scale", "0.08", "--augment_flip", "true"]
    report = {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "dtype": "bf16 autocast" if cuda else "float32",
        "arch": arch,
        "image_size": ARCHS[arch]["image_size"],
        "jpeg_size": image_size,
        "images": images,
        "batch": batch,
        "steps": steps,
        "warmup_steps": warmup,
        "dataloader_num_workers": parse_arguments(["--output_dir", args.output_dir, *common])[
            2
        ].dataloader_num_workers,
        "trainer_arguments": common,
        "methods": {},
    }
    for method in args.methods:
        report["methods"][method] = run_method(method, common, args.output_dir, batch, steps, warmup)
    with open(os.path.join(args.output_dir, "benchmark_training.json"), "w") as f:
        json.dump(report, f, indent=2)
    table = markdown(report)
    with open(os.path.join(args.output_dir, "benchmark_training.md"), "w") as f:
        f.write(table)
    print(table)
    return report


if __name__ == "__main__":
    main()
