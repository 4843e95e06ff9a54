r"""Fine-tunes VPTM, or one of its baselines, for image classification with the Trainer.

Follows transformers' `examples/pytorch/image-classification/run_image_classification.py`. Every method runs on
the same backbone, data pipeline and schedule, so their numbers compare:

* `vptm`: prompts + [MASK] read out through the frozen MIM head and a prototypical verbalizer (prompts in the first
  half of the blocks unless `--prompt_layers` says otherwise);
* `vpt`: the same prompts, a linear head on the final CLS state (VPT; deep by default, shallow or another location
  via `--prompt_layers`);
* `linear`: frozen backbone, linear head on the final CLS state (linear probe);
* `full`: every backbone weight trained (`BeitForImageClassification` initialised from the MIM checkpoint);
* `lora`: PEFT's LoRA in the frozen backbone's attention and a fresh linear head (`BeitForImageClassification`);
* `peft`: any PEFT config of yours (`--peft_config FILE.json`: LoRA, LoHa, IA3, BOFT, ...) the same way;
* `vptm_lora`: VPTM with PEFT's LoRA in its backbone's attention, trained together
  (`modeling_vptm/peft_methods.py`; the PEFT methods need `pip install "vptm[peft]"`).

    # the main job: VPTM on the shipped backbone and the shipped 1,000-image Fashion-MNIST subset (offline)
    python examples/run_classification.py --output_dir runs/vptm
    # VPT-shallow on your own image folders, pushed to the Hub
    python examples/run_classification.py --method vpt --prompt_layers shallow --train_dir data/train \
        --validation_dir data/val --output_dir runs/vpt --push_to_hub --hub_model_id me/vpt-mydata
    # any Hub dataset and BEiT MIM backbone
    python examples/run_classification.py --dataset_name cifar10 --image_column_name img \
        --model_name_or_path microsoft/beit-base-patch16-224-pt22k --output_dir runs/cifar
    # PEFT's LoRA on the same backbone and data, or a PEFT config of your own
    python examples/run_classification.py --method lora --output_dir runs/lora
    python examples/run_classification.py --method peft --peft_config my_loha.json --output_dir runs/loha
    # several processes (CPU or GPUs)
    torchrun --nproc_per_node 2 examples/run_classification.py --output_dir runs/ddp
    accelerate launch --multi_gpu --num_processes 2 examples/run_classification.py --output_dir runs/ddp

Arguments can also come from one JSON file: `python run_classification.py args.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import (
    AutoImageProcessor,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

import modeling_vptm
from modeling_vptm import SHIPPED_BACKBONE, VPTMConfig, VPTMForImageClassification
from modeling_vptm.checkpoint_io import resolve_backbone_path
from modeling_vptm.configuration_vptm import (
    EXTRA_TOKEN_BIASES,
    HEAD_INPUTS,
    MASK_TOKEN_MODES,
    PROMPT_INITS,
    PROMPT_LAYER_PRESETS,
)
from modeling_vptm.evaluation import DEFAULT_METRICS, compute_metrics
from modeling_vptm.hub import point_at_hub_backbone, require_portable_backbone
from modeling_vptm.image_batches import ImageBatchTransform, UInt8Images, collate, decode_images
from modeling_vptm.images import IMAGE_EXTENSIONS, is_image_file
from modeling_vptm.model_card import CardInfo, prompt_checkpoint_card
from modeling_vptm.peft_methods import (
    LORA_DEFAULTS,
    apply_peft,
    classifier_from_mim,
    load_classifier,
    lora_config,
    point_adapter_at,
    read_peft_config,
    require_peft,
    save_labels,
)


logger = logging.getLogger(__name__)

METHODS = ("vptm", "vpt", "linear", "full", "lora", "peft", "vptm_lora")
PEFT_METHODS = ("lora", "peft", "vptm_lora")
SHIPPED_DATASET = "vptm:fashion-mnist-1k"
# the shipped 1,000 training images, evaluated on the 10,000 official test images (Debian dataset-fashion-mnist)
FULL_TEST_DATASET = "vptm:fashion-mnist-1k-test10k"
# a transfer task: scikit-learn's 8x8 handwritten digits, 50 training images per digit, the other 1,297 for test
DIGITS_DATASET = "vptm:digits"
RUN_ARGS_FILE = "vptm_run_args.json"
SPLITS = ("train", "validation", "test")
TRAIN_VAL_SPLIT = 0.15

# lora's and vptm_lora's chosen on validation (experiments/select_defaults.py); peft takes lora's
DEFAULT_LEARNING_RATES = {"vptm": 1e-2, "vpt": 1e-2, "linear": 1e-2, "full": 1e-3, "lora": 3e-3, "peft": 3e-3,
                          "vptm_lora": 1e-2}  # fmt: skip


# the ModelArguments fields each method reads; a flag outside its method's set is reported as ignored
PROMPT_FIELDS = {"prompt_length", "prompt_layers", "prompt_init", "extra_token_bias"}
VERBALIZER_FIELDS = {"prototype_dim", "prototypes_per_class", "logit_scale_init", "learn_logit_scale",
                     "prototype_contrastive_weight", "instance_contrastive_weight", "contrastive_temperature",
                     "prototype_init"}  # fmt: skip
MASK_FIELDS = {"mask_token_mode", "mask_token_position", "train_mask_token", "head_input", "classifier"}
LORA_FIELDS = {"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"}
# Where each prompt method's prompts go unless --prompt_layers says: its best location on validation data (3 splits on
# each of the two shipped backbones; docs/method.md). VPTM's is VPTMConfig's own default.
DEFAULT_PROMPT_LAYERS = {"vptm": VPTMConfig.prompt_layers, "vpt": "deep"}
METHOD_FIELDS = {
    "vptm": PROMPT_FIELDS | MASK_FIELDS | VERBALIZER_FIELDS,
    "vpt": PROMPT_FIELDS,
    "linear": set(),
    "full": set(),
    "lora": LORA_FIELDS,
    "peft": {"peft_config"},
    "vptm_lora": PROMPT_FIELDS | MASK_FIELDS | VERBALIZER_FIELDS | LORA_FIELDS,
}


@dataclass
class ModelArguments:
    _argument_group_name = "model: the backbone, the method and its VPTMConfig fields"

    model_name_or_path: str = field(
        default=SHIPPED_BACKBONE, metadata={"help": "BEiT MIM backbone: Hub id, local folder or vptm:<shipped name>."}
    )
    model_revision: str | None = field(default=None, metadata={"help": "Backbone revision (branch, tag, commit)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are kept."})
    token: str | None = field(default=None, metadata={"help": "Hub token (also for --push_to_hub)."})
    method: Literal[METHODS] = field(
        default="vptm",
        metadata={"help": "vptm: prompts + [MASK] read through the MIM head and a verbalizer; vpt: prompts + a "
                  "linear head on CLS; linear: linear probe; full: every weight trained; lora: PEFT's LoRA and a "
                  "linear head; peft: the PEFT config --peft_config; vptm_lora: VPTM and LoRA together."},
    )  # fmt: skip
    lora_r: int = field(default=LORA_DEFAULTS["r"], metadata={"help": "LoRA's rank (lora, vptm_lora)."})
    lora_alpha: float = field(
        default=LORA_DEFAULTS["lora_alpha"], metadata={"help": "LoRA's scaling numerator: updates x alpha / r."}
    )
    lora_dropout: float = field(default=LORA_DEFAULTS["lora_dropout"], metadata={"help": "Dropout on LoRA's input."})
    lora_target_modules: str = field(
        default=",".join(LORA_DEFAULTS["target_modules"]),
        metadata={"help": "Backbone modules LoRA adapts, comma-separated (BEiT's attention: q_proj, k_proj, v_proj, "
                  "o_proj; its MLP: intermediate.dense, output.dense)."},
    )  # fmt: skip
    peft_config: str | None = field(
        default=None,
        metadata={"help": "For --method peft: a JSON file of a PEFT config (peft_type and its fields, as PEFT's "
                  "adapter_config.json); the classification head is added to its modules_to_save."},
    )  # fmt: skip
    # VPTMConfig fields: the defaults are the config's own, so the script and the model cannot drift apart
    prompt_length: int = field(
        default=VPTMConfig.prompt_length, metadata={"help": "Prompt tokens per prompted block (vptm, vpt)."}
    )
    prompt_layers: str | None = field(
        default=None,
        metadata={"help": "Blocks that get prompts: deep (all), shallow (the input only), first_half, second_half, "
                  "every_other (the same meaning at any depth), or block indices like 0,1,2. Default: each method's "
                  "best on validation, first_half for vptm (VPTMConfig's default), deep for vpt."},
    )  # fmt: skip
    prompt_init: Literal[PROMPT_INITS] = field(
        default=VPTMConfig.prompt_init, metadata={"help": "uniform: VPT's init; normal: N(0, initializer_range)."}
    )
    mask_token_mode: Literal[MASK_TOKEN_MODES] = field(
        default=VPTMConfig.mask_token_mode,
        metadata={"help": "append: [MASK] added after the prompts; replace: [MASK] replaces a patch (vptm)."},
    )
    mask_token_position: int | None = field(
        default=VPTMConfig.mask_token_position,
        metadata={"help": "Patch index [MASK] replaces under --mask_token_mode replace (default: the centre)."},
    )
    extra_token_bias: Literal[EXTRA_TOKEN_BIASES] = field(
        default=VPTMConfig.extra_token_bias,
        metadata={"help": "Relative position bias of added tokens: cls (the CLS entries) or zero."},
    )
    train_mask_token: bool = field(
        default=VPTMConfig.train_mask_token, metadata={"help": "Also train a copy of the mask token (vptm)."}
    )
    head_input: Literal[HEAD_INPUTS] = field(
        default=VPTMConfig.head_input,
        metadata={"help": "What the task head reads at [MASK]: the MIM head's visual-token logits, normalized "
                  "logits, probs, the hidden state, or an ensemble of logits and hidden state (docs/method.md)."},
    )  # fmt: skip
    prototype_dim: int = field(default=VPTMConfig.prototype_dim, metadata={"help": "Verbalizer projection size."})
    prototypes_per_class: int = field(
        default=VPTMConfig.prototypes_per_class, metadata={"help": "Prototypes per class (max-aggregated)."}
    )
    logit_scale_init: float = field(
        default=VPTMConfig.logit_scale_init, metadata={"help": "Class logits = scale x cosine; the initial scale."}
    )
    learn_logit_scale: bool = field(default=VPTMConfig.learn_logit_scale, metadata={"help": "Train the scale."})
    prototype_contrastive_weight: float = field(
        default=VPTMConfig.prototype_contrastive_weight,
        metadata={"help": "Weight of the instance-prototype contrastive term (ProtoVerb's; 0: off)."},
    )
    instance_contrastive_weight: float = field(
        default=VPTMConfig.instance_contrastive_weight,
        metadata={"help": "Weight of the instance-instance supervised contrastive term (ProtoVerb's; 0: off)."},
    )
    contrastive_temperature: float = field(
        default=VPTMConfig.contrastive_temperature, metadata={"help": "Temperature of both contrastive terms."}
    )
    prototype_init: Literal["random", "class_mean"] = field(
        default="random", metadata={"help": "random, or class_mean (one pass over the training data)."}
    )
    backbone_hub_id: str | None = field(
        default=None,
        metadata={"help": "With --push_to_hub and a packaged or local backbone: its copy on the Hub (pushed with "
                  "examples/push_backbone.py), which the pushed checkpoint then names so that it loads anywhere."},
    )  # fmt: skip
    backbone_hub_revision: str | None = field(
        default=None, metadata={"help": "The commit of --backbone_hub_id (push_backbone.py prints it)."}
    )
    classifier: Literal["prototypical_verbalizer", "linear_mask"] = field(
        default="prototypical_verbalizer",
        metadata={"help": "For --method vptm: the prototypical verbalizer at [MASK], or linear_mask (ablation: a "
                  "linear head at [MASK]). VPT and the linear probe always use a linear head on CLS."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        self.prompt_layer_list()  # refuses anything but a preset location or block indices, before any work
        if self.prototype_init == "class_mean" and self.method not in ("vptm", "vptm_lora"):
            raise ValueError(f"--prototype_init class_mean needs --method vptm or vptm_lora, got {self.method!r}")
        if self.method in PEFT_METHODS:  # refused at once, not after the data is read
            require_peft(f"--method {self.method}")
        if self.method == "peft" and not self.peft_config:
            raise ValueError("--method peft trains the PEFT config --peft_config FILE.json, and none was given")

    def prompt_layer_list(self) -> str | list[int]:
        """`--prompt_layers` as VPTMConfig takes it: a preset location ("deep", "first_half", ...) or block indices;
        when not given, the method's own default (`DEFAULT_PROMPT_LAYERS`)."""
        if self.prompt_layers is None:
            return DEFAULT_PROMPT_LAYERS.get(self.method, VPTMConfig.prompt_layers)
        if self.prompt_layers in PROMPT_LAYER_PRESETS:
            return self.prompt_layers
        try:
            return [int(i) for i in self.prompt_layers.split(",") if i.strip()]
        except ValueError as error:
            raise ValueError(
                f"--prompt_layers must be one of {', '.join(PROMPT_LAYER_PRESETS)} or block indices like 0,1,2; got "
                f"{self.prompt_layers!r}"
            ) from error

    def ignored_by_method(self, given: set[str]) -> list[str]:
        """The given flags (model fields only) that the chosen method does not read."""
        used = set(METHOD_FIELDS[self.method])
        if self.method in ("vptm", "vptm_lora") and self.classifier == "linear_mask":
            used -= VERBALIZER_FIELDS
        return sorted((given & set().union(*METHOD_FIELDS.values())) - used)


@dataclass
class DataTrainingArguments:
    _argument_group_name = "data: dataset, splits, augmentation, metrics"

    dataset_name: str | None = field(
        default=SHIPPED_DATASET, metadata={"help": f"Hub dataset, or {SHIPPED_DATASET} (shipped, offline)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of a Hub dataset."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder (one sub-folder per class)."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder scored after training."})
    train_val_split: float = field(
        default=TRAIN_VAL_SPLIT,
        metadata={"help": "Fraction of train held out as validation when the dataset has neither a validation nor a "
                  "test split (for selection on a dataset that has a test split, use --validation_split)."},
    )  # fmt: skip
    validation_split: float = field(
        default=0.0,
        metadata={
            "help": "Carve a stratified, seeded validation split of this fraction from train and evaluate on it "
            "instead of the dataset's validation/test split (for choosing hyperparameters; 0: off)."
        },
    )
    validation_split_seed: int = field(default=0, metadata={"help": "Seed of --validation_split."})
    image_column_name: str = field(default="image", metadata={"help": "Column of the dataset's images."})
    label_column_name: str = field(default="label", metadata={"help": "Column of the dataset's labels."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on a seeded random subset of this many images (debugging, quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Score a seeded random subset of this many evaluation images."}
    )
    augment_shift: int = field(
        default=2, metadata={"help": "Random translation in pixels at train time (0: off); sized for 28-pixel images."}
    )
    augment_flip: bool = field(
        default=False,
        metadata={"help": "Random horizontal flips at train time. Off by default: on validation data of the shipped "
                  "subset they did not help VPTM and cost VPT-deep 2 points, and they hurt data that is not "
                  "mirror-symmetric (digits, text, signs)."},
    )  # fmt: skip
    augment_crop_scale: float = field(
        default=0.0,
        metadata={"help": "Random resized crops at train time covering this fraction of the image up to all of it "
                  "(0: off; 0.08 is the usual recipe for 224-pixel backbones)."},
    )  # fmt: skip
    skip_unreadable_images: bool = field(default=False, metadata={"help": "Skip (and count) unreadable images."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a different run in output_dir."})
    metric_names: list[str] = field(
        default_factory=lambda: list(DEFAULT_METRICS),
        metadata={
            "help": "`evaluate` metrics to report (f1, precision and recall macro-averaged); accuracy is always "
            "reported. accuracy and f1 ship with the package and need no network; other names load from the Hub."
        },
    )

    def __post_init__(self) -> None:
        # the result line, the card and the comparison scripts read accuracy: it always comes first
        self.metric_names = ["accuracy", *(name for name in self.metric_names if name != "accuracy")]
        if not 0 <= self.augment_crop_scale <= 1:
            raise ValueError(f"--augment_crop_scale must be in [0, 1] (0: off), got {self.augment_crop_scale}")
        if self.augment_shift < 0:
            raise ValueError(f"--augment_shift must be >= 0 pixels, got {self.augment_shift}")
        if not 0 <= self.validation_split < 1:
            raise ValueError(f"--validation_split must be a fraction in [0, 1) (0: off), got {self.validation_split}")
        if not 0 < self.train_val_split < 1:
            raise ValueError(f"--train_val_split must be a fraction in (0, 1), got {self.train_val_split}")


@dataclass
class VPTMTrainingArguments(TrainingArguments):
    """TrainingArguments with defaults for prompt tuning on small data."""

    _argument_group_name = (
        "training: Trainer's settings (the ones this script changes and the common ones; --help_all shows all)"
    )

    learning_rate: float = field(
        default=DEFAULT_LEARNING_RATES["vptm"],
        metadata={"help": "Peak learning rate. When not given: 1e-2 for vptm, vpt and linear, 1e-3 for full."},
    )
    push_to_hub: bool = field(
        default=False,
        metadata={"help": "Push the final folder (prompt-only checkpoint, code, image processor, card) once, at the "
                  "end, to --hub_model_id (private with --hub_private_repo, on branch --hub_revision); intermediate "
                  "checkpoints are not pushed, so --hub_strategy does not apply."},
    )  # fmt: skip
    do_train: bool = field(default=True, metadata={"help": "Train (false: score the checkpoint in --output_dir)."})
    do_eval: bool = field(default=True, metadata={"help": "Score the validation split at the end, if there is one."})
    do_predict: bool = field(
        default=True, metadata={"help": "Score the test split once, at the end, if there is one (never in training)."}
    )
    hp_search_trials: int = field(
        default=0,
        metadata={"help": "Before training: this many trials of Trainer.hyperparameter_search (optuna, seeded by "
                  "--seed) over the learning rate (log-uniform, 1e-4 to 1e-1; 1e-5 to 1e-2 for full) and the weight "
                  "decay (0, 1e-4, 1e-3, 1e-2), each trained as configured and scored by --metric_for_best_model "
                  "(default accuracy) on the validation split, never on test; the best pair then trains the final "
                  "model. Needs a validation split (--validation_split) and `pip install optuna` (0: off)."},
    )  # fmt: skip
    # Trainer's settings whose defaults this script changes, each with its help, so that --help shows them
    num_train_epochs: float = field(
        default=30.0, metadata={"help": "Training epochs (Trainer's default: 3; prompts on 1,000 images need more)."}
    )
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Training batch size per device."})
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Evaluation batch size per device."})
    weight_decay: float = field(
        default=1e-4, metadata={"help": "AdamW weight decay of the trained tensors (Trainer's default: 0)."}
    )
    warmup_steps: float = field(
        default=0.1, metadata={"help": "Linear warm-up: steps, or a fraction of all steps when below 1."}
    )
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "Learning-rate schedule after warm-up (Trainer's default: linear)."}
    )
    eval_strategy: str = field(
        default="no",
        metadata={"help": "When to score the validation split during training (no, steps, epoch); with "
                  "--load_best_model_at_end, the model it selects is the one kept. Needs a validation split."},
    )  # fmt: skip
    save_strategy: str = field(
        default="epoch", metadata={"help": "When to write checkpoint-N/ folders (no, steps, epoch, best)."}
    )
    save_total_limit: int | None = field(
        default=1,
        metadata={"help": "checkpoint-N/ folders kept (the newest; with --load_best_model_at_end the best too). Each "
                  "holds the optimiser and RNG state a rerun resumes from; the final model is the output_dir's own "
                  "files."},
    )  # fmt: skip
    logging_steps: float = field(default=10, metadata={"help": "Log the loss every this many steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Always false here: the image and label columns feed the transforms."}
    )
    dataloader_num_workers: int = field(
        default=0,
        metadata={"help": "Data-loading processes (0: the main process loads each batch). On a CUDA device, when "
                  "not given, a few workers are used."},
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- data
def load_data(data_args: DataTrainingArguments, model_args: ModelArguments, seed: int = 0):
    """train, and validation and/or test, with columns renamed to image/label.

    validation (for model selection: Trainer's eval_dataset) is the dataset's own, or carved from train by
    --validation_split; test is the dataset's own and is only scored at the end (--do_predict). With neither,
    --train_val_split of train is held out as validation. Every random choice in here is seeded.
    """
    from datasets import DatasetDict, load_dataset

    from modeling_vptm.data import load_local_dataset

    if data_args.train_dir:
        files = {"train": os.path.join(data_args.train_dir, "**")}
        if data_args.validation_dir:
            files["validation"] = os.path.join(data_args.validation_dir, "**")
        unreadable = check_image_folders(data_args)
        dataset = load_local_dataset("imagefolder", data_files=files, cache_dir=model_args.cache_dir)
        if unreadable:
            dataset = drop_images(dataset, unreadable)
            logger.warning("skipped %d unreadable image(s)", len(unreadable))
    elif data_args.dataset_name == SHIPPED_DATASET:
        from modeling_vptm.data import shipped_dataset

        dataset = shipped_dataset()
    elif data_args.dataset_name == FULL_TEST_DATASET:
        from datasets import DatasetDict

        from modeling_vptm.data import fashion_mnist_dataset, shipped_dataset

        test = fashion_mnist_dataset("test", cache_dir=model_args.cache_dir)
        dataset = DatasetDict(train=shipped_dataset()["train"], test=test)
    elif data_args.dataset_name == DIGITS_DATASET:
        from modeling_vptm.data import digits_dataset

        dataset = digits_dataset()
    elif data_args.dataset_name:
        dataset = load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir,
            token=model_args.token,
        )  # fmt: skip
    else:
        raise ValueError(
            f"no dataset given: pass --dataset_name (a Hub dataset, or {SHIPPED_DATASET} for the shipped "
            "Fashion-MNIST subset) or --train_dir (an image folder with one sub-folder per class)"
        )
    if "train" not in dataset:
        raise ValueError(f"the dataset has no 'train' split; it has {sorted(dataset)}")
    if data_args.validation_split:  # model selection on a carved split, whatever validation split the data has
        carved = carve_validation(dataset, data_args)
        dataset = DatasetDict(carved, **({"test": dataset["test"]} if "test" in dataset else {}))
    elif "validation" not in dataset and "test" not in dataset:  # nothing held out: hold out part of train
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=seed)
        dataset = DatasetDict(train=split["train"], validation=split["test"])
    elif data_args.train_val_split != TRAIN_VAL_SPLIT:
        logger.warning(
            "--train_val_split is ignored: the dataset has its own %s split (carve a validation split from train "
            "with --validation_split)",
            " and ".join(s for s in ("validation", "test") if s in dataset),
        )
    for name in (data_args.image_column_name, data_args.label_column_name):
        if name not in dataset["train"].column_names:
            raise ValueError(
                f"column {name!r} not found in the dataset; its columns are {dataset['train'].column_names}. Pass "
                "--image_column_name / --label_column_name"
            )
    dataset = dataset.rename_columns(
        {c: n for c, n in ((data_args.image_column_name, "image"), (data_args.label_column_name, "label")) if c != n}
    )
    dataset = DatasetDict({name: dataset[name] for name in SPLITS if name in dataset})
    if data_args.max_train_samples is not None:
        count = min(data_args.max_train_samples, len(dataset["train"]))
        dataset["train"] = dataset["train"].shuffle(seed=seed).select(range(count))
    for name in ("validation", "test"):  # a random subset: the first rows of an image folder are one class
        if data_args.max_eval_samples is not None and name in dataset:
            count = min(data_args.max_eval_samples, len(dataset[name]))
            dataset[name] = dataset[name].shuffle(seed=seed).select(range(count))
    return dataset


def carve_validation(dataset, data_args: DataTrainingArguments):
    """Train minus a stratified, seeded validation split of it (a dict with train and validation)."""
    from datasets import ClassLabel

    train = dataset["train"]
    label = data_args.label_column_name
    if label not in train.column_names:
        raise ValueError(f"column {label!r} not found in the dataset; its columns are {train.column_names}")
    if not isinstance(train.features[label], ClassLabel):
        train = train.class_encode_column(label)
    split = train.train_test_split(
        test_size=data_args.validation_split, seed=data_args.validation_split_seed, stratify_by_column=label
    )
    return {"train": split["train"], "validation": split["test"]}


def check_image_folders(data_args: DataTrainingArguments) -> set[str]:
    """Refuses folders with no images or one class; unreadable files fail, or are returned to be skipped."""
    from PIL import Image, UnidentifiedImageError

    unreadable: set[str] = set()
    for folder in filter(None, (data_args.train_dir, data_args.validation_dir)):
        if not os.path.isdir(folder):
            raise ValueError(f"image folder {folder} does not exist")
        classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
        images = [os.path.join(root, f) for root, _, names in os.walk(folder) for f in names if is_image_file(f)]
        if not images:
            raise ValueError(f"image folder {folder} holds no images (looked for {list(IMAGE_EXTENSIONS)})")
        if folder == data_args.train_dir and len(classes) < 2:
            raise ValueError(
                f"image folder {folder} must hold one sub-folder per class and at least 2 classes, found {classes}"
            )
        bad = []
        for path in images:
            try:
                with Image.open(path) as image:
                    image.load()
            except (OSError, UnidentifiedImageError, SyntaxError):
                bad.append(path)
        if bad and not data_args.skip_unreadable_images:
            raise ValueError(
                f"{len(bad)} unreadable image file(s) in {folder}, e.g. {bad[:3]}; fix or remove them, or pass "
                "--skip_unreadable_images to skip them"
            )
        for path in bad:
            logger.warning("skipping unreadable image %s", path)
        unreadable.update(os.path.abspath(p) for p in bad)
    return unreadable


def drop_images(dataset, paths: set[str]):
    """Removes the rows whose image file is in `paths` (undecoded column, so bad files are never opened)."""
    from datasets import Image

    for split in list(dataset):
        raw = dataset[split].cast_column("image", Image(decode=False))
        keep = [i for i, v in enumerate(raw["image"]) if os.path.abspath(v["path"] or "") not in paths]
        dataset[split] = raw.select(keep).cast_column("image", Image())
    return dataset


def labels_of(dataset) -> list[str]:
    feature = dataset["train"].features["label"]
    if hasattr(feature, "names"):
        return list(feature.names)
    return [str(v) for v in sorted(set(dataset["train"]["label"]))]


# a split this large is decoded by several processes (--dataloader_num_workers of them); below it, starting them costs
# more than they save
DECODE_PROCESSES_MIN_IMAGES = 2_000


def prepare_images(
    processor, data_args: DataTrainingArguments, dataset, split_names: list[str], workers: int = 0
) -> tuple[dict[str, UInt8Images], ImageBatchTransform]:
    """The splits as uint8 images, decoded and resized once by the processor (cached by `datasets`, keyed on the
    split and the processor's settings), and the transform that turns their batches into the model's pixel values on
    its device: the processor's normalisation, and in training the augmentations (modeling_vptm/image_batches.py)."""
    feature = dataset["train"].features["label"]
    to_index = (
        None if hasattr(feature, "names") else {v: i for i, v in enumerate(sorted(set(dataset["train"]["label"])))}
    )
    images = {}
    for name in split_names:
        num_proc = workers if workers > 1 and len(dataset[name]) >= DECODE_PROCESSES_MIN_IMAGES else None
        images[name] = UInt8Images(decode_images(dataset[name], processor, to_index, num_proc=num_proc))
    transform = ImageBatchTransform.from_processor(
        processor, crop_scale=data_args.augment_crop_scale, shift=data_args.augment_shift, flip=data_args.augment_flip
    )
    return images, transform


# --------------------------------------------------------------------------------------------------------- model
def build_model(model_args: ModelArguments, id2label: dict[int, str]):
    """The method's model, untrained; the PEFT methods' before their adapter is added (`add_adapter`)."""
    hub = {"revision": model_args.model_revision, "cache_dir": model_args.cache_dir, "token": model_args.token}
    if model_args.method in ("full", "lora", "peft"):
        return classifier_from_mim(model_args.model_name_or_path, id2label, **hub)  # refuses non-MIM checkpoints
    config_fields = {f.name for f in dataclasses.fields(VPTMConfig)}  # the script's other arguments stay out
    fields = {f.name: getattr(model_args, f.name) for f in dataclasses.fields(model_args) if f.name in config_fields}
    fields["prompt_layers"] = model_args.prompt_layer_list()
    if model_args.method not in ("vptm", "vptm_lora"):
        fields["classifier"] = "linear_cls"
    if model_args.method == "linear":
        fields["prompt_length"] = 0
    return VPTMForImageClassification.from_backbone(
        model_args.model_name_or_path, id2label=id2label, revision=model_args.model_revision,
        cache_dir=model_args.cache_dir, token=model_args.token, **fields,
    )  # fmt: skip


def add_adapter(model, model_args: ModelArguments):
    """The PEFT methods' model: PEFT's adapter (with the head in its modules_to_save) on the built model."""
    if model_args.method not in PEFT_METHODS:
        return model
    # the base of lora and peft is the backbone (at its revision); vptm_lora's, the VPTM checkpoint saved beside it
    revision = None if model_args.method == "vptm_lora" else model_args.model_revision
    if model_args.method == "peft":
        config, source = read_peft_config(model_args.peft_config), f"--peft_config {model_args.peft_config}"
    else:
        targets = [name.strip() for name in model_args.lora_target_modules.split(",") if name.strip()]
        config = lora_config(model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout, targets)
        source = f"--method {model_args.method} (LoRA on {targets})"
    return apply_peft(model, config, source, base_revision=revision)


def save_final_model(trainer: Trainer, model_args: ModelArguments, id2label: dict[int, str]) -> None:
    """The trained model in output_dir: a prompt checkpoint, full weights, or a PEFT adapter (and what loading it
    needs: the labels of a PEFT classifier, the VPTM base of vptm_lora)."""
    if model_args.method == "vptm_lora" and trainer.is_world_process_zero():
        # first the VPTM prompt checkpoint the adapter goes on (its original task), then the adapter beside it
        trainer.model.get_base_model().save_pretrained(trainer.args.output_dir)
    trainer.save_model()  # prompt-only for vptm/vpt/linear (VPTMForImageClassification.save_pretrained)
    if model_args.method in ("lora", "peft") and trainer.is_world_process_zero():
        save_labels(trainer.args.output_dir, id2label)


def parameter_counts(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


class PromptTrainer(Trainer):
    """Trainer for prompt checkpoints, fed uint8 image batches.

    With `image_transform`, batches arrive as uint8 (`modeling_vptm.image_batches`) and become the model's pixel
    values on its device at the start of each training step (normalised and augmented) and prediction step
    (normalised): the arithmetic runs batched where the model runs, after 4x fewer bytes were copied there. Its random
    draws come from the global CPU generator, which Trainer seeds and its checkpoints restore.

    A prompt checkpoint holds only the task's tensors, so on resume the frozen backbone's are missing by design:
    only a missing task tensor is worth a warning.
    """

    def __init__(self, *args, image_transform: ImageBatchTransform | None = None, **kwargs) -> None:
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


HP_SEARCH_FILE = "hp_search.json"
WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)


def search_hyperparameters(model_init, model_args, data_args, training_args, trainer_inputs) -> dict:
    """Learning rate and weight decay by `Trainer.hyperparameter_search` (optuna) on the validation split.

    Each trial trains a fresh model (`model_init`, seeded by --seed) as configured, without checkpoints and without
    pruning, in a temporary folder; it is scored by --metric_for_best_model (default accuracy), maximised or, for a
    loss, minimised. The trials and the best pair are written to `output_dir/hp_search.json`, which a rerun of the same
    command (resumed or not) reads instead of searching again.
    """
    saved = os.path.join(training_args.output_dir, HP_SEARCH_FILE)
    if os.path.isfile(saved):  # check_output_dir has made sure this folder holds this same run
        with open(saved) as f:
            return json.load(f)
    try:
        import optuna
    except ImportError as error:
        raise ImportError(
            "--hp_search_trials needs optuna: pip install optuna (or the package's hpo extra)"
        ) from error
    metric = training_args.metric_for_best_model or "accuracy"
    metric = metric if metric.startswith("eval_") else f"eval_{metric}"
    known = ["eval_loss", *(f"eval_{name}" for name in data_args.metric_names)]
    if metric not in known:
        raise ValueError(f"--metric_for_best_model {metric} is not computed; it must be one of {known}")
    maximize = (
        training_args.greater_is_better if training_args.greater_is_better is not None else metric != "eval_loss"
    )
    low, high = (1e-5, 1e-2) if model_args.method == "full" else (1e-4, 1e-1)

    def space(trial) -> dict:
        return {
            "learning_rate": trial.suggest_float("learning_rate", low, high, log=True),
            "weight_decay": trial.suggest_categorical("weight_decay", WEIGHT_DECAYS),
        }

    with tempfile.TemporaryDirectory(prefix="vptm-hp-search-") as folder:
        search_args = dataclasses.replace(
            training_args, output_dir=folder, save_strategy="no", load_best_model_at_end=False, hp_search_trials=0
        )
        trainer = PromptTrainer(model_init=model_init, args=search_args, **trainer_inputs)
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


# ---------------------------------------------------------------------------------------------------- run guards
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


# ---------------------------------------------------------------------------------------------------- model card
def push_folder(
    folder: str, repo_id: str, token: str | None, files: list[str], private: bool | None = None,
    revision: str | None = None,
) -> str:  # fmt: skip
    """Uploads exactly `files` of `folder` (the prompt checkpoint, code, processor and card) to `repo_id`, on the
    branch `revision` (created if needed) of a repository created `private` if it does not exist yet."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True, private=private)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=folder, allow_patterns=files, revision=revision,
        commit_message="Upload VPTM prompt checkpoint",
    )  # fmt: skip
    return getattr(commit, "oid", None) or "main"


def push_checkpoint(out: str, card: CardInfo, model_args: ModelArguments, training_args: TrainingArguments) -> dict:
    """Pushes the final folder: checkpoint, code, processor, then the card that pins the commit holding them. The
    config pushed names the backbone's Hub copy (--backbone_hub_id) when it was trained on a local or packaged one."""
    files = sorted(
        f for f in os.listdir(out) if os.path.isfile(os.path.join(out, f)) and f != RUN_ARGS_FILE
        and not f.endswith("_results.json") and not f.startswith(("training_args", "trainer_state"))
    )  # fmt: skip
    token = model_args.token or training_args.hub_token
    hub = {"private": training_args.hub_private_repo, "revision": training_args.hub_revision}
    if model_args.backbone_hub_id:
        card = dataclasses.replace(
            card, backbone=model_args.backbone_hub_id, backbone_revision=model_args.backbone_hub_revision
        )
    with tempfile.TemporaryDirectory(prefix="vptm-push-") as staging:
        for name in files:
            shutil.copy(os.path.join(out, name), os.path.join(staging, name))
        if model_args.backbone_hub_id and os.path.isfile(os.path.join(staging, "config.json")):
            point_at_hub_backbone(staging, model_args.backbone_hub_id, model_args.backbone_hub_revision)
        if model_args.method == "vptm_lora":  # the adapter's base is the VPTM checkpoint beside it, in this repository
            point_adapter_at(staging, card.repo_id)
        elif model_args.method in PEFT_METHODS and model_args.backbone_hub_id:
            point_adapter_at(staging, model_args.backbone_hub_id, model_args.backbone_hub_revision)
        prompt_checkpoint_card(card).save(os.path.join(staging, "README.md"))
        commit = push_folder(staging, card.repo_id, token, files, **hub)
        # the card's loading snippet pins the commit that holds these files; a second commit adds that card
        prompt_checkpoint_card(dataclasses.replace(card, revision=commit)).save(os.path.join(staging, "README.md"))
        push_folder(staging, card.repo_id, token, ["README.md"], **hub)
    return {"pushed_files": files, "pushed_commit": commit}


# ---------------------------------------------------------------------------------------------------------- main
class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring kept as written, and each flag's default beside its help."""


# Trainer's settings that --help lists besides the ones this script changes (VPTMTrainingArguments' own fields): the
# ones a run commonly sets. --help_all lists all of them.
COMMON_TRAINING_FLAGS = (
    "output_dir", "seed", "max_steps", "gradient_accumulation_steps", "load_best_model_at_end",
    "metric_for_best_model", "resume_from_checkpoint", "bf16", "fp16", "tf32", "use_cpu", "torch_compile",
    "gradient_checkpointing", "dataloader_pin_memory", "dataloader_persistent_workers", "report_to",
    "hub_model_id", "hub_private_repo", "hub_revision",
)  # fmt: skip


class FullHelp(argparse.Action):
    """--help_all: the help with every one of Trainer's settings, then exit (as --help does)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        build_parser(full_help=True).print_help()
        parser.exit()


def build_parser(full_help: bool = False) -> HfArgumentParser:
    """The script's parser. Its --help shows the project's flags, then Trainer's settings this script changes and the
    commonly used ones; with `full_help` (--help_all) every one of Trainer's settings."""
    parser = HfArgumentParser(
        (ModelArguments, DataTrainingArguments, VPTMTrainingArguments),
        prog="run_classification.py",
        usage="%(prog)s [--method METHOD] [--output_dir DIR] [options]  |  %(prog)s args.json",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--help_all", action=FullHelp, help="Show the help with all of Trainer's settings and exit.")
    if not full_help:
        shown = {*VPTMTrainingArguments.__annotations__, *COMMON_TRAINING_FLAGS}
        trainer_flags = {f.name for f in dataclasses.fields(TrainingArguments)} - shown
        for action in parser._actions:  # argparse's documented way to hide an option is a SUPPRESS help
            if action.dest in trainer_flags:
                action.help = argparse.SUPPRESS
    return parser


def given_flags(argv: list[str]) -> set[str]:
    """Names of the arguments given: flags on the command line, or the keys of a JSON file."""
    if len(argv) == 1 and argv[0].endswith(".json"):
        return set(json.load(open(argv[0])))
    return {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}


def gpu_defaults(given: set[str]) -> dict:
    """Defaults for training on a CUDA device, for the flags not given ({} without one, or with --use_cpu): data
    loaded by worker processes (the batches are uint8 slices of decoded images, so a few workers keep up), bf16
    autocast where the device has it, and no per-step check of the loss for NaN (the check is a
    host-device synchronisation every step; it only filters the logged running loss)."""
    if not torch.cuda.is_available() or "use_cpu" in given:
        return {}
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun / accelerate: processes on this machine
    workers = min(4, max(1, cpus // processes - 1))  # one core left to each training process
    defaults = {"dataloader_num_workers": workers, "logging_nan_inf_filter": False}
    if torch.cuda.is_bf16_supported() and not {"bf16", "fp16"} & given:
        defaults["bf16"] = True
    return {name: value for name, value in defaults.items() if name not in given}


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataTrainingArguments, VPTMTrainingArguments]:
    parser = build_parser()
    given = given_flags(argv)
    defaults = gpu_defaults(given)  # parsed as if given, so that what TrainingArguments derives from them follows
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(os.path.abspath(argv[0])) as f:
            model_args, data_args, training_args = parser.parse_dict({**defaults, **json.load(f)})
    else:
        flags = [item for name, value in defaults.items() for item in (f"--{name}", str(value).lower())]
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=[*argv, *flags])
    if defaults:
        logger.info("defaults for a CUDA device: %s", " ".join(f"--{k} {v}" for k, v in defaults.items()))
    if "learning_rate" not in given:
        training_args.learning_rate = DEFAULT_LEARNING_RATES[model_args.method]
    for name in model_args.ignored_by_method(given):
        logger.warning("--%s is ignored: --method %s does not use it", name, model_args.method)
    if training_args.push_to_hub:  # refused before any training, not after
        require_portable_backbone(model_args.model_name_or_path, model_args.backbone_hub_id)
    if "dataloader_pin_memory" not in given and not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
    if torch.cuda.is_available() and not training_args.use_cpu:
        if "dataloader_persistent_workers" not in given and training_args.dataloader_num_workers > 0:
            training_args.dataloader_persistent_workers = True  # not started again every epoch
        if "accelerator_config" not in given and training_args.dataloader_pin_memory:
            # a copy from a pinned batch need not wait for the device to finish the step before
            training_args.accelerator_config.non_blocking = True
    if "hub_strategy" in given:
        logger.warning("--hub_strategy is ignored: the final folder is pushed once, at the end")
    return model_args, data_args, training_args


def main(argv: list[str] | None = None, callbacks: list | None = None) -> dict:
    """Runs the script on `argv` (default: the command line); `callbacks`, extra `TrainerCallback`s of the final
    training (experiments/benchmark_training.py times its steps with one). Returns the run's results."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    model_args, data_args, training_args = parse_arguments(argv)
    # we push the final, prompt-only folder ourselves: Trainer would also push checkpoints and its own card
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    training_args.remove_unused_columns = False
    set_seed(training_args.seed)

    run_args = run_arguments(model_args, data_args, training_args)
    # the main process checks (and, if asked, clears) output_dir first; the others then find it as it left it
    with training_args.main_process_first(desc="checking output_dir"):
        last = check_output_dir(training_args.output_dir, run_args, data_args.overwrite_output_dir)
    resume = training_args.resume_from_checkpoint or last
    if resume:
        logger.warning("resuming from %s (same arguments); pass --overwrite_output_dir true to start over", resume)

    dataset = load_data(data_args, model_args, training_args.seed)
    strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
    if strategy != "no" and "validation" not in dataset:
        raise ValueError(
            f"--eval_strategy {strategy} selects on a validation split, and this dataset has none "
            "(only train and test, and the test images must not choose the model): pass --validation_split 0.1 to "
            "carve one from train"
        )
    label_names = labels_of(dataset)
    id2label = dict(enumerate(label_names))
    if training_args.hp_search_trials and "validation" not in dataset:
        raise ValueError(
            f"--hp_search_trials {training_args.hp_search_trials} scores each trial on a validation split, and this "
            "dataset has none (the test images must not choose hyperparameters): pass --validation_split 0.1 to carve "
            "one from train"
        )
    if training_args.do_train:
        model = build_model(model_args, id2label)
    else:  # evaluate what an earlier run left in output_dir
        saved = ("config.json", "adapter_config.json")  # a model, or a PEFT adapter
        if not any(os.path.isfile(os.path.join(training_args.output_dir, name)) for name in saved):
            raise ValueError(
                f"--do_train false scores the checkpoint in --output_dir, and {training_args.output_dir} holds none"
            )
        model = load_classifier(training_args.output_dir)
    # the backbone's processor, loaded after the backbone itself, whose loading errors say more
    processor = AutoImageProcessor.from_pretrained(
        resolve_backbone_path(model_args.model_name_or_path), revision=model_args.model_revision,
        cache_dir=model_args.cache_dir, token=model_args.token,
    )  # fmt: skip
    # the splits this run reads (an unread test split is not even decoded), decoded and resized once; one process
    # fills the cache of `datasets`, then the others read it
    needed = [name for name in SPLITS if name in dataset and (name != "train" or training_args.do_train)
              and (name != "test" or training_args.do_predict)]  # fmt: skip
    with training_args.main_process_first(desc="decoding images"):
        images, image_transform = prepare_images(
            processor, data_args, dataset, needed, workers=training_args.dataloader_num_workers
        )
    splits = {name: images[name] for name in ("validation", "test") if name in images}
    train_data = images.get("train")

    def initialize(model):
        if model_args.prototype_init == "class_mean" and training_args.do_train:
            batches = torch.utils.data.DataLoader(train_data, batch_size=64, collate_fn=collate)
            model.initialize_prototypes(image_transform.model_inputs(batch, train=False) for batch in batches)
        return add_adapter(model, model_args) if training_args.do_train else model

    trainer_inputs = dict(
        train_dataset=train_data, eval_dataset=splits.get("validation"), data_collator=collate,
        compute_metrics=compute_metrics(data_args.metric_names), processing_class=processor,
        image_transform=image_transform,
    )  # fmt: skip
    if training_args.do_train and training_args.should_save:  # before any search or training: rerun as this run
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, RUN_ARGS_FILE), "w") as f:
            json.dump(run_args, f, indent=2, sort_keys=True)
    search = model_init = None
    if training_args.do_train and training_args.hp_search_trials:

        def model_init(trial=None):
            return initialize(build_model(model_args, id2label))

        search = search_hyperparameters(model_init, model_args, data_args, training_args, trainer_inputs)
        for name in ("learning_rate", "weight_decay"):
            if name in given_flags(argv):
                logger.warning("--%s %s is replaced by the search's best value", name, getattr(training_args, name))
            setattr(training_args, name, search["best"][name])
    else:
        model = initialize(model)

    trainable, total = parameter_counts(model)
    logger.info("method %s: %s trainable of %s parameters", model_args.method, f"{trainable:,d}", f"{total:,d}")
    # after a search, the final model is built and trained as the trials were (same seed, same random draws)
    trainer = PromptTrainer(model=None if model_init else model, model_init=model_init, args=training_args,
                            callbacks=callbacks, **trainer_inputs)  # fmt: skip
    train_seconds, train_loss = 0.0, None
    if training_args.do_train:
        start = time.perf_counter()
        train_result = trainer.train(resume_from_checkpoint=resume)
        train_seconds, train_loss = time.perf_counter() - start, train_result.training_loss
        save_final_model(trainer, model_args, id2label)
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics, combined=False)
        trainer.save_state()
    # validation when asked (--do_eval), then the test split scored once, at the end (--do_predict)
    scored = {}
    for split, asked, prefix in (("validation", training_args.do_eval, "eval"), ("test", training_args.do_predict,
                                                                                   "test")):  # fmt: skip
        if asked and split in splits:
            metrics = trainer.evaluate(splits[split], metric_key_prefix=prefix)
            trainer.log_metrics(prefix, metrics)
            trainer.save_metrics(prefix, metrics, combined=False)  # eval_results.json, test_results.json
            scored[split] = {name: metrics[f"{prefix}_{name}"] for name in data_args.metric_names}
    if not scored:
        raise ValueError(
            f"nothing was scored: the dataset has the held-out splits {sorted(set(dataset) - {'train'})} and "
            f"--do_eval {training_args.do_eval}, --do_predict {training_args.do_predict}"
        )
    eval_split = "test" if "test" in scored else "validation"  # the figure a run reports: test when it was scored
    scores = scored[eval_split]

    results = {
        "method": model_args.method,
        "accuracy": scores["accuracy"],
        "metrics": scores,
        "eval_split": eval_split,
        "eval_images": len(splits[eval_split]),
        "scored": scored,
        "train_images": len(dataset["train"]),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "train_loss": train_loss,
        "train_seconds": round(train_seconds, 1),
        "resumed_from": resume,
        "learning_rate": training_args.learning_rate,
        "weight_decay": training_args.weight_decay,
    }
    if search is not None:
        results["hp_search"] = search
    if trainer.is_world_process_zero():
        out = training_args.output_dir
        processor.save_pretrained(out)
        results["checkpoint_bytes"] = sum(os.path.getsize(os.path.join(out, name)) for name in os.listdir(out)
                                          if name.endswith(".safetensors"))  # fmt: skip
        device = (
            torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
        )
        repo_id = training_args.hub_model_id or os.path.basename(os.path.abspath(out))
        import huggingface_hub
        import transformers

        card = CardInfo(
            model_name=os.path.basename(os.path.abspath(out)), method=model_args.method,
            backbone=model_args.model_name_or_path, backbone_revision=model_args.model_revision,
            dataset=data_args.dataset_name if not data_args.train_dir else "imagefolder", eval_split=eval_split,
            eval_images=results["eval_images"], train_images=results["train_images"], labels=label_names,
            metrics=scores, trainable_parameters=trainable, total_parameters=total,
            checkpoint_bytes=results["checkpoint_bytes"], train_seconds=train_seconds, device=device, repo_id=repo_id,
            arguments=json.dumps({**run_args, "learning_rate": training_args.learning_rate,
                                  "weight_decay": training_args.weight_decay}, indent=2, sort_keys=True),
            versions={"vptm": modeling_vptm.__version__, "transformers": transformers.__version__,
                      "torch": torch.__version__, "huggingface_hub": huggingface_hub.__version__},
        )  # fmt: skip
        prompt_checkpoint_card(card).save(os.path.join(out, "README.md"))
        with open(os.path.join(out, "all_results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(
            f"{model_args.method}: {eval_split} accuracy {results['accuracy']:.4f} on {results['eval_images']} images "
            f"| trainable parameters {trainable:,d} of {total:,d} | checkpoint {results['checkpoint_bytes']:,d}"
            f" bytes | {train_seconds:.1f} s" + (f" (resumed from {os.path.basename(resume)})" if resume else "")
        )
        if push_to_hub:
            results.update(push_checkpoint(out, card, model_args, training_args))
    return results


if __name__ == "__main__":
    main()
