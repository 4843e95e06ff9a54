"""Training VPTM, or a baseline, with transformers' Trainer: from `examples/run_classification.py`, a notebook or a
script of your own.

    images, transform = prepare_images(processor, dataset)           # decoded and resized once, kept as uint8
    trainer = VPTMTrainer(model=model, args=TrainingArguments(...), train_dataset=images["train"],
                          eval_dataset=images["test"], image_transform=transform)
    trainer.train(); trainer.evaluate(); trainer.save_model()       # a prompt-only checkpoint

What `VPTMTrainer` adds to `Trainer` is the data path of `modeling_vptm.data.batches`: batches travel as uint8 and
become the model's pixel values on its device (the processor's normalisation, and in training the augmentations),
so an accelerator is not starved by per-image Python work; and prompt checkpoints resume without warnings about the
frozen backbone they leave out by design. Any other Trainer works too, with `PixelValuesCollator` (float32 pixel
values made on the CPU, no augmentation), so a trainer of your own is not locked out.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from transformers import Trainer

from ..data.batches import ImageBatchTransform, UInt8Images, collate, decode_images
from ..modeling_vptm import VPTMForImageClassification
from .evaluation import compute_metrics


logger = logging.getLogger(__name__)

# a split this large is decoded by several processes (`workers` of them); below it, starting them costs more than
# they save
DECODE_PROCESSES_MIN_IMAGES = 2_000


def prepare_images(
    processor,
    dataset,
    splits: Sequence[str] | None = None,
    crop_scale: float = 0.0,
    shift: int = 0,
    flip: bool = False,
    workers: int = 0,
) -> tuple[dict[str, UInt8Images], ImageBatchTransform]:
    """The splits of `dataset` (a `datasets.DatasetDict` with `image` and `label` columns; default: all of them) as
    uint8 images, decoded and resized once by `processor` (cached by `datasets`, keyed on the split and the
    processor's settings), and the transform that makes their batches the model's pixel values on its device: the
    processor's normalisation, and in training random resized crops (`crop_scale`), shifts of up to `shift` pixels
    and horizontal flips (`flip`). Labels that are not a `ClassLabel` are numbered in sorted order of train's."""
    feature = dataset["train"].features["label"]
    to_index = (
        None if hasattr(feature, "names") else {v: i for i, v in enumerate(sorted(set(dataset["train"]["label"])))}
    )
    images = {}
    for name in splits if splits is not None else list(dataset):
        num_proc = workers if workers > 1 and len(dataset[name]) >= DECODE_PROCESSES_MIN_IMAGES else None
        images[name] = UInt8Images(decode_images(dataset[name], processor, to_index, num_proc=num_proc))
    transform = ImageBatchTransform.from_processor(processor, crop_scale=crop_scale, shift=shift, flip=flip)
    return images, transform


def label_names(dataset) -> list[str]:
    """The class names of `dataset["train"]`: a `ClassLabel`'s names, else its label values in sorted order."""
    feature = dataset["train"].features["label"]
    if hasattr(feature, "names"):
        return list(feature.names)
    return [str(v) for v in sorted(set(dataset["train"]["label"]))]


class PixelValuesCollator:
    """For any `Trainer` (or `DataLoader`): collates uint8 examples of `prepare_images` into float32 `pixel_values`,
    normalised by `transform` on the CPU, and `labels`. No augmentation: the same collator serves training and
    evaluation; `VPTMTrainer` augments the training batches (and normalises on the model's device)."""

    def __init__(self, transform: ImageBatchTransform) -> None:
        self.transform = transform

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        return self.transform.model_inputs(collate(examples), train=False)


class VPTMTrainer(Trainer):
    """Trainer for VPTM and its baselines, fed uint8 image batches.

    With `image_transform` (from `prepare_images`), batches arrive as uint8 (`collate`, the default collator then)
    and become the model's pixel values on its device at the start of each training step (normalised and augmented)
    and prediction step (normalised): the arithmetic runs batched where the model runs, after 4x fewer bytes were
    copied there. Its random draws come from the global CPU generator, which Trainer seeds and its checkpoints
    restore. Without `compute_metrics`, evaluation reports accuracy.

    A prompt checkpoint holds only the task's tensors, so on resume the frozen backbone's are missing by design:
    only a missing task tensor is worth a warning.
    """

    def __init__(self, *args, image_transform: ImageBatchTransform | None = None, **kwargs) -> None:
        if image_transform is not None:
            kwargs.setdefault("data_collator", collate)
        kwargs.setdefault("compute_metrics", compute_metrics(["accuracy"]))
        super().__init__(*args, **kwargs)
        self.image_transform = image_transform

    def _model_inputs(self, inputs: dict, train: bool) -> dict:
        if self.image_transform is None:
            return inputs
        return self.image_transform.model_inputs(inputs, train=train, device=self.args.device)

    def training_step(self, model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        return super().training_step(model, self._model_inputs(inputs, train=True), num_items_in_batch)

    def prediction_step(self, model, inputs: dict, prediction_loss_only: bool, ignore_keys=None):
        return super().prediction_step(model, self._model_inputs(inputs, train=False), prediction_loss_only,
                                       ignore_keys)  # fmt: skip

    def _issue_warnings_after_load(self, load_result) -> None:
        if isinstance(self.model, VPTMForImageClassification):
            missing = [k for k in load_result.missing_keys if not k.startswith("backbone.")]
            load_result = load_result._replace(missing_keys=missing)
        super()._issue_warnings_after_load(load_result)


__all__ = ["PixelValuesCollator", "VPTMTrainer", "label_names", "prepare_images"]
