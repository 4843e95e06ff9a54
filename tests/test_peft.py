"""PEFT beside and on top of VPTM (modeling_vptm/training/peft_methods.py): LoRA and any PEFT config as baselines on
the same backbone, trained by run_classification.py, saved as PEFT saves them and reloaded to the same logits; and
LoRA inside a VPTM model, saved with its prompt checkpoint and refused on another backbone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import predict  # noqa: E402
import push_backbone  # noqa: E402
import pytest
import run_classification  # noqa: E402
import torch
import yaml
from conftest import REPO_ROOT, FakeHub, code_files, make_backbone
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForImageClassification


peft = pytest.importorskip("peft")

from modeling_vptm import SHIPPED_BACKBONE, VPTMForImageClassification, shipped_backbone_path  # noqa: E402
from modeling_vptm.training.peft_methods import (  # noqa: E402
    apply_peft,
    classifier_from_mim,
    load_classifier,
    load_peft_classifier,
    lora_config,
    read_peft_config,
)


TINY = ["--max_train_samples", "40", "--max_eval_samples", "30", "--num_train_epochs", "1",
        "--per_device_train_batch_size", "8", "--use_cpu", "true", "--disable_tqdm", "true"]  # fmt: skip
LABELS = {0: "zero", 1: "one", 2: "two"}


def run(output_dir, *extra) -> dict:
    return run_classification.main(["--output_dir", str(output_dir), *TINY, *extra])


def tensor_names(path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return sorted(f.keys())


def card_metadata(folder) -> dict:
    return yaml.safe_load(open(os.path.join(folder, "README.md")).read().split("---\n", 2)[1])


def move_adapter(model, seed: int = 0) -> None:
    """LoRA's B starts at zero, so an untrained adapter changes nothing: move every trainable tensor."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)


def shipped_pixels(count: int = 4) -> torch.Tensor:
    return torch.randn(count, 3, 28, 28, generator=torch.Generator().manual_seed(3))


def test_lora_run_saves_peft_files_that_reload_to_equal_logits(tmp_path, caplog):
    results = run(tmp_path, "--method", "lora")
    files = set(os.listdir(tmp_path))
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "preprocessor_config.json"} <= files
    assert set(code_files("peft_classifier.py")) <= files  # for trust_remote_code
    assert "model.safetensors" not in files and "labels.json" not in files  # an adapter and its labels, not a model
    config = json.load(open(tmp_path / "config.json"))
    assert config["model_type"] == "vptm_peft_classifier" and config["auto_map"] == {
        "AutoConfig": "peft_classifier.PeftClassifierConfig",
        "AutoModelForImageClassification": "peft_classifier.PeftClassifier",
    }
    adapter = json.load(open(tmp_path / "adapter_config.json"))
    # --method lora's targets, chosen on validation: the attention's four projections and the MLP's two layers
    assert adapter["peft_type"] == "LORA" and sorted(adapter["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
    )
    assert adapter["modules_to_save"] == ["classifier"]
    assert os.path.samefile(adapter["base_model_name_or_path"], shipped_backbone_path(SHIPPED_BACKBONE))
    names = tensor_names(tmp_path / "adapter_model.safetensors")
    assert all("lora_" in n or ".classifier." in n for n in names), names  # LoRA tensors and the head, nothing else
    assert sum("lora_A" in n for n in names) == 36  # six layers in each of the 6 blocks
    assert results["checkpoint_bytes"] == os.path.getsize(tmp_path / "adapter_model.safetensors")
    metadata = card_metadata(tmp_path)
    assert metadata["library_name"] == "peft" and {"lora", "peft"} <= set(metadata["tags"])

    # PEFT's own loading, on the base model built with the saved labels, the package's, and the Auto classes' and
    # pipeline's (config.json), agree exactly; a correct load reports nothing missing
    id2label = {int(k): v for k, v in config["id2label"].items()}
    from transformers import BeitForImageClassification

    base = BeitForImageClassification.from_pretrained(shipped_backbone_path(SHIPPED_BACKBONE), id2label=id2label)
    by_peft = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    labels = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    by_auto_peft = peft.AutoPeftModel.from_pretrained(str(tmp_path), **labels).eval()  # the base class it recorded
    ours = load_peft_classifier(str(tmp_path))
    caplog.clear()
    with caplog.at_level("WARNING"):
        auto = AutoModelForImageClassification.from_pretrained(str(tmp_path))
    assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage() or "newly initialized" in r.getMessage()]
    assert type(auto).__name__ == "BeitForImageClassification" and auto.config.id2label == id2label
    pixels = shipped_pixels()
    with torch.no_grad():
        expected = by_peft(pixel_values=pixels).logits
        assert torch.equal(ours(pixel_values=pixels).logits, expected)
        assert torch.equal(auto(pixel_values=pixels).logits, expected)
    with pytest.MonkeyPatch.context() as without_peft:  # a folder that cannot load here: one sentence saying what can
        without_peft.setitem(sys.modules, "peft", None)
        with pytest.raises(ImportError, match=r"is a PEFT adapter, which needs PEFT: pip install peft"):
            AutoModelForImageClassification.from_pretrained(str(tmp_path))
        assert torch.equal(by_auto_peft(pixel_values=pixels).logits, expected)
    assert ours.config.id2label == id2label and len(id2label) == 10

    # scoring the saved adapter again gives the accuracy the run reported
    rescored = run_classification.main(["--output_dir", str(tmp_path), *TINY, "--method", "lora", "--do_train",
                                        "false"])  # fmt: skip
    assert rescored["accuracy"] == results["accuracy"]


def test_lora_predicts_through_pipeline_and_predict_py(tmp_path, capsys):
    data = tmp_path / "data"
    for name, value in (("dark", 20), ("bright", 235)):
        os.makedirs(data / name)
        for j in range(8):
            Image.fromarray(np.full((28, 28), value + j, dtype=np.uint8)).save(data / name / f"{j}.png")
    run_classification.main(["--output_dir", str(tmp_path / "model"), "--train_dir", str(data), "--num_train_epochs",
                             "8", "--per_device_train_batch_size", "4", "--use_cpu", "true", "--disable_tqdm",
                             "true", "--train_val_split", "0.25", "--method", "lora", "--learning_rate",
                             "0.03"])  # fmt: skip
    queries = tmp_path / "queries"
    os.makedirs(queries)
    Image.fromarray(np.full((28, 28), 10, dtype=np.uint8)).save(queries / "a_dark.png")
    Image.fromarray(np.full((28, 28), 250, dtype=np.uint8)).save(queries / "b_bright.png")
    results = predict.main(["--model", str(tmp_path / "model"), str(queries), "--top_k", "2"])
    assert [r["predictions"][0]["label"] for r in results] == ["dark", "bright"]

    from transformers import pipeline

    classifier = pipeline("image-classification", model=str(tmp_path / "model"))  # the run folder, as it is
    top = classifier([Image.open(queries / "a_dark.png"), Image.open(queries / "b_bright.png")], top_k=1)
    assert [t[0]["label"] for t in top] == ["dark", "bright"]


def test_pipeline_on_a_lora_run_folder_gives_the_runs_test_accuracy(tmp_path, caplog):
    """`pipeline("image-classification", model=run_folder)`, the usual way to use a PEFT adapter folder, classifies
    the run's test images as the run scored them (to rounding: the run's uint8 data path and the image processor's
    differ in the last bits, which can flip a near-tie), and prints nothing about tensors missing."""
    from transformers import pipeline

    results = run_classification.main(
        [
            "--output_dir",
            str(tmp_path / "run"),
            "--method",
            "lora",
            "--max_train_samples",
            "200",
            "--max_eval_samples",
            "60",
            "--num_train_epochs",
            "3",
            "--use_cpu",
            "true",
            "--disable_tqdm",
            "true",
            "--do_eval",
            "false",
        ]
    )
    data_args = run_classification.DataTrainingArguments(max_train_samples=200, max_eval_samples=60)
    seed = run_classification.VPTMTrainingArguments("unused").seed  # the run's, which drew its test subset
    test = run_classification.load_data(data_args, run_classification.ModelArguments(), seed)["test"]
    caplog.clear()
    with caplog.at_level("WARNING"):
        classifier = pipeline("image-classification", model=str(tmp_path / "run"))
    assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage() or "newly initialized" in r.getMessage()]
    names = test.features["label"].names
    top = classifier([image.convert("RGB") for image in test["image"]], top_k=1)
    accuracy = float(np.mean([t[0]["label"] == names[label] for t, label in zip(top, test["label"], strict=True)]))
    assert results["eval_split"] == "test" and results["eval_images"] == 60
    assert abs(accuracy - results["accuracy"]) <= 1 / 60, (accuracy, results["accuracy"])  # one image at most


def test_any_peft_config_trains_and_saves_its_adapter(tmp_path):
    config = tmp_path / "loha.json"
    config.write_text(json.dumps({"peft_type": "LOHA", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}))
    results = run(tmp_path / "out", "--method", "peft", "--peft_config", str(config))
    adapter = json.load(open(tmp_path / "out" / "adapter_config.json"))
    assert adapter["peft_type"] == "LOHA" and adapter["modules_to_save"] == ["classifier"]  # the head added to it
    names = tensor_names(tmp_path / "out" / "adapter_model.safetensors")
    assert any("hada_w1_a" in n for n in names) and any("classifier" in n for n in names)
    loha = sum(p.numel() for n, p in load_classifier(str(tmp_path / "out")).named_parameters() if "hada_" in n)
    assert loha == 6 * 2 * 2 * 4 * (128 + 128)  # 2 Hadamard factors of rank 4, q and v in 6 blocks
    assert results["trainable_parameters"] == loha + 10 * 128 + 10  # and the 10-class head


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"the PEFT config .*missing.json does not exist \(expected a JSON file with peft_type"),
        ("{not json", r"is not a JSON file"),
        ('["LORA"]', r"must be a JSON object with a peft_type \(e.g. LORA\), got list"),
        ('{"peft_type": "NO_SUCH"}', r"names peft_type 'NO_SUCH'; PEFT knows \[.*'LORA'"),
        ('{"peft_type": "LORA", "rank_of_doom": 3}', r"is not one PEFT accepts"),
        ('{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}', r"is PROMPT_TUNING, a prompt-learning method "
         r"of PEFT's for language models; visual prompts on this backbone are --method vptm and --method vpt"),
    ],
)  # fmt: skip
def test_bad_peft_config_files_are_refused_by_name(tmp_path, content, message):
    path = tmp_path / ("missing.json" if content is None else "config.json")
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_peft_config(path)


def test_a_saved_adapter_config_trains_and_one_module_to_save_is_a_list(tmp_path):
    """PEFT's own adapter_config.json says inference_mode true (nothing would train) and may name one module."""
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"], "inference_mode": True,
                                "modules_to_save": "classifier"}))  # fmt: skip
    config = read_peft_config(path)
    assert config.inference_mode is False and list(config.modules_to_save) == ["classifier"]


def test_a_peft_config_that_does_not_fit_the_backbone_fails_before_training(tmp_path):
    config = tmp_path / "lora.json"
    config.write_text(json.dumps({"peft_type": "LORA", "target_modules": ["query", "value"]}))  # BEiT v4's names
    with pytest.raises(ValueError, match=r"--peft_config .*lora.json \(LORA\) cannot be applied to "
                       r"BeitForImageClassification: No modules were targeted for adaptation"):  # fmt: skip
        run(tmp_path / "out", "--method", "peft", "--peft_config", str(config))
    assert not os.path.exists(tmp_path / "out" / "adapter_config.json")
    with pytest.raises(ValueError, match=r"--method peft trains the PEFT config --peft_config FILE.json"):
        run(tmp_path / "out2", "--method", "peft")


def test_without_peft_the_peft_methods_name_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(ImportError, match=r'--method lora .*needs PEFT, which is not installed: pip install peft \(the'
                       r' peft extra'):  # fmt: skip
        run(tmp_path / "out", "--method", "lora")


def test_the_core_package_does_not_import_peft():
    code = "import sys, modeling_vptm, modeling_vptm.serving; print('peft' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------------ PEFT on VPTM
@pytest.fixture
def vptm_lora(backbone_dir):
    model = VPTMForImageClassification.from_backbone(backbone_dir, id2label=LABELS, prompt_length=2)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["task"])
    return peft.get_peft_model(model, config)


def test_lora_and_the_vptm_task_train_together_and_nothing_else_moves(vptm_lora, pixel_values):
    frozen = {n: p.detach().clone() for n, p in vptm_lora.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in vptm_lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "task.modules_to_save" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in vptm_lora.parameters() if p.requires_grad], lr=1e-2)
    vptm_lora.train()
    before = {n: p.detach().clone() for n, p in vptm_lora.named_parameters() if p.requires_grad}
    for _ in range(2):
        loss = vptm_lora(pixel_values=pixel_values, labels=torch.tensor([0, 1, 2])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in vptm_lora.named_parameters() if n in frozen)
    moved = {n for n, p in vptm_lora.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert any("lora_B" in n for n in moved) and any("prompt_embeddings" in n for n in moved)
    assert not vptm_lora.get_base_model().backbone.training  # the frozen backbone stays in eval mode


def test_vptm_lora_saves_lora_and_task_tensors_and_reloads_to_equal_logits(vptm_lora, pixel_values, tmp_path):
    from transformers import AutoModelForImageClassification

    move_adapter(vptm_lora)
    vptm_lora.eval()
    with torch.no_grad():
        expected = vptm_lora(pixel_values=pixel_values).logits
    vptm_lora.get_base_model().save_pretrained(tmp_path)  # the prompt checkpoint of the original task
    vptm_lora.save_pretrained(tmp_path)  # the adapter: LoRA tensors and the trained task
    names = tensor_names(tmp_path / "adapter_model.safetensors")
    assert all("lora_" in n or ".task." in n for n in names) and any(".task." in n for n in names)
    assert tensor_names(tmp_path / "model.safetensors") == ["prompt_embeddings.prompts", "verbalizer.logit_scale",
                                                            "verbalizer.projection.weight",
                                                            "verbalizer.prototypes"]  # fmt: skip
    for loaded in (VPTMForImageClassification.from_pretrained(tmp_path),
                   AutoModelForImageClassification.from_pretrained(tmp_path)):  # fmt: skip
        with torch.no_grad():
            assert torch.equal(loaded(pixel_values=pixel_values).logits, expected)
    # a loaded one saves as it was loaded (prompt checkpoint of the original task, and the adapter), and reloads
    loaded.save_pretrained(tmp_path / "again")
    assert tensor_names(tmp_path / "again" / "adapter_model.safetensors") == names
    assert tensor_names(tmp_path / "again" / "model.safetensors") == tensor_names(tmp_path / "model.safetensors")
    with torch.no_grad():
        again = VPTMForImageClassification.from_pretrained(tmp_path / "again")(pixel_values=pixel_values).logits
    assert torch.equal(again, expected)


def test_a_plain_checkpoint_saved_over_a_vptm_lora_one_drops_its_adapter(vptm_lora, backbone_dir, pixel_values,
                                                                          tmp_path):  # fmt: skip
    move_adapter(vptm_lora)
    vptm_lora.get_base_model().save_pretrained(tmp_path)
    vptm_lora.save_pretrained(tmp_path)
    plain = VPTMForImageClassification.from_backbone(backbone_dir, id2label=LABELS, prompt_length=2).eval()
    plain.save_pretrained(tmp_path)  # the same folder: the adapter there is no longer this checkpoint's
    assert not os.path.exists(tmp_path / "adapter_config.json")
    assert not os.path.exists(tmp_path / "adapter_model.safetensors")
    with torch.no_grad():
        reloaded = VPTMForImageClassification.from_pretrained(tmp_path)(pixel_values=pixel_values).logits
        assert torch.equal(reloaded, plain(pixel_values=pixel_values).logits)


def test_vptm_lora_refuses_another_backbone_and_needs_peft(vptm_lora, tmp_path, monkeypatch):
    vptm_lora.get_base_model().save_pretrained(tmp_path / "task")
    vptm_lora.save_pretrained(tmp_path / "task")
    other = tmp_path / "other-backbone"
    make_backbone(other, seed=5)
    config = json.load(open(tmp_path / "task" / "config.json"))
    config["backbone_name_or_path"] = str(other)
    (tmp_path / "task" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"fingerprint"):
        VPTMForImageClassification.from_pretrained(tmp_path / "task")
    shutil.copytree(tmp_path / "task", tmp_path / "copy")
    monkeypatch.setattr("modeling_vptm.checkpoint_io.is_peft_available", lambda: False)
    with pytest.raises(ImportError, match=r"holds a PEFT adapter \(adapter_config.json\), which needs PEFT"):
        VPTMForImageClassification.from_pretrained(tmp_path / "copy")
    # the same from the Hub (its cache, offline)
    hub = FakeHub(monkeypatch, tmp_path / "remote")
    shutil.copytree(tmp_path / "copy", tmp_path / "remote" / "me" / "task")
    hub.lay_out_cache(tmp_path / "hf", "me/task", "c" * 40)
    with pytest.raises(ImportError, match=r"me/task holds a PEFT adapter \(adapter_config.json\), which needs PEFT"):
        VPTMForImageClassification.from_pretrained("me/task", cache_dir=str(tmp_path / "hf" / "hub"))


def test_vptm_lora_method_runs_saves_and_reloads(tmp_path, capfd):
    results = run(tmp_path, "--method", "vptm_lora", "--prompt_length", "2", "--lora_r", "2")
    # saving the adapter (each checkpoint and the final one) is right, and says nothing that suggests otherwise
    assert "to instantiate a model of type" not in capfd.readouterr().err
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors"} <= files
    adapter = json.load(open(tmp_path / "adapter_config.json"))
    assert adapter["r"] == 2 and adapter["modules_to_save"] == ["task"]
    assert adapter["base_model_name_or_path"] == str(tmp_path)  # its base: the prompt checkpoint beside it
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]  # vptm_lora's own default
    assert card_metadata(tmp_path)["library_name"] == "peft"
    rescored = run_classification.main(["--output_dir", str(tmp_path), *TINY, "--method", "vptm_lora",
                                        "--prompt_length", "2", "--lora_r", "2", "--do_train", "false"])  # fmt: skip
    assert rescored["accuracy"] == results["accuracy"]
    from transformers import pipeline

    classifier = pipeline("image-classification", model=str(tmp_path))  # the run folder, PEFT's usual way
    pixels = shipped_pixels()
    with torch.no_grad():
        expected = load_classifier(str(tmp_path))(pixels).logits
        assert torch.equal(classifier.model(pixels).logits, expected)


def test_apply_peft_adds_the_head_and_refuses_by_name(backbone_dir):
    model = classifier_from_mim(backbone_dir, LABELS)
    wrapped = apply_peft(model, lora_config(r=2, target_modules=["q_proj"]), "test config")
    assert wrapped.peft_config["default"].modules_to_save == ["classifier"]
    with pytest.raises(ValueError, match=r"test config \(LORA\) cannot be applied to BeitForImageClassification"):
        apply_peft(classifier_from_mim(backbone_dir, LABELS), lora_config(target_modules=["nope"]), "test config")
    # PEFT itself applies a list as soon as one name matches: a name of another architecture's is refused here
    bert_names = lora_config(target_modules=["q_proj", "intermediate.dense"])
    with pytest.raises(
        ValueError,
        match=r"test config \(LORA\): target modules \['intermediate.dense'\] match no "
        r"module of BeitForImageClassification; its linear layers end in \[.*'mlp.fc1', 'mlp.fc2'\]",
    ):
        apply_peft(classifier_from_mim(backbone_dir, LABELS), bert_names, "test config")  # fmt: skip
    with pytest.raises(ValueError, match=r"LoRA's rank must be >= 1, got r=0"):
        lora_config(r=0)


LOAD_PUSHED = r"""
import json, sys
import torch
from modeling_vptm.training import load_classifier

model = load_classifier(sys.argv[1], revision=sys.argv[2])
with torch.no_grad():
    print(json.dumps(model(torch.load(sys.argv[3])).logits.tolist()))
"""


@pytest.mark.parametrize("method", ["lora", "vptm_lora"])
def test_pushed_adapter_loads_by_repo_id_at_its_commit(tmp_path, monkeypatch, method):
    """Pushed on a pushed backbone, then read back by repo id at the pushed commit, offline, in a fresh process: the
    base the adapter names (the backbone at its own revision for lora, the VPTM checkpoint beside it for vptm_lora)."""
    hub = FakeHub(monkeypatch, tmp_path / "remote")
    backbone_commit = push_backbone.main(["--backbone", SHIPPED_BACKBONE, "--repo_id", "vptm-tests/tiny-beit"])
    repo = f"vptm-tests/{method}"
    results = run(tmp_path / "out", "--method", method, "--push_to_hub", "true", "--hub_model_id", repo,
                  "--backbone_hub_id", "vptm-tests/tiny-beit", "--backbone_hub_revision", backbone_commit)  # fmt: skip
    remote = tmp_path / "remote" / repo
    adapter = json.load(open(remote / "adapter_config.json"))
    if method == "lora":
        assert sorted(os.listdir(remote)) == sorted(["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                     "config.json", "preprocessor_config.json",
                                                     *code_files("peft_classifier.py")])  # fmt: skip
        assert (adapter["base_model_name_or_path"], adapter["revision"]) == ("vptm-tests/tiny-beit", backbone_commit)
        assert "pipeline(" in open(remote / "README.md").read()
    else:  # the adapter's base is the VPTM checkpoint in the same repository, which names the Hub backbone
        assert adapter["base_model_name_or_path"] == repo and "config.json" in os.listdir(remote)
        assert json.load(open(remote / "config.json"))["backbone_name_or_path"] == "vptm-tests/tiny-beit"
    metadata = card_metadata(remote)
    assert metadata["library_name"] == "peft" and metadata["base_model"] == "vptm-tests/tiny-beit"

    hub.lay_out_cache(tmp_path / "hf", "vptm-tests/tiny-beit", backbone_commit)
    hub.lay_out_cache(tmp_path / "hf", repo, results["pushed_commit"])
    pixels = shipped_pixels()
    torch.save(pixels, tmp_path / "pixels.pt")
    (tmp_path / "load.py").write_text(LOAD_PUSHED)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_MODULES_CACHE=str(tmp_path / "mod"),
               PYTHONPATH=REPO_ROOT)  # fmt: skip
    result = subprocess.run([sys.executable, str(tmp_path / "load.py"), repo, results["pushed_commit"],
                             str(tmp_path / "pixels.pt")], capture_output=True, text=True, env=env, timeout=300,
                            cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = load_classifier(str(tmp_path / "out"))(pixel_values=pixels).logits
    assert torch.equal(torch.tensor(json.loads(result.stdout.strip().splitlines()[-1])), expected)


def test_lora_resumes_from_its_checkpoint_as_if_uninterrupted(tmp_path):
    args = ["--method", "lora", "--num_train_epochs", "2", "--save_total_limit", "5"]
    run(tmp_path / "full", *args)
    first = min((d for d in os.listdir(tmp_path / "full") if d.startswith("checkpoint-")),
                key=lambda d: int(d.split("-")[1]))  # fmt: skip
    assert "adapter_model.safetensors" in os.listdir(tmp_path / "full" / first)  # a checkpoint is the adapter
    os.makedirs(tmp_path / "resumed")
    shutil.copytree(tmp_path / "full" / first, tmp_path / "resumed" / first)
    shutil.copy(tmp_path / "full" / run_classification.RUN_ARGS_FILE, tmp_path / "resumed")
    resumed = run(tmp_path / "resumed", *args)
    assert resumed["resumed_from"] == str(tmp_path / "resumed" / first)
    with safe_open(str(tmp_path / "full" / "adapter_model.safetensors"), "pt") as a:
        with safe_open(str(tmp_path / "resumed" / "adapter_model.safetensors"), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            for key in a.keys():
                torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), atol=1e-5, rtol=1e-4)


def test_a_peft_run_folder_whose_labels_are_not_0_to_n_minus_1_is_refused(backbone_dir, tmp_path):
    """A PEFT run folder's config.json names its labels: keys 0, 1, 2, 7 loaded once and then failed at the first
    prediction (no class 3); they are refused when the folder loads, as a prompt checkpoint's are."""
    from modeling_vptm.peft_classifier import save_peft_classifier_config

    labels = {i: f"c{i}" for i in range(4)}
    apply_peft(classifier_from_mim(backbone_dir, labels), lora_config(r=2, target_modules=["q_proj"]),
               "test config").save_pretrained(tmp_path / "run")  # fmt: skip
    save_peft_classifier_config(tmp_path / "run", labels)
    assert AutoModelForImageClassification.from_pretrained(tmp_path / "run").config.id2label == labels
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b", "2": "c", "7": "d"}
    config.pop("label2id")
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"id2label must name the classes 0 to 3, each once; it has the keys \[7\]"):
        AutoModelForImageClassification.from_pretrained(tmp_path / "run")
