"""The verbalizer's training terms and read-outs: ProtoVerb's two contrastive losses against values worked out by
hand, the ensemble of the token and hidden-state paths, and class-mean prototypes for every read-out."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_beit_config
from torch.nn import functional as F

from modeling_vptm import VPTMConfig, VPTMForImageClassification
from modeling_vptm.prompted_backbone import PromptedBackboneOutput
from modeling_vptm.vptm_task import instance_contrastive_loss, prototype_contrastive_loss, standardize_class_logits


def vptm_model(seed: int = 0, **fields) -> VPTMForImageClassification:
    base = tiny_beit_config().to_dict()
    base.update(num_labels=4, prompt_length=3)
    base.update(fields)
    torch.manual_seed(seed)
    return VPTMForImageClassification(VPTMConfig(**base)).eval()


def unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


# ------------------------------------------------------------------------------------------- contrastive terms
def test_prototype_contrastive_loss_by_hand():
    cosine = torch.tensor([[0.5, -0.5, 0.0], [0.2, 0.8, -1.0]])
    labels = torch.tensor([0, 2])
    t = 0.5
    expected = (
        -math.log(math.exp(0.5 / t) / (math.exp(0.5 / t) + math.exp(-0.5 / t) + math.exp(0.0)))
        - math.log(math.exp(-1.0 / t) / (math.exp(0.2 / t) + math.exp(0.8 / t) + math.exp(-1.0 / t)))
    ) / 2
    assert prototype_contrastive_loss(cosine, labels, t).item() == pytest.approx(expected, rel=1e-6)


def test_instance_contrastive_loss_by_hand():
    # four instances in the plane, classes [0, 0, 1, 2]: the only positive pairs are (0, 1) and (1, 0)
    features = unit([1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0])
    labels = torch.tensor([0, 0, 1, 2])
    t = 1.0
    cos = (features @ features.T).tolist()

    def pair(i, j):  # -log(e_ij / (e_ij + sum over the other classes' instances of e_ik))
        negatives = sum(math.exp(cos[i][k] / t) for k in range(4) if labels[k] != labels[i])
        return -math.log(math.exp(cos[i][j] / t) / (math.exp(cos[i][j] / t) + negatives))

    expected = (pair(0, 1) + pair(1, 0)) / 2
    assert instance_contrastive_loss(features, labels, t).item() == pytest.approx(expected, rel=1e-6)
    # the other positives are not in the denominator: a third instance of class 0 leaves pair (0, 1) unchanged
    assert pair(0, 1) == pytest.approx(
        F.softplus(torch.tensor(math.log(math.exp(cos[0][2]) + math.exp(cos[0][3])) - cos[0][1])).item(), rel=1e-6
    )


def test_instance_contrastive_loss_without_pairs_is_zero_and_keeps_the_graph():
    features = unit([1.0, 0.0], [0.0, 1.0]).requires_grad_()
    loss = instance_contrastive_loss(features, torch.tensor([0, 1]), 1.0)
    assert loss.item() == 0.0 and loss.requires_grad
    # one class only: pairs but no negatives, so each term is -log(1) = 0
    assert instance_contrastive_loss(features, torch.tensor([3, 3]), 1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_loss_in_forward_is_cross_entropy_plus_weighted_terms(pixel_values):
    weights = dict(prototype_contrastive_weight=0.3, instance_contrastive_weight=0.7, contrastive_temperature=0.5)
    model = vptm_model(head_input="hidden", **weights)
    labels = torch.tensor([0, 0, 2])
    out = model(pixel_values, labels=labels)
    head = model.task(model.forward_features(pixel_values), labels)
    torch.testing.assert_close(out.loss, head.loss)
    (projected,), (cosine,) = head.projected, head.prototype_cosine
    expected = (
        F.cross_entropy(head.logits, labels)
        + 0.3 * prototype_contrastive_loss(cosine, labels, 0.5)
        + 0.7 * instance_contrastive_loss(projected, labels, 0.5)
    )
    torch.testing.assert_close(out.loss, expected)
    plain = vptm_model(head_input="hidden", instance_contrastive_weight=0.0)(pixel_values, labels=labels)
    torch.testing.assert_close(plain.loss, F.cross_entropy(plain.logits, labels))
    assert out.loss > plain.loss  # the same weights (same seed), plus two positive terms


def test_legacy_contrastive_weight_is_the_instance_weight():
    config = VPTMConfig(**{**tiny_beit_config().to_dict(), "num_labels": 2, "contrastive_weight": 0.5})
    assert config.instance_contrastive_weight == 0.5 and not hasattr(config, "contrastive_weight")


# ---------------------------------------------------------------------------------------------------- ensemble
def test_ensemble_averages_the_standardised_class_logits_of_both_paths(pixel_values):
    model = vptm_model(head_input="ensemble", num_labels=5)
    assert model.task.verbalizer.projection.in_features == 37  # the MIM logits over the visual vocabulary
    assert model.task.hidden_verbalizer.projection.in_features == 24  # the [MASK] hidden state
    out = model(pixel_values)
    normed = out.readout_hidden_state
    token = model.task.verbalizer(out.visual_token_logits)[0]
    hidden = model.task.hidden_verbalizer(normed)[0]

    def zscore(logits):  # by hand: zero mean, unit (biased) variance over the classes of each image
        centred = logits - logits.mean(-1, keepdim=True)
        return centred / (centred.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()

    torch.testing.assert_close(out.logits, (zscore(token) + zscore(hidden)) / 2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits.mean(-1), torch.zeros(3), atol=1e-5, rtol=0)
    labels = torch.tensor([0, 4, 2])
    expected = (F.cross_entropy(token, labels) + F.cross_entropy(hidden, labels)) / 2  # each path's own loss
    torch.testing.assert_close(model(pixel_values, labels=labels).loss, expected)


def test_standardised_logits_ignore_offset_and_scale():
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    # equal up to the variance epsilon (1e-5) that keeps a one-class task finite
    torch.testing.assert_close(
        standardize_class_logits(3 * logits - 7), standardize_class_logits(logits), atol=1e-4, rtol=0
    )


def test_ensemble_checkpoint_holds_both_verbalizers(backbone_dir, pixel_values, tmp_path):
    model = VPTMForImageClassification.from_backbone(backbone_dir, num_labels=3, head_input="ensemble")
    keys = set(model.task_state_dict())
    assert {
        "verbalizer.projection.weight",
        "hidden_verbalizer.projection.weight",
        "hidden_verbalizer.prototypes",
    } <= keys
    with torch.no_grad():
        model.task.hidden_verbalizer.prototypes.add_(1.0)  # as if trained
    model.save_pretrained(tmp_path / "ensemble")
    again = VPTMForImageClassification.from_pretrained(tmp_path / "ensemble")
    with torch.no_grad():
        torch.testing.assert_close(again(pixel_values).logits, model.eval()(pixel_values).logits)


# ------------------------------------------------------------------------------------------ class-mean prototypes
@pytest.mark.parametrize("head_input", ["logits", "normalized_logits", "probs", "hidden", "ensemble"])
def test_class_mean_prototypes_are_the_features_forward_scores(head_input, pixel_values):
    model = vptm_model(head_input=head_input, num_labels=3)
    images = torch.cat([pixel_values, pixel_values[:1] * -1.5])
    labels = torch.tensor([0, 1, 2, 0])
    model.initialize_prototypes([(images, labels)])
    with torch.no_grad():
        head = model.task(model.forward_features(images))
    verbalizers = [model.task.verbalizer] + ([model.task.hidden_verbalizer] if head_input == "ensemble" else [])
    assert len(head.projected) == len(verbalizers)
    for verbalizer, projected in zip(verbalizers, head.projected, strict=True):
        expected = torch.stack([projected[[0, 3]].mean(0), projected[1], projected[2]])
        torch.testing.assert_close(verbalizer.prototypes, expected, atol=1e-5, rtol=1e-5)


def test_a_linear_task_head_has_one_path_and_plain_cross_entropy():
    model = vptm_model(classifier="linear_mask", head_input="hidden")
    normed = torch.randn(2, 24)
    readout = PromptedBackboneOutput(readout_hidden_state=normed, visual_token_logits=model.backbone.lm_head(normed))
    head = model.task(readout, torch.tensor([0, 1]))
    torch.testing.assert_close(head.logits, model.task.classifier(normed))
    assert head.path_logits == (head.logits,) and head.projected == ()
    torch.testing.assert_close(head.loss, F.cross_entropy(head.logits, torch.tensor([0, 1])))


# ---------------------------------------------------------------------------------- the numpy copy of the heads
NUMPY_HEADS = {  # every head VPTMTask has, by classifier and read-out
    "hidden": {},
    "hidden-3-per-class": dict(prototypes_per_class=3),
    "logits": dict(head_input="logits"),
    "normalized-logits": dict(head_input="normalized_logits"),
    "probs": dict(head_input="probs"),
    "ensemble": dict(head_input="ensemble"),
    "linear-mask-logits": dict(classifier="linear_mask", head_input="logits"),
    "linear-mask-hidden": dict(classifier="linear_mask", head_input="hidden"),
    "linear-cls": dict(classifier="linear_cls"),
}


@pytest.mark.parametrize("fields", NUMPY_HEADS.values(), ids=NUMPY_HEADS)
def test_the_numpy_heads_of_the_exported_runtime_equal_the_task_heads(fields, tmp_path):
    """The ONNX runtime runs the task heads in numpy (without torch); they must give the logits VPTMTask gives."""
    from modeling_vptm.deploy.onnx_export import write_task
    from modeling_vptm.standalone.onnx_runtime import TaskHead

    model = vptm_model(seed=2, **fields)
    with torch.no_grad():
        for p in model.task.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # trained-looking, every tensor matters
    write_task(str(tmp_path), model)
    generator = torch.Generator().manual_seed(3)
    readout = PromptedBackboneOutput(
        readout_hidden_state=torch.randn(5, model.config.hidden_size, generator=generator),
        visual_token_logits=torch.randn(5, model.config.vocab_size, generator=generator) * 3,
    )
    with torch.no_grad():
        expected = model.task(readout).logits.numpy()
    got = TaskHead(str(tmp_path))(readout.readout_hidden_state.numpy(), readout.visual_token_logits.numpy())
    assert got.shape == expected.shape == (5, 4)
    torch.testing.assert_close(torch.from_numpy(got).float(), torch.from_numpy(expected), atol=1e-5, rtol=1e-5)
