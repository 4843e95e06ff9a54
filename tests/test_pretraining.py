"""Tests of the pre-training pieces (IDX loader, tokenizer, masking, pretrain_mim.py) and the shipped backbone."""

from __future__ import annotations

import gzip
import json
import os
import random
import struct

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from transformers import BeitForMaskedImageModeling

from modeling_vptm import SHIPPED_BACKBONE, VPTMForImageClassification, shipped_backbone_path
from modeling_vptm.data import (
    FASHION_MNIST_LABELS,
    balanced_subset,
    fashion_mnist_dataset,
    load_fashion_mnist,
    random_shift_flip,
    read_idx,
    shipped_dataset,
)
from modeling_vptm.pretraining import (
    BlockMaskGenerator,
    MaskedImageModelingCollator,
    PatchKMeansTokenizer,
    TeacherFeatureTokenizer,
    VQKDTokenizer,
    codebook_usage,
    load_visual_tokenizer,
)


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)


def write_fashion_mnist(folder, num_train: int = 64, num_test: int = 32, seed: int = 0) -> None:
    """A tiny fake Fashion-MNIST: class k has a bright bar at rows 2k..2k+4, plus noise."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for n, stem in ((num_train, "train"), (num_test, "t10k")):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, size=(n, 28, 28))
        for i, k in enumerate(labels):
            images[i, 2 * k : 2 * k + 5, 4:24] = 230
        write_idx(os.path.join(folder, f"{stem}-images-idx3-ubyte.gz"), images, compress=True)
        write_idx(os.path.join(folder, f"{stem}-labels-idx1-ubyte"), labels)


# --------------------------------------------------------------------------------------------------------- data
def test_read_idx_plain_and_gzip(tmp_path):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    write_idx(tmp_path / "a-idx3-ubyte", array)
    write_idx(tmp_path / "b-idx3-ubyte.gz", array, compress=True)
    assert np.array_equal(read_idx(tmp_path / "a-idx3-ubyte"), array)
    assert np.array_equal(read_idx(tmp_path / "b-idx3-ubyte.gz"), array)


def test_read_idx_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x00\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(ValueError, match=r"is not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "float").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd")
    with pytest.raises(ValueError, match=r"expected IDX type 0x08 \(unsigned byte\), got 0x0d"):
        read_idx(tmp_path / "float")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(ValueError, match=r"announces shape \(5,\) \(5 bytes\) but the file holds 2 bytes"):
        read_idx(tmp_path / "short")


def test_load_fashion_mnist_and_missing_files(tmp_path):
    write_fashion_mnist(tmp_path / "fm")
    images, labels = load_fashion_mnist("train", tmp_path / "fm")
    assert images.shape == (64, 28, 28) and images.dtype == np.uint8 and labels.shape == (64,)
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", tmp_path / "empty")
    with pytest.raises(ValueError, match=r"split must be one of \['test', 'train'\], got 'val'"):
        load_fashion_mnist("val", tmp_path / "fm")


def test_fashion_mnist_split_is_encoded_once_and_read_back(tmp_path, monkeypatch):
    import datasets

    write_fashion_mnist(tmp_path / "fm")
    images, labels = load_fashion_mnist("train", tmp_path / "fm")
    split = fashion_mnist_dataset("train", tmp_path / "fm", cache_dir=tmp_path / "cache")
    assert split.features["label"].names == FASHION_MNIST_LABELS and split["label"] == labels.tolist()
    assert np.array_equal(np.stack([np.asarray(image) for image in split["image"]]), images)
    (cached,) = (tmp_path / "cache" / "vptm-fashion-mnist").glob("train-*.parquet")
    assert [f.name for f in cached.parent.iterdir()] == [cached.name]  # no partial file left behind
    monkeypatch.setattr(datasets.Dataset, "from_dict", lambda *a, **k: pytest.fail("encoded a second time"))
    again = fashion_mnist_dataset("train", tmp_path / "fm", cache_dir=tmp_path / "cache")
    assert again["label"] == labels.tolist() and again.cache_files  # read back, backed by a file
    write_fashion_mnist(tmp_path / "other", seed=1)  # other contents: another file
    monkeypatch.undo()
    fashion_mnist_dataset("train", tmp_path / "other", cache_dir=tmp_path / "cache")
    assert len(list(cached.parent.glob("train-*.parquet"))) == 2


def test_balanced_subset_is_seeded_and_balanced():
    labels = np.repeat(np.arange(4), 10)
    first, again = balanced_subset(labels, 3, seed=5), balanced_subset(labels, 3, seed=5)
    assert np.array_equal(first, again) and len(first) == 12
    assert np.bincount(labels[first]).tolist() == [3, 3, 3, 3]
    with pytest.raises(ValueError, match=r"class 0 has 10 examples, fewer than per_class=11"):
        balanced_subset(labels, 11)


# ---------------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_fit_encode_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(40, 3, 12, 12, generator=generator)
    images[:20, :, :4] += 3.0  # two kinds of content, so clusters are not arbitrary
    tokenizer = PatchKMeansTokenizer(patch_size=4, num_channels=3, vocab_size=8, context=1)
    stats = tokenizer.fit(images, num_iters=5, generator=torch.Generator().manual_seed(0))
    assert stats["used_codes"] == 8 and stats["inertia"] > 0
    tokens = tokenizer.encode(images)
    assert tokens.shape == (40, 9) and tokens.dtype == torch.int64
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 8
    # the tokens are the nearest centroids of the standardised window features
    feats = tokenizer.patch_features(images).reshape(-1, 36)
    nearest = torch.cdist(feats, tokenizer.centroids).argmin(1).view(40, 9)
    assert torch.equal(tokens, nearest)
    tokenizer.save_pretrained(tmp_path)
    loaded = PatchKMeansTokenizer.from_pretrained(tmp_path)
    assert (loaded.patch_size, loaded.vocab_size, loaded.context) == (4, 8, 1)
    assert torch.equal(loaded.encode(images), tokens)


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size >= 2"):
        PatchKMeansTokenizer(4, 3, 1)
    tokenizer = PatchKMeansTokenizer(4, 3, 8)
    with pytest.raises(ValueError, match=r"shape \(batch, 3, height, width\), got \(2, 1, 8, 8\)"):
        tokenizer.encode(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"at least vocab_size=8 patches, got 4"):
        tokenizer.fit(torch.zeros(1, 3, 8, 8))
    with pytest.raises(FileNotFoundError, match=r"visual_tokenizer.safetensors"):
        PatchKMeansTokenizer.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------------ masking
def test_block_masks_have_the_ratio_and_blocks():
    generator = BlockMaskGenerator((7, 7), mask_ratio=0.4, min_num_patches=4)
    rng = random.Random(0)
    masks = torch.stack([generator(rng) for _ in range(200)])
    counts = masks.flatten(1).sum(1)
    assert counts.max() <= 20 and (counts == 20).float().mean() > 0.95
    # block-wise: most masked patches have a masked 4-neighbour (random masking would give far fewer)
    padded = torch.nn.functional.pad(masks.float(), (1, 1, 1, 1))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    assert (neighbours[masks] > 0).float().mean() > 0.9
    again = torch.stack([generator(random.Random(0)) for _ in range(1)])
    assert torch.equal(again[0], masks[0])
    with pytest.raises(ValueError, match=r"mask_ratio must be in \(0, 1\), got 1.5"):
        BlockMaskGenerator((7, 7), mask_ratio=1.5)


def test_random_shift_flip_moves_content():
    image = torch.zeros(1, 1, 6, 6)
    image[0, 0, 2, 3] = 1.0
    seen = set()
    for seed in range(30):
        out = random_shift_flip(image, max_shift=1, flip=True, generator=torch.Generator().manual_seed(seed))
        assert out.shape == image.shape and out.sum() == 1
        seen.add(tuple(out[0, 0].nonzero()[0].tolist()))
    # row 2 +- 1; column 3 +- 1 or, flipped, 2 +- 1
    assert seen <= {(r, c) for r in (1, 2, 3) for c in (1, 2, 3, 4)} and len(seen) > 4


def test_collator_labels_are_tokens_of_masked_patches():
    tokenizer = PatchKMeansTokenizer(4, 3, 8)
    tokenizer.centroids.normal_(generator=torch.Generator().manual_seed(0))
    collator = MaskedImageModelingCollator(tokenizer, BlockMaskGenerator((5, 5), 0.4, 2), seed=3)
    examples = [{"pixel_values": torch.randn(3, 20, 20)} for _ in range(4)]
    batch = collator(examples)
    assert batch["pixel_values"].shape == (4, 3, 20, 20) and batch["bool_masked_pos"].shape == (4, 25)
    assert torch.equal(batch["labels"], tokenizer.encode(batch["pixel_values"])[batch["bool_masked_pos"]])
    again = MaskedImageModelingCollator(tokenizer, BlockMaskGenerator((5, 5), 0.4, 2), seed=3)(examples)
    assert torch.equal(again["bool_masked_pos"], batch["bool_masked_pos"])


# ------------------------------------------------------------------------------------------------- pre-training
def test_teacher_tokenizer_codes_are_nearest_normalised_teacher_states(tmp_path, backbone_dir, pixel_values):
    backbone = BeitForMaskedImageModeling.from_pretrained(backbone_dir)  # its own copy: the tokenizer freezes it
    tokenizer = TeacherFeatureTokenizer(backbone, str(backbone_dir), vocab_size=5, layer=-2)
    stats = tokenizer.fit(pixel_values, num_samples=1000, num_iters=5, generator=torch.Generator().manual_seed(0))
    assert stats["used_codes"] == 5 and 0 < stats["mean_cosine"] <= 1
    assert torch.allclose(tokenizer.centroids.norm(dim=-1), torch.ones(5))
    # by hand: the teacher's penultimate hidden state of each patch, normalised, against the codebook
    backbone.eval()
    with torch.no_grad():
        states = backbone.beit(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
    expected = (torch.nn.functional.normalize(states, dim=-1) @ tokenizer.centroids.T).argmax(-1)
    tokens = tokenizer.encode(pixel_values)
    assert tokens.shape == (len(pixel_values), states.shape[1]) and torch.equal(tokens, expected)
    # the teacher stays in eval mode (no stochastic depth in the targets) when the model around it trains
    tokenizer.train()
    assert not tokenizer.teacher.training and torch.equal(tokenizer.encode(pixel_values), expected)
    # saved without the teacher's weights; the teacher is found again by name
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_visual_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, TeacherFeatureTokenizer) and loaded.layer == -2
    assert torch.equal(loaded.encode(pixel_values), expected)
    assert (tmp_path / "tok" / "visual_tokenizer.safetensors").stat().st_size < 2000
    with pytest.raises(ValueError, match=r"layer in \[-4, 3\] \(the teacher has 4 hidden states\), got .*layer=4"):
        TeacherFeatureTokenizer(backbone, "x", vocab_size=5, layer=4)


def test_second_generation_pretraining_tokenises_the_teacher_and_starts_from_it(tmp_path):
    write_fashion_mnist(tmp_path / "fm")
    run_pretrain(tmp_path, tmp_path / "gen1", epochs=1)
    first = BeitForMaskedImageModeling.from_pretrained(tmp_path / "gen1")
    extra = ["--teacher", str(tmp_path / "gen1"), "--init_from", str(tmp_path / "gen1"), "--vocab_size", "12"]
    run_pretrain(tmp_path, tmp_path / "gen2", epochs=1, extra=extra, learning_rate="0")
    second = BeitForMaskedImageModeling.from_pretrained(tmp_path / "gen2")
    tokenizer = load_visual_tokenizer(tmp_path / "gen2")
    assert isinstance(tokenizer, TeacherFeatureTokenizer) and tokenizer.teacher_name == str(tmp_path / "gen1")
    assert second.config.vocab_size == 12 and second.lm_head.weight.shape == (12, 16)
    # with a zero learning rate the encoder is exactly the first backbone's
    for name, tensor in first.beit.state_dict().items():
        assert torch.equal(second.beit.state_dict()[name], tensor), name
    # a rerun asking for another tokenizer in the same folder is refused, not silently mixed
    with pytest.raises(ValueError, match=r"holds a tokenizer with .*'vocab_size': 12.* but this run asks for"):
        run_pretrain(tmp_path, tmp_path / "gen2", epochs=1, extra=extra[:4] + ["--vocab_size", "10"])


def run_pretrain(tmp_path, output, epochs, extra=(), learning_rate="1e-3"):
    import examples.pretrain_mim as pretrain

    argv = [
        "--output_dir", str(output), "--data_dir", str(tmp_path / "fm"), "--hidden_size", "16",
        "--num_hidden_layers", "2", "--num_attention_heads", "2", "--intermediate_size", "32", "--vocab_size", "16",
        "--tokenizer_samples", "2000", "--kmeans_iters", "3", "--per_device_train_batch_size", "16",
        "--num_train_epochs", str(epochs), "--save_strategy", "epoch", "--report_to", "none", "--use_cpu", "true",
        "--disable_tqdm", "true", "--learning_rate", learning_rate, "--seed", "7", *extra,
    ]  # fmt: skip
    return pretrain.main(argv)


def test_pretrain_script_produces_a_loadable_backbone_and_resumes(tmp_path):
    write_fashion_mnist(tmp_path / "fm")
    summary = run_pretrain(tmp_path, tmp_path / "run", epochs=1)
    assert summary["train_images"] == 64 and np.isfinite(summary["train_loss"])
    files = set(os.listdir(tmp_path / "run"))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "visual_tokenizer.safetensors"} <= files
    umask = os.umask(0)
    os.umask(umask)  # the backbone and its tokenizer are readable as any file the run writes (safetensors: 0600)
    for name in ("model.safetensors", "visual_tokenizer.safetensors"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    model, info = BeitForMaskedImageModeling.from_pretrained(tmp_path / "run", output_loading_info=True)
    assert not info["missing_keys"] and model.config.vocab_size == 16 and model.config.use_mask_token
    assert model.config.use_shared_relative_position_bias and not model.config.use_absolute_position_embeddings
    tokens_before = PatchKMeansTokenizer.from_pretrained(tmp_path / "run").centroids.clone()

    # a second call with more epochs resumes from checkpoint-4 and reuses the tokenizer
    summary = run_pretrain(tmp_path, tmp_path / "run", epochs=2)
    state = json.loads((tmp_path / "run" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8 and state["epoch"] == 2
    assert torch.equal(PatchKMeansTokenizer.from_pretrained(tmp_path / "run").centroids, tokens_before)


def test_pretraining_is_deterministic_with_a_seed(tmp_path):
    write_fashion_mnist(tmp_path / "fm")
    run_pretrain(tmp_path, tmp_path / "a", epochs=1)
    run_pretrain(tmp_path, tmp_path / "b", epochs=1)
    a = BeitForMaskedImageModeling.from_pretrained(tmp_path / "a").state_dict()
    b = BeitForMaskedImageModeling.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(
        a["lm_head.weight"],
        BeitForMaskedImageModeling(
            BeitForMaskedImageModeling.config_class.from_pretrained(tmp_path / "a")
        ).state_dict()["lm_head.weight"],
    )


# ----------------------------------------------------------------------------------------- shipped backbone/data
# each shipped backbone and the kind of visual tokens it was pre-trained to predict
SHIPPED_TOKENIZERS = {
    "tiny-beit-fashion-mnist": PatchKMeansTokenizer,
    "tiny-beit-fashion-mnist-v2": TeacherFeatureTokenizer,
    "tiny-beit-fashion-mnist-v3": VQKDTokenizer,
}


@pytest.mark.parametrize("name", list(SHIPPED_TOKENIZERS))
def test_shipped_backbones_load_offline_with_their_config(monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = shipped_backbone_path(name)
    assert path.startswith(os.path.join(REPO_ROOT, "modeling_vptm")) or "site-packages" in path
    model, info = BeitForMaskedImageModeling.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"]
    config = model.config
    assert (config.image_size, config.patch_size, config.hidden_size, config.num_hidden_layers) == (28, 4, 128, 6)
    assert config.vocab_size == 512 and config.use_shared_relative_position_bias
    tokenizer = load_visual_tokenizer(path)
    assert isinstance(tokenizer, SHIPPED_TOKENIZERS[name])
    assert tokenizer.vocab_size == config.vocab_size and tokenizer.patch_size == config.patch_size
    shipped = os.path.dirname(path)
    backbones = [os.path.join(shipped, d) for d in os.listdir(shipped) if d.startswith("tiny-beit")]
    # three 1.26 M-parameter backbones in float32 with their tokenizers: the package stays small to install
    assert sum(os.path.getsize(os.path.join(b, f)) for b in backbones for f in os.listdir(b)) <= 17 * 2**20
    # the shipped weights and tokenizer still agree: MIM accuracy measured now, on 1,000 of the shipped test images,
    # matches the figure recorded on the 10,000 official ones and stays far above the most-frequent token
    from evaluate_backbone import mim_accuracy

    from modeling_vptm.pretraining import to_pixel_values

    data = shipped_dataset()
    pixels = {split: to_pixel_values(np.stack([np.asarray(i) for i in data[split]["image"]])) for split in data}
    majority = int(torch.bincount(tokenizer.encode(pixels["train"]).flatten(), minlength=config.vocab_size).argmax())
    measured = mim_accuracy(model, tokenizer, pixels["test"][:1000], 500, 0, majority, "cpu")
    recorded = json.loads(open(os.path.join(path, "evaluation.json")).read())
    assert measured["mim_accuracy"] == pytest.approx(recorded["mim_accuracy"], abs=0.02)
    assert measured["mim_accuracy"] > 1.5 * measured["majority_token_accuracy"]


def test_second_generation_tokens_are_codes_of_the_first_backbones_features():
    tokenizer = load_visual_tokenizer(shipped_backbone_path("tiny-beit-fashion-mnist-v2"))
    assert tokenizer.teacher_name == SHIPPED_BACKBONE and tokenizer.layer == -1
    teacher = BeitForMaskedImageModeling.from_pretrained(shipped_backbone_path()).eval()
    from modeling_vptm.pretraining import to_pixel_values

    images = np.stack([np.asarray(i) for i in shipped_dataset()["test"]["image"][:8]])
    pixels = to_pixel_values(images)
    with torch.no_grad():
        states = teacher.beit(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
    expected = (torch.nn.functional.normalize(states, dim=-1) @ tokenizer.centroids.T).argmax(-1)
    assert torch.equal(tokenizer.encode(pixels), expected)
    assert torch.allclose(tokenizer.centroids.norm(dim=-1), torch.ones(512), atol=1e-5)


def test_third_generation_tokens_are_vqkd_codes_that_use_the_codebook():
    tokenizer = load_visual_tokenizer(shipped_backbone_path("tiny-beit-fashion-mnist-v3"))
    assert tokenizer.vocab_size == 512 and not tokenizer.training
    torch.testing.assert_close(tokenizer.codebook.norm(dim=-1), torch.ones(512))
    from modeling_vptm.pretraining import to_pixel_values

    images = np.stack([np.asarray(i) for i in shipped_dataset()["train"]["image"]])
    pixels = to_pixel_values(images)
    tokens = tokenizer.encode(pixels)
    with torch.no_grad():  # a token is the code of highest cosine similarity to the encoder's normalised vector
        expected = (tokenizer.codes(pixels) @ tokenizer.codebook.T).argmax(-1)
    assert torch.equal(tokens, expected)
    # not collapsed onto a few codes: on 1,000 images (49,000 patches) most codes occur, none dominates
    usage = codebook_usage(tokens, tokenizer.vocab_size)
    assert usage["used_codes"] > 256 and usage["perplexity"] > 100 and usage["top_share"] < 0.05


def test_vptm_on_the_shipped_backbone_names_it_portably(tmp_path):
    data = shipped_dataset()
    assert len(data["train"]) == 1000 and len(data["test"]) == 3000
    assert data["train"].features["label"].names == FASHION_MNIST_LABELS
    assert np.bincount(data["train"]["label"]).tolist() == [100] * 10
    model = VPTMForImageClassification.from_backbone(SHIPPED_BACKBONE, num_labels=10)
    assert model.config.backbone_name_or_path == "vptm:tiny-beit-fashion-mnist"
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["backbone_name_or_path"] == "vptm:tiny-beit-fashion-mnist"
    reloaded = VPTMForImageClassification.from_pretrained(tmp_path)
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(reloaded(pixels).logits, model.eval()(pixels).logits)
