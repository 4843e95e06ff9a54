"""Inference Endpoints: the handler called as the serving toolkit calls it answers as examples/predict.py does, in
both repository shapes and both backends (ONNX Runtime, PyTorch); bad input is answered with an error message; the
repository is written and pushed whole, and the ONNX repository serves in a process without torch or transformers
(the stock container's transformers cannot be the 5.x this package needs)."""

from __future__ import annotations

import ast
import base64
import functools
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys

import make_endpoint
import numpy as np
import predict
import pytest
import torch
from conftest import REPO_ROOT, make_backbone
from packaging.requirements import Requirement
from PIL import Image
from transformers import BeitImageProcessor

from modeling_vptm import VPTMForImageClassification
from modeling_vptm.deploy import write_endpoint_repository
from modeling_vptm.shipped import resolve_backbone_path


TASKS = {  # on the tiny test backbone (20 x 20 pixels): fashion and fashion-ensemble share a sequence layout
    "fashion": dict(num_labels=10, prompt_length=3),
    "fashion-ensemble": dict(num_labels=10, prompt_length=3, head_input="ensemble"),
    "fashion-vpt": dict(id2label={0: "a", 1: "b", 2: "c", 3: "d"}, classifier="linear_cls", prompt_layers="shallow"),
}
PROCESSOR = dict(size={"height": 20, "width": 20}, image_mean=[0.3, 0.4, 0.5], image_std=[0.2, 0.25, 0.3])


@pytest.fixture(scope="module")
def checkpoints(backbone_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("endpoint-tasks")
    processor = BeitImageProcessor(**PROCESSOR)
    paths = {}
    for seed, (name, fields) in enumerate(TASKS.items()):
        torch.manual_seed(seed)
        model = VPTMForImageClassification.from_backbone(backbone_dir, **fields)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.3)  # as if trained: confident, distinct answers
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


@pytest.fixture(scope="module")
def multi_task_repository(checkpoints, tmp_path_factory):
    """The default (ONNX) multi-task repository of fashion and fashion-vpt (the README's tasks): two sequence
    layouts, two backbone graphs."""
    folder = tmp_path_factory.mktemp("multi-task-repo")
    config = write_endpoint_repository(str(folder), {n: checkpoints[n] for n in ("fashion", "fashion-vpt")})
    assert config["backend"] == "onnx" and config["onnx_tasks"] == {"fashion": "layout-0", "fashion-vpt": "layout-1"}
    return folder


@pytest.fixture(scope="module")
def multi_task_handler(multi_task_repository):
    return load_handler(multi_task_repository)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("endpoint-images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (shape, mode) in enumerate([((28, 28), "L"), ((40, 33, 3), "RGB"), ((28, 28, 4), "RGBA")]):
        paths.append(str(folder / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(paths[-1])
    return paths


def load_handler(model_dir):
    """As huggingface-inference-toolkit's check_and_register_custom_pipeline_from_directory does it."""
    spec = importlib.util.spec_from_file_location("handler.EndpointHandler", os.path.join(model_dir, "handler.py"))
    sys.path.insert(0, str(model_dir))
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.EndpointHandler(str(model_dir))
    finally:
        sys.path.remove(str(model_dir))


def request(content_type: str, body: bytes, query: dict | None = None) -> dict:
    """The toolkit's deserialisation of a request body (webservice_starlette.predict): an image content type gives
    `{"inputs": PIL image}` (Imager), JSON its parsed object (Jsoner); query parameters become "parameters", digits
    turned into ints (convert_params_to_int_or_bool)."""
    if content_type.startswith("image/"):
        data = {"inputs": Image.open(io.BytesIO(body)).convert("RGB")}
    else:
        data = json.loads(body)
    if query and "parameters" not in data:
        data["parameters"] = {k: int(v) if v.isnumeric() else v for k, v in query.items()}
    return data


def assert_same_top(answer: list[dict], expected: list[dict]) -> None:
    assert [p["label"] for p in answer] == [p["label"] for p in expected]
    np.testing.assert_allclose([p["score"] for p in answer], [p["score"] for p in expected], atol=1e-5)


def predicted(checkpoint: str, files: list[str], top_k: int) -> list[list[dict]]:
    return predicted_once(checkpoint, tuple(files), top_k)


@functools.cache  # the checkpoints and images are module fixtures: predict.py runs once per question
def predicted_once(checkpoint: str, files: tuple[str, ...], top_k: int) -> list[list[dict]]:
    return [r["predictions"] for r in predict.main([*files, "--model", checkpoint, "--top_k", str(top_k)])]


SHIPPED = "vptm:tiny-beit-fashion-mnist"


@pytest.fixture(scope="module")
def shipped_checkpoint(tmp_path_factory) -> str:
    """A prompt checkpoint on the shipped backbone, which a pytorch endpoint can load (it is bundled with the
    package; a local folder is not)."""
    folder = tmp_path_factory.mktemp("shipped-task")
    torch.manual_seed(0)
    model = VPTMForImageClassification.from_backbone(SHIPPED, **TASKS["fashion"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(folder)
    BeitImageProcessor.from_pretrained(resolve_backbone_path(SHIPPED)).save_pretrained(folder)
    return str(folder)


def test_single_task_pytorch_endpoint_answers_as_predict(shipped_checkpoint, images, tmp_path):
    checkpoints = {"fashion": shipped_checkpoint}
    folder = tmp_path / "repo"
    config = write_endpoint_repository(str(folder), {"default": checkpoints["fashion"]}, backend="pytorch")
    assert config == {"backend": "pytorch", "backbone": SHIPPED, "backbone_revision": None,
                      "tasks": {"default": "."}}  # fmt: skip
    # the root is the prompt checkpoint itself, so the repository also loads with pipeline; the package is bundled
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "modeling_vptm.py", "handler.py",
            "requirements.txt", "endpoint.json"} <= set(os.listdir(folder))  # fmt: skip
    assert os.path.isfile(folder / "modeling_vptm" / "serving" / "multitask.py")
    assert not os.path.exists(folder / "onnx")
    assert "from modeling_vptm.deploy.endpoint import EndpointHandler" in (folder / "handler.py").read_text()
    requirements = [Requirement(line) for line in (folder / "requirements.txt").read_text().split()]
    assert {r.name for r in requirements} == {"transformers", "torch", "safetensors", "huggingface_hub", "numpy",
                                              "Pillow"}  # fmt: skip
    assert all(r.specifier for r in requirements)  # the package's floors: this backend runs on a custom image
    handler = load_handler(folder)
    assert type(handler).__module__ == "modeling_vptm.deploy.endpoint"
    expected = predicted(checkpoints["fashion"], images, 3)
    for path, reference in zip(images, expected, strict=True):
        body = open(path, "rb").read()
        assert_same_top(handler(request("image/png", body, {"top_k": "3"})), reference)
        as_json = json.dumps({"inputs": base64.b64encode(body).decode(), "parameters": {"top_k": 3}}).encode()
        assert_same_top(handler(request("application/json", as_json)), reference)
        # what InferenceClient.image_classification sends when given top_k: base64 JSON, pipeline's parameter names
        sent = {"inputs": base64.b64encode(body).decode(), "parameters": {"top_k": 3, "function_to_apply": "softmax"}}
        assert_same_top(handler(sent), reference)
    # a list of images: one pass, one answer per image; the default top_k is pipeline's 5
    batch = json.dumps({"inputs": [base64.b64encode(open(p, "rb").read()).decode() for p in images]}).encode()
    answers = handler(request("application/json", batch))
    for answer, reference in zip(answers, predicted(checkpoints["fashion"], images, 5), strict=True):
        assert_same_top(answer, reference)


def test_multi_task_endpoint_answers_each_task_as_predict(checkpoints, images, multi_task_handler):
    handler = multi_task_handler
    assert handler.tasks == ["fashion", "fashion-vpt"] and sorted(handler.graphs) == ["layout-0", "layout-1"]
    expected = {name: predicted(checkpoints[name], images, 2) for name in ("fashion", "fashion-vpt")}
    batch = [base64.b64encode(open(p, "rb").read()).decode() for p in images]
    answers = handler(request("application/json", json.dumps({"inputs": batch, "parameters": {"top_k": 2}}).encode()))
    for i, answer in enumerate(answers):  # every task by default, keyed by task
        assert sorted(answer) == ["fashion", "fashion-vpt"]
        for name in expected:
            assert_same_top(answer[name], expected[name][i])
    one = handler(request("image/png", open(images[0], "rb").read(), {"top_k": "2", "tasks": "fashion-vpt"}))
    assert_same_top(one, expected["fashion-vpt"][0])  # one task asked for: pipeline's answer itself
    assert all(p["label"] in "abcd" for p in one)
    # more labels asked for than a task has: all of them, as pipeline does
    assert (
        len(handler({"inputs": open(images[0], "rb").read(), "parameters": {"top_k": 50, "tasks": ["fashion-vpt"]}}))
        == 4
    )


@pytest.mark.parametrize(
    "data, message",
    [
        ({"inputs": b"not an image"}, r"not an image that can be read \(UnidentifiedImageError"),
        ({"inputs": "bm90IGFuIGltYWdl"}, r"not an image that can be read"),  # valid base64 of text
        ({"inputs": "%%% no base64 %%%"}, r"not image bytes or a base64-encoded image"),
        ({"inputs": "/etc/hostname"}, r"not image bytes or a base64-encoded image: '/etc/hostname'"),  # no paths
        ({"inputs": 3}, r"an image is bytes, a base64 string or a PIL image, got int"),
        ({"inputs": "IMAGE", "parameters": {"tasks": ["nope"]}}, r"unknown task\(s\) \['nope'\]; the tasks are"),
        ({"inputs": "IMAGE", "parameters": {"tasks": []}}, r"tasks must be a non-empty list of task names"),
        ({"inputs": "IMAGE", "parameters": {"top_k": 0}}, r"top_k must be a whole number >= 1, got 0"),
        ({"inputs": "IMAGE", "parameters": {"top_k": -2}}, r"top_k must be a whole number >= 1, got -2"),
        ({"inputs": "IMAGE", "parameters": {"top_k": "3"}}, r"top_k must be a whole number >= 1, got '3'"),
        ({"inputs": "IMAGE", "parameters": {"top_k": True}}, r"top_k must be a whole number >= 1, got True"),
        ({"inputs": "IMAGE", "parameters": {"temperature": 2}}, r"unknown parameters \['temperature'\]"),
        ({"inputs": "IMAGE", "parameters": {"function_to_apply": "sigmoid"}}, r"must be 'softmax' .* got 'sigmoid'"),
        ({"inputs": []}, r"inputs must hold 1 to 64 images, got 0"),
        ({"image": "IMAGE"}, r'the request body must be \{"inputs": \.\.\., "parameters"'),
    ],
)
def test_bad_input_is_answered_with_an_error_not_an_exception(multi_task_handler, images, data, message):
    handler = multi_task_handler
    image = base64.b64encode(open(images[0], "rb").read()).decode()
    if data.get("inputs") == "IMAGE":  # a good image, so that only the parameters are at fault
        data = {**data, "inputs": image}
    answer = handler(data)
    assert list(answer) == ["error"], answer
    assert re.search(message, answer["error"]), answer["error"]


def test_a_bad_image_in_a_list_costs_the_others_nothing(checkpoints, images, multi_task_handler):
    good = [open(p, "rb").read() for p in images[:2]]
    answers = multi_task_handler({"inputs": [good[0], b"broken", good[1]], "parameters": {"top_k": 2, "tasks":
                                                                                          ["fashion"]}})  # fmt: skip
    assert answers[1] == {"error": answers[1]["error"]} and answers[1]["error"].startswith("input 1: not an image")
    expected = predicted(checkpoints["fashion"], images[:2], 2)
    assert_same_top(answers[0], expected[0])
    assert_same_top(answers[2], expected[1])


def test_malformed_images_in_a_list_cost_the_good_ones_nothing(checkpoints, images, multi_task_handler):
    good = [open(p, "rb").read() for p in images[:2]]
    truncated = good[0][:16]  # the PNG signature and half a header chunk
    answers = multi_task_handler({"inputs": [good[0], "data:xyz", truncated, "data:image/png;base64", good[1]],
                                  "parameters": {"top_k": 2, "tasks": ["fashion"]}})  # fmt: skip
    assert answers[1] == {"error": "input 1: a data: URL is data:<media type>;base64,<data>, got no comma in "
                                   "'data:xyz'"}  # fmt: skip
    assert re.fullmatch(r"input 2: not an image that can be read \(OSError: .*", answers[2]["error"])
    assert answers[3]["error"].startswith("input 3: a data: URL is data:<media type>;base64,<data>, got no comma")
    expected = predicted(checkpoints["fashion"], images[:2], 2)
    assert_same_top(answers[0], expected[0])
    assert_same_top(answers[4], expected[1])


def test_unexpected_failures_are_answered_with_an_error_naming_them():
    from modeling_vptm.standalone.endpoint_requests import RequestHandler

    class Failing(RequestHandler):
        tasks = ["only"]

        def classify(self, images, tasks, top_k):
            raise RuntimeError("the runtime fell over")

    image = io.BytesIO()
    Image.new("RGB", (4, 4)).save(image, "PNG")
    assert Failing()({"inputs": image.getvalue()}) == {"error": "RuntimeError: the runtime fell over"}


def test_repositories_that_would_not_serve_are_refused(checkpoints, backbone_dir, tmp_path):
    with pytest.raises(ValueError, match=r"is not a VPTM prompt checkpoint: its config has model_type='beit'"):
        write_endpoint_repository(str(tmp_path / "a"), {"default": backbone_dir})
    make_backbone(tmp_path / "other-backbone", seed=3)
    other = VPTMForImageClassification.from_backbone(str(tmp_path / "other-backbone"), num_labels=2)
    other.save_pretrained(tmp_path / "other-task")
    BeitImageProcessor(**PROCESSOR).save_pretrained(tmp_path / "other-task")
    with pytest.raises(ValueError, match=r"task 'other' \(.*\) was made on backbone .*other-backbone.* but this"):
        write_endpoint_repository(str(tmp_path / "b"), {**checkpoints, "other": str(tmp_path / "other-task")})
    shutil.copytree(checkpoints["fashion-vpt"], tmp_path / "resized")
    processor = BeitImageProcessor(**{**PROCESSOR, "size": {"height": 40, "width": 40}})
    processor.save_pretrained(tmp_path / "resized")
    resized = {"fashion": checkpoints["fashion"], "resized": str(tmp_path / "resized")}
    with pytest.raises(ValueError, match=r"task 'resized' was saved with an image processor that differs .*'size'"):
        write_endpoint_repository(str(tmp_path / "c"), resized)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "README.md").write_text("a repository already")
    with pytest.raises(ValueError, match=r"is not empty; an endpoint repository is written into a new or empty"):
        write_endpoint_repository(str(tmp_path / "full"), checkpoints)
    with pytest.raises(ValueError, match=r"give one prompt checkpoint with --model, or several tasks with --task"):
        make_endpoint.main(["--model", checkpoints["fashion"], "--task", f"x={checkpoints['fashion']}",
                            "--output", str(tmp_path / "d")])  # fmt: skip
    with pytest.raises(ValueError, match=r"a checkpoint is given as NAME=SOURCE \(SOURCE a folder .*\), got 'x'"):
        make_endpoint.main(["--task", "x", "--output", str(tmp_path / "e")])
    with pytest.raises(ValueError, match=r"two checkpoints are named 'x'; name each with NAME=SOURCE"):
        make_endpoint.main(["--task", f"x={checkpoints['fashion']}", "--task", "x=y", "--output", str(tmp_path / "e")])
    shutil.copytree(checkpoints["fashion-vpt"], tmp_path / "reweighted")
    config = json.loads((tmp_path / "reweighted" / "config.json").read_text())
    (tmp_path / "reweighted" / "config.json").write_text(json.dumps({**config, "backbone_fingerprint": "0" * 64}))
    with pytest.raises(ValueError, match=r"task 'reweighted' \(.*\) was trained on backbone .* with weights "
                       r"fingerprint 0000000000000000\.\.\., but the weights loaded now have fingerprint "
                       r"[0-9a-f]{16}\.\.\."):  # fmt: skip
        write_endpoint_repository(str(tmp_path / "h"), {**checkpoints, "reweighted": str(tmp_path / "reweighted")})
    with pytest.raises(ValueError, match=r"backend must be one of \['onnx', 'pytorch'\], got 'tf'"):
        write_endpoint_repository(str(tmp_path / "f"), checkpoints, backend="tf")
    with pytest.raises(ValueError, match=r"backend 'pytorch' loads the backbone the tasks were made on, '/.*', which "
                       r"is a local folder the endpoint does not have; expected a shipped backbone 'vptm:<name>' or "
                       r"a Hub id 'org/name'"):  # fmt: skip
        write_endpoint_repository(str(tmp_path / "g"), {"default": checkpoints["fashion"]}, backend="pytorch")
    for name in ("../escape", "a/b", ".."):
        with pytest.raises(ValueError, match=rf"task names are letters, .* got {re.escape(repr(name))}"):
            write_endpoint_repository(str(tmp_path / "i"), {name: checkpoints["fashion"], **checkpoints})
    # refused while writing (after the checkpoints were copied): nothing is left, not even the temporary folder
    assert not any(os.path.exists(tmp_path / f) for f in [*"abcdefghi", "escape"])
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".vptm-save-")]


def test_readme_handler_block_answers_as_predict(checkpoints, multi_task_repository, tmp_path, monkeypatch, capsys):
    """The README's local handler call, as written, on the repository its make_endpoint command writes (the same
    tasks; the command itself is run by tests/test_readme.py)."""
    from test_readme import python_blocks

    monkeypatch.chdir(tmp_path)
    shutil.copytree(multi_task_repository, "endpoint-multi")
    shutil.copytree(os.path.join(REPO_ROOT, "space", "examples"), "space/examples")
    capsys.readouterr()
    block = python_blocks("Deploy: ONNX Runtime and Inference Endpoints")[1]
    exec(compile(block, "README.md endpoint", "exec"), {"__name__": "__readme__"})
    answer = ast.literal_eval(capsys.readouterr().out.splitlines()[-1])
    assert sorted(answer) == ["fashion", "fashion-vpt"]
    for task in answer:
        assert_same_top(answer[task], predicted(checkpoints[task], [str(tmp_path / "space/examples/bag.png")], 3)[0])


# ------------------------------------------------------------------------------------------------ the Hub
TOOLKIT = """
import importlib.util, json, sys
sys.modules["torch"] = sys.modules["transformers"] = None  # neither can be imported: the stock container's
model_dir = sys.argv[1]                                      # transformers is not ours, and the handler needs neither
# huggingface-inference-toolkit: utils.check_and_register_custom_pipeline_from_directory
spec = importlib.util.spec_from_file_location("handler.EndpointHandler", model_dir + "/handler.py")
sys.path.insert(0, model_dir)
handler = importlib.util.module_from_spec(spec)
sys.modules["handler.EndpointHandler"] = handler
spec.loader.exec_module(handler)
endpoint = handler.EndpointHandler(model_dir)
print(json.dumps(endpoint({"inputs": [open(p, "rb").read() for p in sys.argv[2:]], "parameters": {"top_k": 3}})))
"""


def test_make_endpoint_pushes_the_whole_repository_in_one_commit(checkpoints, images, monkeypatch, tmp_path):
    from huggingface_hub import HfApi

    calls, remote = [], tmp_path / "remote"

    def upload_folder(api, repo_id, folder_path, delete_patterns=None, commit_message=None, **kw):
        calls.append(("upload_folder", repo_id, sorted(delete_patterns)))
        shutil.copytree(folder_path, remote / repo_id, dirs_exist_ok=True)

    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: calls.append(("create_repo", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    tasks = {name: checkpoints[name] for name in ("fashion", "fashion-ensemble")}  # one layout: one graph
    result = make_endpoint.main([*(f"--task={n}={p}" for n, p in tasks.items()), "--repo_id", "me/vptm-endpoint",
                                 "--private"])  # fmt: skip
    assert result["url"] == "https://huggingface.co/me/vptm-endpoint"
    assert calls == [("create_repo", "me/vptm-endpoint", {"private": True, "exist_ok": True}),
                     ("upload_folder", "me/vptm-endpoint", ["modeling_vptm/**", "onnx/**", "tasks/**"])]  # fmt: skip
    pushed = remote / "me/vptm-endpoint"
    files = {os.path.relpath(os.path.join(r, f), pushed) for r, _, fs in os.walk(pushed) for f in fs}
    assert {
        "handler.py",
        "requirements.txt",
        "endpoint.json",
        "endpoint_requests.py",
        "onnx_runtime.py",
        "tasks/fashion/model.safetensors",
        "tasks/fashion-ensemble/config.json",
        "onnx/layout-0/backbone.onnx",
        "onnx/layout-0/tasks/fashion/task.npz",
        "onnx/layout-0/tasks/fashion-ensemble/task.npz",
        "onnx/layout-0/preprocessor_config.json",
    } <= files
    assert not any(f.startswith("modeling_vptm/") or "__pycache__" in f for f in files)
    # nothing that touches the container's transformers, and no floor that would upgrade its compiled packages
    assert set((pushed / "requirements.txt").read_text().split()) == {"onnxruntime", "numpy", "Pillow"}
    # the pushed repository served as the toolkit serves it, in a fresh process where torch and transformers
    # cannot be imported, answers as predict.py
    result = subprocess.run([sys.executable, "-c", TOOLKIT, str(pushed), *images], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.splitlines()[-1])
    for name, path in tasks.items():
        for answer, reference in zip(answers, predicted(path, images, 3), strict=True):
            assert_same_top(answer[name], reference)
