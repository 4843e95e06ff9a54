"""The README's code runs as written: every Python block is executed (the Hub block against a local Hub cache, its
`<commit>` placeholders filled with the commit there), and compiles."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


def python_blocks(section: str | None = None) -> list[str]:
    text = open(os.path.join(REPO_ROOT, "README.md")).read()
    if section is not None:
        start = text.index(f"## {section}\n")
        end = text.find("\n## ", start + 1)
        text = text[start : end if end != -1 else None]
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_every_python_block_compiles(index):
    compile(python_blocks()[index], f"README.md python block {index}", "exec")


def run_quickstart(folder) -> list[str]:
    """Runs the Quickstart block in `folder` (it writes my-task/ there); returns the lines it printed."""
    block = python_blocks("Quickstart")[0]
    printed = io.StringIO()
    with contextlib.chdir(folder), contextlib.redirect_stdout(printed):
        exec(compile(block, "README.md Quickstart", "exec"), {"__name__": "__readme__"})
    return printed.getvalue().splitlines()


def test_quickstart_runs_offline_as_written(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    block = python_blocks("Quickstart")[0]
    lines = run_quickstart(tmp_path)
    # the counts the README states in a comment are the ones the code prints
    stated = re.search(r"print_trainable_parameters\(\)  # (.*)", block).group(1)
    assert lines[0] == stated
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(os.listdir("my-task"))
    predictions = eval(lines[1])  # the pipeline's printed list of top-3 labels
    assert len(predictions) == 3 and all(p["label"].startswith("LABEL_") for p in predictions)
    assert sum(p["score"] for p in predictions) <= 1.0 + 1e-6


def test_hub_block_runs_against_a_local_hub_cache(tmp_path):
    """The Quickstart's my-task/, as if pushed to me/my-task, read back by the Hub block in a fresh process offline."""
    run_quickstart(tmp_path)
    commit = "0123456789abcdef" * 2 + "01234567"
    repo = tmp_path / "hf" / "hub" / "models--me--my-task"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tmp_path / "my-task", repo / "snapshots" / commit)
    block = python_blocks("Quickstart")[1]
    assert block.count("<commit>") == 3
    script = block.replace("<commit>", commit) + (
        "\nimport json, torch\n"
        "pixel_values = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))\n"
        "print(type(model).__module__, json.dumps(model(pixel_values).logits.tolist()))\n"
        "print(classifier.model.__class__.__module__)\n"
    )
    (tmp_path / "hub_block.py").write_text(script)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_MODULES_CACHE=str(tmp_path / "mod"))
    result = subprocess.run([sys.executable, "hub_block.py"], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (installed_module, logits), remote_module = (
        result.stdout.splitlines()[-2].split(" ", 1),
        result.stdout.splitlines()[-1],
    )
    # the pipeline ran the Hub's code files; after `import modeling_vptm`, the installed classes load it
    assert remote_module.startswith("transformers_modules.") and installed_module == "modeling_vptm.modeling_vptm"
    import torch

    from modeling_vptm import VPTMForImageClassification

    local = VPTMForImageClassification.from_pretrained(tmp_path / "my-task")
    pixel_values = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(json.loads(logits)), local(pixel_values).logits)


def test_notebook_training_block_trains_evaluates_and_saves(tmp_path, monkeypatch, capsys):
    """The Training section's notebook block, as written but for its length: 2 steps instead of 30 epochs."""
    monkeypatch.chdir(tmp_path)
    block = python_blocks("Training")[0]
    assert "num_train_epochs=30" in block and "VPTMTrainer(" in block
    block = block.replace("num_train_epochs=30", "max_steps=2, use_cpu=True, disable_tqdm=True")
    exec(compile(block, "README.md notebook training", "exec"), {"__name__": "__readme__"})
    accuracy = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= accuracy <= 1.0
    saved = set(os.listdir(tmp_path / "runs" / "notebook"))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "modeling_vptm.py"} <= saved
    assert os.path.getsize(tmp_path / "runs" / "notebook" / "model.safetensors") < 60_000  # the task, as stated


def test_serving_block_runs_on_two_saved_tasks(tmp_path, monkeypatch):
    import torch
    from transformers import AutoImageProcessor

    from modeling_vptm import SHIPPED_BACKBONE, VPTMForImageClassification, shipped_backbone_path

    monkeypatch.chdir(tmp_path)  # the block serves runs/vptm and runs/vpt-shallow, as the README's commands write them
    processor = AutoImageProcessor.from_pretrained(shipped_backbone_path())
    models = {
        "runs/vptm": VPTMForImageClassification.from_backbone(SHIPPED_BACKBONE, num_labels=10),
        "runs/vpt-shallow": VPTMForImageClassification.from_backbone(
            SHIPPED_BACKBONE, num_labels=10, classifier="linear_cls", prompt_layers="shallow"
        ),
    }
    for folder, model in models.items():
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    namespace = {}
    exec(compile(python_blocks("One backbone, many tasks")[0], "README.md serving", "exec"), namespace)
    assert [tuple(logits.shape) for logits in namespace["logits"]] == [(10,)] * 3
    assert list(namespace["server"].tasks) == ["fashion-vptm"]
    with torch.no_grad():  # each image under its own task, as that task's model alone
        alone = [models[f].eval()(namespace["pixel_values"][i : i + 1]).logits[0]
                 for i, f in enumerate(["runs/vptm", "runs/vpt-shallow", "runs/vptm"])]  # fmt: skip
    torch.testing.assert_close(torch.stack(namespace["logits"]), torch.stack(alone))


# ------------------------------------------------------------------------------------------------- shell blocks
def bash_commands() -> list[tuple[str, str]]:
    """(section, command) for every command of the README's bash blocks, continuation lines joined and comments
    dropped, in the order a reader runs them."""
    text = open(os.path.join(REPO_ROOT, "README.md")).read()
    commands = []
    for block in re.finditer(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        section = text[: block.start()].rsplit("\n## ", 1)[-1].split("\n", 1)[0]
        joined = re.sub(r"\\\n\s*", " ", block.group(1))
        for line in joined.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.append((section, command))
    return commands


# What a command needs that a test run on this machine has not; such commands are parsed by their script (every flag
# and value checked, nothing run). Everything else runs as written, training commands with a step cap.
NEEDS_HUB = re.compile(r"(--push_to_hub|--repo_id|<hub dataset>|<commit>| (microsoft|me)/)")
NEEDS_GPU = re.compile(r"--bf16 true")
STEP_CAP = ["--max_steps", "2", "--max_eval_samples", "24"]


class Parsed(Exception):
    """Raised by the patched parser once a script's arguments parsed: the command is valid, nothing more is run."""


def load_script(path: str, monkeypatch):
    """A script as a fresh module (registered while it runs: dataclasses look their module up)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"readme_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def run_script(path: str, argv: list[str], parse_only: bool, monkeypatch) -> None:
    import argparse

    if parse_only:
        parse = argparse.ArgumentParser.parse_known_args

        def parse_then_stop(self, args=None, namespace=None):
            parsed = parse(self, args, namespace)
            raise Parsed(parsed)

        monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_then_stop)
    try:
        load_script(path, monkeypatch).main(argv)
    except Parsed:
        assert parse_only
    else:
        assert not parse_only, f"{path} {argv} ran without parsing its arguments"
    finally:
        monkeypatch.undo()


def run_command(command: str, workdir, monkeypatch) -> str:
    """Runs or checks one README command in `workdir` (a stand-in for the repository root); says how."""
    import shlex

    words = shlex.split(command)
    while re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VARIABLE=value before the command: its environment
        name, value = words.pop(0).split("=", 1)
        monkeypatch.setenv(name, value)
    if words[0] == "bash":  # a shell script for another machine (a GPU's): its syntax is checked
        result = subprocess.run(["bash", "-n", os.path.join(workdir, words[1])], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return "syntax checked (needs a GPU)"
    if words[:2] == ["pip", "install"]:
        extras = set(importlib.metadata.metadata("vptm").get_all("Provides-Extra"))
        for word in words[2:]:
            named = re.fullmatch(r"(?:-e )?\.\[(.*)\]", word)
            if named:
                assert set(named.group(1).split(",")) <= extras, word
            else:
                assert word in ("-e", ".", "torch==2.13.0"), word
        return "install: its extras exist"
    if words[:2] == ["apt-get", "install"]:
        assert all(package in open(os.path.join(REPO_ROOT, ".ci", "run")).read() for package in words[2:])
        return "system install: the packages CI installs"
    if words[:3] == ["python", "-m", "pytest"]:
        return "this suite"
    if words[0] == "ruff":
        result = subprocess.run(command, shell=True, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout[-2000:]
        return "ran"
    if words[0] == "curl":
        if any(word.startswith("http://127.0.0.1:") for word in words):
            return "needs the server of the command before (tests/test_serve_ray_example.py runs both)"
        assert "$ENDPOINT_URL" in command
        return "needs a deployed endpoint"
    if words[0] in ("torchrun", "accelerate"):  # the two launchers are run by tests/test_examples.py
        script = next(i for i, word in enumerate(words) if word.endswith(".py"))
        run_script(os.path.join(workdir, words[script]), words[script + 1 :], True, monkeypatch)
        return "parsed (the launcher is tested with two processes elsewhere)"
    assert words[0] == "python", f"a README command this test does not know how to run: {command}"
    script, argv = os.path.join(workdir, words[1]), words[2:]
    assert os.path.isfile(script), f"{words[1]} does not exist (yet): {command}"
    why = "needs the Hub" if NEEDS_HUB.search(command) else "needs a GPU" if NEEDS_GPU.search(command) else None
    if words[1] == "space/app.py":
        why = "a server that runs until stopped (tests/test_space.py runs it)"
    if words[1] == "examples/serve_ray.py":
        why = "a server that runs until stopped (tests/test_serve_ray_example.py runs it)"
    if why is None and words[1].endswith("run_classification.py"):
        argv = argv + STEP_CAP
    run_script(script, argv, why is not None, monkeypatch)
    return f"parsed ({why})" if why else "ran"


def test_every_shell_command_runs_as_written(tmp_path, monkeypatch):
    """Every command of the README's bash blocks, in order, from a folder that stands in for the repository root (its
    files linked, its outputs kept apart): each one runs as written (training with a cap of 2 steps), or, when it needs
    the Hub, a GPU or a running server, is parsed by its own script. A command naming a file no earlier command wrote,
    a flag its script does not take, or a tool this test does not know fails the test."""
    for name in os.listdir(REPO_ROOT):
        if not name.startswith(".") and name not in ("runs", "onnx"):
            os.symlink(os.path.join(REPO_ROOT, name), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    outcome = {}
    for section, command in bash_commands():
        with monkeypatch.context() as patched:
            try:
                outcome[command] = run_command(command, tmp_path, patched)
            except Exception as error:
                raise AssertionError(f"README section {section!r}: {command}") from error
    ran = [command for command, how in outcome.items() if how == "ran"]
    assert any("run_classification.py --output_dir runs/vptm" in command for command in ran)  # the main job
    assert any("predict.py" in command for command in ran) and any("serve_batch.py" in command for command in ran)
    assert len(outcome) >= 20, outcome
