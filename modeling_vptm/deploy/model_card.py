"""The model card of a checkpoint trained with vptm, built with `huggingface_hub`'s `ModelCard` and `ModelCardData`.

The metadata follows the Hub's rules: `base_model` and `datasets` name only what the Hub can resolve (a Hub id, not
a packaged `vptm:` name or a local folder), with `base_model_relation: adapter` for prompt-only checkpoints, and
one `EvalResult` per metric.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..hub_names import is_hub_id
from ..shipped import SHIPPED_PREFIX
from ..training.methods import METHODS


TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates", "prompt_checkpoint_card.md")

METRIC_TITLES = {"accuracy": "Accuracy", "f1": "Macro F1", "precision": "Macro precision", "recall": "Macro recall"}
LICENSE = "mit"  # the license vptm is released under; change the card's if your data or backbone need another


@dataclass
class CardInfo:
    """What a card says about one trained checkpoint."""

    model_name: str
    method: str
    backbone: str
    backbone_revision: str | None
    dataset: str
    eval_split: str
    eval_images: int
    train_images: int
    labels: list[str]
    metrics: dict[str, float]
    trainable_parameters: int
    total_parameters: int
    checkpoint_bytes: int
    train_seconds: float
    device: str
    arguments: str
    repo_id: str
    revision: str = "<commit>"
    versions: dict[str, str] = field(default_factory=dict)


def prompt_checkpoint_card(info: CardInfo):
    """A `huggingface_hub.ModelCard` for the checkpoint `info` describes."""
    from huggingface_hub import ModelCard

    return ModelCard.from_template(card_data(info), template_path=TEMPLATE, **card_texts(info))


def card_data(info: CardInfo):
    """The card's metadata: what the Hub indexes (library, base model and relation, datasets, eval results)."""
    from huggingface_hub import EvalResult, ModelCardData

    backbone_on_hub = is_hub_id(info.backbone)
    results = [
        EvalResult(
            task_type="image-classification", task_name="Image Classification", dataset_type=info.dataset,
            dataset_name=info.dataset, dataset_split=info.eval_split, metric_type=name, metric_value=round(value, 4),
            metric_name=METRIC_TITLES.get(name, name),
        )
        for name, value in info.metrics.items()
    ]  # fmt: skip
    tags = ["vptm", "visual-prompt-tuning", info.method.replace("_", "-")]
    tags += ["peft", "lora"] if info.method in ("lora", "vptm_lora") else []
    return ModelCardData(
        license=LICENSE,
        library_name="peft" if METHODS[info.method].peft else "transformers",
        pipeline_tag="image-classification",
        tags=list(dict.fromkeys(tags)),
        base_model=info.backbone if backbone_on_hub else None,
        base_model_relation=("finetune" if info.method == "full" else "adapter") if backbone_on_hub else None,
        datasets=[info.dataset] if is_hub_id(info.dataset) and info.dataset != "imagefolder" else None,
        metrics=list(info.metrics),
        model_name=info.model_name,
        eval_results=results,
    )


def card_texts(info: CardInfo) -> dict[str, str]:
    """The values the card's template fills in."""
    if info.backbone.startswith(SHIPPED_PREFIX):
        where = "packaged with vptm, so it loads offline wherever the package is installed"
    elif is_hub_id(info.backbone):
        where = f"Hub repository, revision `{info.backbone_revision or 'main'}`"
    else:
        where = "a local folder: share it on the Hub and retrain, or others cannot load this checkpoint"
    adapter = METHODS[info.method].peft_classifier
    check = "the adapter is trained for exactly those weights" if adapter else "loading checks its fingerprint"
    return dict(
        model_name=info.model_name, method=info.method, method_title=METHODS[info.method].title,
        backbone=info.backbone, backbone_where=where, contents=card_contents(info),
        metric_header=" | ".join(METRIC_TITLES.get(name, name) for name in info.metrics),
        metric_rule="---|" * len(info.metrics),
        metric_values=" | ".join(f"{value:.4f}" for value in info.metrics.values()),
        eval_split=info.eval_split, eval_images=f"{info.eval_images:,d}", train_images=f"{info.train_images:,d}",
        train_seconds=f"{info.train_seconds:.1f}", device=info.device, repo_id=info.repo_id, revision=info.revision,
        data_note=f"Trained on {info.train_images:,d} images of `{info.dataset}`; accuracy on other data is not "
        "measured here.",
        dataset=info.dataset, labels=", ".join(info.labels), trainable=f"{info.trainable_parameters:,d}",
        total=f"{info.total_parameters:,d}",
        trainable_percent=f"{100 * info.trainable_parameters / info.total_parameters:.3f}",
        versions=", ".join(f"{k} {v}" for k, v in info.versions.items()), arguments=info.arguments,
        backbone_check=f"The prediction depends on the frozen backbone named above: {check}"
        + ("." if adapter else " and refuses other weights."),
        use=USE_SNIPPETS["peft" if adapter else "transformers"].format(repo_id=info.repo_id, revision=info.revision),
    )  # fmt: skip


def card_contents(info: CardInfo) -> str:
    if info.method == "full":
        return f"It holds every weight of the fine-tuned BEiT ({info.trainable_parameters:,d} parameters)."
    if METHODS[info.method].peft_classifier:
        return (
            f"It is a PEFT adapter ({info.trainable_parameters:,d} trainable parameters, {info.checkpoint_bytes:,d} "
            f"bytes): the adapter's tensors and the classification head, on `BeitForImageClassification` built from "
            f"`{info.backbone}`; `config.json` holds the class names."
        )
    return (
        f"It holds only the task's small tensors ({info.trainable_parameters:,d} trainable parameters, "
        f"{info.checkpoint_bytes:,d} bytes); the frozen backbone is rebuilt from `{info.backbone}` when this model is "
        "loaded."
    )


# how a card's "Use" section loads the checkpoint (a vptm_lora folder loads as a prompt checkpoint does, its adapter
# with it)
USE_SNIPPETS = {
    "transformers": """```python
from transformers import AutoModelForImageClassification, pipeline

model = AutoModelForImageClassification.from_pretrained(
    "{repo_id}", trust_remote_code=True, revision="{revision}", code_revision="{revision}"
)
classifier = pipeline("image-classification", model="{repo_id}", trust_remote_code=True, revision="{revision}")
print(classifier("image.png", top_k=3))
```

Pin `revision` (and `code_revision`) to a commit you have read: remote code runs on your machine. With the vptm
package installed (from its repository: `pip install -e .` in a checkout, or the wheel `pip wheel .` builds) and
imported (`import modeling_vptm`), the same calls work without `trust_remote_code`.""",
    "peft": """```python
from transformers import pipeline

classifier = pipeline("image-classification", model="{repo_id}", trust_remote_code=True, revision="{revision}")
print(classifier("image.png", top_k=3))
```

`config.json` holds the class names and maps the Auto classes to `peft_classifier.py`, which builds the base model the
adapter names with those labels and puts the adapter on it with PEFT's own loading (PEFT must be installed). Pin
`revision` to a commit you have read: remote code runs on your machine; with the vptm package installed and imported
(`import modeling_vptm`), no remote code is needed. Without either: `peft.PeftModel.from_pretrained(base,
"{repo_id}")`, where `base` is `BeitForImageClassification.from_pretrained(<the backbone>, id2label=...)` with the
labels of `config.json`.""",
}


__all__ = [
    "CardInfo",
    "LICENSE",
    "prompt_checkpoint_card",
]
