"""Tests of VPTMConfig and VPTMForImageClassification on tiny backbones built in the test."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
from conftest import PROMPT_CHECKPOINT_CODE, REPO_ROOT, make_backbone, tiny_beit_config
from safetensors import safe_open
from transformers import (
    AutoModelForImageClassification,
    BeitConfig,
    BeitForImageClassification,
    BeitForMaskedImageModeling,
)

from modeling_vptm import (
    PrototypicalVerbalizer,
    VPTMConfig,
    VPTMForImageClassification,
    extend_relative_position_bias,
)
from modeling_vptm.prompted_backbone import bias_modules


def vptm_config(**fields) -> VPTMConfig:
    base = tiny_beit_config().to_dict()
    base.update(num_labels=4, prompt_length=3)
    base.update(fields)
    return VPTMConfig(**base)


def from_backbone(backbone_dir, **fields) -> VPTMForImageClassification:
    fields.setdefault("prompt_length", 3)
    return VPTMForImageClassification.from_backbone(backbone_dir, num_labels=4, **fields)


# ------------------------------------------------------------------------------------------------------ config
def test_config_with_no_arguments_is_valid_and_saves(tmp_path):
    """transformers builds `VPTMConfig()` to diff a config against (to_json_string, save_pretrained): every field has
    a working default, including BEiT's use_mask_token, which VPTM's backbones have."""
    config = VPTMConfig()
    assert config.use_mask_token and config.classifier == "prototypical_verbalizer" and config.num_labels == 2
    assert json.loads(config.to_json_string())["model_type"] == "vptm"
    config.save_pretrained(tmp_path)
    assert VPTMConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    # a config built from a BEiT classifier's fields keeps their use_mask_token; only the VPT head can do without
    from_classifier = {**BeitConfig().to_dict(), "classifier": "linear_cls"}
    assert VPTMConfig(**from_classifier).use_mask_token is False
    with pytest.raises(ValueError, match=r"reads the backbone's mask token, so use_mask_token must be True"):
        VPTMConfig(**BeitConfig().to_dict())


@pytest.mark.parametrize(
    "preset, six_blocks, twelve_blocks",
    [
        ("deep", [0, 1, 2, 3, 4, 5], list(range(12))),
        ("shallow", [0], [0]),
        ("first_half", [0, 1, 2], [0, 1, 2, 3, 4, 5]),
        ("second_half", [3, 4, 5], [6, 7, 8, 9, 10, 11]),
        ("every_other", [0, 2, 4], [0, 2, 4, 6, 8, 10]),
    ],
)
def test_prompt_locations_mean_the_same_at_any_depth(preset, six_blocks, twelve_blocks, backbone_dir, pixel_values):
    assert vptm_config(num_hidden_layers=6, prompt_layers=preset).prompted_layers == six_blocks
    assert vptm_config(num_hidden_layers=12, prompt_layers=preset).prompted_layers == twelve_blocks
    # a preset is exactly the list of blocks it names: same tensors, same logits (the tiny backbone has 3 blocks)
    torch.manual_seed(0)
    by_name = from_backbone(backbone_dir, prompt_layers=preset).eval()
    blocks = by_name.config.prompted_layers
    assert by_name.task.prompt_embeddings.prompts.shape[0] == len(blocks)
    torch.manual_seed(0)
    by_list = from_backbone(backbone_dir, prompt_layers=blocks).eval()
    with torch.no_grad():
        torch.testing.assert_close(by_name(pixel_values).logits, by_list(pixel_values).logits)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"prompt_length": -1}, r"prompt_length must be an integer in \[0, 104\] .*, got -1"),
        (
            {"prompt_layers": "middle"},
            r"prompt_layers must be one of \['deep', 'shallow', 'first_half', 'second_half', "
            r"'every_other'\], got 'middle'",
        ),
        ({"prompt_layers": [0, 3]}, r"prompt_layers must be .* in \[0, 3\) .* got \[0, 3\]"),
        ({"prompt_layers": []}, r"prompt_layers must be .*non-empty"),
        ({"prompt_layers": [1, 1]}, r"distinct"),
        ({"mask_token_mode": "insert"}, r"mask_token_mode must be one of \['append', 'replace'\], got 'insert'"),
        ({"mask_token_position": 25}, r"mask_token_position must be a patch index in \[0, 25\).* got 25"),
        ({"extra_token_bias": "learned"}, r"extra_token_bias must be one of"),
        ({"classifier": "mlp"}, r"classifier must be one of .*got 'mlp'"),
        ({"head_input": "features"}, r"head_input must be one of"),
        ({"prototype_dim": 0}, r"prototype_dim must be an integer in \[1, 4096\], got 0"),
        ({"prototypes_per_class": 0}, r"prototypes_per_class must be an integer in \[1, 64\]"),
        ({"logit_scale_init": 0.0}, r"logit_scale_init must be a number > 0"),
        ({"prototype_contrastive_weight": -1.0}, r"prototype_contrastive_weight must be a number >= 0, got -1.0"),
        ({"instance_contrastive_weight": "0.5"}, r"instance_contrastive_weight must be a number >= 0, got '0.5'"),
        ({"contrastive_temperature": 0}, r"contrastive_temperature must be a number > 0"),
        (
            {"head_input": "ensemble", "classifier": "linear_mask"},
            r"'ensemble' combines two prototypical verbalizers, so classifier must be 'prototypical_verbalizer', "
            r"got classifier='linear_mask'",
        ),
        ({"prompt_init": "zeros"}, r"prompt_init must be one of \['uniform', 'normal'\]"),
        ({"num_labels": 0}, r"needs 1 to 65,536 labels"),
        ({"use_mask_token": False}, r"use_mask_token must be True"),
    ],
)
def test_config_rejects_invalid_values(fields, message):
    with pytest.raises(ValueError, match=message):
        vptm_config(**fields)


def test_config_round_trip_and_model_type():
    config = vptm_config(prompt_layers=[2, 0], model_type="beit")
    assert config.model_type == "vptm"
    assert config.prompt_layers == [0, 2]
    again = VPTMConfig.from_dict(config.to_dict())
    assert again.prompt_layers == [0, 2] and again.prompt_length == 3 and again.num_labels == 4
    assert vptm_config(prompt_layers="deep").prompted_layers == [0, 1, 2]
    assert vptm_config(prompt_layers="shallow").prompted_layers == [0]
    assert vptm_config(prompt_length=0).prompted_layers == []


# ------------------------------------------------------------------------------------------------ shapes, loss
MODES = [
    dict(zip(("prompt_layers", "mask_token_mode", "classifier", "head_input"), combo, strict=True))
    for combo in itertools.product(
        ("deep", "shallow", [1, 2]),
        ("append", "replace"),
        ("prototypical_verbalizer", "linear_cls", "linear_mask"),
        ("logits", "probs", "hidden", "ensemble"),
    )
    if not (combo[3] == "ensemble" and combo[2] != "prototypical_verbalizer")
]


@pytest.mark.parametrize("fields", MODES, ids=lambda f: "-".join(str(v) for v in f.values()))
def test_every_mode_gives_shapes_and_finite_loss(fields, pixel_values):
    model = VPTMForImageClassification(vptm_config(**fields))
    out = model(pixel_values, labels=torch.tensor([0, 1, 3]))
    assert out.logits.shape == (3, 4)
    assert torch.isfinite(out.loss) and out.loss.ndim == 0
    if fields["classifier"] == "linear_cls":
        assert out.visual_token_logits is None
    else:
        assert out.visual_token_logits.shape == (3, 37)
    assert out.readout_hidden_state.shape == (3, 24)


@pytest.mark.parametrize(
    "fields",
    [
        dict(prompt_length=0),
        dict(train_mask_token=True),
        dict(train_mask_token=True, mask_token_mode="replace", mask_token_position=0),
        dict(extra_token_bias="zero"),
        dict(prototypes_per_class=3, prototype_dim=5, prototype_contrastive_weight=0.5, instance_contrastive_weight=1),
        dict(head_input="ensemble", prototype_contrastive_weight=1.0, instance_contrastive_weight=1.0),
        dict(learn_logit_scale=False, prompt_init="normal"),
    ],
)
def test_other_options_give_finite_loss(fields, pixel_values):
    model = VPTMForImageClassification(vptm_config(**fields))
    out = model(pixel_values, labels=torch.tensor([0, 1, 1]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    # every trainable tensor gets a finite gradient, and the frozen backbone none
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        else:
            assert parameter.grad is None, name
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and trained <= {
        "task." + name for name in model.task_state_dict()
    }  # only task tensors train, and all are saved


@pytest.mark.parametrize(
    "fields",
    [
        dict(),
        dict(classifier="linear_cls", prompt_layers="first_half"),
        dict(head_input="ensemble", prototype_contrastive_weight=1.0, instance_contrastive_weight=1.0),
        dict(train_mask_token=True, mask_token_mode="replace"),
    ],
)
def test_training_and_serving_never_wait_for_the_device(fields, monkeypatch):
    # On a GPU every read of a device value on the host (a bool of a tensor, .item(), a boolean-mask index) stalls
    # the queue of kernels. Meta tensors have no values, so any such read fails here: the training step and the
    # multi-task server must run on them, apart from the one documented read that checks a training batch.
    from modeling_vptm import VPTMTask
    from modeling_vptm.data import ImageBatchTransform
    from modeling_vptm.serving import MultiTaskVPTM

    config = vptm_config(**fields)
    with torch.device("meta"):
        model = VPTMForImageClassification(config).train()
        pixels = torch.zeros(4, 3, 20, 20, dtype=torch.uint8)
        labels = torch.tensor([0, 0, 1, 1])
        other = VPTMTask(config)
    monkeypatch.setattr(
        "modeling_vptm.modeling_vptm.check_training_batch", lambda pixel_values, labels, num_labels: None
    )
    pixel_values = ImageBatchTransform([0.5] * 3, [0.25] * 3, crop_scale=0.5, shift=2, flip=True)(pixels, train=True)
    out = model(pixel_values, labels=labels)
    out.loss.backward()
    assert (
        out.loss.device.type == "meta"
        and model.task.state_dict()
        and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    )
    model.backbone.loaded_fingerprint = "of no values"  # hashing the weights would read them
    server = MultiTaskVPTM(None, backbone=model.backbone)
    server.tasks.update({"mine": model.task, "other": other})  # add_task copies values, which meta tensors do not have
    predictions = server.predict(pixel_values, ["other", "mine", "other", "mine"], output_readout_attention=True)
    assert [p.logits.shape for p in predictions] == [(4,)] * 4


@pytest.mark.parametrize("prompt_layers, lengths", [([1], [27, 27, 30, 30]), ([0], [30, 30, 30, 30])])
def test_output_hidden_states_has_prompted_sequence(pixel_values, prompt_layers, lengths):
    """The input of the first block, as that block sees it, then each block's output: CLS + MASK + 25 patches before
    the first prompted block, 3 prompts more from it on (the input of block 0 has them when block 0 is prompted)."""
    model = VPTMForImageClassification(vptm_config(prompt_layers=prompt_layers))
    out = model(pixel_values, output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == lengths


# --------------------------------------------------------------------------------------------- training state
def test_only_task_parameters_train_and_backbone_is_bit_identical(backbone_dir, pixel_values):
    model = from_backbone(backbone_dir, train_mask_token=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "task.prompt_embeddings.prompts",
        "task.trainable_mask_token",
        "task.verbalizer.projection.weight",
        "task.verbalizer.prototypes",
        "task.verbalizer.logit_scale",
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    model.train()
    labels = torch.tensor([0, 1, 2])
    for _ in range(3):
        model(pixel_values, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    for name, tensor in after.items():
        if name.startswith("backbone."):
            assert torch.equal(tensor, before[name]), name
        else:
            assert not torch.equal(tensor, before[name]), f"{name} did not change"
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_backbone_stays_in_eval_mode(backbone_dir, pixel_values):
    model = from_backbone(backbone_dir)  # the tiny backbone has drop_path_rate=0.1
    model.train()
    assert model.training and not model.backbone.beit.training and not model.backbone.lm_head.training
    assert all(not m.training for m in model.backbone.beit.modules())
    first, second = model(pixel_values).logits, model(pixel_values).logits
    assert torch.equal(first, second)  # no stochastic depth or dropout inside the backbone
    holder = torch.nn.ModuleList([model.backbone])  # whatever holds the backbone, training it leaves it in eval
    holder.train()
    assert not any(m.training for m in model.backbone.modules())


def test_trainable_parameter_count(backbone_dir, capsys):
    model = from_backbone(backbone_dir, prompt_length=3, prototype_dim=5)
    trainable, total = model.get_nb_trainable_parameters()
    # prompts in the first half of the 3 blocks (block 0) x 3 x 24, projection 24 x 5 (from the hidden state),
    # prototypes 4 x 5, scale 1
    assert model.config.prompted_layers == [0]
    assert trainable == 1 * 3 * 24 + 24 * 5 + 4 * 5 + 1
    assert total == trainable + sum(p.numel() for p in model.backbone.beit.parameters()) + 24 * 2 + 24 * 37 + 37
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,d}" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("position", [0, 7, 24])
def test_replace_mode_without_prompts_matches_beit_mim(backbone_dir, backbone, pixel_values, position):
    model = from_backbone(backbone_dir, prompt_length=0, mask_token_mode="replace", mask_token_position=position)
    model.eval()
    bool_masked_pos = torch.zeros(3, 25, dtype=torch.bool)
    bool_masked_pos[:, position] = True
    with torch.no_grad():
        reference = backbone(pixel_values, bool_masked_pos=bool_masked_pos).logits[:, position]
        ours = model(pixel_values).visual_token_logits
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_extended_bias_keeps_pretrained_block_and_uses_cls_entries(backbone):
    bias = backbone.beit.shared_position_bias((5, 5), dim_size=26)  # (1, heads, 26, 26)
    extended = extend_relative_position_bias(bias, 4, "cls")
    assert extended.shape == (1, 2, 30, 30)
    keep = torch.cat([torch.tensor([0]), torch.arange(5, 30)])
    assert torch.equal(extended[:, :, keep][:, :, :, keep], bias)  # CLS+patch block bit-identical
    for extra in range(1, 5):
        assert torch.equal(extended[:, :, extra, 5:], bias[:, :, 0, 1:])  # added -> patch = CLS -> patch
        assert torch.equal(extended[:, :, 5:, extra], bias[:, :, 1:, 0])  # patch -> added = patch -> CLS
        assert torch.equal(extended[:, :, extra, :5], bias[:, :, 0, :1].expand(-1, -1, 5))  # CLS -> CLS
    zero = extend_relative_position_bias(bias, 4, "zero")
    assert torch.equal(zero[:, :, keep][:, :, :, keep], bias)
    assert zero[:, :, 1:5].abs().sum() == 0 and zero[:, :, :, 1:5].abs().sum() == 0


@pytest.mark.parametrize("mode", ["cls", "zero"])
def test_extended_bias_with_leading_tokens_is_the_permuted_bias(backbone, mode):
    bias = backbone.beit.shared_position_bias((5, 5), dim_size=26)
    after_cls = extend_relative_position_bias(bias, 4, mode)  # [CLS, a0, a1, a2, a3, patches]
    leading = extend_relative_position_bias(bias, 4, mode, leading=3)  # [a0, a1, a2, CLS, a3, patches]
    order = torch.cat([torch.tensor([1, 2, 3, 0, 4]), torch.arange(5, 30)])
    assert torch.equal(leading, after_cls[:, :, order][:, :, :, order])
    with pytest.raises(ValueError, match=r"leading must be in \[0, num_extra=4\], got 5"):
        extend_relative_position_bias(bias, 4, mode, leading=5)


@pytest.mark.parametrize("mode", ["cls", "zero"])
def test_hidden_states_are_in_method_order(pixel_values, mode):
    """Block outputs are reported as [CLS] + P + [MASK] + patches and equal a library BeitLayer run on that order."""
    model = VPTMForImageClassification(vptm_config(prompt_layers=[1, 2], extra_token_bias=mode)).eval()
    with torch.no_grad():
        model.task.prompt_embeddings.prompts.normal_()
        model.backbone.beit.shared_position_bias.relative_position_bias_table.normal_()
        states = model(pixel_values, output_hidden_states=True).hidden_states
        bias = model.backbone.beit.shared_position_bias((5, 5), dim_size=26)
        bias = extend_relative_position_bias(bias, 1 + 3, mode)  # prompts and [MASK] right after CLS
        before = states[1]  # output of block 0: [CLS, MASK, patches]
        for block, (inputs, prompts) in enumerate([(before, 0), (states[2], 1)], start=1):
            rest = inputs[:, 1:] if block == 1 else inputs[:, 4:]  # block 2 overwrites the prompt slots
            sequence = torch.cat(
                [inputs[:, :1], model.task.prompt_embeddings.prompts[prompts].expand(3, -1, -1), rest], 1
            )
            expected = model.backbone.beit.layers[block](sequence, attention_mask=bias)
            torch.testing.assert_close(states[block + 1], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", [0, 12])
def test_readout_attention_matches_beit_attentions_without_prompts(backbone_dir, pixel_values, position):
    """With no prompts and [MASK] in place of a patch, the sequence is BEiT's own: the read-out row equals the
    library's last-block attention of that patch, computed by transformers' eager attention."""
    from transformers import BeitForMaskedImageModeling

    reference = BeitForMaskedImageModeling.from_pretrained(backbone_dir, attn_implementation="eager").eval()
    model = from_backbone(backbone_dir, prompt_length=0, mask_token_mode="replace", mask_token_position=position)
    bool_masked_pos = torch.zeros(3, 25, dtype=torch.bool)
    bool_masked_pos[:, position] = True
    with torch.no_grad():
        attentions = reference.beit(pixel_values, bool_masked_pos=bool_masked_pos, output_attentions=True).attentions
        ours = model.eval()(pixel_values, output_readout_attention=True).readout_attention
    torch.testing.assert_close(ours, attentions[-1][:, :, 1 + position], atol=1e-5, rtol=1e-5)
    assert model(pixel_values).readout_attention is None  # only on request


@pytest.mark.parametrize("fields", [{"prompt_layers": [1, 2]}, {"prompt_layers": [0]}, {"classifier": "linear_cls"}])
def test_readout_attention_is_in_method_order(pixel_values, fields):
    """The read-out row over [CLS] + P + [MASK]? + patches, recomputed from the last block's input by hand, and so is
    the last block's whole attention map (`output_attentions`, eager attention as with BEiT)."""
    model = VPTMForImageClassification(vptm_config(**fields)).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        if model.task.prompt_embeddings is not None:
            model.task.prompt_embeddings.prompts.normal_()
        model.backbone.beit.shared_position_bias.relative_position_bias_table.normal_()
        out = model(pixel_values, output_hidden_states=True, output_attentions=True, output_readout_attention=True)
        attention = out.readout_attention
        # skipping unread outputs (prompts stored before CLS), the read-out row is the same, in the same order
        torch.testing.assert_close(model(pixel_values, output_readout_attention=True).readout_attention, attention)
        reads_mask = model.config.reads_mask_token
        extra = 3 + int(reads_mask)
        bias = extend_relative_position_bias(
            model.backbone.beit.shared_position_bias((5, 5), dim_size=26), extra, "cls"
        )
        layer, inputs = model.backbone.beit.layers[-1], out.hidden_states[-2].clone()
        if 2 in model.config.prompted_layers:  # the last block gets its own prompts in the prompt slots
            inputs[:, 1:4] = model.task.prompt_embeddings.prompts[-1]
        normed = layer.layernorm_before(inputs)
        query = layer.attention.q_proj(normed).view(3, -1, 2, 12).transpose(1, 2)
        key = layer.attention.k_proj(normed).view(3, -1, 2, 12).transpose(1, 2)
        expected = ((query @ key.transpose(-1, -2)) * 12**-0.5 + bias).softmax(-1)  # (3, heads, L, L)
    row = 1 + 3 if reads_mask else 0
    assert attention.shape == (3, 2, 1 + extra + 25)
    torch.testing.assert_close(attention.sum(-1), torch.ones(3, 2))
    torch.testing.assert_close(attention, expected[:, :, row], atol=1e-5, rtol=1e-5)
    assert len(out.attentions) == 3 and out.attentions[-1].shape == (3, 2, 1 + extra + 25, 1 + extra + 25)
    torch.testing.assert_close(out.attentions[-1], expected, atol=1e-5, rtol=1e-5)


def test_per_layer_relative_bias_backbone(tmp_path, pixel_values):
    """Backbones with one relative bias per block (no shared one) get each block's own extended bias."""
    reference = make_backbone(tmp_path, use_shared_relative_position_bias=False, use_relative_position_bias=True)
    model = VPTMForImageClassification.from_backbone(
        str(tmp_path), num_labels=4, prompt_length=0, mask_token_mode="replace", mask_token_position=3
    ).eval()
    mask = torch.zeros(3, 25, dtype=torch.bool)
    mask[:, 3] = True
    with torch.no_grad():
        expected = reference(pixel_values, bool_masked_pos=mask).logits[:, 3]
        torch.testing.assert_close(model(pixel_values).visual_token_logits, expected, atol=1e-5, rtol=1e-5)
        prompted = VPTMForImageClassification.from_backbone(str(tmp_path), num_labels=4, prompt_length=2)
        assert torch.isfinite(prompted(pixel_values).logits).all()


@pytest.mark.parametrize(
    "fields",
    [
        dict(),
        dict(classifier="linear_cls"),
        dict(prompt_layers=[0, 1]),
        dict(prompt_layers=[1, 2], mask_token_mode="replace"),
        dict(prompt_layers="shallow"),
        dict(prompt_length=0),
    ],
    ids=["deep", "vpt-deep", "blocks-0-1", "blocks-1-2-replace", "shallow", "no-prompts"],
)
def test_skipping_unread_outputs_is_exact_in_inference_and_training(backbone_dir, pixel_values, fields):
    torch.manual_seed(0)
    model = from_backbone(backbone_dir, **fields)
    labels = torch.tensor([0, 1, 2])
    results = []
    for fast in (True, False):
        model.config.skip_unread_outputs = fast
        model.eval()
        with torch.no_grad():
            logits = model(pixel_values).logits
        model.train()
        model.zero_grad()
        model(pixel_values, labels=labels).loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((logits, grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for fast_grad, full_grad in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(fast_grad, full_grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("per_block", [False, True], ids=["shared-bias", "per-block-bias"])
def test_cached_position_biases_follow_the_bias_tables(pixel_values, per_block):
    config = vptm_config(
        use_relative_position_bias=per_block, use_shared_relative_position_bias=not per_block, prompt_layers="deep"
    )
    model = VPTMForImageClassification(config).eval()
    tables = [module.relative_position_bias_table for module in bias_modules(model.backbone.beit)]

    def fresh_logits():
        model.backbone._bias_cache.clear()
        with torch.no_grad():
            return model(pixel_values).logits

    with torch.no_grad():
        model(pixel_values)
    assert len(model.backbone._bias_cache) == 1 and not any("_bias_cache" in key for key in model.state_dict())
    # the rows that partial blocks read (prompt slots skipped, the read-out token alone in the last block) are kept
    # with the biases, one copy per bias tensor and row range: one bias for every block, or one per block
    (kept,) = model.backbone._bias_cache.values()
    rows = dict(kept._rows)
    assert len(rows) == (len(kept) if per_block else 2) and all(r.is_contiguous() for r in rows.values())
    with torch.no_grad():
        model(pixel_values)
    assert all(kept._rows[key] is rows[key] for key in rows)
    model.double()  # a conversion drops the kept biases instead of keeping stale float32 copies
    assert not model.backbone._bias_cache
    with torch.no_grad():
        assert model(pixel_values.double()).logits.dtype == torch.float64
    model.float()
    # an in-place edit (as load_state_dict does) must not be answered from the cache
    with torch.no_grad():
        tables[-1].add_(torch.randn_like(tables[-1]))
    with torch.no_grad():
        after_edit = model(pixel_values).logits
    torch.testing.assert_close(after_edit, fresh_logits(), atol=0, rtol=0)
    model.load_state_dict({k: torch.randn_like(v) if "relative_position_bias_table" in k else v
                           for k, v in model.state_dict().items()})  # fmt: skip
    with torch.no_grad():
        after_load = model(pixel_values).logits
    torch.testing.assert_close(after_load, fresh_logits(), atol=0, rtol=0)
    assert not torch.allclose(after_edit, after_load)
    # biases made under inference_mode are inference tensors: training after it must not reuse them
    with torch.inference_mode():
        model(pixel_values)
    model.train()
    model(pixel_values, labels=torch.tensor([0, 1, 2])).loss.backward()
    assert model.task.prompt_embeddings.prompts.grad is not None
    # a trainable table (a user unfreezing the backbone) is never cached: its gradient must flow
    model.backbone._bias_cache.clear()
    tables[0].requires_grad_(True)
    model(pixel_values, labels=torch.tensor([0, 1, 2])).loss.backward()
    assert tables[0].grad is not None and not model.backbone._bias_cache


def test_normalized_logits_ignore_the_offset_and_spread_of_the_mim_logits(pixel_values):
    model = VPTMForImageClassification(vptm_config(head_input="normalized_logits")).eval()
    with torch.no_grad():
        before = model(pixel_values)
        standardised = (before.visual_token_logits - before.visual_token_logits.mean(-1, keepdim=True)) / (
            before.visual_token_logits.var(-1, unbiased=False, keepdim=True) + 1e-5
        ).sqrt()
        projected = torch.nn.functional.normalize(model.task.verbalizer.project(standardised), dim=-1)
        expected = (
            model.task.verbalizer.logit_scale
            * projected
            @ torch.nn.functional.normalize(model.task.verbalizer.prototypes, dim=-1).T
        )
        torch.testing.assert_close(before.logits, expected, atol=1e-4, rtol=1e-4)
        assert before.logits.std() > 0.1  # non-trivial class scores (random prototypes)
        model.backbone.lm_head.weight.mul_(3.0)  # every image's logits: 3x the spread and 2.5 higher
        model.backbone.lm_head.bias.mul_(3.0).add_(2.5)
        after = model(pixel_values)
    assert not torch.allclose(after.visual_token_logits, before.visual_token_logits)
    torch.testing.assert_close(after.logits, before.logits, atol=1e-4, rtol=1e-4)


def test_eager_and_sdpa_agree(backbone_dir, pixel_values):
    model = from_backbone(backbone_dir).eval()
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        sdpa = model(pixel_values).logits
        model.set_attn_implementation("eager")
        eager = model(pixel_values).logits
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(backbone_dir, pixel_values):
    labels = torch.tensor([0, 1, 2])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = from_backbone(backbone_dir).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.backbone.beit.layers)
        model(pixel_values, labels=labels).loss.backward()
        grads.append(model.task.prompt_embeddings.prompts.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    # through each layer's own checkpoint function, and only while the model trains (not for gradients in eval)
    calls = []
    for layer in model.backbone.beit.layers:
        function = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *args, function=function: calls.append(1) or function(*args)
    model(pixel_values, labels=labels).loss.backward()
    assert len(calls) == 3
    model.eval()(pixel_values, labels=labels).loss.backward()
    assert len(calls) == 3


def test_bfloat16_forward_and_backward(backbone_dir, pixel_values):
    model = from_backbone(backbone_dir).to(torch.bfloat16).train()
    out = model(pixel_values.to(torch.bfloat16), labels=torch.tensor([0, 1, 2]))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(model.task.prompt_embeddings.prompts.grad).all()


def test_torch_compile_matches_eager(backbone_dir, pixel_values):
    model = from_backbone(backbone_dir).eval()
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixel_values).logits, model(pixel_values).logits, atol=1e-5, rtol=1e-5)


def test_per_sample_prompts_equal_separate_runs(backbone_dir, pixel_values):
    model = from_backbone(backbone_dir).eval()
    other = torch.randn_like(model.task.prompt_embeddings.prompts)
    per_sample = torch.stack([model.task.prompt_embeddings.prompts, other, model.task.prompt_embeddings.prompts])
    with torch.no_grad():
        mixed = model.forward_features(pixel_values, prompts=per_sample).readout_hidden_state
        own = model.forward_features(pixel_values).readout_hidden_state
        alone = model.forward_features(pixel_values, prompts=other).readout_hidden_state
    torch.testing.assert_close(mixed[[0, 2]], own[[0, 2]], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mixed[1], alone[1], atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------------- verbalizer
def test_verbalizer_is_scaled_cosine_with_max_over_prototypes():
    verbalizer = PrototypicalVerbalizer(input_dim=6, num_labels=3, prototype_dim=4, prototypes_per_class=2)
    with torch.no_grad():
        verbalizer.projection.weight.copy_(torch.eye(4, 6))
        verbalizer.prototypes.copy_(
            torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [-1, 0, 0, 0], [0, 0, 0, -1]])
        )
    features = torch.tensor([[2.0, 0, 0, 0, 5, 5], [0, 0, 0, -3, 1, 1]])
    logits, projected, cosine = verbalizer(features)
    assert projected.shape == (2, 4)
    torch.testing.assert_close(logits, verbalizer.logit_scale * cosine)
    # sample 0 points along e0: class 0 (prototype e0) cos 1, class 1 max(0, 0), class 2 max(-1, 0)
    torch.testing.assert_close(logits, torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 10.0]]))


def test_class_mean_prototypes(backbone_dir, pixel_values):
    model = from_backbone(backbone_dir, head_input="logits")
    labels = torch.tensor([0, 1, 2, 3])
    images = torch.cat([pixel_values, pixel_values[:1] * 0.5])
    model.initialize_prototypes([(images, labels)])
    with torch.no_grad():
        projected = model.task.verbalizer.project(model(images).visual_token_logits)
    torch.testing.assert_close(model.task.verbalizer.prototypes, projected, atol=1e-5, rtol=1e-5)
    before = model.task.verbalizer.prototypes[3].clone()
    model.initialize_prototypes([(pixel_values * 2, labels[:3])])
    assert torch.equal(model.task.verbalizer.prototypes[3], before)  # no example of class 3: prototype kept
    assert not torch.allclose(model.task.verbalizer.prototypes[0], projected[0])


# ------------------------------------------------------------------------------------------------------- errors
def test_input_errors(backbone_dir, pixel_values):
    model = from_backbone(backbone_dir)
    with pytest.raises(ValueError, match=r"must have 3 channels .* got 1"):
        model(pixel_values[:, :1])
    with pytest.raises(ValueError, match=r"must be 20x20 .* got 24x20"):
        model(torch.randn(2, 3, 24, 20))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\), got \[4\]"):
        model(pixel_values, labels=torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\), got \[-1\]"):
        model(pixel_values, labels=torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match=r"floating-point"):
        model(pixel_values.to(torch.uint8))
    with pytest.raises(ValueError, match=r"empty batch"):
        model(pixel_values[:0])
    with pytest.raises(ValueError, match=r"needs the labels"):
        VPTMForImageClassification.from_backbone(backbone_dir)


def test_non_mim_backbone_is_refused(tmp_path):
    classifier = BeitForImageClassification(tiny_beit_config(use_mask_token=True, num_labels=3))
    classifier.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"not a complete BEiT masked-image-modeling checkpoint.*lm_head"):
        VPTMForImageClassification.from_backbone(str(tmp_path), num_labels=2)


def test_missing_backbone_offline_names_the_id(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(OSError, match=r"(?s)cannot load the backbone .no-such-org/no-such-beit.*local folder"):
        VPTMForImageClassification.from_backbone("no-such-org/no-such-beit", num_labels=2, local_files_only=True)


# ------------------------------------------------------------------------------------------------ save and load
def test_legacy_key_checkpoint_loads_every_backbone_tensor(backbone_dir, backbone):
    with safe_open(os.path.join(backbone_dir, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("encoder.layer.0.attention.attention.query.weight" in k for k in keys)  # the v4 (Hub) layout
    model = from_backbone(backbone_dir)
    reference = backbone.state_dict()
    loaded = model.backbone.state_dict()
    assert sorted(loaded) == sorted(reference)  # the same names as BeitForMaskedImageModeling
    for name, tensor in loaded.items():
        assert torch.equal(tensor, reference[name]), name


def test_save_writes_only_task_tensors_and_reloads_exactly(backbone_dir, pixel_values, tmp_path):
    model = from_backbone(backbone_dir).eval()
    with torch.no_grad():
        model.task.prompt_embeddings.prompts.add_(0.5)  # trained-looking values
        expected = model(pixel_values).logits
    model.save_pretrained(tmp_path / "prompts")
    files = sorted(os.listdir(tmp_path / "prompts"))
    assert files == sorted(["config.json", "model.safetensors", *PROMPT_CHECKPOINT_CODE])
    with safe_open(str(tmp_path / "prompts" / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(model.task_state_dict())
    config = json.loads((tmp_path / "prompts" / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_vptm.VPTMConfig",
        "AutoModel": "modeling_vptm.VPTMForImageClassification",
        "AutoModelForImageClassification": "modeling_vptm.VPTMForImageClassification",
    }
    assert config["backbone_name_or_path"] == backbone_dir and config["model_type"] == "vptm"
    assert not any(os.path.basename(d).startswith(".vptm-save-") for d in os.listdir(tmp_path))

    loaded = VPTMForImageClassification.from_pretrained(tmp_path / "prompts")
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values).logits, expected)
    auto = AutoModelForImageClassification.from_pretrained(tmp_path / "prompts")  # registered by the package
    assert isinstance(auto, VPTMForImageClassification)
    with torch.no_grad():
        assert torch.equal(auto(pixel_values).logits, expected)


def test_state_dict_passed_to_save_is_filtered(backbone_dir, tmp_path):
    model = from_backbone(backbone_dir)
    model.save_pretrained(tmp_path, state_dict=model.state_dict())  # what Trainer passes
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(model.task_state_dict())


def test_fingerprint_mismatch_is_refused(tmp_path):
    make_backbone(tmp_path / "backbone", seed=0)
    model = VPTMForImageClassification.from_backbone(str(tmp_path / "backbone"), num_labels=2)
    model.save_pretrained(tmp_path / "prompts")
    make_backbone(tmp_path / "backbone", seed=1)  # same architecture, other weights
    with pytest.raises(ValueError, match=r"was trained on backbone .* fingerprint .* do not fit these weights"):
        VPTMForImageClassification.from_pretrained(tmp_path / "prompts")


def test_checkpoint_that_does_not_fit_its_backbone_is_refused(tmp_path):
    make_backbone(tmp_path / "backbone")
    model = VPTMForImageClassification.from_backbone(str(tmp_path / "backbone"), num_labels=2)
    model.save_pretrained(tmp_path / "prompts")
    config = json.loads((tmp_path / "prompts" / "config.json").read_text())
    config.update(backbone_fingerprint=None)
    (tmp_path / "prompts" / "config.json").write_text(json.dumps(config))
    make_backbone(tmp_path / "backbone", hidden_size=16)
    with pytest.raises(ValueError, match=r"does not fit the backbone .*hidden_size: checkpoint 24 vs backbone 16"):
        VPTMForImageClassification.from_pretrained(tmp_path / "prompts", allow_unverified_backbone=True)


def test_task_tensors_with_wrong_shapes_are_refused(backbone_dir):
    model = from_backbone(backbone_dir, prompt_layers="deep")
    tensors = model.task_state_dict()
    bad = dict(tensors, **{"prompt_embeddings.prompts": torch.zeros(3, 5, 24)})
    with pytest.raises(ValueError, match=r"prompt_embeddings.prompts has shape \(3, 5, 24\).*need \(3, 3, 24\)"):
        model.load_task_state_dict(bad)
    missing = {k: v for k, v in tensors.items() if k != "verbalizer.prototypes"}
    with pytest.raises(ValueError, match=r"missing \['verbalizer.prototypes'\]"):
        model.load_task_state_dict(missing)


REMOTE_SCRIPT = r"""
import inspect, json, sys, torch
from transformers import AutoModel, AutoModelForImageClassification, pipeline
from PIL import Image
folder, pixels_path = sys.argv[1], sys.argv[2]
assert "modeling_vptm" not in sys.modules
model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
pixel_values = torch.load(pixels_path)
with torch.no_grad():
    logits = model(pixel_values).logits
base = AutoModel.from_pretrained(folder, trust_remote_code=True)
with torch.no_grad():
    same = torch.equal(base(pixel_values).logits, logits)
classify = pipeline("image-classification", model=folder, trust_remote_code=True)
image = Image.new("RGB", (31, 17), (200, 30, 90))
top = classify(image, top_k=4)
print(json.dumps({"logits": logits.tolist(), "auto_model_same": same, "pipeline": top,
                  "module_file": inspect.getfile(type(model))}))
"""


def test_remote_code_auto_classes_and_pipeline_in_fresh_process(backbone_dir, pixel_values, tmp_path):
    from transformers import BeitImageProcessor

    model = from_backbone(backbone_dir).eval()
    model.save_pretrained(tmp_path / "prompts")
    processor = BeitImageProcessor(size={"height": 20, "width": 20}, do_center_crop=False)
    processor.save_pretrained(tmp_path / "prompts")
    torch.save(pixel_values, tmp_path / "pixels.pt")
    script = tmp_path / "remote.py"
    script.write_text(REMOTE_SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "prompts"), str(tmp_path / "pixels.pt")],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        expected = model(pixel_values).logits
        image_logits = model(
            processor(
                __import__("PIL.Image").Image.new("RGB", (31, 17), (200, 30, 90)), return_tensors="pt"
            ).pixel_values
        ).logits[0]
    assert torch.equal(torch.tensor(out["logits"]), expected)
    assert out["auto_model_same"]
    probs = image_logits.softmax(-1)
    order = probs.argsort(descending=True).tolist()
    assert [p["label"] for p in out["pipeline"]] == [model.config.id2label[i] for i in order]
    assert [round(p["score"], 5) for p in out["pipeline"]] == [round(float(probs[i]), 5) for i in order]
    # the class came from the code files saved beside the weights, copied into the modules cache, not this checkout
    assert out["module_file"].startswith(str(tmp_path / "modules")), out["module_file"]


def test_from_pretrained_honours_or_refuses_each_argument(backbone_dir, pixel_values, tmp_path):
    model = from_backbone(backbone_dir).eval()
    model.save_pretrained(tmp_path)
    assert "auto_map" not in model.config.__dict__  # saving writes auto_map to the file, not into the model
    assert json.load(open(tmp_path / "config.json"))["auto_map"]["AutoModel"].endswith("VPTMForImageClassification")
    with torch.no_grad():
        expected = model(pixel_values).logits
    for device_map in ("auto", "cpu", {"": "cpu"}, torch.device("cpu")):
        loaded = VPTMForImageClassification.from_pretrained(tmp_path, device_map=device_map)
        assert next(loaded.parameters()).device == torch.device("cpu")
    loaded, info = VPTMForImageClassification.from_pretrained(tmp_path, output_loading_info=True, dtype="float64")
    assert info["missing_keys"] == [] and next(loaded.parameters()).dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values.double()).logits.float(), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match=r"cannot honour \['low_cpu_mem_usage', 'quantization_config'\]"):
        VPTMForImageClassification.from_pretrained(tmp_path, low_cpu_mem_usage=True, quantization_config={})
    with pytest.raises(ValueError, match=r"device_map must put the whole model on one device"):
        VPTMForImageClassification.from_pretrained(tmp_path, device_map={"beit": "cpu", "verbalizer": "cpu"})
    with pytest.raises(TypeError, match=r"cannot honour \['use_safetensors'\]"):
        VPTMForImageClassification.from_pretrained(tmp_path, use_safetensors=False)


def test_the_model_is_a_prompted_backbone_and_one_task(backbone_dir, pixel_values):
    from modeling_vptm import PromptedBackbone, SequenceLayout, VPTMTask

    model = from_backbone(backbone_dir, mask_token_mode="replace", mask_token_position=7, prompt_layers=[1, 2])
    assert isinstance(model.backbone, PromptedBackbone) and isinstance(model.task, VPTMTask)
    assert model.task.layout == SequenceLayout(3, (1, 2), "replace", 7, "cls")
    # the backbone alone, given the task's tokens, is what forward_features runs
    with torch.no_grad():
        alone = model.backbone(pixel_values, model.task.layout, prompts=model.task.prompts())
        features = model.forward_features(pixel_values)
    torch.testing.assert_close(alone.readout_hidden_state, features.readout_hidden_state, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"the layout prompts blocks \[1, 2\], but no prompts were given"):
        model.backbone(pixel_values, model.task.layout)
    with pytest.raises(ValueError, match=r"a layout with prompts needs prompted layers"):
        SequenceLayout(prompt_length=3)
    with pytest.raises(ValueError, match=r"mask_token must be 'append', 'replace' or None, got 'prepend'"):
        SequenceLayout(mask_token="prepend")


def test_the_backbone_refuses_weights_it_cannot_hold(backbone_dir):
    from modeling_vptm import PromptedBackbone

    backbone = PromptedBackbone(tiny_beit_config(hidden_size=32, intermediate_size=64))
    mim = BeitForMaskedImageModeling.from_pretrained(backbone_dir)
    with pytest.raises(ValueError, match=r"backbone tensor .* has shape \(.*24.*\) in the checkpoint but \(.*32.*\)"):
        backbone.load_mim_weights(mim)
    del mim.lm_head
    with pytest.raises(ValueError, match=r"the backbone checkpoint lacks 2 tensors VPTM needs, e.g. \['lm_head.bias'"):
        PromptedBackbone(tiny_beit_config()).load_mim_weights(mim)


def test_state_dicts_by_checkpoint_names_load_into_the_task(backbone_dir, pixel_values):
    """Trainer reloads a checkpoint folder's file with `load_state_dict` (to resume, or to pick the best one): the
    file names task tensors as the task does, without the model's `task.` prefix."""
    model = from_backbone(backbone_dir, train_mask_token=True)
    trained = {k: torch.randn_like(v) for k, v in model.task_state_dict().items()}
    result = model.load_state_dict(trained, strict=False)
    assert result.unexpected_keys == [] and not [k for k in result.missing_keys if not k.startswith("backbone.")]
    for name, tensor in model.task_state_dict().items():
        assert torch.equal(tensor, trained[name]), name


def test_state_dict_given_to_save_is_checked(backbone_dir, tmp_path):
    model = from_backbone(backbone_dir)
    by_model_names = {k: v + 1 for k, v in model.state_dict().items()}  # what Trainer passes
    model.save_pretrained(tmp_path / "a", state_dict=by_model_names)
    by_checkpoint_names = {k: v + 1 for k, v in model.task_state_dict().items()}
    model.save_pretrained(tmp_path / "b", state_dict=by_checkpoint_names)
    for folder in ("a", "b"):
        loaded = VPTMForImageClassification.from_pretrained(tmp_path / folder)
        for name, tensor in loaded.task_state_dict().items():
            torch.testing.assert_close(tensor, by_checkpoint_names[name])
    incomplete = {k: v for k, v in by_checkpoint_names.items() if not k.startswith("verbalizer.")}
    with pytest.raises(ValueError, match=r"the state_dict given to save_pretrained .* missing \['verbalizer"):
        model.save_pretrained(tmp_path / "c", state_dict=incomplete)
    assert not (tmp_path / "c").exists()  # nothing written


def test_save_and_push_names_the_repo_after_the_folder(backbone_dir, tmp_path, monkeypatch):
    import transformers.modeling_utils

    class Api:
        def create_repo(self, repo_id, **kwargs):
            created.append(repo_id)
            return types.SimpleNamespace(repo_id=repo_id)

    model, created, pushed = from_backbone(backbone_dir), [], []
    monkeypatch.setattr(transformers.modeling_utils, "hf_api", Api)
    monkeypatch.setattr(type(model), "_upload_modified_files", lambda self, folder, repo_id, *a, **kw: pushed.append(
        (repo_id, sorted(os.listdir(folder)))))  # fmt: skip
    model.save_pretrained(tmp_path / "my-task", push_to_hub=True)
    assert created == ["my-task"] and pushed[0][0] == "my-task" and "model.safetensors" in pushed[0][1]


def test_full_checkpoints_with_the_earlier_tensor_names_load(tmp_path, pixel_values):
    """A folder holding the backbone too (no backbone_name_or_path), saved when the task's tensors and the backbone's
    sat side by side in the model: `prompt_embeddings.prompts`, `beit.embeddings...`."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = VPTMForImageClassification(vptm_config(train_mask_token=True)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
        expected = model(pixel_values).logits
    earlier = {
        k.removeprefix("task.").removeprefix("backbone."): v.contiguous() for k, v in model.state_dict().items()
    }
    model.config.save_pretrained(tmp_path)
    save_file(earlier, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = VPTMForImageClassification.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values).logits, expected)
    assert not any(p.requires_grad for p in loaded.backbone.parameters())


def test_a_trained_mask_in_place_of_a_patch_keeps_the_position_embedding(tmp_path, pixel_values):
    """On a backbone with absolute position embeddings, a trained [MASK] embedding equal to the pre-trained one gives
    the pre-trained token's features, position embedding included."""
    make_backbone(tmp_path, use_absolute_position_embeddings=True)
    fields = dict(prompt_length=2, mask_token_mode="replace", mask_token_position=6)
    torch.manual_seed(0)
    pretrained = VPTMForImageClassification.from_backbone(str(tmp_path), num_labels=4, **fields).eval()
    torch.manual_seed(0)
    trained = VPTMForImageClassification.from_backbone(str(tmp_path), num_labels=4, train_mask_token=True, **fields)
    trained.eval().task.load_state_dict({**pretrained.task_state_dict(), "trainable_mask_token":
                                         pretrained.backbone.pretrained_mask_token})  # fmt: skip
    assert pretrained.backbone.beit.embeddings.position_embeddings is not None
    with torch.no_grad():
        torch.testing.assert_close(trained(pixel_values).logits, pretrained(pixel_values).logits)


def test_conventions_transformers_relies_on(backbone_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = from_backbone(backbone_dir)
    assert model.get_input_embeddings() is model.backbone.beit.embeddings.patch_embeddings
    # the loss is a batch mean, so Trainer must divide it by the accumulation steps itself
    trainer = Trainer(model=model, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True))
    assert trainer.model_accepts_loss_kwargs is False
    with pytest.raises(TypeError, match=r"from_pretrained needs config=VPTMConfig, got BeitConfig"):
        VPTMForImageClassification.from_pretrained(tmp_path, config=tiny_beit_config())


def test_configs_saved_under_earlier_field_names_keep_their_settings():
    earlier = vptm_config(fast_inference=False, verbalizer_input="logits")
    assert earlier.skip_unread_outputs is False and earlier.head_input == "logits"
    assert vptm_config(verbalizer_input="logits", head_input="probs").head_input == "probs"  # the new name wins
    saved = vptm_config().to_dict()
    assert saved["skip_unread_outputs"] is True and not {"fast_inference", "verbalizer_input"} & set(saved)


@pytest.mark.parametrize("name", ["vptm-hidden", "vpt"])
def test_checkpoints_saved_by_version_0_1_0_load_unchanged(name):
    from safetensors.torch import load_file

    folder = os.path.join(os.path.dirname(__file__), "fixtures", "checkpoints-0.1.0", name)
    expected = load_file(os.path.join(folder, "expected_outputs.safetensors"))
    model = VPTMForImageClassification.from_pretrained(folder)
    with torch.no_grad():
        torch.testing.assert_close(model(expected["pixel_values"]).logits, expected["logits"], atol=1e-5, rtol=1e-5)


OLD_REMOTE_CODE = r"""
import json, sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained(sys.argv[1], trust_remote_code=True)
expected = load_file(sys.argv[1] + "/expected_outputs.safetensors")
with torch.no_grad():
    logits = model(expected["pixel_values"]).logits
print(json.dumps({"module": type(model).__module__, "error": (logits - expected["logits"]).abs().max().item()}))
"""


# Releases before PreTrainedConfig.default_config_fields build the config class with no arguments whenever they print a
# loaded config, and 0.1.0's config refuses its own defaults (a verbalizer without a mask token): on those releases its
# code files cannot load at all, whatever package is installed beside them. Today's classes load these checkpoints on
# every supported release (the test above); 0.1.0's own code needs a release with that method (5.25 has it).
@pytest.mark.skipif(
    not hasattr(__import__("transformers").PretrainedConfig, "default_config_fields"),
    reason="this transformers builds a default config to print one, which 0.1.0's config class refuses",
)
@pytest.mark.parametrize("name", ["vptm-hidden", "vpt"])
def test_checkpoints_saved_by_version_0_1_0_load_with_their_own_code_files(name, tmp_path):
    """A 0.1.0 checkpoint on the Hub carries 0.1.0's code files, which find the shipped backbone through the installed
    package: that code, run with trust_remote_code beside today's package, gives the logits it gave then."""
    fixtures = os.path.join(os.path.dirname(__file__), "fixtures", "checkpoints-0.1.0")
    shutil.copytree(os.path.join(fixtures, name), tmp_path / name)
    for code in os.listdir(os.path.join(fixtures, "code")):  # kept as text: data of the test, not the project's code
        shutil.copy(os.path.join(fixtures, "code", code), tmp_path / name / code.removesuffix(".txt"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH=REPO_ROOT)
    result = subprocess.run([sys.executable, "-c", OLD_REMOTE_CODE, str(tmp_path / name)], capture_output=True,
                            text=True, env=env, cwd=str(tmp_path), timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["module"].startswith("transformers_modules") and out["error"] < 1e-5, out


# ---------------------------------------------------------------------------------- transformers' contract, as BEiT's
def eager_reference(backbone_dir) -> BeitForMaskedImageModeling:
    return BeitForMaskedImageModeling.from_pretrained(backbone_dir, attn_implementation="eager").eval()


def test_config_fields_given_to_from_pretrained_set_the_config_as_on_beit(backbone_dir, pixel_values, tmp_path):
    reference = BeitForMaskedImageModeling.from_pretrained(backbone_dir, output_hidden_states=True)
    assert reference.config.output_hidden_states
    from_backbone(backbone_dir).save_pretrained(tmp_path / "prompts")  # names its backbone: task tensors only
    VPTMForImageClassification(vptm_config()).save_pretrained(tmp_path / "full")  # holds the backbone too
    for folder in ("prompts", "full"):
        fields = dict(output_hidden_states=True, output_attentions=True, attn_implementation="eager")
        for loaded in (
            VPTMForImageClassification.from_pretrained(tmp_path / folder, **fields),
            AutoModelForImageClassification.from_pretrained(tmp_path / folder, **fields),
        ):
            assert loaded.config.output_hidden_states and loaded.config.output_attentions, folder
            with torch.no_grad():
                out = loaded(pixel_values)
            assert len(out.hidden_states) == 4 and len(out.attentions) == 3, folder
    # an argument that is neither a config field nor a loading option is still refused by name
    with pytest.raises(TypeError, match=r"cannot honour \['no_such_field'\]"):
        VPTMForImageClassification.from_pretrained(tmp_path / "prompts", no_such_field=1)


def test_the_config_output_flags_are_the_defaults_as_on_beit(backbone_dir, pixel_values):
    model = from_backbone(backbone_dir).eval()
    model.set_attn_implementation("eager")
    for tested in (eager_reference(backbone_dir), model):
        tested.config.output_hidden_states = tested.config.output_attentions = True
        with torch.no_grad():
            out = tested(pixel_values)
            assert len(out.hidden_states) == 4 and len(out.attentions) == 3, type(tested).__name__
            assert tested(pixel_values, output_hidden_states=False).hidden_states is None  # the argument wins
    model.config.return_dict = False  # (BEiT's MIM model breaks on this one: its base model returns a tuple to it)
    with torch.no_grad():
        assert isinstance(model(pixel_values), tuple) and isinstance(model(pixel_values, return_dict=True).logits,
                                                                     torch.Tensor)  # fmt: skip


def test_hidden_states_chosen_by_index_as_on_beit(backbone_dir, pixel_values):
    """`output_hidden_states=[0, -1]` picks states as transformers' output capturing picks them on BEiT: the same
    entries set (in 5.25: those two of the four, the others `None`; earlier releases count differently)."""
    picked = []
    for tested in (eager_reference(backbone_dir), from_backbone(backbone_dir).eval()):
        with torch.no_grad():
            every = tested(pixel_values, output_hidden_states=True).hidden_states
            chosen = tested(pixel_values, output_hidden_states=[0, -1]).hidden_states
        # each entry: None, or the index of the state of the full run it is
        index = [next((i for i, e in enumerate(every) if torch.equal(h, e)), "?") for h in chosen if h is not None]
        picked.append([None if h is None else index.pop(0) for h in chosen])
    assert picked[1] == picked[0] and "?" not in picked[1] and None in picked[1] and len(set(picked[1])) > 1, picked


def test_the_base_model_is_a_pretrained_model_as_on_beit(backbone_dir, backbone, pixel_values, tmp_path):
    from transformers import PreTrainedModel

    reference = BeitForMaskedImageModeling.from_pretrained(backbone_dir)
    reference.base_model.save_pretrained(tmp_path / "beit")
    model = from_backbone(backbone_dir)
    assert model.base_model is model.backbone and isinstance(model.base_model, PreTrainedModel)
    model.base_model.save_pretrained(tmp_path / "base")
    # what it saves is the frozen backbone, a BEiT MIM checkpoint: it loads as one, and prompts can be made on it
    loaded = BeitForMaskedImageModeling.from_pretrained(tmp_path / "base")
    expected = backbone.state_dict()
    assert sorted(loaded.state_dict()) == sorted(expected)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    again = VPTMForImageClassification.from_backbone(str(tmp_path / "base"), num_labels=4)
    assert again.config.backbone_fingerprint == model.config.backbone_fingerprint


def test_attention_maps_need_eager_attention_as_on_beit(backbone_dir, pixel_values):
    reference = BeitForMaskedImageModeling.from_pretrained(backbone_dir).eval()
    model = from_backbone(backbone_dir).eval()
    assert model.config._attn_implementation == reference.config._attn_implementation == "sdpa"
    with torch.no_grad():  # transformers' SDPA returns no attention maps (and warns that it does not)
        assert len(model(pixel_values, output_attentions=True).attentions) == len(
            reference(pixel_values, output_attentions=True).attentions
        )


def test_forward_hooks_see_each_block_once_also_under_gradient_checkpointing(backbone_dir, pixel_values, monkeypatch):
    """Each block runs as a module, so its forward hooks (and transformers' output capturing) fire once per pass;
    checkpointed, the block is recomputed in the backward pass without firing them again."""
    import modeling_vptm.prompted_backbone as prompted_backbone

    model = from_backbone(backbone_dir).train()
    labels = torch.tensor([0, 1, 2])
    seen, computed = [], []
    for i, layer in enumerate(model.backbone.beit.layers):
        layer.register_forward_pre_hook(lambda module, args, i=i: seen.append(i))
    block = prompted_backbone.prompted_block
    monkeypatch.setattr(prompted_backbone, "prompted_block", lambda *a, **kw: computed.append(1) or block(*a, **kw))
    for checkpointing in (False, True):
        seen.clear(), computed.clear()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(pixel_values, labels=labels).loss.backward()
        assert seen == [0, 1, 2]
        assert len(computed) == (6 if checkpointing else 3)  # checkpointed: each block once more, in the backward
