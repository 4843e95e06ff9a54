"""A save killed at any point: every file operation `save_pretrained` makes into an existing checkpoint folder is, in
turn, the one a process dies at; every folder it leaves loads as the old checkpoint or the new one, and the staging
folders the killed processes leave are removed by the next save."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


# Runs in its own process, single-threaded, so that it can fork: each child saves the new checkpoint over a copy of the
# old one and is killed (os._exit) just before its n-th file operation, seen through Python's audit hooks; the parent
# then loads what the child left.
FAULT_INJECTION = r"""
import json, os, shutil, sys
import torch
torch.set_num_threads(1)
from modeling_vptm import VPTMForImageClassification

backbone, root = sys.argv[1], sys.argv[2]
# file operations, as audit events (an open counts when it writes)
EVENTS = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.link", "os.symlink", "os.chmod", "os.truncate",
          "shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.rmtree", "vptm.exchange"}
WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def writes(args):
    mode, flags = args[1], args[2]
    return bool(mode and any(c in mode for c in "wax+")) or bool(flags and flags & WRITES)

def model(prompt_length, seed):
    torch.manual_seed(seed)
    made = VPTMForImageClassification.from_backbone(backbone, num_labels=3, prompt_length=prompt_length)
    with torch.no_grad():
        for p in made.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    return made.eval()

# the two checkpoints differ in their tensors' shapes: a folder mixing their files would not load
old, new = model(2, 0), model(4, 1)
pristine, folder = os.path.join(root, "pristine"), os.path.join(root, "work", "task")
old.save_pretrained(pristine)
with open(os.path.join(pristine, "notes.txt"), "w") as f:  # a file of the folder's own, which a save keeps
    f.write("kept")
pixels = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    expected = {"old": old(pixels).logits, "new": new(pixels).logits}

outcomes, operation = [], 0
while True:
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(pristine, folder)
    pid = os.fork()
    if pid == 0:
        seen = [0]
        def hook(event, args):
            if event in EVENTS or (event == "open" and writes(args)):
                seen[0] += 1
                if seen[0] > operation:
                    os._exit(9)
        sys.addaudithook(hook)
        new.save_pretrained(folder)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    killed = os.WEXITSTATUS(status) == 9
    loaded = VPTMForImageClassification.from_pretrained(folder)
    with torch.no_grad():
        logits = loaded(pixels).logits
    which = [name for name, value in expected.items() if value.shape == logits.shape and torch.equal(value, logits)]
    kept = os.path.join(folder, "notes.txt")
    notes = open(kept).read() if os.path.isfile(kept) else None
    outcomes.append({"operation": operation, "killed": killed, "loads_as": which, "notes": notes})
    if not killed:
        break
    operation += 1
staging = [name for name in os.listdir(os.path.dirname(folder)) if name.startswith(".vptm-save-")]
print(json.dumps({"outcomes": outcomes, "staging_left": staging}))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the kills are forked children")
def test_a_save_killed_at_any_file_operation_leaves_the_old_or_the_new_checkpoint(backbone_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", FAULT_INJECTION, backbone_dir, str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    outcomes = report["outcomes"]
    print(f"{len(outcomes) - 1} file operations, a kill at each")
    kills = [o for o in outcomes if o["killed"]]
    assert len(kills) >= 10, outcomes  # config, weights, code files, permissions, exchange, clean-up: each a kill
    for outcome in outcomes:
        assert outcome["loads_as"] in (["old"], ["new"]), outcome
        assert outcome["notes"] == "kept", outcome  # the folder's own files survive whichever checkpoint it holds
    assert outcomes[0]["loads_as"] == ["old"] and outcomes[-1] == {
        **outcomes[-1],
        "killed": False,
        "loads_as": ["new"],
    }
    # a kill after the exchange leaves the new checkpoint in place (and the old one in a staging folder)
    assert any(o["killed"] and o["loads_as"] == ["new"] for o in outcomes)
    # the staging folders of the killed processes were removed by the saves that followed
    assert report["staging_left"] == []
