"""Tests of the third-generation tokens: the contrastive teacher and the VQ-KD tokenizer (modules and scripts)."""

from __future__ import annotations

import json

import pytest
import torch
from test_pretraining import run_pretrain, write_fashion_mnist
from transformers import BeitForMaskedImageModeling

from modeling_vptm.pretraining import (
    TEACHER_FILE,
    ContrastiveTeacher,
    TwoViewCollator,
    VQKDTokenizer,
    codebook_usage,
    load_visual_tokenizer,
    nt_xent,
)


def tiny_tokenizer(**kwargs) -> VQKDTokenizer:
    settings = {"patch_size": 4, "vocab_size": 16, "code_dim": 8, "width": 4, "hidden_dim": 12, "target_dim": 12}
    return VQKDTokenizer(**{**settings, **kwargs})


def test_teacher_gives_one_feature_per_patch_and_round_trips(tmp_path):
    torch.manual_seed(0)
    teacher = ContrastiveTeacher(patch_size=4, width=4, feature_dim=12, projection_dim=6).eval()
    x = torch.randn(3, 3, 28, 28)
    feats = teacher.patch_features(x)
    assert feats.shape == (3, 49, 12)
    torch.testing.assert_close(teacher.image_features(x), feats.mean(1))
    teacher.save_pretrained(tmp_path)
    loaded = ContrastiveTeacher.from_pretrained(tmp_path)
    assert torch.equal(loaded.patch_features(x), feats) and not loaded.training
    with pytest.raises(FileNotFoundError, match=TEACHER_FILE):
        ContrastiveTeacher.from_pretrained(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        ContrastiveTeacher(patch_size=3)


def test_nt_xent_rewards_views_that_find_each_other():
    torch.manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    aligned = nt_xent(torch.cat([base, base]), temperature=0.1)
    shuffled = nt_xent(torch.cat([base, base.roll(1, 0)]), temperature=0.1)
    assert aligned < 0.05 < 1.0 < shuffled
    # two identical pairs: the positive and the other pair's copies are tied, so the loss is log(3)
    pair = torch.nn.functional.normalize(torch.ones(2, 4), dim=1)
    torch.testing.assert_close(nt_xent(torch.cat([pair, pair]), 1.0), torch.log(torch.tensor(3.0)))


def test_two_views_differ_and_are_seeded():
    examples = [{"pixel_values": torch.randn(3, 28, 28)} for _ in range(4)]
    first, again = TwoViewCollator(seed=1)(examples), TwoViewCollator(seed=1)(examples)
    assert first["pixel_values"].shape == first["pixel_values_2"].shape == (4, 3, 28, 28)
    assert not torch.allclose(first["pixel_values"], first["pixel_values_2"])
    assert torch.equal(first["pixel_values"], again["pixel_values"])


def test_vqkd_lookup_is_the_most_cosine_similar_code():
    tokenizer = tiny_tokenizer().eval()
    x = torch.randn(2, 3, 28, 28)
    codes = tokenizer.codes(x)
    torch.testing.assert_close(codes.norm(dim=-1), torch.ones(2, 49))
    torch.testing.assert_close(tokenizer.codebook.norm(dim=-1), torch.ones(16))
    expected = torch.stack([torch.stack([torch.nn.functional.cosine_similarity(v, tokenizer.codebook).argmax()
                                         for v in image]) for image in codes])  # fmt: skip
    tokens = tokenizer.encode(x)
    assert tokens.shape == (2, 49) and tokens.dtype == torch.int64 and torch.equal(tokens, expected)


def test_vqkd_training_moves_the_codebook_restarts_dead_codes_and_leaves_encode_deterministic():
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(decay=0.5)
    x, targets = torch.randn(4, 3, 28, 28), torch.randn(4, 49, 12)
    tokenizer.ema_count[3] = 0.0  # code 3 is dead
    before = tokenizer.codebook.clone()
    stats = [m.running_mean.clone() for m in tokenizer.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    tokens_eval = tokenizer.encode(x)  # in training mode, still eval statistics and no update
    assert tokenizer.training and torch.equal(tokens_eval, tokenizer.eval().encode(x))
    tokenizer.train()
    after_encode = [m.running_mean for m in tokenizer.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(stats, after_encode, strict=True))

    out = tokenizer(x, targets)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and tokenizer.encoder[0][1][0].weight.grad.abs().sum() > 0  # straight-through
    assert not torch.allclose(tokenizer.codebook, before)
    torch.testing.assert_close(tokenizer.codebook.norm(dim=-1), torch.ones(16))
    # the dead code now sits on one of the batch's encoder vectors
    codes = tokenizer.codes(x).detach().flatten(0, 1)
    assert torch.isclose(codes @ tokenizer.codebook[3], torch.tensor(1.0), atol=1e-4).any()


def test_vqkd_saves_and_loads_as_a_visual_tokenizer(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer(torch.randn(2, 3, 28, 28), torch.randn(2, 49, 12))  # a training step changes the codebook
    tokenizer.save_pretrained(tmp_path)
    loaded = load_visual_tokenizer(tmp_path)
    assert isinstance(loaded, VQKDTokenizer) and loaded.settings == tokenizer.settings and not loaded.training
    x = torch.randn(3, 3, 28, 28)
    assert torch.equal(loaded.encode(x), tokenizer.encode(x))
    assert torch.equal(loaded.codebook, tokenizer.codebook)
    other = tmp_path / "teacher"
    ContrastiveTeacher(width=4, feature_dim=12).save_pretrained(other)
    with pytest.raises(FileNotFoundError, match="visual_tokenizer.safetensors"):
        VQKDTokenizer.from_pretrained(other)


def test_codebook_usage_figures():
    usage = codebook_usage(torch.tensor([[0, 0], [1, 1]]), vocab_size=4)
    assert usage["used_codes"] == 2 and usage["top_share"] == 0.5
    assert usage["perplexity"] == pytest.approx(2.0)
    assert codebook_usage(torch.arange(8), 8)["perplexity"] == pytest.approx(8.0)


def test_teacher_vqkd_and_third_generation_scripts_chain(tmp_path):
    import examples.pretrain_teacher as pretrain_teacher
    import examples.train_vqkd as train_vqkd

    write_fashion_mnist(tmp_path / "fm")
    common = ["--data_dir", str(tmp_path / "fm"), "--per_device_train_batch_size", "16", "--max_steps", "2",
              "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true",
              "--save_strategy", "no"]  # fmt: skip
    summary = pretrain_teacher.main(["--output_dir", str(tmp_path / "teacher"), "--width", "4", "--feature_dim", "12",
                                     *common])  # fmt: skip
    assert summary["train_images"] == 64 and (tmp_path / "teacher" / TEACHER_FILE).is_file()
    summary = train_vqkd.main(["--output_dir", str(tmp_path / "vqkd"), "--teacher", str(tmp_path / "teacher"),
                               "--vocab_size", "16", "--code_dim", "8", "--width", "4", "--hidden_dim", "12",
                               *common])  # fmt: skip
    usage = json.loads((tmp_path / "vqkd" / "tokenizer_summary.json").read_text())["codebook_usage"]
    assert usage == summary["codebook_usage"] and 1 <= usage["used_codes"] <= 16
    tokenizer = load_visual_tokenizer(tmp_path / "vqkd")
    assert isinstance(tokenizer, VQKDTokenizer) and tokenizer.settings["target_dim"] == 12

    run_pretrain(tmp_path, tmp_path / "v3", epochs=1, extra=["--tokenizer_from", str(tmp_path / "vqkd")])
    model = BeitForMaskedImageModeling.from_pretrained(tmp_path / "v3")
    assert model.config.vocab_size == 16
    x = torch.randn(2, 3, 28, 28)
    assert torch.equal(load_visual_tokenizer(tmp_path / "v3").encode(x), tokenizer.encode(x))
    with pytest.raises(ValueError, match="has vocab_size 16 and patch_size 4; this run asks for vocab_size 12"):
        run_pretrain(tmp_path, tmp_path / "v3b", epochs=1,
                     extra=["--tokenizer_from", str(tmp_path / "vqkd"), "--vocab_size", "12"])  # fmt: skip
