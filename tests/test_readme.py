"""The README's code runs as written: every Python block is executed (the Hub block against a local Hub cache, its
`<commit>` placeholders filled with the commit there), and compiles."""

from __future__ import annotations

import contextlib
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


def test_serving_block_runs_on_two_saved_tasks(tmp_path, monkeypatch):
    import torch

    from modeling_vptm import SHIPPED_BACKBONE, VPTMForImageClassification

    monkeypatch.chdir(tmp_path)  # the block serves runs/vptm and runs/vpt, as the README's main job writes them
    VPTMForImageClassification.from_backbone(SHIPPED_BACKBONE, num_labels=10).save_pretrained("runs/vptm")
    VPTMForImageClassification.from_backbone(SHIPPED_BACKBONE, num_labels=10, classifier="linear_cls").save_pretrained(
        "runs/vpt"
    )
    namespace = {"pixel_values": torch.randn(3, 3, 28, 28)}
    exec(compile(python_blocks("One backbone, many tasks")[0], "README.md serving", "exec"), namespace)
    assert [tuple(logits.shape) for logits in namespace["logits"]] == [(10,)] * 3
    assert list(namespace["server"].tasks) == ["fashion-vptm"]
