"""The README's code runs as written: the offline Quickstart block is executed, every Python block compiles."""

from __future__ import annotations

import contextlib
import io
import os
import re

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


def test_quickstart_runs_offline_as_written(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    block = python_blocks("Quickstart")[0]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block, "README.md Quickstart", "exec"), {"__name__": "__readme__"})
    lines = printed.getvalue().splitlines()
    # the counts the README states in a comment are the ones the code prints
    stated = re.search(r"print_trainable_parameters\(\)  # (.*)", block).group(1)
    assert lines[0] == stated
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(os.listdir("my-task"))
    predictions = eval(lines[1])  # the pipeline's printed list of top-3 labels
    assert len(predictions) == 3 and all(p["label"].startswith("LABEL_") for p in predictions)
    assert sum(p["score"] for p in predictions) <= 1.0 + 1e-6
