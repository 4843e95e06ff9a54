"""Fine-tunes VPTM, or one of its baselines, for image classification with the Trainer.

Follows transformers' `examples/pytorch/image-classification/run_image_classification.py`. Every method runs on
the same backbone, data pipeline and schedule, so their numbers compare:

* `vptm`: prompts + [MASK] read out through the frozen MIM head and a prototypical verbalizer;
* `vpt`: the same prompts, a linear head on the final CLS state (VPT; shallow or deep via `--prompt_layers`);
* `linear`: frozen backbone, linear head on the final CLS state (linear probe);
* `full`: every backbone weight trained (`BeitForImageClassification` initialised from the MIM checkpoint).

    # the main job: VPTM-deep on the shipped backbone and the shipped 1,000-image Fashion-MNIST subset (offline)
    python examples/run_classification.py --output_dir runs/vptm
    # VPT-shallow on your own image folders, pushed to the Hub
    python examples/run_classification.py --method vpt --prompt_layers shallow --train_dir data/train \
        --validation_dir data/val --output_dir runs/vpt --push_to_hub --hub_model_id me/vpt-mydata
    # any Hub dataset and BEiT MIM backbone
    python examples/run_classification.py --dataset_name cifar10 --image_column_name img \
        --model_name_or_path microsoft/beit-base-patch16-224-pt22k --output_dir runs/cifar
    # several processes (CPU or GPUs)
    torchrun --nproc_per_node 2 examples/run_classification.py --output_dir runs/ddp
    accelerate launch --multi_gpu --num_processes 2 examples/run_classification.py --output_dir runs/ddp

Arguments can also come from one JSON file: `python run_classification.py args.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import torch
from transformers import (
    AutoImageProcessor,
    BeitForImageClassification,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from modeling_vptm import SHIPPED_BACKBONE, VPTMConfig, VPTMForImageClassification  # noqa: E402
from modeling_vptm.evaluation import DEFAULT_METRICS, compute_metrics  # noqa: E402
from modeling_vptm.masking import random_shift_flip  # noqa: E402
from modeling_vptm.modeling_vptm import load_mim_backbone, resolve_backbone_path  # noqa: E402


logger = logging.getLogger(__name__)

METHODS = ("vptm", "vpt", "linear", "full")
SHIPPED_DATASET = "vptm:fashion-mnist-1k"
# the shipped 1,000 training images, evaluated on the 10,000 official test images (Debian dataset-fashion-mnist)
FULL_TEST_DATASET = "vptm:fashion-mnist-1k-test10k"
# a transfer task: scikit-learn's 8x8 handwritten digits, 50 training images per digit, the other 1,297 for test
DIGITS_DATASET = "vptm:digits"
RUN_ARGS_FILE = "vptm_run_args.json"
CARD_TEMPLATE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_cards", "prompt_checkpoint_template.md"
)
METRIC_TITLES = {"accuracy": "Accuracy", "f1": "Macro F1", "precision": "Macro precision", "recall": "Macro recall"}
DEFAULT_LEARNING_RATES = {"vptm": 1e-2, "vpt": 1e-2, "linear": 1e-2, "full": 1e-3}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=SHIPPED_BACKBONE, metadata={"help": "BEiT MIM backbone: Hub id, local folder or vptm:<shipped name>."}
    )
    model_revision: str | None = field(default=None, metadata={"help": "Backbone revision (branch, tag, commit)."})
    cache_dir: str | None = field(default=None)
    token: str | None = field(default=None, metadata={"help": "Hub token (also for --push_to_hub)."})
    method: str = field(default="vptm", metadata={"help": f"One of {METHODS}."})
    # VPTMConfig fields: the defaults are the config's own, so the script and the model cannot drift apart
    prompt_length: int = VPTMConfig.prompt_length
    prompt_layers: str = field(
        default=VPTMConfig.prompt_layers, metadata={"help": "deep, shallow, or block indices like 0,1,2."}
    )
    prompt_init: str = VPTMConfig.prompt_init
    mask_token_mode: str = VPTMConfig.mask_token_mode
    mask_token_position: int | None = VPTMConfig.mask_token_position
    extra_token_bias: str = VPTMConfig.extra_token_bias
    train_mask_token: bool = VPTMConfig.train_mask_token
    verbalizer_input: str = VPTMConfig.verbalizer_input
    prototype_dim: int = VPTMConfig.prototype_dim
    prototypes_per_class: int = VPTMConfig.prototypes_per_class
    logit_scale_init: float = VPTMConfig.logit_scale_init
    learn_logit_scale: bool = VPTMConfig.learn_logit_scale
    prototype_contrastive_weight: float = VPTMConfig.prototype_contrastive_weight
    instance_contrastive_weight: float = VPTMConfig.instance_contrastive_weight
    contrastive_temperature: float = VPTMConfig.contrastive_temperature
    prototype_init: str = field(default="random", metadata={"help": "random or class_mean (one pass over the data)."})
    vptm_head: str = field(
        default="prototypical_verbalizer",
        metadata={"help": "For --method vptm: prototypical_verbalizer, or linear_mask (ablation: a linear head)."},
    )


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(
        default=SHIPPED_DATASET, metadata={"help": f"Hub dataset, or {SHIPPED_DATASET} (shipped, offline)."}
    )
    dataset_config_name: str | None = None
    train_dir: str | None = field(default=None, metadata={"help": "Image folder (one sub-folder per class)."})
    validation_dir: str | None = None
    train_val_split: float = field(default=0.15, metadata={"help": "Held-out fraction if there is no eval split."})
    validation_split: float = field(
        default=0.0,
        metadata={
            "help": "Carve a stratified, seeded validation split of this fraction from train and evaluate on it "
            "instead of the dataset's validation/test split (for choosing hyperparameters; 0: off)."
        },
    )
    validation_split_seed: int = field(default=0, metadata={"help": "Seed of --validation_split."})
    image_column_name: str = "image"
    label_column_name: str = "label"
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    augment_shift: int = field(default=2, metadata={"help": "Random translation in pixels at train time (0: off)."})
    augment_flip: bool = field(default=True, metadata={"help": "Random horizontal flips at train time."})
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


@dataclass
class VPTMTrainingArguments(TrainingArguments):
    """TrainingArguments with defaults for prompt tuning on small data."""

    learning_rate: float = field(default=0.0, metadata={"help": f"0: the method's default {DEFAULT_LEARNING_RATES}."})
    num_train_epochs: float = 30.0
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 256
    weight_decay: float = 1e-4
    warmup_steps: float = 0.1
    lr_scheduler_type: str = "cosine"
    eval_strategy: str = "no"
    save_strategy: str = "epoch"
    save_total_limit: int | None = 1
    logging_steps: float = 10
    remove_unused_columns: bool = False
    dataloader_num_workers: int = 0


# ---------------------------------------------------------------------------------------------------------- data
def load_data(data_args: DataTrainingArguments, model_args: ModelArguments):
    from datasets import DatasetDict, load_dataset

    if data_args.train_dir:
        files = {"train": os.path.join(data_args.train_dir, "**")}
        if data_args.validation_dir:
            files["validation"] = os.path.join(data_args.validation_dir, "**")
        unreadable = check_image_folders(data_args)
        dataset = load_dataset("imagefolder", data_files=files, cache_dir=model_args.cache_dir)
        if unreadable:
            dataset = drop_images(dataset, unreadable)
            logger.warning("skipped %d unreadable image(s)", len(unreadable))
    elif data_args.dataset_name == SHIPPED_DATASET:
        from modeling_vptm.data import shipped_dataset

        dataset = shipped_dataset()
    elif data_args.dataset_name == FULL_TEST_DATASET:
        from datasets import DatasetDict

        from modeling_vptm.data import fashion_mnist_dataset, shipped_dataset

        dataset = DatasetDict(train=shipped_dataset()["train"], test=fashion_mnist_dataset("test"))
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
    eval_split = next((s for s in ("validation", "test") if s in dataset), None)
    if eval_split is None:
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=0)
        dataset, eval_split = DatasetDict(train=split["train"], validation=split["test"]), "validation"
    if data_args.validation_split:
        if not 0 < data_args.validation_split < 1:
            raise ValueError(f"--validation_split must be a fraction in (0, 1), got {data_args.validation_split}")
        dataset, eval_split = carve_validation(dataset, data_args), "validation"
    for name in (data_args.image_column_name, data_args.label_column_name):
        if name not in dataset["train"].column_names:
            raise ValueError(
                f"column {name!r} not found in the dataset; its columns are {dataset['train'].column_names}. Pass "
                "--image_column_name / --label_column_name"
            )
    dataset = dataset.rename_columns(
        {c: n for c, n in ((data_args.image_column_name, "image"), (data_args.label_column_name, "label")) if c != n}
    )
    dataset = DatasetDict(train=dataset["train"], eval=dataset[eval_split])
    if data_args.max_train_samples is not None:
        count = min(data_args.max_train_samples, len(dataset["train"]))
        dataset["train"] = dataset["train"].shuffle(seed=0).select(range(count))
    if data_args.max_eval_samples is not None:
        dataset["eval"] = dataset["eval"].select(range(min(data_args.max_eval_samples, len(dataset["eval"]))))
    return dataset, eval_split


def carve_validation(dataset, data_args: DataTrainingArguments):
    """Train minus a stratified, seeded validation split of it; the test split is left out of the run."""
    from datasets import ClassLabel, DatasetDict

    train = dataset["train"]
    label = data_args.label_column_name
    if label not in train.column_names:
        raise ValueError(f"column {label!r} not found in the dataset; its columns are {train.column_names}")
    if not isinstance(train.features[label], ClassLabel):
        train = train.class_encode_column(label)
    split = train.train_test_split(
        test_size=data_args.validation_split, seed=data_args.validation_split_seed, stratify_by_column=label
    )
    return DatasetDict(train=split["train"], validation=split["test"])


def check_image_folders(data_args: DataTrainingArguments) -> set[str]:
    """Refuses folders with no images or one class; unreadable files fail, or are returned to be skipped."""
    from PIL import Image, UnidentifiedImageError

    unreadable: set[str] = set()
    extensions = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
    for folder in filter(None, (data_args.train_dir, data_args.validation_dir)):
        if not os.path.isdir(folder):
            raise ValueError(f"image folder {folder} does not exist")
        classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
        images = [
            os.path.join(root, f)
            for root, _, names in os.walk(folder)
            for f in names
            if os.path.splitext(f)[1].lower() in extensions
        ]
        if not images:
            raise ValueError(f"image folder {folder} holds no images (looked for {sorted(extensions)})")
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


def build_transforms(processor, data_args: DataTrainingArguments, label_names: list[str], dataset):
    feature = dataset["train"].features["label"]
    to_index = (
        None if hasattr(feature, "names") else {v: i for i, v in enumerate(sorted(set(dataset["train"]["label"])))}
    )

    def prepare(batch, train: bool):
        images = [image.convert("RGB") for image in batch["image"]]
        pixel_values = processor(images, return_tensors="pt")["pixel_values"]
        if train and (data_args.augment_shift or data_args.augment_flip):
            # per-image shift/flip drawn from the global torch RNG: Trainer seeds it and restores it on resume
            pixel_values = random_shift_flip(pixel_values, data_args.augment_shift, data_args.augment_flip, None)
        labels = batch["label"] if to_index is None else [to_index[v] for v in batch["label"]]
        return {"pixel_values": list(pixel_values), "labels": labels}

    return (lambda b: prepare(b, True)), (lambda b: prepare(b, False))


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long),
    }


# --------------------------------------------------------------------------------------------------------- model
def build_model(model_args: ModelArguments, id2label: dict[int, str]):
    if model_args.method not in METHODS:
        raise ValueError(f"--method must be one of {list(METHODS)}, got {model_args.method!r}")
    hub = {"revision": model_args.model_revision, "cache_dir": model_args.cache_dir, "token": model_args.token}
    if model_args.method == "full":
        mim = load_mim_backbone(model_args.model_name_or_path, **hub)  # refuses non-MIM checkpoints
        config = mim.config
        config.update(
            {"num_labels": len(id2label), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
        )
        model = BeitForImageClassification(config)
        model.beit.load_state_dict(mim.beit.state_dict(), strict=False)  # the new pooler/classifier stay fresh
        return model
    layers = model_args.prompt_layers
    if layers not in ("deep", "shallow"):
        try:
            layers = [int(i) for i in layers.split(",") if i.strip()]
        except ValueError as error:
            raise ValueError(f"--prompt_layers must be deep, shallow or indices like 0,1,2; got {layers!r}") from error
    fields = {f.name: getattr(model_args, f.name) for f in dataclasses.fields(model_args)}
    not_config = (
        "model_name_or_path",
        "model_revision",
        "cache_dir",
        "token",
        "method",
        "prototype_init",
        "vptm_head",
    )
    for key in not_config:
        fields.pop(key, None)
    fields["prompt_layers"] = layers
    if model_args.vptm_head not in ("prototypical_verbalizer", "linear_mask"):
        raise ValueError(f"--vptm_head must be prototypical_verbalizer or linear_mask, got {model_args.vptm_head!r}")
    fields["classifier"] = model_args.vptm_head if model_args.method == "vptm" else "linear_cls"
    if model_args.method == "linear":
        fields["prompt_length"] = 0
    return VPTMForImageClassification.from_backbone(
        model_args.model_name_or_path, id2label=id2label, revision=model_args.model_revision,
        cache_dir=model_args.cache_dir, token=model_args.token, **fields,
    )  # fmt: skip


def parameter_counts(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------- run guards
def check_output_dir(output_dir: str, run_args: dict, overwrite: bool) -> str | None:
    """Returns the checkpoint to resume from (same run) or None; refuses a folder that holds a different run."""
    if not os.path.isdir(output_dir) or not os.listdir(output_dir):
        return None
    previous_path = os.path.join(output_dir, RUN_ARGS_FILE)
    previous = json.load(open(previous_path)) if os.path.isfile(previous_path) else None
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
        "token",
        "local_rank",
        "disable_tqdm",
        "metric_names",  # what is reported, not what is trained
    }
    args = {**dataclasses.asdict(model_args), **dataclasses.asdict(data_args)}
    args.update({k: v for k, v in training_args.to_dict().items() if k in ("learning_rate", "num_train_epochs",
                 "per_device_train_batch_size", "weight_decay", "seed", "lr_scheduler_type", "warmup_steps",
                 "max_steps")})  # fmt: skip
    return {k: v for k, v in sorted(args.items()) if k not in ignore and not k.startswith("_")}


# ---------------------------------------------------------------------------------------------------- model card
def write_model_card(output_dir: str, info: dict) -> None:
    import yaml

    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "image-classification",
        "base_model": info["backbone"],
        "datasets": [info["dataset"]],
        "tags": ["vptm", "visual-prompt-tuning", info["method"]],
        "metrics": list(info["metrics"]),
        "model-index": [{
            "name": info["model_name"],
            "results": [{
                "task": {"type": "image-classification", "name": "Image Classification"},
                "dataset": {"name": info["dataset"], "type": info["dataset"], "split": info["eval_split"]},
                "metrics": [{"type": name, "value": round(value, 4), "name": METRIC_TITLES.get(name, name)}
                            for name, value in info["metrics"].items() if isinstance(value, (int, float))],
            }],
        }],
    }  # fmt: skip
    template = open(CARD_TEMPLATE).read()
    text = template.format(metadata=yaml.safe_dump(metadata, sort_keys=False).strip(), **info)
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        f.write(text)


def push_folder(folder: str, repo_id: str, token: str | None, files: list[str]) -> str:
    """Uploads exactly `files` of `folder` (the prompt checkpoint, code, processor and card) to `repo_id`."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=folder, allow_patterns=files, commit_message="Upload VPTM prompt checkpoint"
    )
    return getattr(commit, "oid", None) or "main"


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, VPTMTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if model_args.method not in METHODS:
        raise ValueError(f"--method must be one of {list(METHODS)}, got {model_args.method!r}")
    if model_args.prototype_init not in ("random", "class_mean"):
        raise ValueError(f"--prototype_init must be random or class_mean, got {model_args.prototype_init!r}")
    if training_args.learning_rate == 0:
        training_args.learning_rate = DEFAULT_LEARNING_RATES[model_args.method]
    # we push the final, prompt-only folder ourselves: Trainer would also push checkpoints and its own card
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    training_args.remove_unused_columns = False
    set_seed(training_args.seed)

    run_args = run_arguments(model_args, data_args, training_args)
    # the main process checks (and, if asked, clears) output_dir first; the others then find it as it left it
    with training_args.main_process_first(desc="checking output_dir"):
        last = check_output_dir(training_args.output_dir, run_args, data_args.overwrite_output_dir)
    resume = training_args.resume_from_checkpoint or last

    dataset, eval_split = load_data(data_args, model_args)
    label_names = labels_of(dataset)
    id2label = dict(enumerate(label_names))
    model = build_model(model_args, id2label)
    processor = AutoImageProcessor.from_pretrained(
        resolve_backbone_path(model_args.model_name_or_path), revision=model_args.model_revision,
        cache_dir=model_args.cache_dir, token=model_args.token,
    )  # fmt: skip
    train_transform, eval_transform = build_transforms(processor, data_args, label_names, dataset)
    train_data = dataset["train"].with_transform(train_transform)
    eval_data = dataset["eval"].with_transform(eval_transform)

    if model_args.prototype_init == "class_mean":
        if model_args.method != "vptm":
            raise ValueError(f"--prototype_init class_mean needs --method vptm, got {model_args.method!r}")
        plain = dataset["train"].with_transform(eval_transform)
        loader = torch.utils.data.DataLoader(plain, batch_size=64, collate_fn=collate)
        model.initialize_prototypes(loader)

    trainable, total = parameter_counts(model)
    logger.info("method %s: %s trainable of %s parameters", model_args.method, f"{trainable:,d}", f"{total:,d}")
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_data, eval_dataset=eval_data,
        data_collator=collate, compute_metrics=compute_metrics(data_args.metric_names),
    )  # fmt: skip
    if trainer.is_world_process_zero():
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, RUN_ARGS_FILE), "w") as f:
            json.dump(run_args, f, indent=2, sort_keys=True)
    start = time.perf_counter()
    train_result = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - start
    metrics = trainer.evaluate(eval_data, metric_key_prefix="eval")
    trainer.save_model()  # prompt-only for vptm/vpt/linear (VPTMForImageClassification.save_pretrained)
    trainer.log_metrics("train", train_result.metrics)
    trainer.log_metrics("eval", metrics)
    # train_results.json, eval_results.json and trainer_state.json beside the checkpoint; all_results.json is ours
    trainer.save_metrics("train", train_result.metrics, combined=False)
    trainer.save_metrics("eval", metrics, combined=False)
    trainer.save_state()
    scores = {name: metrics[f"eval_{name}"] for name in data_args.metric_names if f"eval_{name}" in metrics}

    results = {
        "method": model_args.method,
        "accuracy": metrics["eval_accuracy"],
        "metrics": scores,
        "eval_split": eval_split,
        "eval_images": len(eval_data),
        "train_images": len(train_data),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "train_loss": train_result.training_loss,
        "train_seconds": round(train_seconds, 1),
    }
    if trainer.is_world_process_zero():
        out = training_args.output_dir
        processor.save_pretrained(out)
        weights = os.path.join(out, "model.safetensors")
        results["checkpoint_bytes"] = os.path.getsize(weights) if os.path.isfile(weights) else 0
        device = (
            torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
        )
        repo_id = training_args.hub_model_id or os.path.basename(os.path.abspath(out))
        card = dict(
            results,
            model_name=os.path.basename(os.path.abspath(out)),
            method_title={"vptm": "VPTM", "vpt": "VPT", "linear": "linear-probe", "full": "fully fine-tuned"}[
                model_args.method
            ],
            backbone=model_args.model_name_or_path,
            backbone_revision=model_args.model_revision or "main",
            dataset=data_args.dataset_name if not data_args.train_dir else "imagefolder",
            labels=", ".join(label_names),
            trainable_percent=100 * trainable / total,
            device=device,
            repo_id=repo_id,
            revision="<commit>",
            contents=(
                f"It holds every weight of the fine-tuned BEiT ({trainable:,d} parameters, "
                f"{results['checkpoint_bytes']:,d} bytes)."
                if model_args.method == "full"
                else f"It holds only the task's small tensors ({trainable:,d} trainable parameters, "
                f"{results['checkpoint_bytes']:,d} bytes); the frozen backbone is loaded from its own repository "
                "when this model is loaded."
            ),
            arguments=json.dumps(run_args, indent=2, sort_keys=True),
            metric_header=" | ".join(METRIC_TITLES.get(name, name) for name in scores),
            metric_rule="---|" * len(scores),
            metric_values=" | ".join(f"{value:.4f}" for value in scores.values()),
        )
        write_model_card(out, card)
        with open(os.path.join(out, "all_results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(
            f"{model_args.method}: eval accuracy {results['accuracy']:.4f} on {results['eval_images']} {eval_split} "
            f"images | trainable parameters {trainable:,d} of {total:,d} | checkpoint {results['checkpoint_bytes']:,d}"
            f" bytes | {train_seconds:.1f} s"
        )
        if push_to_hub:
            files = [
                f
                for f in os.listdir(out)
                if os.path.isfile(os.path.join(out, f))
                and f != RUN_ARGS_FILE
                and f != "all_results.json"
                and not f.startswith(("training_args", "trainer_state"))
            ]
            results["pushed_files"] = sorted(files)
            token = model_args.token or training_args.hub_token
            commit = push_folder(out, repo_id, token, files)
            # the card's loading snippet pins the commit that holds these files; a second commit adds that card
            write_model_card(out, dict(card, revision=commit))
            push_folder(out, repo_id, token, ["README.md"])
            results["pushed_commit"] = commit
    return results


if __name__ == "__main__":
    main()
