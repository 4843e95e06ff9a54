"""What the experiments share (a module, not a script): the architectures they measure, step timing side by side,
device-operation counts, CPU peak memory, the training step they time, and the BEiT-base-shaped backbone they build.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import torch
from torch import nn

from modeling_vptm import SHIPPED_BACKBONE


ARCHS = {
    "base": dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, vocab_size=8192),
    "tiny": dict(image_size=28, patch_size=4, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                 intermediate_size=512, vocab_size=512),
}  # fmt: skip
COMMON = dict(use_mask_token=True, use_shared_relative_position_bias=True, use_relative_position_bias=False,
              layer_scale_init_value=0.1, drop_path_rate=0.0, num_channels=3)  # fmt: skip


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(step, device: str, batch: int, steps: int, warmup: int) -> dict:
    """Median step time (and, on CUDA, peak memory) of one step function run alone."""
    return measure_side_by_side({"step": step}, device, batch, steps, warmup)["step"]


def measure_side_by_side(step_fns: dict, device: str, batch: int, steps: int, warmup: int) -> dict:
    """Times the steps in interleaved rounds (A, B, A, B, ...) and reports each one's median step.

    Compared steps then share whatever else the machine is doing at that moment, and one slow step (another
    process, a frequency change) moves a median little; timing A's steps and then B's would charge any drift to one
    of them. On CUDA, peak memory is the most allocated during each of the step's runs, everything resident included.
    """
    for step in step_fns.values():
        for _ in range(warmup):
            step()
    sync(device)
    times = {name: [] for name in step_fns}
    peaks = dict.fromkeys(step_fns, 0)
    for _ in range(steps):
        for name, step in step_fns.items():
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
            if device == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated())
    out = {}
    for name, seconds in times.items():
        median = statistics.median(seconds)
        out[name] = {"images_per_s": round(batch / median, 1), "step_ms": round(median * 1e3, 2),
                     "peak_gib": round(peaks[name] / 2**30, 3) if device == "cuda" else None}  # fmt: skip
    return out


VIEW_LIKE = (torch.ops.aten._unsafe_view, torch.ops.aten.detach)  # metadata only, like views


def dispatched_ops(call) -> int:
    """Aten operations that `call()` dispatches, views excluded: about one kernel launch each on a GPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.overloadpacket not in VIEW_LIKE:
                Count.count += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        call()
    return Count.count


def cpu_peak_gib(step) -> float:
    """Peak tensor memory of one CPU step, in GiB, from the profiler's memory timeline: like CUDA's
    `max_memory_allocated`, it counts tensors (weights, gradients, optimiser state, activations), not the process's
    other memory."""
    import gzip

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "timeline.json.gz")
        prof.export_memory_timeline(path, device="cpu")
        with gzip.open(path, "rt") as f:
            _, sizes = json.load(f)  # [times, bytes per category at each time]
    return round(max(sum(row) for row in sizes) / 2**30, 3)


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str, dtype):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            loss = model(pixel_values=x, labels=y).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def make_backbone(arch: str, folder: str) -> str:
    """The backbone of `arch` ("shipped", or "base": BEiT-base-shaped, random, written to `folder` with an image
    processor): its name or folder."""
    if arch == "shipped":
        return SHIPPED_BACKBONE
    from transformers import BeitConfig, BeitForMaskedImageModeling, BeitImageProcessor

    torch.manual_seed(0)
    model = BeitForMaskedImageModeling(BeitConfig(**ARCHS["base"], **COMMON)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # BEiT initialises these to zero; parity must cover them
        table = model.beit.shared_position_bias.relative_position_bias_table
        table.copy_(torch.randn(table.shape, generator=generator) * 0.5)
        for token in (model.beit.embeddings.cls_token, model.beit.embeddings.mask_token):
            token.copy_(torch.randn(token.shape, generator=generator) * 0.02)
    model.save_pretrained(folder)
    BeitImageProcessor(size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        folder
    )
    return folder
