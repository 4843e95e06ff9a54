"""The command line of `examples/run_classification.py`: its argument groups (`HfArgumentParser` dataclasses), the
methods and the flags each reads, and the parser with its GPU defaults.

Kept in the package so that the script reads as a user script (data, model, trainer, train, evaluate, save) and a
notebook can build the same arguments: `ModelArguments(method="lora")`, `VPTMTrainingArguments(output_dir=...)`.
Each VPTMConfig field's default is the config's own, so the script and the model cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import HfArgumentParser, TrainingArguments

from ..configuration_vptm import (
    EXTRA_TOKEN_BIASES,
    HEAD_INPUTS,
    MASK_TOKEN_MODES,
    PROMPT_INITS,
    PROMPT_LAYER_PRESETS,
    VPTMConfig,
)
from ..data.loading import TRAIN_VAL_SPLIT
from ..hub_names import is_hub_id
from ..shipped import SHIPPED_BACKBONE, SHIPPED_DATASET
from .evaluation import DEFAULT_METRICS
from .methods import MASK_FIELDS, METHOD_FLAGS, METHODS, PROMPT_FIELDS, VERBALIZER_FIELDS
from .peft_methods import LORA_DEFAULTS, require_peft


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    _argument_group_name = "model: the backbone and the method (the task's config fields are listed last)"

    model_name_or_path: str = field(
        default=SHIPPED_BACKBONE, metadata={"help": "BEiT MIM backbone: Hub id, local folder or vptm:<shipped name>."}
    )
    model_revision: str | None = field(default=None, metadata={"help": "Backbone revision (branch, tag, commit)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are kept."})
    token: str | None = field(default=None, metadata={"help": "Hub token (also for --push_to_hub)."})
    method: Literal[tuple(METHODS)] = field(
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
    lora_target_modules: str | None = field(
        default=None,
        metadata={"help": "Backbone modules LoRA adapts, comma-separated (BEiT's attention: q_proj, k_proj, v_proj, "
                  "o_proj; its MLP: fc1, fc2); a name that matches no module is refused. Default: each method's best "
                  "on validation, all six for lora, q_proj,v_proj for vptm_lora."},
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
        if METHODS[self.method].peft:  # refused at once, not after the data is read
            require_peft(f"--method {self.method}")
        if self.method == "peft" and not self.peft_config:
            raise ValueError("--method peft trains the PEFT config --peft_config FILE.json, and none was given")

    def lora_targets(self) -> list[str]:
        """`--lora_target_modules` as a list; when not given, the method's own default (`Method.lora_targets`)."""
        if self.lora_target_modules is None:
            return list(METHODS[self.method].lora_targets or LORA_DEFAULTS["target_modules"])
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]

    def prompt_layer_list(self) -> str | list[int]:
        """`--prompt_layers` as VPTMConfig takes it: a preset location ("deep", "first_half", ...) or block indices;
        when not given, the method's own default (`Method.prompt_layers`)."""
        if self.prompt_layers is None:
            return METHODS[self.method].prompt_layers or VPTMConfig.prompt_layers
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
        used = set(METHODS[self.method].reads)
        if self.method in ("vptm", "vptm_lora") and self.classifier == "linear_mask":
            used -= VERBALIZER_FIELDS
        return sorted((given & METHOD_FLAGS) - used)


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
        default=METHODS["vptm"].learning_rate,
        metadata={
            "help": "Peak learning rate. When not given: 1e-2 for vptm, vpt, linear and vptm_lora, 1e-3 for "
            "full, 3e-3 for lora and peft."
        },
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


def push_backbone_command(backbone: str) -> str:
    return f"python examples/push_backbone.py --backbone {backbone} --repo_id <your-name>/<backbone-name>"


def require_portable_backbone(backbone: str, hub_id: str | None) -> None:
    """Refuses, before any work, to push a prompt checkpoint whose backbone others could not load."""
    if is_hub_id(backbone) or hub_id:
        return
    raise ValueError(
        f"the backbone {backbone!r} is a packaged name or local folder, which others cannot load, so a prompt "
        "checkpoint trained on it cannot be pushed as is. Push the backbone first: "
        f"`{push_backbone_command(backbone)}`, then pass the repository and commit it prints: --backbone_hub_id "
        "<your-name>/<backbone-name> "
        "--backbone_hub_revision <commit>"
    )


TASK_FIELDS_GROUP = "the task's VPTMConfig fields (read by vptm, vpt and vptm_lora)"


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
        build_parser(parser.description, full_help=True).print_help()
        parser.exit()


def build_parser(description: str | None = None, full_help: bool = False) -> HfArgumentParser:
    """The script's parser, `description` (the script's docstring) at the top of its help. Its --help shows the
    project's flags, then Trainer's settings this script changes and the commonly used ones; with `full_help`
    (--help_all) every one of Trainer's settings."""
    parser = HfArgumentParser(
        (ModelArguments, DataTrainingArguments, VPTMTrainingArguments),
        prog="run_classification.py",
        usage="%(prog)s [--method METHOD] [--output_dir DIR] [options]  |  %(prog)s args.json",
        description=description,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--help_all", action=FullHelp, help="Show the help with all of Trainer's settings and exit.")
    # the ~20 fields of the task's config, each with a few lines of help, come last: the method, data and training
    # flags a run usually sets are read first
    task_fields = parser.add_argument_group(TASK_FIELDS_GROUP)
    for group in parser._action_groups:
        moved = [a for a in group._group_actions if a.dest in PROMPT_FIELDS | MASK_FIELDS | VERBALIZER_FIELDS]
        if group is not task_fields and moved:
            group._group_actions[:] = [a for a in group._group_actions if a not in moved]
            task_fields._group_actions.extend(moved)
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


def parse_arguments(
    argv: list[str], description: str | None = None
) -> tuple[ModelArguments, DataTrainingArguments, VPTMTrainingArguments]:
    """The three argument groups from a command line (or one JSON file), with the method's learning rate and the
    device's defaults where not given, the flags the method ignores reported, and a push refused before any work if
    the backbone could not be loaded by others."""
    parser = build_parser(description)
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
        training_args.learning_rate = METHODS[model_args.method].learning_rate
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


__all__ = [
    "DataTrainingArguments",
    "ModelArguments",
    "VPTMTrainingArguments",
    "build_parser",
    "parse_arguments",
]
