"""ONNX export: both graphs equal PyTorch in ONNX Runtime (batch sizes other than the trace's), a file is classified
in a process where torch cannot be imported, the numpy preprocessing equals the image processor's, and bad input
gets errors that name what was expected."""

from __future__ import annotations

import ast
import io
import json
import os
import re
import shutil
import subprocess
import sys

import export_onnx
import numpy as np
import predict
import pytest
from conftest import REPO_ROOT, make_backbone, save_task_checkpoints
from PIL import Image
from transformers import AutoImageProcessor, BeitImageProcessor

from modeling_vptm import VPTMForImageClassification
from modeling_vptm.deploy.onnx_export import (
    EXAMPLE_BATCH,
    backbone_graph_parity,
    export_backbone_graph,
    export_task_graph,
    task_graph_parity,
)
from modeling_vptm.standalone.image_input import read_image
from modeling_vptm.standalone.onnx_runtime import ImagePreprocessor, OnnxImageClassifier, OnnxMultiTask


TOLERANCE = 1e-4
BATCH_SIZES = (1, 7)  # neither is the trace's batch: the graph must not have specialised on it
assert EXAMPLE_BATCH not in BATCH_SIZES
PROCESSOR = dict(size={"height": 20, "width": 20}, image_mean=[0.3, 0.4, 0.5], image_std=[0.2, 0.25, 0.3], resample=3)

# one task graph per head family; the backbone graphs hold every head of their layout
TASK_GRAPHS = {
    "vptm-hidden": dict(prompt_length=3, num_labels=4),
    "vptm-ensemble-replace": dict(prompt_length=2, head_input="ensemble", mask_token_mode="replace",
                                  train_mask_token=True, prototypes_per_class=2, num_labels=5),
    "vpt-shallow": dict(prompt_length=2, prompt_layers="shallow", classifier="linear_cls", num_labels=3),
}  # fmt: skip
DEEP_APPEND = {  # one layout: 3 prompts in every block, [MASK] appended
    "hidden": dict(prompt_length=3, num_labels=4),
    "logits": dict(prompt_length=3, head_input="logits", num_labels=3),
    "normalized-logits": dict(prompt_length=3, head_input="normalized_logits", num_labels=3),
    "probs": dict(prompt_length=3, head_input="probs", prototypes_per_class=3, num_labels=2),
    "ensemble": dict(prompt_length=3, head_input="ensemble", num_labels=4),
    "linear-mask": dict(prompt_length=3, classifier="linear_mask", head_input="logits", num_labels=3),
    "trained-mask": dict(prompt_length=3, train_mask_token=True, num_labels=2),
}
VPT_DEEP = {  # one layout: read-out at CLS
    "vpt-a": dict(prompt_length=2, classifier="linear_cls", num_labels=3),
    "vpt-b": dict(prompt_length=2, classifier="linear_cls", num_labels=6),
}


def make_checkpoints(backbone_dir: str, root, tasks: dict) -> dict[str, str]:
    paths = save_task_checkpoints(backbone_dir, root, tasks, noise=0.3)
    for path in paths.values():
        BeitImageProcessor(**PROCESSOR).save_pretrained(path)
    return paths


@pytest.fixture(scope="module")
def checkpoints(backbone_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-tasks")
    return make_checkpoints(backbone_dir, root, {**TASK_GRAPHS, **DEEP_APPEND, **VPT_DEEP})


@pytest.fixture(scope="module")
def task_exports(checkpoints, tmp_path_factory):
    """Each task graph, the first through the command line (which reports its own parity check)."""
    root = tmp_path_factory.mktemp("onnx-task-graphs")
    folders, reports = {}, {}
    for i, name in enumerate(TASK_GRAPHS):
        folders[name] = str(root / name)
        if i == 0:
            reports[name] = export_onnx.main(["--model", checkpoints[name], "--output", folders[name],
                                              "--tolerance", str(TOLERANCE)])  # fmt: skip
        else:
            export_task_graph(checkpoints[name], folders[name])
    return folders, reports


@pytest.fixture(scope="module")
def backbone_exports(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-backbone-graphs")
    folders = {}
    for layout, tasks in (("deep-append", DEEP_APPEND), ("vpt-deep", VPT_DEEP)):
        folders[layout] = str(root / layout)
        export_backbone_graph({name: checkpoints[name] for name in tasks}, folders[layout])
    return folders


def write_images(folder, count: int = 3) -> list[str]:
    """Greyscale, RGB and RGBA files of other sizes than the model's (the processor resizes them)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = [((31, 17), "L"), ((20, 20, 3), "RGB"), ((9, 40, 4), "RGBA")]
    paths = []
    for i, (shape, mode) in enumerate((shapes * count)[:count]):
        path = os.path.join(folder, f"{i}-{mode}.png")
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
        paths.append(path)
    return paths


# -------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", list(TASK_GRAPHS))
def test_task_graph_equals_pytorch(checkpoints, task_exports, name):
    folders, reports = task_exports
    model = VPTMForImageClassification.from_pretrained(checkpoints[name]).eval()
    errors = task_graph_parity(model, folders[name], BATCH_SIZES)
    reads_mask = TASK_GRAPHS[name].get("classifier") != "linear_cls"
    expected = {f"{output}@{b}" for b in BATCH_SIZES for output in ["logits"] + ["visual_token_logits"] * reads_mask}
    assert set(errors) == expected
    assert max(errors.values()) <= TOLERANCE, errors
    runtime = OnnxImageClassifier(folders[name])
    assert [o.name for o in runtime.session.get_outputs()] == ["logits"] + ["visual_token_logits"] * reads_mask
    assert runtime.id2label == model.config.id2label
    if name in reports:  # the command line's own check, on the same batch sizes
        report = reports[name]
        assert report["max_abs_error"] <= TOLERANCE and set(report["errors"]) == expected
        assert report["graph"].endswith("model.onnx") and report["bytes"] > 0


@pytest.mark.parametrize("layout, tasks", [("deep-append", DEEP_APPEND), ("vpt-deep", VPT_DEEP)])
def test_one_backbone_graph_serves_every_task_of_its_layout(checkpoints, backbone_exports, layout, tasks):
    models = {name: VPTMForImageClassification.from_pretrained(checkpoints[name]).eval() for name in tasks}
    errors = backbone_graph_parity(models, backbone_exports[layout], BATCH_SIZES + (len(tasks) * 2,))
    assert {key.split("@")[0] for key in errors} == set(tasks)  # every head checked in a mixed batch
    assert max(errors.values()) <= TOLERANCE, errors
    runtime = OnnxMultiTask(backbone_exports[layout])
    inputs = [i.name for i in runtime.session.get_inputs()]
    assert inputs == (["pixel_values", "prompts", "mask_embedding"] if layout == "deep-append" else
                      ["pixel_values", "prompts"])  # fmt: skip
    # the task tensors are inputs, not weights: the graph holds none of them
    assert os.path.getsize(os.path.join(backbone_exports[layout], "tasks", next(iter(tasks)), "task.npz")) < 20_000


def test_tasks_are_the_manifests_and_their_names_plain_folder_names(checkpoints, backbone_exports, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(backbone_exports["vpt-deep"], folder)
    (folder / "tasks" / "stray").mkdir()  # not a task: no task.npz, and not in the manifest
    assert list(OnnxMultiTask(str(folder)).tasks) == ["vpt-a", "vpt-b"]
    for name in ("../escape", "a/b", "..", ".", "", "a b"):
        with pytest.raises(ValueError, match=r"task names are letters, digits, '_', '.' and '-' \(a folder name, not "
                                             rf"'\.' or '\.\.'\), got {re.escape(repr(name))}"):  # fmt: skip
            export_backbone_graph({name: checkpoints["vpt-a"]}, str(tmp_path / "refused"))
    assert not os.path.exists(tmp_path / "refused") and not os.path.exists(tmp_path / "escape")


# ------------------------------------------------------------------------------------------- without torch
NO_TORCH = (
    "import sys\n"
    "sys.modules['torch'] = None  # `import torch` raises ImportError from here on\n"
    "sys.modules['transformers'] = None\n"
    "try:\n"
    "    import torch\n"
    "    raise SystemExit('torch was importable')\n"
    "except ImportError:\n"
    "    pass\n"
    "import runpy\n"
    "script = sys.argv[1]\n"
    "sys.argv = [script, *sys.argv[2:]]\n"
    "runpy.run_path(script, run_name='__main__')\n"
)


def run_without_torch(script: str, *args: str, cwd=None) -> list:
    """Runs `script` in a fresh process where `import torch` fails; returns its printed lines, parsed."""
    result = subprocess.run([sys.executable, "-c", NO_TORCH, script, *args], capture_output=True, text=True,
                            timeout=120, cwd=cwd)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return [
        ast.literal_eval(line) if line.startswith("[") else json.loads(line) for line in result.stdout.splitlines()
    ]


def test_files_are_classified_without_torch_as_predict_does(checkpoints, task_exports, backbone_exports, tmp_path):
    files = write_images(tmp_path / "images")
    folders, _ = task_exports
    name = "vptm-ensemble-replace"
    expected = predict.main([*files, "--model", checkpoints[name], "--top_k", "3"])
    answers = run_without_torch(os.path.join(folders[name], "onnx_runtime.py"), "--model", folders[name],
                                *files, "--top_k", "3")  # fmt: skip
    assert_same_predictions(answers, expected)
    # the backbone graph, one task at a time, from the same copied runtime
    folder = backbone_exports["deep-append"]
    expected = predict.main([*files, "--model", checkpoints["ensemble"], "--top_k", "2"])
    answers = run_without_torch(os.path.join(folder, "onnx_runtime.py"), "--model", folder, "--task", "ensemble",
                                *files, "--top_k", "2")  # fmt: skip
    assert [a["task"] for a in answers] == ["ensemble"] * len(files)
    assert_same_predictions(answers, expected)


def test_readme_onnx_block_runs_without_torch(checkpoints, task_exports, backbone_exports, tmp_path):
    """The README's ONNX Runtime block, as written, in a process where torch cannot be imported: onnx/vptm is a task
    graph, onnx/shared a backbone graph with tasks fashion and fashion-ensemble, the images the Space's examples."""
    from test_readme import python_blocks

    folders, _ = task_exports
    shutil.copytree(folders["vptm-hidden"], tmp_path / "onnx" / "vptm")
    shutil.copytree(backbone_exports["deep-append"], tmp_path / "onnx" / "shared")
    tasks = tmp_path / "onnx" / "shared" / "tasks"
    renamed = {"hidden": "fashion", "ensemble": "fashion-ensemble"}
    for name in os.listdir(tasks):
        if name in renamed:
            os.rename(tasks / name, tasks / renamed[name])
        else:
            shutil.rmtree(tasks / name)
    manifest = tmp_path / "onnx" / "shared" / "onnx_config.json"  # the tasks are the manifest's list
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "tasks": sorted(renamed.values())}))
    shutil.copytree(os.path.join(REPO_ROOT, "space", "examples"), tmp_path / "space" / "examples")
    (tmp_path / "block.py").write_text(python_blocks("Deploy: ONNX Runtime and Inference Endpoints")[0])
    single, shared = run_without_torch("block.py", cwd=tmp_path)
    bag, trouser = (str(tmp_path / "space" / "examples" / f"{n}.png") for n in ("bag", "trouser"))
    expected = predict.main([bag, "--model", checkpoints["vptm-hidden"], "--top_k", "3"])
    assert_same_predictions([{"file": bag, "predictions": single[0]}], expected)
    for answer, image, task in zip(shared, [bag, trouser], ["hidden", "ensemble"], strict=True):
        expected = predict.main([image, "--model", checkpoints[task], "--top_k", "1"])
        assert_same_predictions([{"file": image, "predictions": answer}], expected)


def assert_same_predictions(answers: list[dict], expected: list[dict]) -> None:
    assert [a["file"] for a in answers] == [e["file"] for e in expected]
    for answer, reference in zip(answers, expected, strict=True):
        assert [p["label"] for p in answer["predictions"]] == [p["label"] for p in reference["predictions"]]
        np.testing.assert_allclose([p["score"] for p in answer["predictions"]],
                                   [p["score"] for p in reference["predictions"]], atol=1e-5)  # fmt: skip


@pytest.mark.parametrize(
    "config",
    [
        PROCESSOR,
        dict(size={"height": 28, "width": 28}, image_mean=[0.286] * 3, image_std=[0.353] * 3, resample=3),
        dict(size={"shortest_edge": 24}, do_center_crop=True, crop_size={"height": 20, "width": 22}, resample=2),
        dict(size={"height": 16, "width": 12}, do_normalize=False, resample=0),
    ],
)
def test_numpy_preprocessing_equals_the_image_processor(config, tmp_path):
    processor = BeitImageProcessor(**config)
    processor.save_pretrained(tmp_path)
    ours = ImagePreprocessor.from_folder(str(tmp_path))
    images = [read_image(path) for path in write_images(tmp_path / "images", 6)]
    for image in images:  # one at a time: the shortest-edge resize gives each its own shape
        expected = AutoImageProcessor.from_pretrained(tmp_path)(image, return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(ours([image]), expected, atol=1e-6, rtol=0)


def test_images_are_read_from_paths_bytes_base64_and_pil(tmp_path):
    import base64

    path = write_images(tmp_path, 1)[0]
    data = open(path, "rb").read()
    reference = np.asarray(Image.open(path).convert("RGB"))
    for source in (path, data, base64.b64encode(data).decode(), "data:image/png;base64," + base64.b64encode(data)
                   .decode(), Image.open(path)):  # fmt: skip
        assert np.array_equal(np.asarray(read_image(source)), reference)


def test_a_checkpoint_without_its_processor_gets_the_backbones_and_only_then(tmp_path):
    from modeling_vptm.serving import image_processor_of

    make_backbone(tmp_path / "backbone")
    BeitImageProcessor(**{**PROCESSOR, "size": {"height": 24, "width": 24}}).save_pretrained(tmp_path / "backbone")
    model = VPTMForImageClassification.from_backbone(str(tmp_path / "backbone"), num_labels=2)
    model.save_pretrained(tmp_path / "task")  # no preprocessor_config.json
    assert image_processor_of(str(tmp_path / "task"), model.config).size == {"height": 24, "width": 24}
    (tmp_path / "task" / "preprocessor_config.json").write_text("{ not json")  # there, but unreadable: no fallback
    with pytest.raises(OSError, match=r"preprocessor_config.json' is not a valid JSON file"):
        image_processor_of(str(tmp_path / "task"), model.config)


def test_malformed_images_are_refused_with_a_value_error_naming_the_problem(tmp_path, monkeypatch):
    import struct

    data = open(write_images(tmp_path, 1)[0], "rb").read()
    with pytest.raises(ValueError, match=r"a data: URL is data:<media type>;base64,<data>, got no comma in "
                                         r"'data:image/png;base64'"):  # fmt: skip
        read_image("data:image/png;base64")
    with pytest.raises(ValueError, match=r"not an image that can be read \(OSError: "):
        read_image(data[:16])  # truncated in its header
    with pytest.raises(ValueError, match=r"not an image that can be read \(OSError: image file is truncated"):
        read_image(data[: len(data) // 2])

    def broken(*args, **kwargs):  # what PIL raises for some corrupt data, besides OSError
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(Image.Image, "convert", broken)
    for source in (data, Image.new("RGB", (4, 4))):  # decoded from bytes, or a PIL image as the toolkit gives it
        with pytest.raises(ValueError, match=r"not an image that can be read \(error: unpack requires a buffer"):
            read_image(source)


def test_images_above_the_pixel_limit_are_refused_before_decoding():
    from modeling_vptm.standalone.image_input import MAX_PIXELS

    side = int(MAX_PIXELS**0.5) + 1
    large = io.BytesIO()
    Image.new("1", (side, side)).save(large, "PNG")  # one colour: a few kB on disk, 50 MB as RGB
    assert len(large.getvalue()) < 100_000
    message = rf"image of {side} x {side} = {side * side} pixels; at most {MAX_PIXELS} pixels are read"
    with pytest.raises(ValueError, match=message):
        read_image(large.getvalue(), allow_paths=False)
    with pytest.raises(ValueError, match=message):
        read_image(Image.open(large))  # a PIL image opened lazily, as the toolkit gives it


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_with_what_was_expected(checkpoints, task_exports, backbone_exports, backbone_dir):
    folders, _ = task_exports
    runtime = OnnxImageClassifier(folders["vptm-hidden"])
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(batch, 3, 20, 20\) .* got \(2, 3, 28, 28\)"):
        runtime.run(np.zeros((2, 3, 28, 28), np.float32))
    with pytest.raises(ValueError, match=r"must have shape \(batch, 3, 20, 20\) .* got \(3, 20, 20\)"):
        runtime.run(np.zeros((3, 20, 20), np.float32))
    with pytest.raises(ValueError, match=r"pixel_values is an empty batch"):
        runtime.run(np.zeros((0, 3, 20, 20), np.float32))
    with pytest.raises(ValueError, match=r"pixel_values must be floating point, got dtype uint8"):
        runtime.run(np.zeros((1, 3, 20, 20), np.uint8))
    with pytest.raises(ValueError, match=r"not an image that can be read \(UnidentifiedImageError"):
        runtime([b"these bytes are not an image"])
    with pytest.raises(ValueError, match=r"not an image file, image bytes or a base64-encoded image: 'no-such.png'"):
        runtime(["no-such.png"])
    with pytest.raises(ValueError, match=r"holds a 'task' graph .* OnnxMultiTask reads a 'backbone' graph"):
        OnnxMultiTask(folders["vptm-hidden"])
    shared = OnnxMultiTask(backbone_exports["vpt-deep"])
    with pytest.raises(ValueError, match=r"unknown tasks \['nope'\]; tasks are \['vpt-a', 'vpt-b'\]"):
        shared.run(np.zeros((1, 3, 20, 20), np.float32), ["nope"])
    with pytest.raises(ValueError, match=r"one task per image: got 1 task names for 2 images"):
        shared.run(np.zeros((2, 3, 20, 20), np.float32), ["vpt-a"])
    with pytest.raises(FileNotFoundError, match=r"has no onnx_config.json: not a folder written by"):
        OnnxImageClassifier(checkpoints["vpt-a"])


def test_export_refuses_what_it_cannot_export(checkpoints, backbone_dir, tmp_path):
    with pytest.raises(ValueError, match=r"is not a VPTM prompt checkpoint: its config has model_type='beit', "
                                         r"expected 'vptm'"):  # fmt: skip
        export_task_graph(backbone_dir, str(tmp_path / "beit"))
    with pytest.raises(ValueError, match=r"task 'vpt-a' has sequence layout .* but 'hidden' has .* one backbone graph "
                                         r"serves one layout"):  # fmt: skip
        export_backbone_graph({"hidden": checkpoints["hidden"], "vpt-a": checkpoints["vpt-a"]}, str(tmp_path / "b"))
    make_backbone(tmp_path / "other-backbone", seed=3)
    other = VPTMForImageClassification.from_backbone(str(tmp_path / "other-backbone"), num_labels=2, prompt_length=3)
    other.save_pretrained(tmp_path / "other-task")
    with pytest.raises(ValueError, match=r"was made on backbone .*other-backbone.* but this server holds"):
        export_backbone_graph({"hidden": checkpoints["hidden"], "other": str(tmp_path / "other-task")},
                              str(tmp_path / "c"))  # fmt: skip
    shutil.copytree(checkpoints["logits"], tmp_path / "resized")
    BeitImageProcessor(**{**PROCESSOR, "size": {"height": 24, "width": 24}}).save_pretrained(tmp_path / "resized")
    with pytest.raises(ValueError, match=r"task 'resized' was saved with an image processor that differs from "
                                         r"'hidden''s in \['size'\]"):  # fmt: skip
        export_backbone_graph({"hidden": checkpoints["hidden"], "resized": str(tmp_path / "resized")},
                              str(tmp_path / "g"))  # fmt: skip
    with pytest.raises(ValueError, match=r"a task graph holds one task, got 2 models; pass --backbone_only"):
        export_onnx.main(["--model", checkpoints["hidden"], checkpoints["logits"], "--output", str(tmp_path / "d")])
    with pytest.raises(ValueError, match=r"two checkpoints are named 'x'; name each with NAME=SOURCE"):
        export_onnx.main(["--backbone_only", "--model", f"x={checkpoints['hidden']}", f"x={checkpoints['logits']}",
                          "--output", str(tmp_path / "e")])  # fmt: skip
    with pytest.raises(ValueError, match=r"a checkpoint is given as SOURCE or NAME=SOURCE \(SOURCE a folder or Hub "
                       r"id\), got '=runs/x'"):  # fmt: skip
        export_onnx.main(["--model", "=runs/x", "--output", str(tmp_path / "f")])
    assert not any(os.path.exists(tmp_path / f) for f in ("beit", *"bcdefg"))  # refused before writing


# ----------------------------------------------------------------------------------------- committed results
def test_committed_parity_and_speed_tables_are_what_the_scripts_write():
    """benchmarks/onnx-parity and benchmarks/onnx-cpu-2core hold what experiments/onnx_parity.py and
    experiments/benchmark_onnx.py wrote: the tables follow from the JSON, and the JSON covers what docs/speed.md claims
    (every read-out and VPT, both graphs, both architectures, within the tolerance)."""
    import benchmark_onnx
    import onnx_parity

    folder = os.path.join(REPO_ROOT, "benchmarks", "onnx-parity")
    parity = json.load(open(os.path.join(folder, "parity.json")))
    assert open(os.path.join(folder, "parity.md")).read() == onnx_parity.markdown(parity)
    for arch in ("shipped", "base"):
        rows = [row for row in parity["rows"] if row["arch"] == arch]
        assert {row["tasks"][0] for row in rows if row["graph"] == "task"} == set(onnx_parity.TASKS)
        assert {t for row in rows if row["graph"] == "backbone" for t in row["tasks"]} == set(onnx_parity.TASKS)
        assert all(f"@{b}" in " ".join(row["errors"]) for row in rows for b in onnx_parity.BATCH_SIZES)
    assert max(max(row["errors"].values()) for row in parity["rows"]) == parity["max_abs_error"] <= TOLERANCE
    folder = os.path.join(REPO_ROOT, "benchmarks", "onnx-cpu-2core")
    speed = json.load(open(os.path.join(folder, "benchmark_onnx.json")))
    assert open(os.path.join(folder, "benchmark_onnx.md")).read() == benchmark_onnx.markdown(speed)
    assert set(speed["archs"]) == {"tiny", "base"} and all(
        a["max_abs_error"] <= TOLERANCE for a in speed["archs"].values()
    )
    readme = open(os.path.join(REPO_ROOT, "docs", "speed.md")).read()
    for arch, name in (("tiny", "shipped tiny"), ("base", "BEiT-base-shaped")):  # the published rows, as the table's
        row = speed["archs"][arch]
        ratio = benchmark_onnx.speedups(row)
        images_per_s = {step: timing["images_per_s"] for step, timing in row["timings"].items()}
        assert (
            f"| {name} | {row['batch']} | {images_per_s['pytorch_eager']} | {images_per_s['onnxruntime_task_graph']} "
            f"| **{ratio['onnxruntime_task_graph']:.2f}×** | {images_per_s['onnxruntime_backbone_graph']} | "
            f"{ratio['onnxruntime_backbone_graph']:.2f}× |"
        ) in readme
