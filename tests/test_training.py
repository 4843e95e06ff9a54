"""The training module (modeling_vptm/training/) used from a notebook: VPTMTrainer on the uint8 data path, and the
plain transformers Trainer with the package's collator."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoImageProcessor, Trainer, TrainingArguments

from modeling_vptm import SHIPPED_BACKBONE, VPTMForImageClassification, shipped_backbone_path
from modeling_vptm.data import carve_validation, shipped_dataset
from modeling_vptm.training import PixelValuesCollator, VPTMTrainer, label_names, prepare_images


@pytest.fixture(scope="module")
def small_data():
    """40 training and 24 test images of the shipped subset, decoded once."""
    dataset = shipped_dataset()
    dataset["train"] = dataset["train"].shuffle(seed=0).select(range(40))
    dataset["test"] = dataset["test"].shuffle(seed=0).select(range(24))
    processor = AutoImageProcessor.from_pretrained(shipped_backbone_path(SHIPPED_BACKBONE))
    images, transform = prepare_images(processor, dataset, shift=2)
    return dataset, processor, images, transform


def arguments(folder, **overrides) -> TrainingArguments:
    fields = dict(num_train_epochs=1, per_device_train_batch_size=8, per_device_eval_batch_size=16, learning_rate=1e-2,
                  save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)  # fmt: skip
    return TrainingArguments(str(folder), **{**fields, **overrides})


def model_for(dataset) -> VPTMForImageClassification:
    torch.manual_seed(0)
    return VPTMForImageClassification.from_backbone(
        SHIPPED_BACKBONE, id2label=dict(enumerate(label_names(dataset))), prompt_length=2
    )


def test_prepare_images_keeps_uint8_and_the_transform_normalises_as_the_processor(small_data):
    dataset, processor, images, transform = small_data
    assert set(images) == {"train", "test"} and len(images["train"]) == 40 and len(images["test"]) == 24
    example = images["test"][0]
    assert example["pixel_values"].dtype.name == "uint8" and example["pixel_values"].shape == (3, 28, 28)
    batch = PixelValuesCollator(transform)([images["test"][i] for i in range(4)])
    assert batch["pixel_values"].dtype == torch.float32 and batch["labels"].tolist() == [
        images["test"][i]["labels"] for i in range(4)
    ]
    expected = processor([dataset["test"][i]["image"] for i in range(4)], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch["pixel_values"], expected, atol=1e-5, rtol=1e-5)
    assert label_names(dataset)[:2] == ["T-shirt/top", "Trouser"]


def test_vptm_trainer_trains_only_the_task_and_saves_a_prompt_checkpoint(small_data, tmp_path):
    dataset, processor, images, transform = small_data
    model = model_for(dataset)
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    task = {k: v.clone() for k, v in model.task_state_dict().items()}
    splits = {"train_dataset": images["train"], "eval_dataset": images["test"]}
    trainer = VPTMTrainer(model=model, args=arguments(tmp_path), image_transform=transform, processing_class=processor,
                          **splits)  # fmt: skip
    trainer.train()
    metrics = trainer.evaluate()
    assert 0 <= metrics["eval_accuracy"] <= 1 and "eval_loss" in metrics  # accuracy without asking
    assert all(torch.equal(v, backbone[k]) for k, v in model.backbone.state_dict().items())
    assert any(not torch.equal(v, task[k]) for k, v in model.task_state_dict().items())
    trainer.save_model()
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(os.listdir(tmp_path))
    assert os.path.getsize(tmp_path / "model.safetensors") < 100_000  # the task only, not the backbone
    reloaded = VPTMForImageClassification.from_pretrained(tmp_path)
    pixels = PixelValuesCollator(transform)([images["test"][i] for i in range(4)])["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).logits, model.eval()(pixels).logits)


def test_the_plain_trainer_trains_with_the_packages_collator(small_data, tmp_path):
    dataset, _, images, transform = small_data
    model = model_for(dataset)
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    prompts = model.task.prompt_embeddings.prompts.detach().clone()
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=images["train"],
                      eval_dataset=images["test"], data_collator=PixelValuesCollator(transform))  # fmt: skip
    result = trainer.train()
    assert result.global_step == 5 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(model.task.prompt_embeddings.prompts, prompts)
    assert all(torch.equal(v, backbone[k]) for k, v in model.backbone.state_dict().items())
    assert "eval_loss" in trainer.evaluate()


def test_a_validation_split_is_carved_from_train_only():
    dataset = shipped_dataset()
    carved = carve_validation(dataset, 0.2, seed=3)
    assert len(carved["validation"]) == 200 and len(carved["train"]) == 800
    counts = torch.bincount(torch.tensor(carved["validation"]["label"]), minlength=10)
    assert counts.tolist() == [20] * 10  # stratified
    assert carve_validation(dataset, 0.2, seed=3)["validation"]["label"] == carved["validation"]["label"]
