"""Tests of examples/run_classification.py and examples/predict.py on the shipped backbone and tiny data."""

from __future__ import annotations

import dataclasses
import json
import os
import re
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
from conftest import PROMPT_CHECKPOINT_CODE, REPO_ROOT, FakeHub
from PIL import Image
from safetensors import safe_open


TINY = ["--max_train_samples", "40", "--max_eval_samples", "30", "--num_train_epochs", "1",
        "--per_device_train_batch_size", "8", "--use_cpu", "true", "--disable_tqdm", "true"]  # fmt: skip


def run(output_dir, *extra) -> dict:
    return run_classification.main(["--output_dir", str(output_dir), *TINY, *extra])


def read_card(folder) -> tuple[dict, str]:
    text = open(os.path.join(folder, "README.md")).read()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def task_keys(folder) -> list[str]:
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        return sorted(f.keys())


@pytest.mark.parametrize(
    "method, expected_keys",
    [
        ("vptm", ["prompt_embeddings.prompts", "verbalizer.logit_scale", "verbalizer.projection.weight",
                  "verbalizer.prototypes"]),
        ("vpt", ["classifier.bias", "classifier.weight", "prompt_embeddings.prompts"]),
        ("linear", ["classifier.bias", "classifier.weight"]),
    ],
)  # fmt: skip
def test_prompt_methods_save_only_task_tensors_and_a_card(tmp_path, method, expected_keys, capsys):
    results = run(tmp_path, "--method", method, "--prompt_length", "2")
    assert 0.0 <= results["accuracy"] <= 1.0 and results["eval_images"] == 30 and results["train_images"] == 40
    assert json.load(open(tmp_path / "all_results.json"))["accuracy"] == results["accuracy"]
    assert task_keys(tmp_path) == expected_keys
    assert results["checkpoint_bytes"] < 0.05 * os.path.getsize(
        os.path.join(REPO_ROOT, "modeling_vptm/shipped/tiny-beit-fashion-mnist/model.safetensors")
    )
    files = set(os.listdir(tmp_path))
    assert {
        "config.json",
        "modeling_vptm.py",
        "configuration_vptm.py",
        "prompted_backbone.py",
        "vptm_task.py",
        "checkpoint_io.py",
        "preprocessor_config.json",
    } <= files
    saved = json.load(open(tmp_path / "config.json"))  # only config fields: the script's own arguments stay out
    assert not {"backbone_hub_id", "prototype_init", "method", "token"} & set(saved)
    metadata, body = read_card(tmp_path)
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-classification"
    # the packaged backbone and dataset are not Hub ids: the card does not name them as such
    assert "base_model" not in metadata and "datasets" not in metadata and metadata["license"] == "mit"
    assert metadata["tags"] == list(dict.fromkeys(["vptm", "visual-prompt-tuning", method]))
    assert "packaged with vptm" in body and "@article{liao2023vptm" in body and "Intended use" in body
    scores = metadata["model-index"][0]["results"][0]["metrics"]
    assert [(m["type"], m["value"]) for m in scores] == [
        ("accuracy", round(results["accuracy"], 4)), ("f1", round(results["metrics"]["f1"], 4))
    ]  # fmt: skip
    assert metadata["metrics"] == ["accuracy", "f1"] and "| Accuracy | Macro F1 |" in body
    # Trainer's own metric and state files, beside our all_results.json
    assert json.load(open(tmp_path / "test_results.json"))["test_f1"] == results["metrics"]["f1"]
    assert {"train_results.json", "trainer_state.json"} <= set(os.listdir(tmp_path))
    assert "trust_remote_code=True" in body and "revision=" in body
    assert f"only the task's small tensors ({results['trainable_parameters']:,d} trainable" in body
    printed = capsys.readouterr().out
    assert f"{method}: test accuracy {results['accuracy']:.4f} on {results['eval_images']} images |" in printed
    assert "trainable parameters" in printed


def test_vptm_trainable_count_and_class_mean_init(tmp_path):
    results = run(tmp_path, "--prototype_init", "class_mean", "--prompt_length", "1", "--prompt_layers", "0,5")
    # prompts 2 blocks x 1 x 128, projection 128 x 64 (the hidden state), prototypes 10 x 64, scale
    assert results["trainable_parameters"] == 2 * 128 + 128 * 64 + 10 * 64 + 1


def test_full_fine_tuning_trains_the_backbone(tmp_path):
    results = run(tmp_path, "--method", "full")
    assert results["trainable_parameters"] == results["total_parameters"]
    assert "It holds every weight of the fine-tuned BEiT" in read_card(tmp_path)[1]
    assert any(k.startswith("beit.encoder.layer.") or k.startswith("beit.layers.") for k in task_keys(tmp_path))


@pytest.mark.parametrize(
    "args, error, message",
    [
        (["--method", "dora"], SystemExit, r"argument --method: invalid choice: 'dora' \(choose from 'vptm', 'vpt'"),
        (["--dataset_name", ""], ValueError, r"no dataset given: pass --dataset_name"),
        (["--label_column_name", "target"], ValueError,
         r"column 'target' not found .* columns are \['image', 'label'\]"),
        (["--prototype_init", "kmeans"], SystemExit,
         r"argument --prototype_init/--prototype-init: invalid choice: 'kmeans'"),
        (["--model_name_or_path", "no-such/backbone", "--cache_dir", "/nonexistent"], OSError,
         r"cannot load the backbone 'no-such/backbone'"),
    ],
)  # fmt: skip
def test_argument_errors(tmp_path, monkeypatch, capsys, args, error, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(error, match=None if error is SystemExit else message):
        run(tmp_path / "out", *args)
    if error is SystemExit:  # argparse's refusal: usage and the reason on stderr
        assert re.search(message, capsys.readouterr().err)


def make_folder(root, classes=("cat", "dog"), per_class=3, size=(9, 7)):
    rng = np.random.default_rng(0)
    for name in classes:
        os.makedirs(root / name, exist_ok=True)
        for j in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / name / f"{j}.png")


def test_image_folder_errors_and_skipping(tmp_path):
    make_folder(tmp_path / "one", classes=("cat",))
    with pytest.raises(ValueError, match=r"at least 2 classes, found \['cat'\]"):
        run(tmp_path / "o1", "--train_dir", str(tmp_path / "one"))
    os.makedirs(tmp_path / "empty" / "a")
    with pytest.raises(ValueError, match=r"holds no images"):
        run(tmp_path / "o2", "--train_dir", str(tmp_path / "empty"))
    make_folder(tmp_path / "data", per_class=6)
    (tmp_path / "data" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match=r"1 unreadable image file\(s\) .*broken.png.*--skip_unreadable_images"):
        run(tmp_path / "o3", "--train_dir", str(tmp_path / "data"))
    results = run(tmp_path / "o4", "--train_dir", str(tmp_path / "data"), "--skip_unreadable_images", "true",
                  "--train_val_split", "0.25")  # fmt: skip
    assert results["train_images"] + results["eval_images"] == 12
    config = json.load(open(tmp_path / "o4" / "config.json"))
    assert config["id2label"] == {"0": "cat", "1": "dog"}


def test_output_dir_with_a_different_run_is_refused(tmp_path):
    run(tmp_path, "--prompt_length", "1")
    with pytest.raises(
        ValueError, match=r"already holds a run with different arguments \(differs in \['prompt_length'\]"
    ):
        run(tmp_path, "--prompt_length", "2")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"already holds files of another program"):
        run(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    results = run(tmp_path, "--prompt_length", "2", "--overwrite_output_dir", "true")
    assert results["method"] == "vptm"


def test_resume_equals_uninterrupted(tmp_path, caplog, capsys, monkeypatch):
    import logging

    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)  # let caplog see Trainer's warnings
    args = ["--num_train_epochs", "2", "--save_total_limit", "5", "--prompt_length", "2"]
    run(tmp_path / "full", *args)
    assert "Writing model shards" not in capsys.readouterr().err  # no progress bar per checkpoint save
    checkpoints = sorted(d for d in os.listdir(tmp_path / "full") if d.startswith("checkpoint-"))
    first = min(checkpoints, key=lambda d: int(d.split("-")[1]))
    os.makedirs(tmp_path / "resumed")
    shutil.copytree(tmp_path / "full" / first, tmp_path / "resumed" / first)
    shutil.copy(tmp_path / "full" / run_classification.RUN_ARGS_FILE, tmp_path / "resumed")
    with caplog.at_level("WARNING"):
        resumed = run(tmp_path / "resumed", *args)  # same arguments: resumes from the checkpoint it finds
    assert resumed["resumed_from"] == str(tmp_path / "resumed" / first)
    assert f"resuming from {tmp_path / 'resumed' / first}" in caplog.text
    assert "missing keys" not in caplog.text  # the frozen backbone is not in a prompt checkpoint, by design
    assert f"(resumed from {first})" in capsys.readouterr().out
    state = json.load(open(tmp_path / "resumed" / "checkpoint-10" / "trainer_state.json"))
    assert state["global_step"] == 10
    with safe_open(str(tmp_path / "full" / "model.safetensors"), "pt") as a:
        with safe_open(str(tmp_path / "resumed" / "model.safetensors"), "pt") as b:
            for key in a.keys():
                torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), atol=1e-5, rtol=1e-4)


LOAD_BY_ID = r"""
import importlib.abc, json, sys


class NoVptmPackage(importlib.abc.MetaPathFinder):  # a machine with transformers only: the package is not there
    def find_spec(self, name, path=None, target=None):
        if name == "modeling_vptm" or name.startswith("modeling_vptm."):
            raise ModuleNotFoundError(name)


sys.meta_path.insert(0, NoVptmPackage())
import torch
from transformers import AutoModelForImageClassification

model = AutoModelForImageClassification.from_pretrained("vptm-tests/fashion-prompts", trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
pixel_values = torch.load(sys.argv[1])
with torch.no_grad():
    print(json.dumps(model(pixel_values).logits.tolist()))
"""


def test_push_refuses_a_backbone_others_cannot_load_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"python examples/push_backbone.py --backbone vptm:tiny-beit-fashion-mnist "
                       r"--repo_id <your-name>/<backbone-name>.*--backbone_hub_id"):  # fmt: skip
        run(tmp_path / "out", "--push_to_hub", "true", "--hub_model_id", "vptm-tests/fashion-prompts")
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_pushed_checkpoint_on_a_pushed_backbone_loads_with_transformers_only(tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    hub = FakeHub(monkeypatch, tmp_path / "remote")
    backbone_commit = push_backbone.main(["--backbone", "vptm:tiny-beit-fashion-mnist", "--repo_id",
                                          "vptm-tests/tiny-beit"])  # fmt: skip
    assert sorted(os.listdir(tmp_path / "remote" / "vptm-tests/tiny-beit")) == [
        "README.md", "config.json", "evaluation.json", "model.safetensors", "preprocessor_config.json",
        "pretrain_summary.json", "visual_tokenizer.safetensors",
    ]  # fmt: skip
    backbone_card = ModelCard.load(tmp_path / "remote" / "vptm-tests/tiny-beit" / "README.md")
    assert backbone_card.data.license == "mit" and "fingerprint" in backbone_card.text

    results = run(tmp_path / "out", "--push_to_hub", "true", "--hub_model_id", "vptm-tests/fashion-prompts",
                  "--hub_private_repo", "true", "--hub_revision", "v1", "--backbone_hub_id", "vptm-tests/tiny-beit",
                  "--backbone_hub_revision", backbone_commit)  # fmt: skip
    assert hub.calls[:2] == [
        ("create_repo", "vptm-tests/tiny-beit", None),
        ("upload_folder", "vptm-tests/tiny-beit", None),
    ]
    prompts = "vptm-tests/fashion-prompts"  # checkpoint files, then the card pinning their commit
    assert hub.calls[2:] == [("create_repo", prompts, True), ("create_branch", prompts, "v1"),
                             ("upload_folder", prompts, "v1")] * 2  # fmt: skip
    remote = tmp_path / "remote" / "vptm-tests/fashion-prompts"
    uploaded = sorted(os.listdir(remote))
    assert uploaded == sorted(["README.md", "config.json", "model.safetensors", "preprocessor_config.json",
                               *PROMPT_CHECKPOINT_CODE])  # fmt: skip
    assert results["pushed_files"] == uploaded and results["pushed_commit"] == f"{2:040x}"
    # the pushed config names the Hub copy; the local folder keeps the packaged name it was trained on
    pushed = json.load(open(remote / "config.json"))
    assert (pushed["backbone_name_or_path"], pushed["backbone_revision"]) == ("vptm-tests/tiny-beit", backbone_commit)
    assert json.load(open(tmp_path / "out" / "config.json"))["backbone_name_or_path"] == "vptm:tiny-beit-fashion-mnist"
    card = ModelCard.load(remote / "README.md")
    assert card.data.base_model == "vptm-tests/tiny-beit" and card.data.base_model_relation == "adapter"
    assert f'revision="{results["pushed_commit"]}"' in card.text and "<commit>" not in card.text

    # read back by repo id, offline, in a fresh process where only transformers is importable
    hub.lay_out_cache(tmp_path / "hf", "vptm-tests/tiny-beit", backbone_commit)
    hub.lay_out_cache(tmp_path / "hf", "vptm-tests/fashion-prompts", results["pushed_commit"])
    from modeling_vptm import VPTMForImageClassification

    local = VPTMForImageClassification.from_pretrained(tmp_path / "out")
    pixel_values = torch.randn(2, 3, 28, 28)
    torch.save(pixel_values, tmp_path / "pixels.pt")
    (tmp_path / "load.py").write_text(LOAD_BY_ID)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_MODULES_CACHE=str(tmp_path / "mod"))
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(tmp_path / "pixels.pt")],
                            capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = local(pixel_values).logits
    assert torch.equal(torch.tensor(json.loads(result.stdout.strip().splitlines()[-1])), expected)


def test_torchrun_two_processes_on_cpu(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               os.path.join(REPO_ROOT, "examples", "run_classification.py"), "--output_dir", str(tmp_path),
               *TINY, "--ddp_backend", "gloo", "--prompt_length", "2"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    checkpoints = [d for d in os.listdir(tmp_path) if d.startswith("checkpoint-")]
    assert checkpoints == ["checkpoint-3"]  # 40 images / (8 per process x 2 processes), rounded up
    assert task_keys(tmp_path) == ["prompt_embeddings.prompts", "verbalizer.logit_scale",
                                   "verbalizer.projection.weight", "verbalizer.prototypes"]  # fmt: skip
    assert json.load(open(tmp_path / "all_results.json"))["eval_images"] == 30


def test_accelerate_launch_two_processes_on_cpu(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    # accelerate's --cpu launcher runs one process; --multi_gpu starts torch.distributed, which falls back to gloo
    # on a machine without GPUs
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", "29518", os.path.join(REPO_ROOT, "examples", "run_classification.py"),
               "--output_dir", str(tmp_path), *TINY, "--method", "vpt", "--prompt_length", "2"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    assert [d for d in os.listdir(tmp_path) if d.startswith("checkpoint-")] == ["checkpoint-3"]
    assert task_keys(tmp_path) == ["classifier.bias", "classifier.weight", "prompt_embeddings.prompts"]


def test_predict_prints_the_labels_of_a_trained_model(tmp_path, capsys):
    """A model trained in the test on two easy classes; predict.py must return its labels for a folder."""
    make_folder(tmp_path / "unused")
    data = tmp_path / "data"
    for name, value in (("dark", 20), ("bright", 235)):
        os.makedirs(data / name)
        for j in range(8):
            Image.fromarray(np.full((28, 28), value + j, dtype=np.uint8)).save(data / name / f"{j}.png")
    args = ["--output_dir", str(tmp_path / "model"), "--train_dir", str(data), "--num_train_epochs", "6",
            "--per_device_train_batch_size", "4", "--use_cpu", "true", "--disable_tqdm", "true",
            "--train_val_split", "0.25", "--method", "linear", "--learning_rate", "0.05"]  # fmt: skip
    run_classification.main(args)
    queries = tmp_path / "queries"
    os.makedirs(queries)
    Image.fromarray(np.full((28, 28), 10, dtype=np.uint8)).save(queries / "a_dark.png")
    Image.fromarray(np.full((28, 28), 250, dtype=np.uint8)).convert("RGB").save(queries / "b_bright.jpg")
    capsys.readouterr()
    results = predict.main(["--model", str(tmp_path / "model"), str(queries), "--top_k", "2",
                            "--output", str(tmp_path / "p.jsonl")])  # fmt: skip
    assert [r["predictions"][0]["label"] for r in results] == ["dark", "bright"]
    assert all(abs(sum(p["score"] for p in r["predictions"]) - 1) < 1e-5 for r in results)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(str(queries / "a_dark.png") + "\tdark=")
    assert len(open(tmp_path / "p.jsonl").read().splitlines()) == 2
    with pytest.raises(FileNotFoundError, match=r"neither an image file nor a folder"):
        predict.main(["--model", str(tmp_path / "model"), str(tmp_path / "missing.png")])


def test_benchmark_quick_mode_writes_json_table_and_plot(tmp_path):
    import benchmark

    results = benchmark.main(["--quick", "--arch", "tiny", "--output_dir", str(tmp_path)])
    rows = results["archs"]["tiny"]["rows"]
    assert {"full", "linear", "vpt_deep", "vptm_deep", "infer_beit", "infer_vptm", "model_forward",
            "serve_one_task", "serve_eight_tasks"} <= set(rows)  # fmt: skip
    assert {"mixed_8_tasks_vs_one", "serve_one_task_vs_model"} <= set(results["archs"]["tiny"]["ratios"])
    # device operations per call: the server adds a few to the model's forward, eight tasks a few per task
    ops = {
        k: rows[k]["ops"] for k in ("infer_beit", "infer_vptm", "model_forward", "serve_one_task", "serve_eight_tasks")
    }
    assert 50 < ops["infer_beit"] and ops["model_forward"] == ops["infer_vptm"] <= ops["serve_one_task"]
    assert ops["serve_one_task"] <= ops["model_forward"] + 2 < ops["serve_eight_tasks"]
    assert all(rows[k]["images_per_s"] > 0 for k in rows if k != "checkpoint")
    assert rows["vptm_deep"]["trainable"] == 6 * 10 * 128 + 128 * 64 + 100 * 64 + 1
    assert rows["full"]["trainable"] > 20 * rows["vptm_deep"]["trainable"]
    # tensor memory of a training step, from the CPU profiler: full fine-tuning holds weight gradients and AdamW state
    assert all(rows[k]["peak_gib"] > 0 for k in ("full", "linear", "vpt_deep", "vptm_deep"))
    assert rows["linear"]["peak_gib"] < rows["vptm_deep"]["peak_gib"] < rows["full"]["peak_gib"]
    assert results["archs"]["tiny"]["ratios"]["vptm_train_memory_vs_full"] < 1
    assert 0 < rows["checkpoint"]["ratio"] < 0.05
    saved = json.load(open(tmp_path / "benchmark.json"))
    assert (
        saved["archs"]["tiny"]["ratios"]["vptm_train_vs_full"]
        == results["archs"]["tiny"]["ratios"]["vptm_train_vs_full"]
    )
    assert "| vptm_deep |" in (tmp_path / "benchmark.md").read_text()
    # PEFT's LoRA beside VPTM: training, inference unmerged and merged, 8 adapters in one batch both ways PEFT offers
    assert {"lora", "infer_lora", "infer_lora_merged", "lora_one_task", "lora_eight_tasks_adapter_names",
            "lora_eight_tasks_set_adapter"} <= set(rows)  # fmt: skip
    assert rows["lora"]["trainable"] == 6 * 8 * (4 * (128 + 128) + 2 * (128 + 512)) + 100 * 128 + 100
    assert ops["infer_beit"] == rows["infer_lora_merged"]["ops"] < rows["infer_lora"]["ops"]  # merged: plain BEiT
    assert rows["lora_one_task"]["ops"] < rows["lora_eight_tasks_adapter_names"]["ops"]
    assert rows["checkpoint"]["lora_adapter_bytes"] > 4 * 6 * 8 * (4 * 256 + 2 * 640)
    assert {"lora_train_vs_vptm", "lora_merged_infer_vs_vptm", "lora_mixed_8_adapter_names_vs_one",
            "lora_mixed_8_set_adapter_vs_one"} <= set(results["archs"]["tiny"]["ratios"])  # fmt: skip
    assert results["plot"] and (tmp_path / "benchmark.png").stat().st_size > 1000


def test_benchmark_training_quick_mode_reports_trainer_and_model_rates(tmp_path):
    import benchmark_training

    report = benchmark_training.main(["--quick", "--methods", "vptm", "full", "--output_dir", str(tmp_path)])
    assert list(report["methods"]) == ["vptm", "full"] and report["arch"] == "tiny" and report["batch"] == 8
    for row in report["methods"].values():
        assert row["trainer_images_per_s"] > 0 and row["model_images_per_s"] > 0
        assert row["trainer_train_samples_per_second"] > 0 and row["measured_steps"] == report["steps"] == 3
        assert row["ratio"] == round(row["trainer_images_per_s"] / row["model_images_per_s"], 3)
        assert row["host_wait_s"] >= 0 and row["host_step_s"] > 0 and 0 <= row["eval_accuracy"] <= 1
    assert report["methods"]["full"]["trainable"] > 20 * report["methods"]["vptm"]["trainable"]
    assert json.load(open(tmp_path / "benchmark_training.json")) == report
    table = (tmp_path / "benchmark_training.md").read_text()
    assert f"| vptm | {report['methods']['vptm']['trainer_images_per_s']:,} |" in table
    # the folder of JPEGs and the backbone the real script trained on
    assert len(os.listdir(tmp_path / "images")) == 10 and (tmp_path / "backbone" / "preprocessor_config.json").exists()


def test_benchmark_times_compared_steps_in_interleaved_rounds():
    import time

    import measuring

    calls = []

    def step(name, seconds):
        def run():
            calls.append(name)
            time.sleep(seconds)

        return run

    rows = measuring.measure_side_by_side({"a": step("a", 0.0), "b": step("b", 0.03)}, "cpu", 6, steps=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up, then rounds that alternate
    assert rows["b"]["step_ms"] >= 30 and rows["a"]["step_ms"] < rows["b"]["step_ms"]
    assert rows["b"]["images_per_s"] == pytest.approx(6 / (rows["b"]["step_ms"] / 1e3), rel=0.01)
    assert rows["a"]["peak_gib"] is None  # no CUDA here


def test_every_vptm_config_field_is_an_argument():
    import dataclasses

    from transformers import BeitConfig

    from modeling_vptm import VPTMConfig

    vptm_fields = {f.name for f in dataclasses.fields(VPTMConfig)} - {f.name for f in dataclasses.fields(BeitConfig)}
    set_by_the_script = {"backbone_name_or_path", "backbone_revision", "backbone_fingerprint",
                         "skip_unread_outputs"}  # fmt: skip
    arguments = {f.name for f in dataclasses.fields(run_classification.ModelArguments)}
    assert vptm_fields - set_by_the_script <= arguments, vptm_fields - set_by_the_script - arguments
    defaults = {f.name: f.default for f in dataclasses.fields(run_classification.ModelArguments)}
    shared = vptm_fields & arguments - {"prompt_layers"}  # the location defaults per method, below
    assert {name: defaults[name] for name in shared} == {name: getattr(VPTMConfig, name) for name in shared}
    location = {m: run_classification.ModelArguments(method=m).prompt_layer_list() for m in ("vptm", "vpt")}
    assert location == {"vptm": VPTMConfig.prompt_layers, "vpt": "deep"} and VPTMConfig.prompt_layers == "first_half"


def test_compare_methods_quick_mode_and_resume(tmp_path):
    import compare_methods

    # two of the ablations keep the bookkeeping covered (one rerun below, one kept) at a fraction of the time
    ablations = ["verbalizer_on_probs", "class_mean_prototypes"]
    results = compare_methods.main(["--quick", "--output_dir", str(tmp_path), "--ablations", *ablations])
    methods = results["methods"]
    assert set(methods) == {"linear", "full", "vpt_shallow", "vpt_deep", "vptm_shallow", "vptm_deep",
                            "vptm_first_half", "vptm_logits", "vptm_ensemble", "lora", "lora_r1_qv", "lora_r2_qv",
                            "lora_r1_all", "lora_r2_all", "vptm_lora", "raw_pixel_logreg"}  # fmt: skip
    # the token-path rows differ from the default in their read-out only
    token_path = json.load(open(tmp_path / "vptm_logits-seed0" / "config.json"))
    assert token_path["head_input"] == "logits" and token_path["prompt_layers"] == "first_half"
    # LoRA of rank 8 on the attention (4 x 128 -> 128) and the MLP (128 -> 512 -> 128) of 6 blocks and a 10-class
    # head; VPTM + LoRA: rank 8 on query and value, and VPTM's default task
    lora = 6 * 8 * (4 * (128 + 128) + 2 * (128 + 512))
    assert methods["lora"]["trainable_parameters"] == lora + 128 * 10 + 10
    # the low-rank presets change the rank and the targets only: rank 1 on query and value, ranks 1 and 2 on all six
    assert methods["lora_r1_qv"]["trainable_parameters"] == 6 * 2 * (128 + 128) + 128 * 10 + 10
    assert methods["lora_r1_all"]["trainable_parameters"] == lora / 8 + 128 * 10 + 10
    assert methods["lora_r2_all"]["trainable_parameters"] == lora / 4 + 128 * 10 + 10
    query_value = 6 * 2 * 8 * (128 + 128)
    assert (methods["vptm_lora"]["trainable_parameters"]
            == query_value + methods["vptm_first_half"]["trainable_parameters"])  # fmt: skip
    assert methods["vptm_deep"]["trainable_parameters"] > methods["vpt_deep"]["trainable_parameters"]
    # VPTM's default location is the first half of the blocks (3 of 6 prompted), VPT's every block
    assert (
        methods["vptm_deep"]["trainable_parameters"] - methods["vptm_first_half"]["trainable_parameters"]
        == 3 * 10 * 128
    )
    assert methods["full"]["trainable_parameters"] > 1_000_000
    assert set(results["sweeps"]) == {"vptm/prompt_length", "vpt/prompt_length", "vptm/prompt_layers",
                                      "vpt/prompt_layers", "vptm/prototype_dim"}  # fmt: skip
    sweep = results["sweeps"]["vptm/prototype_dim"]
    accuracies = [p["accuracy_mean"] for p in sweep["points"].values()]
    assert sweep["spread"] == pytest.approx(max(accuracies) - min(accuracies))
    assert list(results["ablations"]) == ablations
    assert results["uniform"]["vptm/prototype_dim"]["gap"] == pytest.approx(sweep["best"] - sweep["default"])
    table = (tmp_path / "results.md").read_text()
    assert "| vptm_deep |" in table and "raw-pixel logistic regression" in table
    assert sorted(os.path.basename(p) for p in results["plots"]) == ["accuracy_vs_parameters.png", "sweeps.png"]
    again = compare_methods.main(["--quick", "--output_dir", str(tmp_path), "--sections", "methods", "--update"])
    assert again["methods"]["vptm_deep"] == methods["vptm_deep"]  # finished runs are read back, not rerun
    assert again["seconds"] < results["seconds"]
    # default sweep points and default ablations share the main table's run folder instead of training again
    folders = sorted(name for name in os.listdir(tmp_path) if name.endswith("-seed0"))
    shared = [name for name in ablations if compare_methods.run_name(name, compare_methods.ABLATIONS[name]) != name]
    assert all(f"ablation-{name}-seed0" not in folders for name in shared)
    assert "sweep-vptm-prompt_length-10-seed0" not in folders
    assert "sweep-vptm-prompt_length-1-seed0" in folders and "ablation-verbalizer_on_probs-seed0" in folders
    assert list(sweep["points"]) == ["16", "64"]  # quick mode: the first value and the default
    assert sweep["points"]["64"]["accuracy_mean"] == methods["vptm_first_half"]["accuracy_mean"]  # the default
    transfer = results["transfer"]
    assert set(transfer) == {"linear", "vpt_deep", "vptm_deep", "vptm_first_half", "vptm_logits", "vptm_ensemble",
                             "lora", "lora_r1_qv", "lora_r2_qv", "lora_r1_all", "lora_r2_all", "vptm_lora",
                             "raw_pixel_logreg"}  # fmt: skip
    assert transfer["lora_r1_qv"]["trainable_parameters"] == methods["lora_r1_qv"]["trainable_parameters"]
    digits = json.load(open(tmp_path / "transfer-vptm_deep-seed0" / "vptm_run_args.json"))
    assert digits["dataset_name"] == "vptm:digits" and digits["augment_flip"] is False
    assert "Transfer task: vptm:digits" in table
    # quick sweeps: the first value and the default; prompt_layers' first value (shallow) is a main-table method
    assert [name for name in folders if name.startswith("sweep-")] == [
        "sweep-vpt-prompt_length-1-seed0", "sweep-vptm-prompt_length-1-seed0", "sweep-vptm-prototype_dim-16-seed0"
    ]  # fmt: skip
    assert len(folders) == 15 + 3 + len(ablations) - len(shared) + 12  # + transfer
    # --update reruns a part and keeps the other rows
    part = compare_methods.main(["--quick", "--output_dir", str(tmp_path), "--sections", "ablations", "--ablations",
                                 "verbalizer_on_probs", "--update"])  # fmt: skip
    assert part["methods"] == json.loads(json.dumps(again["methods"])) and list(part["ablations"]) == ablations


def test_validation_split_is_carved_from_train_stratified_and_seeded():
    def carve(fraction, seed):
        data_args = run_classification.DataTrainingArguments(validation_split=fraction, validation_split_seed=seed)
        return run_classification.load_data(data_args, run_classification.ModelArguments())

    dataset = carve(0.2, 0)
    assert list(dataset) == ["train", "validation", "test"]  # the test split stays for the end, untouched
    assert len(dataset["train"]) == 800 and len(dataset["validation"]) == 200 and len(dataset["test"]) == 3000
    assert np.bincount(dataset["validation"]["label"]).tolist() == [20] * 10  # stratified
    pixels = {split: {image.tobytes() for image in dataset[split]["image"]} for split in ("train", "validation")}
    shipped = run_classification.load_data(
        run_classification.DataTrainingArguments(), run_classification.ModelArguments()
    )
    assert list(shipped) == ["train", "test"]  # no validation split of its own, and none invented
    shipped_train = {image.tobytes() for image in shipped["train"]["image"]}
    assert not pixels["train"] & pixels["validation"]  # disjoint
    assert pixels["train"] | pixels["validation"] == shipped_train  # all from train: the test images stay out
    assert {image.tobytes() for image in carve(0.2, 0)["validation"]["image"]} == pixels["validation"]  # seeded
    assert {image.tobytes() for image in carve(0.2, 1)["validation"]["image"]} != pixels["validation"]
    with pytest.raises(ValueError, match=r"--validation_split must be a fraction in \[0, 1\) \(0: off\), got 1.5"):
        carve(1.5, 0)


def test_selection_on_validation_never_on_test(tmp_path):
    with pytest.raises(ValueError, match=r"--eval_strategy epoch selects on a validation split.*--validation_split"):
        run(tmp_path / "a", "--eval_strategy", "epoch", "--save_strategy", "epoch", "--load_best_model_at_end", "true")
    results = run(tmp_path / "b", "--validation_split", "0.2", "--eval_strategy", "epoch", "--save_strategy", "epoch",
                  "--load_best_model_at_end", "true", "--prompt_length", "1")  # fmt: skip
    state = json.load(open(tmp_path / "b" / "trainer_state.json"))
    assert [e for e in state["log_history"] if "eval_accuracy" in e]  # selected on the carved validation split
    assert set(results["scored"]) == {"validation", "test"} and results["eval_split"] == "test"
    assert results["accuracy"] == results["scored"]["test"]["accuracy"] and results["eval_images"] == 30
    assert json.load(open(tmp_path / "b" / "test_results.json"))["test_accuracy"] == results["accuracy"]
    # every checkpoint folder carries the image processor, so pipeline loads any of them
    checkpoint = next(d for d in os.listdir(tmp_path / "b") if d.startswith("checkpoint-"))
    assert os.path.isfile(tmp_path / "b" / checkpoint / "preprocessor_config.json")
    # --do_predict false: the test split is not read; --do_train false: the saved checkpoint is scored again
    only_validation = run(tmp_path / "c", "--validation_split", "0.2", "--do_predict", "false", "--prompt_length", "1")
    assert set(only_validation["scored"]) == {"validation"} and only_validation["eval_split"] == "validation"
    again = run(tmp_path / "c", "--validation_split", "0.2", "--do_predict", "false", "--prompt_length", "1",
                "--do_train", "false")  # fmt: skip
    assert again["accuracy"] == only_validation["accuracy"] and again["train_loss"] is None
    with pytest.raises(ValueError, match="--do_train false scores the checkpoint in --output_dir"):
        run(tmp_path / "d", "--do_train", "false")


def test_digits_transfer_task_is_balanced_and_disjoint():
    from modeling_vptm.data import digits_dataset

    data = digits_dataset()
    assert len(data["train"]) == 500 and len(data["test"]) == 1797 - 500
    assert np.bincount(data["train"]["label"]).tolist() == [50] * 10
    image = np.asarray(data["train"][0]["image"])
    assert image.shape == (8, 8) and image.dtype == np.uint8 and image.max() > 200
    counts = np.bincount(list(data["train"]["label"]) + list(data["test"]["label"]))
    from sklearn.datasets import load_digits

    assert counts.tolist() == np.bincount(load_digits().target).tolist()  # every image once, train or test


def test_digits_transfer_task_trains_without_flips(tmp_path):
    results = run(tmp_path, "--dataset_name", "vptm:digits", "--augment_flip", "false")
    assert results["eval_split"] == "test" and results["eval_images"] == 30
    config = json.load(open(tmp_path / "config.json"))
    assert config["id2label"] == {str(d): str(d) for d in range(10)}


def test_select_defaults_scores_candidates_on_validation_only(tmp_path):
    import select_defaults

    argv = ["--quick", "--output_dir", str(tmp_path), "--candidates", "vpt_deep", "vptm_logits", "vptm_ensemble"]
    results = select_defaults.main(argv)
    rows = results["candidates"]
    assert set(rows) == {"vpt_deep", "vptm_logits", "vptm_ensemble"}
    for name, row in rows.items():
        run = json.load(open(tmp_path / f"{name}-split0" / "all_results.json"))
        assert run["eval_split"] == "validation" and run["eval_images"] == 200  # carved from train, not the test
        assert row["validation_accuracy"] == [run["accuracy"]]
    reference = rows["vpt_deep"]["mean"]
    assert rows["vptm_ensemble"]["paired_difference_vs_reference"] == pytest.approx(
        rows["vptm_ensemble"]["mean"] - reference
    )
    assert results["chosen"] == max(("vptm_logits", "vptm_ensemble"), key=lambda n: rows[n]["mean"])
    assert f"| {results['chosen']} (chosen) |" in (tmp_path / "selection.md").read_text()


def test_select_defaults_compares_prompt_locations_split_by_split(tmp_path):
    import select_defaults

    deep, half = "vptm_hidden_instance_t0.1_deep", "vptm_hidden_instance_t0.1_first_half"
    results = select_defaults.main(["--quick", "--output_dir", str(tmp_path), "--candidates", deep, half])
    rows = results["candidates"]
    config = json.load(open(tmp_path / f"{half}-split0" / "config.json"))
    assert config["prompt_layers"] == "first_half" and config["num_hidden_layers"] == 6  # blocks 0-2 of 6
    args = json.load(open(tmp_path / f"{half}-split0" / run_classification.RUN_ARGS_FILE))
    assert args["augment_flip"] is False  # the current augmentation defaults, not the pinned flips
    difference = rows[half]["paired_difference_vs_defaults"]
    assert difference["base"] == deep and difference["mean"] == pytest.approx(rows[half]["mean"] - rows[deep]["mean"])
    best = max((deep, half), key=lambda name: rows[name]["mean"])
    assert results["chosen_locations"] == {"vptm_hidden_instance_t0.1": best.rsplit("_t0.1_", 1)[1]}
    assert f"| {half} |" in (tmp_path / "selection.md").read_text()


def test_help_is_the_docstring_then_every_project_flag_with_help_and_choices(capsys):
    with pytest.raises(SystemExit):
        run_classification.main(["--help"])
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith("usage: run_classification.py [--method METHOD]") and len(lines[0]) < 120
    assert "--method {vptm,vpt,linear,full,lora,peft,vptm_lora}" in text
    assert lines[2] == run_classification.__doc__.splitlines()[0]
    assert "--method {vptm,vpt,linear,full,lora,peft,vptm_lora}" in text
    assert "--head_input {logits,normalized_logits,probs,hidden,ensemble}" in text
    for dataclass_type in (run_classification.ModelArguments, run_classification.DataTrainingArguments):
        for f in dataclasses.fields(dataclass_type):
            assert f.metadata.get("help"), f"--{f.name} has no help"
    # every Trainer setting the script changes is listed with its help and the script's default; the rest of
    # Trainer's settings only under --help_all
    changed = run_classification.VPTMTrainingArguments.__annotations__
    assert {"num_train_epochs", "warmup_steps", "save_total_limit", "dataloader_num_workers"} <= set(changed)
    entries = {  # flag -> its help, as printed
        entry.split()[0]: " ".join(entry.split("\n\n")[0].split())  # an entry ends where a group's title starts
        for entry in re.split(r"\n(?=  -)", text)
        if entry.startswith("  -")
    }
    for f in dataclasses.fields(run_classification.VPTMTrainingArguments):
        if f.name in changed:
            assert f.metadata.get("help"), f"--{f.name} has no help"
            assert " ".join(f.metadata["help"].split()[:3]) in entries[f"--{f.name}"], f.name
            assert entries[f"--{f.name}"].endswith(f"(default: {f.default})"), entries[f"--{f.name}"]
    assert text.index("--method") < text.index("--dataset_name") < text.index("--num_train_epochs")
    # the task's config fields come after the method, data and training flags a run usually sets
    assert (
        text.index("--num_train_epochs") < text.index("the task's VPTMConfig fields") < text.index("--prompt_length")
    )
    assert text.index("the task's VPTMConfig fields") < text.index("--prototype_dim") and "--head_input" in text
    assert "--adam_beta1" not in text and "--help_all" in text
    with pytest.raises(SystemExit):
        run_classification.main(["--help_all"])
    full = capsys.readouterr().out
    assert "--adam_beta1" in full and "--num_train_epochs" in full and len(full) > 1.5 * len(text)
    with pytest.raises(SystemExit):
        run_classification.main(["--method", "vtp", "--output_dir", "x"])
    assert "invalid choice: 'vtp'" in capsys.readouterr().err


def test_learning_rate_default_follows_the_method_unless_given(tmp_path):
    parse = run_classification.parse_arguments
    assert parse(["--output_dir", str(tmp_path)])[2].learning_rate == 1e-2
    assert parse(["--output_dir", str(tmp_path)])[2].dataloader_pin_memory is torch.cuda.is_available()
    assert parse(["--method", "full", "--output_dir", str(tmp_path)])[2].learning_rate == 1e-3
    assert (
        parse(["--method", "full", "--learning_rate", "0.05", "--output_dir", str(tmp_path)])[2].learning_rate == 0.05
    )
    (tmp_path / "args.json").write_text(json.dumps({"method": "full", "output_dir": str(tmp_path)}))
    assert parse([str(tmp_path / "args.json")])[2].learning_rate == 1e-3


def test_gpu_defaults_fill_only_the_flags_not_given(tmp_path, monkeypatch):
    gpu_defaults = run_classification.gpu_defaults
    if not torch.cuda.is_available():
        assert gpu_defaults(set()) == {}
    with monkeypatch.context() as patched:  # what a CUDA device with bf16 gets
        patched.setattr(torch.cuda, "is_available", lambda: True)
        patched.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
        defaults = gpu_defaults({"output_dir"})
        assert defaults.pop("bf16") is True and defaults.pop("logging_nan_inf_filter") is False
        assert 1 <= defaults.pop("dataloader_num_workers") <= 4 and not defaults
        assert "bf16" not in gpu_defaults({"fp16"}) and "bf16" not in gpu_defaults({"bf16"})
        assert "dataloader_num_workers" not in gpu_defaults({"dataloader_num_workers"})
        assert gpu_defaults({"use_cpu"}) == {}
    # the defaults are parsed as if given, so that what TrainingArguments derives from them follows (bf16 -> mixed
    # precision), from the command line and from a JSON file alike; a given flag wins
    monkeypatch.setattr("modeling_vptm.training.arguments.gpu_defaults", lambda given: {
        k: v for k, v in {"bf16": True, "dataloader_num_workers": 2}.items() if k not in given})  # fmt: skip
    args = run_classification.parse_arguments(["--output_dir", str(tmp_path), "--use_cpu", "true"])[2]
    assert args.bf16 and args.mixed_precision == "bf16" and args.dataloader_num_workers == 2
    (tmp_path / "args.json").write_text(json.dumps({"output_dir": str(tmp_path), "use_cpu": True,
                                                    "dataloader_num_workers": 0}))  # fmt: skip
    args = run_classification.parse_arguments([str(tmp_path / "args.json")])[2]
    assert args.bf16 and args.dataloader_num_workers == 0


def test_flags_the_method_ignores_are_reported_and_bad_values_refused(tmp_path, caplog):
    parse = run_classification.parse_arguments
    with caplog.at_level("WARNING"):
        parse(["--method", "vpt", "--prototype_dim", "32", "--prompt_length", "3", "--output_dir", str(tmp_path)])
    assert (
        "--prototype_dim is ignored: --method vpt does not use it" in caplog.text
        and "--prompt_length" not in caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING"):
        parse(["--method", "linear", "--prompt_layers=shallow", "--seed", "3", "--output_dir", str(tmp_path)])
    assert "--prompt_layers is ignored" in caplog.text and "--seed" not in caplog.text
    with pytest.raises(
        ValueError,
        match="--prompt_layers must be one of deep, shallow, first_half, second_half, every_other or block indices",
    ):
        parse(["--prompt_layers", "first", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--prototype_init class_mean needs --method vptm or vptm_lora, got 'vpt'"):
        parse(["--method", "vpt", "--prototype_init", "class_mean", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match=r"--validation_split must be a fraction in \[0, 1\)"):
        parse(["--validation_split", "1.5", "--output_dir", str(tmp_path)])


def test_train_val_split_that_cannot_apply_says_so(caplog):
    data_args = run_classification.DataTrainingArguments(train_val_split=0.3)
    with caplog.at_level("WARNING"):
        dataset = run_classification.load_data(data_args, run_classification.ModelArguments())
    assert list(dataset) == ["train", "test"] and len(dataset["train"]) == 1000
    assert "--train_val_split is ignored: the dataset has its own test split" in caplog.text


def test_eval_subset_is_seeded_and_random_not_the_first_rows():
    def eval_labels(seed):
        data_args = run_classification.DataTrainingArguments(max_eval_samples=50)
        dataset = run_classification.load_data(data_args, run_classification.ModelArguments(), seed)
        return dataset["test"]["label"]

    assert eval_labels(0) == eval_labels(0) and eval_labels(0) != eval_labels(1)
    assert len(set(eval_labels(0))) > 5  # a random subset spans the classes


def test_card_names_a_hub_backbone_as_base_model_of_an_adapter(tmp_path):
    from huggingface_hub import ModelCard, ModelCardData
    from huggingface_hub.repocard_data import model_index_to_eval_results
    from huggingface_hub.utils import validate_repo_id

    from modeling_vptm.deploy import CardInfo, prompt_checkpoint_card

    info = CardInfo(
        model_name="beit-cifar-vptm", method="vptm", backbone="microsoft/beit-base-patch16-224-pt22k",
        backbone_revision="abc123", dataset="uoft-cs/cifar10", eval_split="test", eval_images=10_000,
        train_images=1_000, labels=["airplane", "automobile"], metrics={"accuracy": 0.91234, "f1": 0.9},
        trainable_parameters=622_849, total_parameters=87_000_000, checkpoint_bytes=2_491_796, train_seconds=12.0,
        device="CPU", arguments="{}", repo_id="me/beit-cifar-vptm", revision="0" * 40,
    )  # fmt: skip
    prompt_checkpoint_card(info).save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")  # parsed back by the library: valid front matter
    data = card.data.to_dict()
    assert data["base_model"] == "microsoft/beit-base-patch16-224-pt22k" and data["base_model_relation"] == "adapter"
    # the Hub's metadata rules that can be checked offline (its validate-yaml endpoint is online only): repo ids
    # where ids go, a relation the model tree knows, an SPDX-style license id, eval results the library rebuilds
    for repo_id in [data["base_model"], *data["datasets"]]:
        validate_repo_id(repo_id)
    assert data["base_model_relation"] in ("adapter", "merge", "quantized", "finetune") and data["license"] == "mit"
    assert ModelCardData(**data).to_dict() == data
    assert data["datasets"] == ["uoft-cs/cifar10"] and data["pipeline_tag"] == "image-classification"
    name, results = model_index_to_eval_results(data["model-index"])
    assert name == "beit-cifar-vptm"
    assert [(r.metric_type, r.metric_value, r.dataset_split) for r in results] == [
        ("accuracy", 0.9123, "test"), ("f1", 0.9, "test")
    ]  # fmt: skip
    assert f'"me/beit-cifar-vptm", trust_remote_code=True, revision="{"0" * 40}"' in card.text
    assert "revision `abc123`" in card.text and "| 10,000 | 0.9123 | 0.9000 |" in card.text
    full = prompt_checkpoint_card(dataclasses.replace(info, method="full"))
    assert full.data.base_model_relation == "finetune"


def test_random_resized_crop_keeps_size_and_is_seeded():
    from modeling_vptm.data import random_resized_crop

    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    crops = random_resized_crop(images, 0.08, torch.Generator().manual_seed(0))
    assert crops.shape == images.shape and not torch.equal(crops, images)
    assert torch.equal(crops, random_resized_crop(images, 0.08, torch.Generator().manual_seed(0)))
    whole = random_resized_crop(images, 1.0, torch.Generator().manual_seed(0), ratio=(1.0, 1.0))
    torch.testing.assert_close(whole, images)  # the whole image, resized to its own size
    constant = torch.full((4, 3, 32, 32), 0.7)
    torch.testing.assert_close(random_resized_crop(constant, 0.08, None), constant)


def test_224_pixel_recipe_on_a_tiny_backbone(tmp_path):
    """The real-backbone path: 224-pixel inputs, 16-pixel patches, random resized crops, an image folder."""
    from conftest import make_backbone
    from transformers import BeitImageProcessor

    make_backbone(tmp_path / "backbone", image_size=224, patch_size=16)
    BeitImageProcessor(size={"height": 224, "width": 224}, do_center_crop=False).save_pretrained(tmp_path / "backbone")
    make_folder(tmp_path / "data", per_class=4, size=(300, 260))
    results = run_classification.main([
        "--output_dir", str(tmp_path / "out"), "--model_name_or_path", str(tmp_path / "backbone"), "--train_dir",
        str(tmp_path / "data"), "--train_val_split", "0.25", "--augment_crop_scale", "0.08", "--augment_shift", "0",
        "--prompt_length", "2", "--num_train_epochs", "1", "--per_device_train_batch_size", "4", "--use_cpu", "true",
        "--disable_tqdm", "true", "--save_strategy", "no",
    ])  # fmt: skip
    assert results["train_images"] == 6 and results["eval_images"] == 2 and results["eval_split"] == "validation"
    processor = json.load(open(tmp_path / "out" / "preprocessor_config.json"))
    assert processor["size"] == {"height": 224, "width": 224}
    with pytest.raises(ValueError, match=r"--augment_crop_scale must be in \[0, 1\] \(0: off\), got 2.0"):
        run_classification.main(["--output_dir", str(tmp_path / "x"), "--augment_crop_scale", "2"])


def test_hp_search_chooses_on_validation_and_trains_with_the_best(tmp_path):
    results = run(tmp_path, "--validation_split", "0.25", "--hp_search_trials", "2")
    search = json.load(open(tmp_path / "hp_search.json"))
    assert search == results["hp_search"] and search["metric"] == "eval_accuracy" and len(search["trials"]) == 2
    for trial in search["trials"]:
        assert 1e-4 <= trial["learning_rate"] <= 1e-1 and trial["weight_decay"] in (0.0, 1e-4, 1e-3, 1e-2)
    assert search["best_objective"] == max(trial["eval_accuracy"] for trial in search["trials"])
    # the final model trained with the best pair; the test split was scored once, after the search
    assert (results["learning_rate"], results["weight_decay"]) == (
        search["best"]["learning_rate"],
        search["best"]["weight_decay"],
    )
    assert sorted(results["scored"]) == ["test", "validation"] and results["eval_split"] == "test"
    # the final model is the best trial's, trained again the same way: the same validation score
    assert results["scored"]["validation"]["accuracy"] == search["best_objective"]
    _, body = read_card(tmp_path)  # the card states the values the model was trained with
    assert f'"learning_rate": {search["best"]["learning_rate"]}' in body
    # the same seed gives the same trials
    again = run(tmp_path / "again", "--validation_split", "0.25", "--hp_search_trials", "2")
    assert again["hp_search"] == search


def test_hp_search_is_not_repeated_by_a_rerun_and_minimises_a_loss(tmp_path, monkeypatch):
    from transformers import Trainer

    arguments = ["--validation_split", "0.25", "--hp_search_trials", "2", "--save_strategy", "no",
                 "--metric_for_best_model", "loss"]  # fmt: skip
    first = run(tmp_path, *arguments)
    assert first["hp_search"]["metric"] == "eval_loss" and first["hp_search"]["maximize"] is False
    losses = [trial["eval_loss"] for trial in first["hp_search"]["trials"]]
    assert first["hp_search"]["best_objective"] == min(losses)
    monkeypatch.setattr(Trainer, "hyperparameter_search", lambda *a, **k: pytest.fail("searched again"))
    assert run(tmp_path, *arguments)["hp_search"] == first["hp_search"]  # no checkpoint, the same run: read back
    with pytest.raises(ValueError, match=r"--metric_for_best_model eval_precision is not computed; it must be one of"):
        run(tmp_path / "other", "--validation_split", "0.25", "--hp_search_trials", "2",
            "--metric_for_best_model", "precision")  # fmt: skip


def test_hp_search_without_a_validation_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--hp_search_trials 2 scores each trial on a validation split, and this"):
        run(tmp_path, "--hp_search_trials", "2")
    assert not os.path.exists(tmp_path / "hp_search.json")
