"""Training VPTM, or a baseline, with transformers' Trainer: from `examples/run_classification.py`, a notebook or a
script of your own.

    images, transform = prepare_images(processor, dataset)           # decoded and resized once, kept as uint8
    trainer = VPTMTrainer(model=model, args=TrainingArguments(...), train_dataset=images["train"],
                          eval_dataset=images["test"], image_transform=transform)
    trainer.train(); trainer.evaluate(); trainer.save_model()       # a prompt-only checkpoint

What `VPTMTrainer` adds to `Trainer` is the data path of `modeling_vptm.image_batches`: batches travel as uint8 and
become the model's pixel values on its device (the processor's normalisation, and in training the augmentations),
so an accelerator is not starved by per-image Python work; and prompt checkpoints resume without warnings about the
frozen backbone they leave out by design. Any other Trainer works too, with `PixelValuesCollator` (float32 pixel
values made on the CPU, no augmentation), so a trainer of your own is not locked out.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence

import torch
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from .evaluation import compute_metrics
from .image_batches import ImageBatchTransform, UInt8Images, collate, decode_images
from .modeling_vptm import VPTMForImageClassification


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


# the run's arguments, written to its output_dir before any training: a rerun of the same run resumes from them
RUN_ARGS_FILE = "vptm_run_args.json"
HP_SEARCH_FILE = "hp_search.json"
WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)


def search_hyperparameters(
    model_init, training_args, trainer_inputs: dict, metric_names: Sequence[str], learning_rates: tuple[float, float]
) -> dict:
    """Learning rate (log-uniform in `learning_rates`) and weight decay (`WEIGHT_DECAYS`) by
    `Trainer.hyperparameter_search` (optuna) on the validation split, with `training_args.hp_search_trials` trials.

    Each trial trains a fresh model (`model_init`, seeded by the training seed) as configured, without checkpoints
    and without pruning, in a temporary folder; it is scored by `metric_for_best_model` (default accuracy; one of
    `metric_names` or the loss), maximised or, for a loss, minimised. The trials and the best pair are written to
    `output_dir/hp_search.json`, which a rerun (resumed or not) reads instead of searching again.
    """
    saved = os.path.join(training_args.output_dir, HP_SEARCH_FILE)
    if os.path.isfile(saved):  # the caller has made sure this folder holds this same run
        with open(saved) as f:
            return json.load(f)
    try:
        import optuna
    except ImportError as error:
        raise ImportError(
            "--hp_search_trials needs optuna: pip install optuna (or the package's hpo extra)"
        ) from error
    metric, maximize = search_objective(training_args, metric_names)
    low, high = learning_rates

    def space(trial) -> dict:
        return {
            "learning_rate": trial.suggest_float("learning_rate", low, high, log=True),
            "weight_decay": trial.suggest_categorical("weight_decay", WEIGHT_DECAYS),
        }

    with tempfile.TemporaryDirectory(prefix="vptm-hp-search-") as folder:
        search_args = dataclasses.replace(
            training_args, output_dir=folder, save_strategy="no", load_best_model_at_end=False, hp_search_trials=0
        )
        trainer = VPTMTrainer(model_init=model_init, args=search_args, **trainer_inputs)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = optuna.storages.InMemoryStorage()  # kept, to read every trial back
        best = trainer.hyperparameter_search(
            hp_space=space, compute_objective=lambda metrics: metrics[metric],
            n_trials=training_args.hp_search_trials, direction="maximize" if maximize else "minimize",
            backend="optuna", sampler=optuna.samplers.TPESampler(seed=training_args.seed),
            pruner=optuna.pruners.NopPruner(), study_name="vptm", storage=storage,
        )  # fmt: skip
    result = None
    if best is not None:  # the main process ran the study; the others followed its trials
        trials = optuna.load_study(study_name="vptm", storage=storage).trials
        trials = [{"number": t.number, **t.params, metric: t.value} for t in trials]
        result = {"metric": metric, "maximize": maximize, "trials": trials, "best": best.hyperparameters,
                  "best_objective": best.objective}  # fmt: skip
    if training_args.world_size > 1:
        box = [result]
        torch.distributed.broadcast_object_list(box, src=0)
        result = box[0]
    if trainer.is_world_process_zero():
        with open(saved, "w") as f:
            json.dump(result, f, indent=2)
    logger.info("hyperparameter search: best %s (%s %.4f)", result["best"], metric, result["best_objective"])
    return result


# ------------------------------------------------------------------------------------- one run in one folder
def check_output_dir(output_dir: str, run_args: dict, overwrite: bool) -> str | None:
    """Returns the checkpoint to resume from (same run) or None; refuses a folder that holds a different run."""
    if not os.path.isdir(output_dir) or not os.listdir(output_dir):
        return None
    previous_path = os.path.join(output_dir, RUN_ARGS_FILE)
    previous = json.load(open(previous_path)) if os.path.isfile(previous_path) else None
    if previous is not None:  # runs recorded before some arguments were renamed or added
        for old, new in (("verbalizer_input", "head_input"), ("vptm_head", "classifier")):
            if old in previous:
                previous[new] = previous.pop(old)
        previous.setdefault("hp_search_trials", 0)
        previous.setdefault("metric_for_best_model", None)
    if previous == run_args:
        return get_last_checkpoint(output_dir)
    if not overwrite:
        what = "files of another program" if previous is None else "a run with different arguments"
        differing = sorted(k for k in run_args if previous and previous.get(k) != run_args[k])
        raise ValueError(
            f"output_dir {output_dir} already holds {what}"
            + (f" (differs in {differing})" if differing else "")
            + "; pass --overwrite_output_dir to replace it, or choose another --output_dir"
        )
    shutil.rmtree(output_dir)
    return None


def run_arguments(model_args, data_args, training_args) -> dict:
    """What makes a run of the script: its arguments but those that only say where things go or are shown, as
    recorded in `RUN_ARGS_FILE`; a rerun with the same ones resumes, with others is refused (`check_output_dir`)."""
    ignore = {
        "output_dir",
        "logging_dir",
        "resume_from_checkpoint",
        "overwrite_output_dir",
        "push_to_hub",
        "hub_model_id",
        "hub_token",
        "backbone_hub_id",
        "backbone_hub_revision",
        "token",
        "local_rank",
        "disable_tqdm",
        "metric_names",  # what is reported, not what is trained (the search's metric is metric_for_best_model)
    }
    args = {**dataclasses.asdict(model_args), **dataclasses.asdict(data_args)}
    args.update({k: v for k, v in training_args.to_dict().items() if k in ("learning_rate", "num_train_epochs",
                 "per_device_train_batch_size", "weight_decay", "seed", "lr_scheduler_type", "warmup_steps",
                 "max_steps", "hp_search_trials", "metric_for_best_model")})  # fmt: skip
    return {k: v for k, v in sorted(args.items()) if k not in ignore and not k.startswith("_")}


def search_objective(training_args, metric_names: Sequence[str]) -> tuple[str, bool]:
    """The metric a search scores trials by (`metric_for_best_model`, default accuracy) and whether it maximises."""
    metric = training_args.metric_for_best_model or "accuracy"
    metric = metric if metric.startswith("eval_") else f"eval_{metric}"
    known = ["eval_loss", *(f"eval_{name}" for name in metric_names)]
    if metric not in known:
        raise ValueError(f"--metric_for_best_model {metric} is not computed; it must be one of {known}")
    if training_args.greater_is_better is not None:
        return metric, training_args.greater_is_better
    return metric, metric != "eval_loss"


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameters of `model`."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


__all__ = [
    "RUN_ARGS_FILE",
    "PixelValuesCollator",
    "check_output_dir",
    "VPTMTrainer",
    "label_names",
    "parameter_counts",
    "prepare_images",
    "run_arguments",
    "search_hyperparameters",
]


def write_run_summary(output_dir: str, file_name: str, summary: dict) -> dict:
    """Adds the machine (``device``) to a pre-training run's ``summary`` and writes it as JSON in ``output_dir``."""
    import json

    import torch

    gpu = torch.cuda.is_available()
    summary = {**summary, "device": torch.cuda.get_device_name() if gpu else f"cpu x{torch.get_num_threads()}"}
    with open(os.path.join(output_dir, file_name), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
