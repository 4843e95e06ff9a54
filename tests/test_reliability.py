"""Bad input at every entry point: each case gets a clear error (type and message checked) or a documented
recovery, and nothing is lost or half-written. Plus property-based tests over valid configurations."""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import shutil
import tempfile

import numpy as np
import predict  # noqa: E402
import pytest
import torch
from conftest import HUB_CODE_FILES, REPO_ROOT, Exploit, code_files
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import PreTrainedModel

from modeling_vptm import VPTMForImageClassification


@pytest.fixture
def saved(backbone_dir, tmp_path):
    """A saved prompt checkpoint and the logits it must reproduce."""
    torch.manual_seed(0)
    model = VPTMForImageClassification.from_backbone(backbone_dir, num_labels=4, prompt_length=3).eval()
    folder = tmp_path / "prompts"
    model.save_pretrained(folder)
    return folder, model


# ------------------------------------------------------------------------------------------------------- files
def test_truncated_safetensors(saved):
    folder, _ = saved
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"prompts: its weights file .*truncated or not a safetensors file"):
        VPTMForImageClassification.from_pretrained(folder)


def test_corrupted_safetensors(saved):
    folder, _ = saved
    (folder / "model.safetensors").write_bytes(os.urandom(2000))
    with pytest.raises(ValueError, match=r"truncated or not a safetensors file"):
        VPTMForImageClassification.from_pretrained(folder)


def test_config_that_is_not_json(saved):
    folder, _ = saved
    (folder / "config.json").write_text("{ this is not json")
    with pytest.raises(OSError, match=r"not a valid JSON file"):
        VPTMForImageClassification.from_pretrained(folder)


def test_config_missing_a_field_falls_back_to_the_default_and_then_refuses_the_shapes(saved):
    folder, _ = saved
    config = json.loads((folder / "config.json").read_text())
    del config["prompt_length"]  # default 10 != the 3 prompts stored
    (folder / "config.json").write_text(json.dumps(config))
    # one prompted block: the default location, the first half of the 3 blocks
    with pytest.raises(ValueError, match=r"prompt_embeddings.prompts has shape \(1, 3, 24\).*need \(1, 10, 24\)"):
        VPTMForImageClassification.from_pretrained(folder)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("prompt_length", "ten", r"prompt_length must be an integer in \[0, \d+\] .*, got 'ten'"),
        ("prompt_layers", 3, r"prompt_layers must be one of \[.*'first_half'.*\] or a list of block indices, got 3"),
        ("classifier", None, r"classifier must be one of"),
        ("prototype_dim", 6.5, r"prototype_dim must be an integer in \[1, 4096\], got 6.5"),
    ],
)
def test_config_with_wrong_types(saved, field, value, message):
    folder, _ = saved
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises((ValueError, TypeError), match=message):
        VPTMForImageClassification.from_pretrained(folder)


@pytest.mark.parametrize("change", ["extra", "missing", "shape"])
def test_prompt_checkpoint_with_wrong_tensors(saved, change):
    from safetensors.torch import load_file, save_file

    folder, _ = saved
    tensors = load_file(folder / "model.safetensors")
    if change == "extra":
        tensors["verbalizer.bias"] = torch.zeros(4)
        message = r"unexpected \['verbalizer.bias'\]"
    elif change == "missing":
        del tensors["verbalizer.logit_scale"]
        message = r"missing \['verbalizer.logit_scale'\]"
    else:
        tensors["verbalizer.prototypes"] = torch.zeros(5, 64)
        message = r"verbalizer.prototypes has shape \(5, 64\).*need \(4, 64\)"
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=message):
        VPTMForImageClassification.from_pretrained(folder)


def test_pickle_offered_instead_of_safetensors_is_never_unpickled(saved, monkeypatch):
    folder, _ = saved
    monkeypatch.chdir(folder)
    os.remove(folder / "model.safetensors")
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"prompt_embeddings.prompts": Exploit()}, f)
    with pytest.raises(OSError, match=r"model.safetensors"):
        VPTMForImageClassification.from_pretrained(folder)
    assert not (folder / "exploited").exists()


# ------------------------------------------------------------------------------------------------------ saving
def test_interrupted_save_leaves_the_previous_checkpoint_intact(saved, monkeypatch):
    folder, model = saved
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    original = PreTrainedModel.save_pretrained

    def crash_midway(self, directory, *args, **kwargs):
        original(self, directory, *args, **kwargs)
        with open(os.path.join(directory, "model.safetensors"), "r+b") as f:
            f.truncate(10)  # half-written
        raise KeyboardInterrupt("interrupted while saving")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash_midway)
    with torch.no_grad():
        model.task.prompt_embeddings.prompts.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(folder)
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before
    assert not any(d.startswith(".vptm-save-") for d in os.listdir(folder.parent))
    with pytest.raises(KeyboardInterrupt):  # into a new folder: none appears
        model.save_pretrained(folder.parent / "new-task")
    assert not (folder.parent / "new-task").exists()


def test_a_new_checkpoint_folder_appears_whole_with_ordinary_permissions(saved, tmp_path):
    _, model = saved
    model.save_pretrained(tmp_path / "fresh")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "fresh").stat().st_mode & 0o777 == 0o777 & ~umask  # not the staging folder's 0o700
    assert "model.safetensors" in os.listdir(tmp_path / "fresh")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_checkpoint_file_gets_the_permissions_of_any_new_file(saved, tmp_path, umask):
    """safetensors writes 0600 files; a checkpoint's files are readable by whoever may read the run's other files."""
    _, model = saved
    previous = os.umask(umask)
    try:
        model.save_pretrained(tmp_path / "fresh")  # a new folder, renamed into place
        model.save_pretrained(tmp_path / "fresh")  # into an existing folder, file by file
    finally:
        os.umask(previous)
    modes = {name: (tmp_path / "fresh" / name).stat().st_mode & 0o777 for name in os.listdir(tmp_path / "fresh")}
    assert modes["model.safetensors"] == 0o666 & ~umask
    assert set(modes.values()) == {0o666 & ~umask}, modes


# ------------------------------------------------------------------------------------------- names and paths
MISSING_FOLDERS = ["./runs/vtpm", "runs/vtpm", "~/no-such-vptm-folder/task", "/no/such/vptm/task", "a/b/c"]


@pytest.mark.parametrize("name", MISSING_FOLDERS)
def test_a_missing_local_folder_is_refused_at_once_not_tried_on_the_hub(name, backbone_dir, tmp_path, monkeypatch):
    """A path that looks local is never sent to the Hub (half a minute of retries without a network); `runs/vtpm`
    looks local because runs/ exists. Offline mode is lifted to show that the check, not the mode, is what stops it."""
    from modeling_vptm.serving import MultiTaskVPTM

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError(f"{name!r} was looked up on the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr("transformers.utils.hub.hf_hub_download", no_hub, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    expected = rf"prompt checkpoint folder '{re.escape(name)}' not found \(looked in .*\); expected an existing folder"
    with pytest.raises(FileNotFoundError, match=expected):
        VPTMForImageClassification.from_pretrained(name)
    server = MultiTaskVPTM(str(backbone_dir))
    with pytest.raises(FileNotFoundError, match=expected):
        server.add_task("mine", name)
    with pytest.raises(FileNotFoundError, match=expected):
        predict.main(["--model", name, str(tmp_path)])
    with pytest.raises(FileNotFoundError, match=expected.replace("prompt checkpoint", "backbone")):
        VPTMForImageClassification.from_backbone(name, num_labels=2)


def test_a_file_given_as_a_checkpoint_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(
        FileNotFoundError, match=r"prompt checkpoint folder '.*model.safetensors' not found .*expected an"
    ):
        VPTMForImageClassification.from_pretrained(tmp_path / "model.safetensors")


def test_a_hub_id_that_is_not_cached_offline_gets_one_clear_line():
    with pytest.raises(OSError) as raised:
        VPTMForImageClassification.from_pretrained("no-such-org/no-such-task")
    message = str(raised.value)
    assert "\n" not in message and ".." not in message, message
    assert message.startswith("cannot load the prompt checkpoint 'no-such-org/no-such-task': no such local folder")
    assert "offline (HF_HUB_OFFLINE) this Hub id is not in the cache" in message
    assert "`hf download no-such-org/no-such-task`" in message
    with pytest.raises(OSError, match=r"^cannot load the backbone 'no-such-org/no-such-beit': no such local folder"):
        VPTMForImageClassification.from_backbone("no-such-org/no-such-beit", num_labels=2)


# ------------------------------------------------------------------------------------------------------ images
def test_predict_on_every_kind_of_image(tmp_path, capsys):
    """Greyscale, RGBA, palette, 16-bit, 1x1, huge and non-square images are classified; truncated files and
    non-images fail with the file named, or are skipped and counted with --skip_unreadable."""
    from modeling_vptm import SHIPPED_BACKBONE

    torch.manual_seed(0)
    model = VPTMForImageClassification.from_backbone(SHIPPED_BACKBONE, num_labels=3)
    model.save_pretrained(tmp_path / "model")
    from transformers import AutoImageProcessor

    from modeling_vptm import shipped_backbone_path

    AutoImageProcessor.from_pretrained(shipped_backbone_path()).save_pretrained(tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), "L").save(images / "grey.png")
    Image.fromarray(rng.integers(0, 255, (30, 20, 4), dtype=np.uint8), "RGBA").save(images / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).convert("P").save(images / "palette.png")
    Image.fromarray(rng.integers(0, 65535, (28, 28), dtype=np.uint16)).save(images / "sixteen.png")
    Image.new("RGB", (1, 1), (3, 4, 5)).save(images / "tiny.png")
    Image.new("RGB", (4000, 3000), (90, 10, 200)).save(images / "huge.jpg")
    Image.new("RGB", (90, 17)).save(images / "wide.bmp")
    full = (images / "grey.png").read_bytes()
    (images / "truncated.png").write_bytes(full[: len(full) // 2])
    (images / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"(text|truncated).png.* not an image that can be read.*--skip_unreadable"):
        predict.main(["--model", str(tmp_path / "model"), str(images)])
    capsys.readouterr()
    results = predict.main(["--model", str(tmp_path / "model"), str(images), "--skip_unreadable", "--top_k", "3"])
    names = sorted(os.path.basename(r["file"]) for r in results)
    assert names == ["grey.png", "huge.jpg", "palette.png", "rgba.png", "sixteen.png", "tiny.png", "wide.bmp"]
    assert all(abs(sum(p["score"] for p in r["predictions"]) - 1) < 1e-5 for r in results)
    assert "skipped 2 unreadable file(s)" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------- tensors
def test_non_finite_pixels(backbone_dir, pixel_values):
    model = VPTMForImageClassification.from_backbone(backbone_dir, num_labels=4)
    bad = pixel_values.clone()
    bad[1, 0, 3, 3] = float("nan")
    bad[2, 2, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or infinite values \(images \[1, 2\] of the batch\)"):
        model(bad, labels=torch.tensor([0, 1, 2]))
    model.eval()
    with torch.no_grad():  # documented: inference gives that image non-finite logits, the others are unaffected
        logits = model(bad).logits
        clean = model(pixel_values).logits
    assert torch.isfinite(logits[0]).all() and not torch.isfinite(logits[1]).all()
    torch.testing.assert_close(logits[0], clean[0])


def test_dtypes(backbone_dir, pixel_values):
    model = VPTMForImageClassification.from_backbone(backbone_dir, num_labels=4).eval()
    with torch.no_grad():
        reference = model(pixel_values).logits
        torch.testing.assert_close(model(pixel_values.double()).logits, reference)  # cast to the model's dtype
    with pytest.raises(ValueError, match=r"floating-point tensor, got dtype torch.int64"):
        model(pixel_values.long())
    with pytest.raises(ValueError, match=r"empty batch"):
        model(pixel_values[:0])


# ------------------------------------------------------------------------------------------------ config limits
@pytest.mark.parametrize(
    "fields",
    [
        dict(prompt_length=0),
        dict(prompt_length=4 * 26, prompt_layers="shallow"),  # the most: 4 x the tiny backbone's 1 + 25 tokens
        dict(prototype_dim=1),
        dict(num_labels=1),
        dict(num_labels=10_000, prototype_dim=8),
    ],
    ids=["no-prompts", "most-prompts", "prototype-dim-1", "one-class", "10000-classes"],
)
def test_config_limits(backbone_dir, pixel_values, fields):
    num_labels = fields.pop("num_labels", 4)
    model = VPTMForImageClassification.from_backbone(backbone_dir, num_labels=num_labels, **fields)
    out = model(pixel_values, labels=torch.zeros(3, dtype=torch.long))
    assert out.logits.shape == (3, num_labels) and torch.isfinite(out.loss)
    out.loss.backward()


# ------------------------------------------------------------------------------------------------------- security
# what a prompt checkpoint carries, and what a PEFT classifier run folder carries
HUB_FILES = sorted(set(code_files("modeling_vptm.py")) | set(code_files("peft_classifier.py")))


def test_hub_files_are_the_package_root():
    """The files a prompt checkpoint or a PEFT classifier folder carries are exactly the package's root modules (but
    __init__): the model, its parts, the config, their checkpoint IO; nothing of training, serving or deployment."""
    assert HUB_FILES == HUB_CODE_FILES
    assert {"configuration_vptm.py", "modeling_vptm.py", "prompted_backbone.py", "vptm_task.py"} <= set(
        code_files("modeling_vptm.py")
    )
    assert "modeling_vptm.py" not in code_files("peft_classifier.py")


# the standard modules the Hub files import at module level: each loaded with Python itself, none with side effects
HUB_FILE_MODULES = ("contextlib", "errno", "hashlib", "json", "math", "os", "re", "shutil", "socket", "stat",
                    "struct", "sys", "tempfile", "torch")  # fmt: skip


@pytest.mark.parametrize("name", HUB_FILES)
def test_hub_files_only_define_things_at_import(name):
    """Module level: docstring, imports, constants, class and function definitions; no calls with side effects."""
    tree = ast.parse(open(os.path.join(REPO_ROOT, "modeling_vptm", name)).read())
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.ClassDef, ast.FunctionDef)):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                allowed = ("__future__", "torch", "transformers", "dataclasses", "collections")
                assert node.module.split(".")[0] in allowed, node.module
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] in HUB_FILE_MODULES for a in node.names), ast.unparse(node)
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring
        assert isinstance(node, (ast.Assign, ast.AnnAssign)), ast.dump(node)[:200]
        value = node.value
        if isinstance(value, ast.Call):  # only the module logger and compiled patterns
            assert ast.unparse(value) == "logging.get_logger(__name__)" or ast.unparse(value.func) == "re.compile", (
                ast.unparse(value)
            )
        else:
            for sub in ast.walk(value):
                assert not isinstance(sub, ast.Call), ast.unparse(node)


# ------------------------------------------------------------------------------------------- property-based tests
layer_choices = st.one_of(st.sampled_from(["deep", "shallow"]), st.sets(st.integers(0, 2), min_size=1).map(sorted))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt_length=st.integers(0, 4),
    prompt_layers=layer_choices,
    mask_token_mode=st.sampled_from(["append", "replace"]),
    mask_token_position=st.integers(0, 24),
    classifier=st.sampled_from(["prototypical_verbalizer", "linear_cls", "linear_mask"]),
    head_input=st.sampled_from(["logits", "normalized_logits", "probs", "hidden"]),
    extra_token_bias=st.sampled_from(["cls", "zero"]),
    prototype_dim=st.integers(1, 8),
    prototypes_per_class=st.integers(1, 3),
    train_mask_token=st.booleans(),
    num_labels=st.integers(1, 5),
    batch=st.integers(1, 3),
)
def test_any_valid_configuration_trains_saves_and_reloads(backbone_dir, num_labels, batch, **fields):
    model = VPTMForImageClassification.from_backbone(backbone_dir, num_labels=num_labels, **fields)
    pixel_values = torch.randn(batch, 3, 20, 20)
    labels = torch.randint(0, num_labels, (batch,))
    model.train()
    out = model(pixel_values, labels=labels)
    assert out.logits.shape == (batch, num_labels) and torch.isfinite(out.loss)
    out.loss.backward()
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values).logits
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = VPTMForImageClassification.from_pretrained(folder)
        with torch.no_grad():
            assert torch.equal(reloaded(pixel_values).logits, expected)
    shutil.rmtree(folder, ignore_errors=True)


def test_packaged_backbone_without_the_package_names_an_install_that_works(monkeypatch):
    import importlib.util

    from modeling_vptm.shipped import resolve_backbone_path

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "modeling_vptm" else real(name, *a)
    )
    message = (r"'vptm:tiny-beit-fashion-mnist' is the backbone shipped with the vptm package, which is not "
               r"installed here; install it from its repository \(`pip install -e \.`")  # fmt: skip
    with pytest.raises(OSError, match=message):
        resolve_backbone_path("vptm:tiny-beit-fashion-mnist")
    assert resolve_backbone_path("me/backbone") == "me/backbone"  # anything else is passed through


# ------------------------------------------------------------------------------------- a name the Hub cannot give
NOT_FOUND = (r"^cannot load the {what} '{name}': no such local folder, and it could not be found on the Hub: the Hub "
             r"did not answer \(offline\? ")  # fmt: skip


def test_a_name_that_is_neither_a_folder_nor_on_the_hub_fails_fast_in_one_line(unreachable_hub, backbone_dir):
    import time

    from modeling_vptm.hub_names import CheckpointNotFoundError
    from modeling_vptm.serving import MultiTaskVPTM

    calls = {
        "prompt checkpoint": lambda: VPTMForImageClassification.from_pretrained("runs/no-such-run"),
        "backbone": lambda: VPTMForImageClassification.from_backbone("runs/no-such-run", num_labels=2),
    }
    server = MultiTaskVPTM(backbone_dir)
    for what, call in [*calls.items(), ("prompt checkpoint", lambda: server.add_task("mine", "runs/no-such-run"))]:
        start = time.perf_counter()
        with pytest.raises(CheckpointNotFoundError, match=NOT_FOUND.format(what=what, name="runs/no-such-run")) as e:
            call()
        assert time.perf_counter() - start < 10 and "\n" not in str(e.value)


@pytest.mark.parametrize("script", ["predict", "serve_batch", "run_classification"])
def test_the_scripts_answer_a_name_not_found_in_one_line_without_a_traceback(unreachable_hub, tmp_path, script):
    import subprocess
    import sys
    import time

    argv = {
        "predict": ["--model", "runs/no-such-run", "image.png"],
        "serve_batch": ["--backbone", "runs/no-such-run", "--task", "a=runs/x", "--input", "a=image.png"],
        "run_classification": ["--model_name_or_path", "runs/no-such-run", "--output_dir", str(tmp_path / "out")],
    }[script]
    what = "prompt checkpoint" if script == "predict" else "backbone"
    env = dict(os.environ, **unreachable_hub, PYTHONPATH=REPO_ROOT)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "examples", f"{script}.py"), *argv],
                            capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)  # fmt: skip
    assert time.perf_counter() - start < 30  # the interpreter and imports included; the lookup itself is seconds
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert re.match("error: " + NOT_FOUND[1:].format(what=what, name="runs/no-such-run"), last), last


def test_the_endpoint_handler_names_a_backbone_it_cannot_find(unreachable_hub, tmp_path):
    import json
    import time

    from modeling_vptm.deploy.endpoint import ENDPOINT_CONFIG, EndpointHandler
    from modeling_vptm.hub_names import CheckpointNotFoundError

    (tmp_path / "task").mkdir()
    (tmp_path / ENDPOINT_CONFIG).write_text(json.dumps({"tasks": {"a": "task"}, "backbone": "no-org/no-such-beit"}))
    start = time.perf_counter()
    with pytest.raises(CheckpointNotFoundError, match=NOT_FOUND.format(what="backbone", name="no-org/no-such-beit")):
        EndpointHandler(str(tmp_path))
    assert time.perf_counter() - start < 10
