"""Speed and memory of VPTM against its baselines, side by side in one run (same machine, batch and dtype).

Measures, for each architecture (`base`: the layout of microsoft/beit-base-patch16-224-pt22k; `tiny`: the shipped
backbone's; random weights, speed does not depend on them):

* training images/s and peak memory of one optimiser step: full fine-tuning (`BeitForImageClassification`), linear
  probe, VPT-deep and VPTM-deep (10 prompts per block);
* inference images/s of VPTM against `BeitForImageClassification` (eager, and `torch.compile` with `--compile`);
* a mixed batch over 8 tasks (`MultiTaskVPTM`) against a batch of one task, same size, and that one task through
  the server against the model's own forward;
* prompt-checkpoint bytes against backbone bytes;
* with PEFT installed, its LoRA beside them (`--method lora`'s defaults: rank 8 on the attention and the MLP, a
  linear head): training images/s and peak memory, inference with the adapter unmerged and merged
  (`merge_and_unload`), adapter bytes, and a batch over 8 LoRA tasks, each its own adapter, both ways PEFT offers:
  one forward with `adapter_names` (PEFT's mixed-adapter batches) and one forward per task after `set_adapter`;
* for each inference and serving call, the device operations it dispatches (`ops`: every aten operation that
  computes, views excluded), counted on any device: where a small model runs at the speed the GPU can be handed
  kernels (the tiny layout), time follows this count more than the arithmetic.

On CUDA it uses bf16 autocast and SDPA, and peak memory is `max_memory_allocated`; on CPU float32, and peak memory
is read from one profiled step's memory timeline (tensors only, as on CUDA). Writes `benchmark.json`, `benchmark.md`
and (with matplotlib) `benchmark.png` to `--output_dir`, and prints the table with the ratios.

    python experiments/benchmark.py --quick --output_dir runs/bench          # CPU, under 2 minutes
    python experiments/benchmark.py --arch base --batch 128 --output_dir runs/bench-gpu   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
from measuring import ARCHS, COMMON, cpu_peak_gib, dispatched_ops, measure, measure_side_by_side, training_step
from torch import nn

from modeling_vptm import VPTMConfig, VPTMForImageClassification


def vptm(arch: str, **fields) -> VPTMForImageClassification:
    """VPTM (or, with `classifier="linear_cls"`, VPT) with prompts in every block unless `fields` say otherwise: the
    deep-prompt methods the ratios compare."""
    fields = {"num_labels": 100, "prompt_layers": "deep", **fields}
    config = VPTMConfig(**ARCHS[arch], **COMMON, **fields)
    return VPTMForImageClassification(config)


def has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


LORA_TASKS = ["default", *(f"task{t}" for t in range(1, 8))]  # PEFT names the first adapter "default"


def lora_classifier(beit_config, adapters: int = 1) -> nn.Module:
    """`BeitForImageClassification` under PEFT's LoRA (`--method lora`'s defaults, a trained head per adapter), with
    `adapters` adapters (`LORA_TASKS`), the first active. LoRA's B starts at zero: every adapter is moved off
    it, so that each one changes the outputs."""
    from transformers import BeitForImageClassification

    from modeling_vptm.training import METHODS, apply_peft, lora_config

    config = lora_config(target_modules=METHODS["lora"].lora_targets, modules_to_save=["classifier"])
    model = apply_peft(BeitForImageClassification(beit_config), config, "the benchmark's LoRA")
    for name in LORA_TASKS[1:adapters]:
        model.add_adapter(name, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.01)
    return model


def run_arch(arch: str, batch: int, steps: int, warmup: int, device: str, use_compile: bool) -> dict:
    from transformers import BeitConfig, BeitForImageClassification

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    size = ARCHS[arch]["image_size"]
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    rows = {}

    beit_config = BeitConfig(**ARCHS[arch], **COMMON, num_labels=100)
    builders = {
        "full": lambda: BeitForImageClassification(beit_config),
        "linear": lambda: vptm(arch, prompt_length=0, classifier="linear_cls"),
        "vpt_deep": lambda: vptm(arch, classifier="linear_cls"),
        "vptm_deep": lambda: vptm(arch),
    }
    if has_peft():
        builders["lora"] = lambda: lora_classifier(beit_config)
    if device == "cuda":
        # one model at a time, so that each peak is that method's own memory (as in the reference measurements)
        for name, build in builders.items():
            step, trainable = training_step(build().to(device).train(), x, y, device, dtype)
            rows[name] = dict(measure(step, device, batch, steps, warmup), trainable=trainable)
            print(f"[{arch}] train {name}: {rows[name]}", flush=True)
            del step
            torch.cuda.empty_cache()
    else:  # all four side by side, which keeps the ratios steady on a busy machine; memory from one profiled step
        steps_fns, trainables = {}, {}
        for name, build in builders.items():
            steps_fns[name], trainables[name] = training_step(build().train(), x, y, device, dtype)
        for name, row in measure_side_by_side(steps_fns, device, batch, steps, warmup).items():
            rows[name] = dict(row, trainable=trainables[name], peak_gib=cpu_peak_gib(steps_fns[name]))
            print(f"[{arch}] train {name}: {rows[name]}", flush=True)
        del steps_fns

    inputs = x.to(dtype) if device == "cuda" else x

    def inference(model):
        model = model.to(device).eval()
        if device == "cuda":
            model = model.to(dtype)

        @torch.no_grad()
        def step():
            return model(pixel_values=inputs).logits

        return step

    classifier = BeitForImageClassification(beit_config)
    ours = vptm(arch)
    compared = {"infer_beit": inference(classifier), "infer_vptm": inference(ours)}
    if has_peft():
        compared["infer_lora"] = inference(lora_classifier(beit_config))
        compared["infer_lora_merged"] = inference(lora_classifier(beit_config).merge_and_unload())
    if use_compile:
        compared.update(infer_beit_compiled=inference(torch.compile(classifier)),
                        infer_vptm_compiled=inference(torch.compile(ours)))  # fmt: skip
    for name, row in measure_side_by_side(compared, device, batch, steps, warmup).items():
        # a compiled call runs generated kernels, not aten operations: nothing to count
        rows[name] = row if "compiled" in name else dict(row, ops=dispatched_ops(compared[name]))
        print(f"[{arch}] {name}: {rows[name]}", flush=True)
    rows.update(mixed_batch(arch, ours, x, device, dtype, batch, steps, warmup))
    rows["checkpoint"] = checkpoint_bytes(ours)
    if has_peft():
        rows.update(lora_mixed_batch(arch, beit_config, x, device, dtype, batch, steps, warmup))
        rows["checkpoint"]["lora_adapter_bytes"] = lora_adapter_bytes(lora_classifier(beit_config))
    return rows


def lora_mixed_batch(arch, beit_config, x, device, dtype, batch, steps, warmup) -> dict:
    """A batch spread over 8 LoRA tasks (8 adapters on one loaded model) against the same batch under one adapter:
    one forward with PEFT's `adapter_names`, and what a user without it does, one forward per task's rows after
    `set_adapter`, the outputs put back in the batch's order."""
    model = lora_classifier(beit_config, adapters=8).to(device).eval()
    if device == "cuda":
        model = model.to(dtype)
    inputs = x.to(next(model.parameters()).dtype)
    names = [LORA_TASKS[i % 8] for i in range(batch)]
    groups = {name: torch.tensor([i for i, n in enumerate(names) if n == name], device=device) for name in set(names)}

    def one_task():
        model.set_adapter("default")
        return model(pixel_values=inputs).logits

    def per_task_forwards():
        logits = None
        for name, rows in groups.items():
            model.set_adapter(name)
            part = model(pixel_values=inputs[rows]).logits
            logits = part.new_empty(len(names), part.shape[-1]) if logits is None else logits
            logits[rows] = part
        return logits

    compared = {
        "lora_one_task": one_task,
        "lora_eight_tasks_adapter_names": lambda: model(pixel_values=inputs, adapter_names=names).logits,
        "lora_eight_tasks_set_adapter": per_task_forwards,
    }
    return calls_with_ops(compared, arch, device, batch, steps, warmup)


def calls_with_ops(compared: dict, arch: str, device: str, batch: int, steps: int, warmup: int) -> dict:
    """No-grad calls timed side by side, each with the device operations it dispatches."""
    with torch.no_grad():
        result = measure_side_by_side(compared, device, batch, steps, warmup)
    for name, row in result.items():
        result[name] = dict(row, ops=dispatched_ops(compared[name]))
        print(f"[{arch}] {name}: {result[name]}", flush=True)
    return result


def lora_adapter_bytes(model) -> int:
    """Bytes of the saved adapter (LoRA tensors and the head, float32), as `save_pretrained` writes it."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))


def mixed_batch(arch, model, x, device, dtype, batch, steps, warmup) -> dict:
    """A batch spread over 8 tasks against the same batch under one task (MultiTaskVPTM, same backbone), and that
    one task against the model's own forward (what serving costs over a plain batched call)."""
    from modeling_vptm import VPTMTask
    from modeling_vptm.serving import MultiTaskVPTM

    server = MultiTaskVPTM.from_model(model.eval(), "task0")  # shares the model's backbone
    for t in range(1, 8):
        task = VPTMTask(model.config)
        task.load_state_dict({k: v + 0.01 * t for k, v in model.task_state_dict().items()})
        server.add_task(f"task{t}", task)
    if device == "cuda":
        server = server.to(dtype)
    inputs = x.to(next(server.parameters()).dtype)
    mixed = [f"task{i % 8}" for i in range(batch)]
    single = ["task0"] * batch
    compared = {
        "model_forward": lambda: model(pixel_values=inputs).logits,
        "serve_one_task": lambda: server(inputs, single),
        "serve_eight_tasks": lambda: server(inputs, mixed),
    }
    return calls_with_ops(compared, arch, device, batch, steps, warmup)


def checkpoint_bytes(model: VPTMForImageClassification) -> dict:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as folder:
        task = os.path.join(folder, "task.safetensors")
        backbone = os.path.join(folder, "backbone.safetensors")
        save_file({k: v.float().contiguous().cpu() for k, v in model.task_state_dict().items()}, task)
        backbone_tensors = {k: v.float().contiguous().cpu() for k, v in model.backbone.state_dict().items()}
        save_file(backbone_tensors, backbone)
        sizes = {"prompt_checkpoint_bytes": os.path.getsize(task), "backbone_bytes": os.path.getsize(backbone)}
    sizes["ratio"] = round(sizes["prompt_checkpoint_bytes"] / sizes["backbone_bytes"], 5)
    return sizes


def ratios(rows: dict) -> dict:
    full, beit = rows["full"], rows["infer_beit"]
    out = {
        "vptm_train_vs_full": round(rows["vptm_deep"]["images_per_s"] / full["images_per_s"], 3),
        "vptm_train_vs_vpt_deep": round(rows["vptm_deep"]["images_per_s"] / rows["vpt_deep"]["images_per_s"], 3),
        "vptm_infer_vs_beit": round(rows["infer_vptm"]["images_per_s"] / beit["images_per_s"], 3),
        "mixed_8_tasks_vs_one": round(
            rows["serve_eight_tasks"]["images_per_s"] / rows["serve_one_task"]["images_per_s"], 3
        ),
        "serve_one_task_vs_model": round(
            rows["serve_one_task"]["images_per_s"] / rows["model_forward"]["images_per_s"], 3
        ),
        "checkpoint_vs_backbone": rows["checkpoint"]["ratio"],
    }
    if full["peak_gib"]:
        out["vptm_train_memory_vs_full"] = round(rows["vptm_deep"]["peak_gib"] / full["peak_gib"], 3)
    if "lora" in rows:
        lora = rows["lora"]
        out.update(
            lora_train_vs_vptm=round(lora["images_per_s"] / rows["vptm_deep"]["images_per_s"], 3),
            lora_infer_vs_vptm=round(rows["infer_lora"]["images_per_s"] / rows["infer_vptm"]["images_per_s"], 3),
            lora_merged_infer_vs_vptm=round(
                rows["infer_lora_merged"]["images_per_s"] / rows["infer_vptm"]["images_per_s"], 3
            ),
            lora_mixed_8_adapter_names_vs_one=round(
                rows["lora_eight_tasks_adapter_names"]["images_per_s"] / rows["lora_one_task"]["images_per_s"], 3
            ),
            lora_mixed_8_set_adapter_vs_one=round(
                rows["lora_eight_tasks_set_adapter"]["images_per_s"] / rows["lora_one_task"]["images_per_s"], 3
            ),
            lora_adapter_vs_vptm_checkpoint=round(
                rows["checkpoint"]["lora_adapter_bytes"] / rows["checkpoint"]["prompt_checkpoint_bytes"], 3
            ),
        )
        if lora["peak_gib"] and rows["vptm_deep"]["peak_gib"]:
            out["lora_train_memory_vs_vptm"] = round(lora["peak_gib"] / rows["vptm_deep"]["peak_gib"], 3)
    if "infer_vptm_compiled" in rows:
        out["vptm_compiled_vs_beit_compiled"] = round(
            rows["infer_vptm_compiled"]["images_per_s"] / rows["infer_beit_compiled"]["images_per_s"], 3
        )
    return out


def markdown(results: dict) -> str:
    lines = [f"Device: {results['device']}; torch {results['torch']}; dtype {results['dtype']}.", ""]
    for arch, data in results["archs"].items():
        rows = data["rows"]
        lines += [f"### {arch} (batch {data['batch']})", ""]
        lines += ["| measurement | images/s | step ms | peak GiB | trainable params | ops per call |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for name, row in rows.items():
            if name == "checkpoint":
                continue
            peak = "–" if row.get("peak_gib") is None else row["peak_gib"]
            trainable = f"{row['trainable']:,}" if "trainable" in row else "–"
            ops = row.get("ops", "–")
            lines.append(f"| {name} | {row['images_per_s']:,} | {row['step_ms']} | {peak} | {trainable} | {ops} |")
        c = rows["checkpoint"]
        lora = f"; LoRA adapter {c['lora_adapter_bytes']:,} bytes" if "lora_adapter_bytes" in c else ""
        lines += ["", f"Prompt checkpoint {c['prompt_checkpoint_bytes']:,} bytes vs backbone {c['backbone_bytes']:,}"
                  f" bytes ({100 * c['ratio']:.2f} %){lora}.", "", "Ratios: " + ", ".join(
                      f"{k} {v}" for k, v in data["ratios"].items()), ""]  # fmt: skip
    return "\n".join(lines)


def plot(results: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    archs = list(results["archs"])
    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        rows = results["archs"][arch]["rows"]
        names = [n for n in rows if n != "checkpoint"]
        ax.barh(names, [rows[n]["images_per_s"] for n in names], color="tab:blue")
        ax.set_xlabel("images/s")
        ax.set_title(f"{arch} on {results['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["base", "tiny", "both"], default="both")
    parser.add_argument("--batch", type=int, default=None, help="Default: 128 on CUDA, 8 (base) / 64 (tiny) on CPU.")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="Also time torch.compile inference.")
    parser.add_argument("--quick", action="store_true", help="Few steps and small batches (CI).")
    parser.add_argument("--output_dir", default="runs/benchmark")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "dtype": "bf16 autocast" if device == "cuda" else "float32",
        "archs": {},
    }
    for arch in ["base", "tiny"] if args.arch == "both" else [args.arch]:
        cpu_batch = {"base": 2 if args.quick else 8, "tiny": 32 if args.quick else 128}[arch]
        batch = args.batch or (128 if device == "cuda" else cpu_batch)
        steps = args.steps or (3 if args.quick else (21 if device == "cuda" else 9))  # odd: a true median
        warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
        rows = run_arch(arch, batch, steps, warmup, device, args.compile)
        results["archs"][arch] = {"batch": batch, "steps": steps, "rows": rows, "ratios": ratios(rows)}
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "benchmark.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = markdown(results)
    with open(os.path.join(args.output_dir, "benchmark.md"), "w") as f:
        f.write(table + "\n")
    results["plot"] = plot(results, os.path.join(args.output_dir, "benchmark.png"))
    print(table)
    return results


if __name__ == "__main__":
    main()
