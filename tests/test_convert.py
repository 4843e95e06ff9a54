"""The BEiT v2/v1 converter against an independent reference forward written here in the original layout."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from conftest import Exploit, FakeHub
from torch.nn import functional as F
from transformers import BeitForMaskedImageModeling

from modeling_vptm import VPTMForImageClassification
from modeling_vptm.pretraining import convert_beit_checkpoint


HIDDEN, DEPTH, PATCH, WINDOW, VOCAB, MLP = 128, 2, 4, 4, 50, 96  # two heads of 64, as in every BEiT size


def original_state_dict(shared_bias=True, pos_embed=False, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    n = WINDOW * WINDOW
    table = (2 * WINDOW - 1) ** 2 + 3
    sd = {
        "cls_token": r(1, 1, HIDDEN), "mask_token": r(1, 1, HIDDEN),
        "patch_embed.proj.weight": r(HIDDEN, 3, PATCH, PATCH), "patch_embed.proj.bias": r(HIDDEN),
        "norm.weight": 1 + r(HIDDEN), "norm.bias": r(HIDDEN), "lm_head.weight": r(VOCAB, HIDDEN),
        "lm_head.bias": r(VOCAB),
        # pre-training-only branch and index buffers: dropped by the converter
        "cls_pt_layers.0.norm1.weight": r(HIDDEN), "cls_pt_layers.0.attn.qkv.weight": r(3 * HIDDEN, HIDDEN),
        "rel_pos_bias.relative_position_index": torch.zeros(n + 1, n + 1, dtype=torch.long),
    }  # fmt: skip
    if pos_embed:
        sd["pos_embed"] = r(1, n + 1, HIDDEN)
    if shared_bias:
        sd["rel_pos_bias.relative_position_bias_table"] = r(table, HIDDEN // 64, scale=1.0)
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": 1 + r(HIDDEN), b + "norm1.bias": r(HIDDEN),
            b + "attn.qkv.weight": r(3 * HIDDEN, HIDDEN), b + "attn.q_bias": r(HIDDEN), b + "attn.v_bias": r(HIDDEN),
            b + "attn.proj.weight": r(HIDDEN, HIDDEN), b + "attn.proj.bias": r(HIDDEN),
            b + "norm2.weight": 1 + r(HIDDEN), b + "norm2.bias": r(HIDDEN),
            b + "mlp.fc1.weight": r(MLP, HIDDEN), b + "mlp.fc1.bias": r(MLP),
            b + "mlp.fc2.weight": r(HIDDEN, MLP), b + "mlp.fc2.bias": r(HIDDEN),
            b + "gamma_1": r(HIDDEN, scale=0.5), b + "gamma_2": r(HIDDEN, scale=0.5),
        })  # fmt: skip
        if not shared_bias:
            sd[b + "attn.relative_position_bias_table"] = r(table, HIDDEN // 64, scale=1.0)
            sd[b + "attn.relative_position_index"] = torch.zeros(n + 1, n + 1, dtype=torch.long)
    return sd


def relative_position_index(window: int) -> torch.Tensor:
    """The original index table: patch pairs by their offset, then CLS->token, token->CLS and CLS->CLS."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    relative[..., 0] += window - 1
    relative[..., 1] += window - 1
    relative[..., 0] *= 2 * window - 1
    size = (2 * window - 1) ** 2 + 3
    index = torch.zeros(window * window + 1, window * window + 1, dtype=torch.long)
    index[1:, 1:] = relative.sum(-1)
    index[0, :] = size - 3
    index[:, 0] = size - 2
    index[0, 0] = size - 1
    return index


def reference_mim_logits(sd, pixel_values, bool_masked_pos) -> torch.Tensor:
    """Minimal BEiT v2 pre-training forward: fused qkv with q/v biases, layer scale, relative position bias."""
    heads, eps = HIDDEN // 64, 1e-6
    x = F.conv2d(pixel_values, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)  # (batch, patches, hidden)
    w = bool_masked_pos[..., None].float()
    x = x * (1 - w) + sd["mask_token"] * w
    x = torch.cat([sd["cls_token"].expand(len(x), -1, -1), x], dim=1)
    if "pos_embed" in sd:
        x = x + sd["pos_embed"]
    index = relative_position_index(WINDOW).view(-1)
    length = x.shape[1]
    for i in range(DEPTH):
        b = f"blocks.{i}."
        table = sd.get("rel_pos_bias.relative_position_bias_table", sd.get(b + "attn.relative_position_bias_table"))
        bias = table[index].view(length, length, heads).permute(2, 0, 1)
        y = F.layer_norm(x, (HIDDEN,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps)
        qkv_bias = torch.cat([sd[b + "attn.q_bias"], torch.zeros(HIDDEN), sd[b + "attn.v_bias"]])
        qkv = F.linear(y, sd[b + "attn.qkv.weight"], qkv_bias).reshape(len(x), length, 3, heads, 64)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attention = (q * 64**-0.5) @ k.transpose(-2, -1) + bias
        out = (attention.softmax(-1) @ v).transpose(1, 2).reshape(len(x), length, HIDDEN)
        x = x + sd[b + "gamma_1"] * F.linear(out, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        y = F.layer_norm(x, (HIDDEN,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps)
        y = F.linear(F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])), sd[b + "mlp.fc2.weight"],
                     sd[b + "mlp.fc2.bias"])  # fmt: skip
        x = x + sd[b + "gamma_2"] * y
    x = F.layer_norm(x, (HIDDEN,), sd["norm.weight"], sd["norm.bias"], eps)
    return F.linear(x[:, 1:], sd["lm_head.weight"], sd["lm_head.bias"])[bool_masked_pos]


@pytest.mark.parametrize("shared_bias, pos_embed", [(True, False), (False, False), (True, True)])
def test_converted_model_reproduces_the_original_mim_logits(tmp_path, shared_bias, pos_embed):
    sd = original_state_dict(shared_bias=shared_bias, pos_embed=pos_embed)
    torch.save({"model": sd}, tmp_path / "beitv2.pth")
    convert_beit_checkpoint(tmp_path / "beitv2.pth", tmp_path / "hf")
    model = BeitForMaskedImageModeling.from_pretrained(tmp_path / "hf").eval()
    assert model.config.image_size == PATCH * WINDOW and model.config.vocab_size == VOCAB
    assert model.config.num_attention_heads == 2 and model.config.layer_norm_eps == 1e-6
    pixel_values = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.rand(3, 16, generator=torch.Generator().manual_seed(2)) < 0.4
    with torch.no_grad():
        ours = model(pixel_values, bool_masked_pos=mask).logits[mask]
        reference = reference_mim_logits(sd, pixel_values, mask)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.485, 0.456, 0.406] and processor["image_std"] == [0.229, 0.224, 0.225]
    vptm = VPTMForImageClassification.from_backbone(str(tmp_path / "hf"), num_labels=3)  # ready for VPTM
    assert vptm(pixel_values).logits.shape == (3, 3)


def test_converter_refuses_unknown_or_missing_tensors(tmp_path):
    sd = original_state_dict()
    torch.save({"model": dict(sd, **{"blocks.0.attn.extra": torch.zeros(2)})}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"1 tensors this converter does not know: \['blocks.0.attn.extra'\]"):
        convert_beit_checkpoint(tmp_path / "extra.pth", tmp_path / "out1")
    del sd["lm_head.weight"]
    torch.save({"model": sd}, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\]"):
        convert_beit_checkpoint(tmp_path / "missing.pth", tmp_path / "out2")
    assert not os.path.exists(tmp_path / "out1") and not os.path.exists(tmp_path / "out2")


def test_converter_never_unpickles_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": Exploit()}, f)
    with pytest.raises(ValueError, match=r"cannot read .*evil.pth as a weights-only PyTorch checkpoint"):
        convert_beit_checkpoint(tmp_path / "evil.pth", tmp_path / "out")
    assert not (tmp_path / "exploited").exists()


def test_convert_script(tmp_path, capsys):

    import convert_beitv2_to_hf

    torch.save({"model": original_state_dict()}, tmp_path / "v2.pth")
    convert_beitv2_to_hf.main(["--checkpoint", str(tmp_path / "v2.pth"), "--output_dir", str(tmp_path / "hf")])
    assert "hidden 128, 2 blocks, 2 heads, patch 4, image 16, vocabulary 50" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    umask = os.umask(0)
    os.umask(umask)
    # a backbone to publish: its weights readable as any file the run writes (safetensors itself writes 0600)
    assert (tmp_path / "hf" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_convert_script_pushes_the_converted_backbone(tmp_path, monkeypatch, capsys):
    import convert_beitv2_to_hf
    from huggingface_hub import ModelCard

    hub = FakeHub(monkeypatch, tmp_path / "remote")
    torch.save({"model": original_state_dict()}, tmp_path / "v2.pth")
    convert_beitv2_to_hf.main(["--checkpoint", str(tmp_path / "v2.pth"), "--output_dir", str(tmp_path / "hf"),
                               "--push_to_hub", "me/beitv2-tiny", "--private"])  # fmt: skip
    assert hub.calls == [("create_repo", "me/beitv2-tiny", True), ("upload_folder", "me/beitv2-tiny", None)]
    pushed = tmp_path / "remote" / "me/beitv2-tiny"
    assert sorted(os.listdir(pushed)) == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    card = ModelCard.load(pushed / "README.md")
    assert f"published from `{tmp_path / 'v2.pth'}`" in card.text and "vocab" not in card.data.to_dict()
    assert f"--model_name_or_path me/beitv2-tiny --model_revision {1:040x}" in capsys.readouterr().out
