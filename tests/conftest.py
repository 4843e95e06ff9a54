"""Shared fixtures: tiny BEiT MIM backbones built from scratch (odd sizes, random non-zero weights), no network."""

from __future__ import annotations

import fnmatch
import os
import shutil
import sys


# The suite never touches the network: the Hub libraries read these when they are first imported, so set them first.
for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[variable] = "1"
# pytest-xdist runs the test files in parallel processes (pyproject's addopts: one per core): each takes its share of
# the cores for its own threads and those of the processes it starts, instead of every process taking them all
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import BeitConfig, BeitForMaskedImageModeling  # noqa: E402


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
# the one way tests import the example scripts and the experiments: as top-level modules from their folders
sys.path.insert(0, os.path.join(REPO_ROOT, "examples"))
sys.path.insert(0, os.path.join(REPO_ROOT, "experiments"))
# the Hub code files: the package's root modules but __init__, which save_pretrained copies beside a checkpoint
HUB_CODE_FILES = sorted(
    name
    for name in os.listdir(os.path.join(REPO_ROOT, "modeling_vptm"))
    if name.endswith(".py") and name != "__init__.py"
)


def code_files(name: str) -> list[str]:
    """The code files save_pretrained copies beside a checkpoint whose code is the root module `name`: that file and,
    recursively, every file it imports relatively (found the way transformers finds them)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    code = os.path.join(REPO_ROOT, "modeling_vptm", name)
    return sorted({os.path.basename(path) for path in [code, *get_relative_import_files(code)]})


# what a prompt checkpoint carries
PROMPT_CHECKPOINT_CODE = code_files("modeling_vptm.py")


def tiny_beit_config(**overrides) -> BeitConfig:
    fields = dict(
        image_size=20,
        patch_size=4,
        num_channels=3,
        hidden_size=24,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=40,
        vocab_size=37,
        use_mask_token=True,
        use_absolute_position_embeddings=False,
        use_relative_position_bias=False,
        use_shared_relative_position_bias=True,
        layer_scale_init_value=0.1,
        drop_path_rate=0.1,
    )
    fields.update(overrides)
    return BeitConfig(**fields)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """BEiT initialises biases, tokens and the relative bias to zero; tests need every tensor to matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def save_task_checkpoints(backbone_dir, root, tasks: dict, noise: float) -> dict[str, str]:
    """Prompt checkpoints on `backbone_dir`, one per `{name: VPTMConfig fields with num_labels}`, saved under `root`,
    their trained tensors moved by `noise` from the initialisation (as if trained: every tensor matters)."""
    from modeling_vptm import VPTMForImageClassification

    paths = {}
    for i, (name, fields) in enumerate(tasks.items()):
        torch.manual_seed(i)
        fields = dict(fields)
        model = VPTMForImageClassification.from_backbone(backbone_dir, num_labels=fields.pop("num_labels"), **fields)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * noise)
        model.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


# the tasks of a server's task root in the serving tests: two verbalizer tasks and a linear one
SERVED_TASKS = {"a": dict(num_labels=3, prompt_length=2), "b": dict(num_labels=4, prompt_length=2),
                "c": dict(num_labels=3, prompt_length=3, classifier="linear_cls")}  # fmt: skip


def make_task_root(backbone_dir, tmp_path_factory):
    """A task root of the `SERVED_TASKS` on `backbone_dir`, a broken task (its weights not safetensors) and one that
    names this backbone but was made on other weights."""
    import json
    import shutil

    root = tmp_path_factory.mktemp("tasks")
    save_task_checkpoints(backbone_dir, root, SERVED_TASKS, noise=0.3)
    shutil.copytree(root / "a", root / "broken")
    (root / "broken" / "model.safetensors").write_bytes(b"not safetensors")
    other = tmp_path_factory.mktemp("other")
    make_backbone(other / "backbone", seed=7)
    save_task_checkpoints(str(other / "backbone"), other, {"foreign": dict(num_labels=3)}, noise=0.3)
    config = json.loads((other / "foreign" / "config.json").read_text())
    config["backbone_name_or_path"] = backbone_dir  # the name of this server's backbone, trained on other weights
    (other / "foreign" / "config.json").write_text(json.dumps(config))
    shutil.copytree(other / "foreign", root / "foreign")
    return root


def make_backbone(path, seed: int = 0, **overrides) -> BeitForMaskedImageModeling:
    torch.manual_seed(seed)
    model = randomize(BeitForMaskedImageModeling(tiny_beit_config(**overrides)).eval(), seed)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def backbone_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("backbone")
    make_backbone(path)
    return str(path)


@pytest.fixture(scope="session")
def backbone(backbone_dir):
    return BeitForMaskedImageModeling.from_pretrained(backbone_dir).eval()


@pytest.fixture
def pixel_values():
    return torch.randn(3, 3, 20, 20, generator=torch.Generator().manual_seed(1))


UNREACHABLE_HUB = "http://127.0.0.1:9"  # the loopback discard port: nothing listens, a connection is refused at once


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """Online mode, with the Hub at an address nothing answers on, and an empty Hub cache; returns the environment a
    subprocess needs for the same."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", UNREACHABLE_HUB)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)  # no runs/ here: 'runs/no-such-run' reads as a Hub id
    return {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_ENDPOINT": UNREACHABLE_HUB,
            "HF_HOME": str(tmp_path / "hf")}  # fmt: skip


class FakeHub:
    """HfApi's writing calls, recorded, with each repository's files copied into remote/<repo_id>/."""

    def __init__(self, monkeypatch, remote):
        from huggingface_hub import HfApi

        self.remote, self.calls, self.commits = remote, [], 0
        monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, private=None, **kw: self.log(
            "create_repo", repo_id, private))  # fmt: skip
        monkeypatch.setattr(HfApi, "create_branch", lambda api, repo_id, branch, **kw: self.log(
            "create_branch", repo_id, branch))  # fmt: skip
        monkeypatch.setattr(HfApi, "upload_folder", self.upload_folder)

    def log(self, *call):
        self.calls.append(call)
        return call[1]

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, revision=None, **kwargs):
        self.log("upload_folder", repo_id, revision)
        target = self.remote / repo_id
        target.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(folder_path):
            path = os.path.join(folder_path, name)
            if os.path.isfile(path) and (
                allow_patterns is None or any(fnmatch.fnmatch(name, p) for p in allow_patterns)
            ):
                shutil.copy(path, target / name)
        self.commits += 1

        class Commit:
            oid = f"{self.commits:040x}"

        return Commit()

    def lay_out_cache(self, hf_home, repo_id, commit):
        """The Hub cache layout huggingface_hub reads offline: refs/main and snapshots/<commit>/."""
        repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        shutil.copytree(self.remote / repo_id, repo / "snapshots" / commit)


class Exploit:
    """Unpickling this runs a shell command: a file that holds it must never be unpickled."""

    def __reduce__(self):
        return (os.system, ("touch exploited",))
