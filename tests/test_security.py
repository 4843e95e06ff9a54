"""Untrusted input at every edge (docs/security.md): each test feeds one attack, as an attacker or a careless user
would, to the code that meets it, and checks the answer (one clear line), what was allocated (memory measured in a
subprocess where memory is the point) and that nothing is silently wrong."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, make_backbone
from PIL import Image
from safetensors.torch import load_file, save_file

from modeling_vptm import VPTMForImageClassification
from modeling_vptm.limits import MAX_PIXELS
from modeling_vptm.serving import MultiTaskVPTM


SIDE = int(MAX_PIXELS**0.5)  # 4096: the per-image limit


def run_python(code: str, *args: str, timeout: int = 300) -> dict:
    """Runs `code` in a fresh interpreter and returns the JSON object it prints last."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# the process's memory, from Linux's accounting: resident now, and the peak since the last reset
MEMORY = r"""
def resident_mb(field="VmRSS"):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident size starts again from the current one

def peak_mb():
    return resident_mb("VmHWM")
"""
needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="memory is read from Linux /proc")


def png(width: int, height: int, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), 128).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny backbone with its image processor, and a prompt checkpoint on it (trained-looking) with the same."""
    from transformers import BeitImageProcessor

    root = tmp_path_factory.mktemp("security")
    make_backbone(root / "backbone", seed=5)
    processor = BeitImageProcessor(size={"height": 20, "width": 20}, do_center_crop=False)
    processor.save_pretrained(root / "backbone")
    torch.manual_seed(0)
    model = VPTMForImageClassification.from_backbone(str(root / "backbone"), num_labels=3, prompt_length=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    model.save_pretrained(root / "task")
    processor.save_pretrained(root / "task")
    return str(root / "backbone"), root / "task"


@pytest.fixture(scope="module")
def backbone(served):
    return served[0]


@pytest.fixture(scope="module")
def checkpoint(served):
    return served[1]


def variant(checkpoint, tmp_path, config=None, tensors=None):
    """A copy of `checkpoint` with its config fields and/or task tensors changed (None: removed)."""
    folder = tmp_path / "variant"
    folder.mkdir()
    fields = json.loads((checkpoint / "config.json").read_text())
    for key, value in (config or {}).items():
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    (folder / "config.json").write_text(json.dumps(fields))
    weights = load_file(checkpoint / "model.safetensors")
    weights.update(tensors or {})
    save_file(weights, folder / "model.safetensors")
    return folder


def refused(folder, backbone, match: str) -> None:
    """Both loaders refuse `folder` with a message matching `match`."""
    with pytest.raises(ValueError, match=match):
        VPTMForImageClassification.from_pretrained(folder)
    server = MultiTaskVPTM(backbone)
    with pytest.raises(ValueError, match=match):
        server.add_task("attack", folder)
    assert "attack" not in server.tasks


# ------------------------------------------------------------------------------- 1. memory of an endpoint request
ENDPOINT_MEMORY = (
    MEMORY
    + r"""
import json, sys
from modeling_vptm.deploy.endpoint import EndpointHandler
from modeling_vptm.limits import MAX_IMAGES

folder, image = sys.argv[1], open(sys.argv[2], "rb").read()
handler = EndpointHandler(folder, device="cpu")
handler({"inputs": image})  # warm: the first request's one-time costs are not the request's
idle = resident_mb()
default = handler({"inputs": [image] * MAX_IMAGES, "parameters": {"top_k": 1}})
handler.request_pixels = MAX_IMAGES * 4096 * 4096  # every image decoded: the bound holds for all 64
reset_peak()
start = __import__("time").perf_counter()
full = handler({"inputs": [image] * MAX_IMAGES, "parameters": {"top_k": 1}})
print(json.dumps({"idle": idle, "peak": peak_mb(), "seconds": __import__("time").perf_counter() - start,
                  "default": default, "full": full}))
"""
)


@needs_proc
def test_an_endpoint_request_of_64_images_at_the_pixel_limit_stays_within_its_memory_bound(tmp_path):
    """64 PNGs of 4096 x 4096 (a 1.6 MB request inside every documented limit) took 11.0 GB; each image is now decoded
    no larger than the 28-pixel model needs, one at a time."""
    from modeling_vptm import SHIPPED_BACKBONE

    model = VPTMForImageClassification.from_backbone(SHIPPED_BACKBONE, num_labels=10)
    model.save_pretrained(tmp_path / "task")
    (tmp_path / "image.png").write_bytes(png(SIDE, SIDE))
    report = run_python(ENDPOINT_MEMORY, str(tmp_path / "task"), str(tmp_path / "image.png"))
    assert report["peak"] - report["idle"] < 1500, report["peak"] - report["idle"]  # MB above the idle process
    assert all(isinstance(answer, list) and len(answer) == 1 for answer in report["full"])
    # with the default budget of decoded pixels per request, 16 such images are classified and the rest refused
    answered = [a for a in report["default"] if isinstance(a, list)]
    refused_ = [a["error"] for a in report["default"] if isinstance(a, dict)]
    assert len(answered) == 16 and len(refused_) == 48 and all("budget of" in e for e in refused_), refused_[:1]


def test_an_image_is_decoded_no_larger_than_the_model_needs():
    from modeling_vptm.standalone import PixelBudget, read_image

    image = read_image(png(SIDE, SIDE // 2), allow_paths=False, size={"height": 28, "width": 28})
    assert image.mode == "RGB" and min(image.size) >= 3 * 28 and image.size[1] < 6 * 28  # reduced, not below 3x
    assert read_image(png(100, 80), allow_paths=False, size={"height": 28, "width": 28}).size == (100, 80)
    jpeg = io.BytesIO()
    Image.new("RGB", (2048, 2048), (10, 20, 30)).save(jpeg, "JPEG")
    budget = PixelBudget(2048 * 2048 // 8)
    read_image(jpeg.getvalue(), allow_paths=False, size={"shortest_edge": 28}, budget=budget)  # draft: 1/8 scale
    assert budget.left > 0
    with pytest.raises(ValueError, match=r"image of 4097 x 4096 = \d+ pixels; at most 16777216 pixels are read"):
        read_image(png(SIDE + 1, SIDE), allow_paths=False)


# ------------------------------------------------------------------------------------------------ 2. config bombs
CONFIG_BOMB = (
    MEMORY
    + r"""
import json, sys, time
from modeling_vptm import VPTMForImageClassification
from modeling_vptm.serving import MultiTaskVPTM

folder, backbone = sys.argv[1], sys.argv[2]
server = MultiTaskVPTM(backbone)
report = {}
for name, load in (("from_pretrained", lambda: VPTMForImageClassification.from_pretrained(folder)),
                   ("add_task", lambda: server.add_task("bomb", folder))):
    idle = resident_mb()
    reset_peak()
    start = time.perf_counter()
    try:
        load()
        message = None
    except ValueError as error:
        message = str(error)
    report[name] = {"seconds": time.perf_counter() - start, "grew": peak_mb() - idle, "message": message}
print(json.dumps(report))
"""
)


@needs_proc
def test_a_config_asking_for_gigabytes_is_refused_before_anything_is_allocated(checkpoint, backbone, tmp_path):
    """`prompt_length: 1400000` in a 2 KB config allocated 2.5 GB before a shape error."""
    folder = variant(checkpoint, tmp_path, config={"prompt_length": 1_400_000})
    assert os.path.getsize(folder / "config.json") < 4096
    report = run_python(CONFIG_BOMB, str(folder), backbone)
    for loader, outcome in report.items():
        assert outcome["message"] and "prompt_length must be an integer in [0, 104]" in outcome["message"], loader
        assert outcome["seconds"] < 2 and outcome["grew"] < 200, (loader, outcome)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"prototypes_per_class": 10**6}, r"prototypes_per_class must be an integer in \[1, 64\]"),
        ({"prototype_dim": 10**6}, r"prototype_dim must be an integer in \[1, 4096\]"),
        ({"intermediate_size": 10**7}, r"does not fit the backbone .*intermediate_size: checkpoint 10000000 vs"),
        ({"num_hidden_layers": 1000}, r"does not fit the backbone .*num_hidden_layers"),
        (
            {"id2label": {str(i): f"c{i}" for i in range(60_000)}, "prototypes_per_class": 64, "prototype_dim": 64},
            r"a task of this config holds [\d,]+ parameters .*at most 67,108,864",
        ),
    ],
    ids=["prototypes-per-class", "prototype-dim", "backbone-width", "backbone-depth", "task-size"],
)
def test_every_size_a_config_gives_is_bounded_before_allocation(checkpoint, backbone, tmp_path, fields, match):
    refused(variant(checkpoint, tmp_path, config=fields), backbone, match)


def test_a_config_file_larger_than_any_config_is_not_parsed(checkpoint, backbone, tmp_path):
    folder = variant(checkpoint, tmp_path, config={"padding": "x" * (4 * 2**20)})
    refused(folder, backbone, r"its config.json has [\d,]+ bytes; at most 4,194,304 are read")


# ------------------------------------------------------------------------------------ 3. the backbone's fingerprint
@pytest.mark.parametrize("fingerprint", [None, "missing"], ids=["null", "removed"])
def test_a_checkpoint_without_a_fingerprint_is_refused_unless_asked_for(
    checkpoint, backbone, tmp_path, fingerprint, caplog
):
    fields = json.loads((checkpoint / "config.json").read_text())
    folder = variant(checkpoint, tmp_path)
    if fingerprint == "missing":
        fields.pop("backbone_fingerprint")
    else:
        fields["backbone_fingerprint"] = None
    (folder / "config.json").write_text(json.dumps(fields))
    refused(folder, backbone, r"names no backbone_fingerprint, so nothing tells whether backbone .*"
                                  r"allow_unverified_backbone=True only if you trust it")  # fmt: skip
    with caplog.at_level("WARNING"):
        model = VPTMForImageClassification.from_pretrained(folder, allow_unverified_backbone=True)
    assert "loaded on the weights of" in caplog.text and "unverified" in caplog.text
    expected = VPTMForImageClassification.from_pretrained(checkpoint)
    pixels = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, expected(pixels).logits)
    MultiTaskVPTM(backbone).add_task("trusted", folder, allow_unverified_backbone=True)


def test_a_checkpoint_on_other_weights_is_refused(checkpoint, tmp_path):
    make_backbone(tmp_path / "other", seed=3)
    folder = variant(checkpoint, tmp_path, config={"backbone_name_or_path": str(tmp_path / "other")})
    with pytest.raises(ValueError, match=r"with weights fingerprint [0-9a-f]{16}\.\.\., but the weights loaded now"):
        VPTMForImageClassification.from_pretrained(folder)


@pytest.mark.parametrize("name", ["vptm:../../../etc", "vptm:shipped/../..", "vptm:fashion-mnist-1k", "vptm:"])
def test_a_shipped_name_resolves_only_to_a_shipped_backbone(checkpoint, tmp_path, name):
    from modeling_vptm.shipped import resolve_backbone_path

    with pytest.raises(ValueError, match=r"is not a shipped backbone; the shipped ones are vptm:tiny-beit"):
        resolve_backbone_path(name)
    with pytest.raises(ValueError, match=r"is not a shipped backbone"):
        VPTMForImageClassification.from_pretrained(
            variant(checkpoint, tmp_path, config={"backbone_name_or_path": name})
        )


def test_a_backbone_path_that_is_a_file_or_missing_gets_the_same_answer(tmp_path):
    from modeling_vptm.hub_names import check_local_folder

    (tmp_path / "a-file").write_text("x")
    answers = []
    for name in (tmp_path / "a-file", tmp_path / "no-such-folder"):
        with pytest.raises(OSError) as error:
            check_local_folder(str(name), "backbone")
        answers.append(str(error.value).replace(str(name), "NAME").replace(os.path.basename(name), "BASE"))
    assert answers[0] == answers[1], answers  # nothing tells an existing file from a missing one


# ----------------------------------------------------------------------------- 4. saves: tests/test_security_saves.py
# ----------------------------------------------------------------------------------- 5. image files in the tools
def run_tool(script: str, *argv: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """An example script in a fresh process, its own peak memory (the children's maximum resident size) reported on
    the last line of its stdout."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run([sys.executable, *sys.argv[1:]])\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)\n"
        "sys.exit(r.returncode)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", wrapper, os.path.join(REPO_ROOT, "examples", f"{script}.py"), *argv],
        capture_output=True, text=True, timeout=timeout, env=dict(os.environ, PYTHONPATH=REPO_ROOT),
    )  # fmt: skip


@needs_proc
@pytest.mark.parametrize("script", ["predict", "serve_batch"])
def test_the_tools_refuse_huge_bombs_and_fifos_without_decoding_or_waiting(checkpoint, backbone, tmp_path, script):
    """A 12000 x 12000 PNG (140 KB) peaked at 2.37 GB; a 20000 x 20000 one ended in a traceback even with
    --skip_unreadable; a FIFO named x.png hung both tools forever."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "big.png").write_bytes(png(12_000, 12_000, "1"))
    (images / "bomb.png").write_bytes(png(20_000, 20_000, "1"))
    os.mkfifo(images / "x.png")
    Image.new("L", (28, 28), 30).save(images / "good.png")
    assert stat.S_ISFIFO(os.stat(images / "x.png").st_mode)
    where = {
        "predict": ["--model", str(checkpoint), str(images)],
        "serve_batch": ["--backbone", backbone, "--task", f"t={checkpoint}", "--input", f"t={images}"],
    }
    result = run_tool(script, *where[script])  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last_error = result.stderr.strip().splitlines()[-1]
    assert last_error.startswith("error: ") and "pixels are read" in last_error and "--skip_unreadable" in last_error
    result = run_tool(script, *where[script], "--skip_unreadable")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len([line for line in lines if "good.png" in line]) == 1 and int(lines[-1]) < 1024  # MB: nothing decoded
    assert "skipped 3 unreadable file(s)" in result.stderr


# --------------------------------------------------------------------------------------- 6. tensors not numbers
@pytest.mark.parametrize(
    ("tensor", "match"),
    [
        ({"prompt_embeddings.prompts": torch.zeros(1, 2, 24, dtype=torch.int64)}, r"prompts is 'I64'"),
        ({"prompt_embeddings.prompts": torch.zeros(1, 2, 24, dtype=torch.bool)}, r"prompts is 'BOOL'"),
        ({"prompt_embeddings.prompts": torch.zeros(1, 2, 24, dtype=torch.uint8)}, r"prompts is 'U8'"),
        (
            {"prompt_embeddings.prompts": torch.full((1, 2, 24), float("nan"))},
            r"\['prompt_embeddings.prompts'\] hold NaN",
        ),
        ({"verbalizer.logit_scale": torch.tensor(float("inf"))}, r"\['verbalizer.logit_scale'\] hold NaN or infinite"),
    ],
    ids=["int64", "bool", "uint8", "nan-prompts", "infinite-scale"],
)
def test_task_tensors_that_are_not_finite_floats_are_refused(checkpoint, backbone, tmp_path, tensor, match):
    refused(variant(checkpoint, tmp_path, tensors=tensor), backbone, match)


def test_predict_never_writes_a_score_that_is_not_a_number(tmp_path, capsys):
    import predict

    from modeling_vptm import VPTMConfig, shipped_backbone_path
    from modeling_vptm.standalone import json_line, run

    config = VPTMConfig.from_pretrained(shipped_backbone_path(), num_labels=3, prompt_length=2)
    model = VPTMForImageClassification(config)  # a full checkpoint: its weights load the ordinary way, unchecked
    with torch.no_grad():
        model.task.verbalizer.logit_scale.fill_(float("nan"))
    model.save_pretrained(tmp_path / "full")
    from transformers import AutoImageProcessor

    AutoImageProcessor.from_pretrained(shipped_backbone_path()).save_pretrained(tmp_path / "full")
    Image.new("L", (28, 28), 30).save(tmp_path / "a.png")
    with pytest.raises(SystemExit) as exit_:
        run(
            predict.main, ["--model", str(tmp_path / "full"), str(tmp_path / "a.png"), "--output", str(tmp_path / "o")]
        )
    assert exit_.value.code == 2 and "gave non-finite scores" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        json_line({"score": float("nan")})


# ----------------------------------------------------------------------------------------------------- 7. labels
def test_labels_that_are_not_0_to_n_minus_1_are_refused(checkpoint, backbone, tmp_path):
    labels = {"0": "a", "1": "b", "2": "c", "7": "d"}
    refused(variant(checkpoint, tmp_path, config={"id2label": labels, "label2id": None}), backbone,
            r"id2label must name the classes 0 to 3, each once; it has the keys \[7\] instead of \[3\]")  # fmt: skip


# ------------------------------------------------------------------------------------ 8. errors that grow with input
def test_a_message_listing_what_was_wrong_does_not_grow_with_the_input(checkpoint):
    from modeling_vptm.deploy.endpoint import EndpointHandler

    handler = EndpointHandler(str(checkpoint), device="cpu")
    names = [f"no-such-task-{i}" for i in range(10_000)]
    answer = handler({"inputs": png(28, 28), "parameters": {"tasks": names}})
    assert len(answer["error"]) < 1000 and "and 9,990 more" in answer["error"], answer
    server = MultiTaskVPTM.from_model(VPTMForImageClassification.from_pretrained(checkpoint), "a")
    with pytest.raises(KeyError) as error:
        server.remove_task("x" * 100_000)
    assert len(str(error.value)) < 500


# ---------------------------------------------------------------------------------------------- 9. the command line
def test_a_dataset_name_neither_local_nor_on_the_hub_gets_one_line_within_seconds(unreachable_hub, tmp_path, capsys):
    import run_classification

    from modeling_vptm.standalone import run

    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        run(run_classification.main, ["--dataset_name", "no_such_folder", "--output_dir", str(tmp_path / "out")])
    assert time.perf_counter() - start < 10 and exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot load the dataset 'no_such_folder'") and "Traceback" not in "\n".join(err)
    with pytest.raises(SystemExit):
        run(run_classification.main, ["--dataset_name", "./no/such/folder", "--output_dir", str(tmp_path / "out")])
    assert "error: dataset folder './no/such/folder' not found" in capsys.readouterr().err


def test_the_output_file_is_checked_before_any_work_and_written_whole(checkpoint, tmp_path, capsys, monkeypatch):
    import predict

    from modeling_vptm.standalone import run

    Image.new("L", (28, 28), 30).save(tmp_path / "a.png")
    monkeypatch.setattr(predict, "load_classifier", lambda *a, **k: pytest.fail("the model was loaded"))
    for output, message in ((tmp_path / "no-folder" / "out.jsonl", "does not exist"), (tmp_path, "is a folder")):
        with pytest.raises(SystemExit):
            run(predict.main, ["--model", str(checkpoint), str(tmp_path / "a.png"), "--output", str(output)])
        assert message in capsys.readouterr().err
    monkeypatch.undo()
    out = tmp_path / "out.jsonl"
    out.write_text("an earlier run's result\n")
    with pytest.raises(SystemExit):  # an existing file is not overwritten without a word
        run(predict.main, ["--model", str(checkpoint), str(tmp_path / "a.png"), "--output", str(out)])
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_text() == "an earlier run's result\n"
    (tmp_path / "broken.png").write_bytes(b"no image")
    with pytest.raises(SystemExit):  # a run that fails leaves no earlier result to be taken for its own
        run(predict.main, ["--model", str(checkpoint), str(tmp_path / "broken.png"), "--output", str(out),
                           "--overwrite"])  # fmt: skip
    assert not out.exists()
    predict.main(["--model", str(checkpoint), str(tmp_path / "a.png"), "--output", str(out), "--overwrite"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and not [p for p in os.listdir(tmp_path) if p.endswith(".partial")]


@pytest.mark.parametrize("flag", [["--batch_size", "-1"], ["--batch_size", "0"], ["--top_k", "0"], ["--top_k", "-1"]])
def test_numeric_flags_are_checked_by_the_parser(checkpoint, tmp_path, capsys, flag):
    import predict
    import serve_batch

    for main, argv in ((predict.main, ["--model", str(checkpoint), "x.png"]),
                       (serve_batch.main, ["--backbone", "b", "--task", "t=c", "--input", "t=x"])):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            main([*argv, *flag])
        assert exit_.value.code == 2 and "expected a whole number >= 1" in capsys.readouterr().err


def test_a_file_name_cannot_forge_a_line_of_text_output(checkpoint, tmp_path, capsys):
    import predict

    name = tmp_path / "a.png\nforged.png\tcat=1.0000"
    Image.new("L", (28, 28), 30).save(name, format="PNG")
    capsys.readouterr()
    predict.main(["--model", str(checkpoint), str(name)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "a.png\\nforged.png\\tcat=1.0000" in lines[0], lines


def test_anticipated_errors_are_one_line_with_exit_status_2(tmp_path, capsys):
    import predict

    from modeling_vptm.standalone import run

    Image.new("L", (28, 28), 30).save(tmp_path / "a.png")
    with pytest.raises(SystemExit) as exit_:
        run(predict.main, ["--model", str(tmp_path / "no-such-run"), str(tmp_path / "a.png")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: prompt checkpoint folder")


def test_the_onnx_runtime_tool_checks_its_flags(tmp_path, capsys):
    from modeling_vptm.standalone import onnx_runtime

    with pytest.raises(SystemExit) as exit_:
        onnx_runtime.main(["--model", str(tmp_path), "--top_k", "0", "a.png"])
    assert exit_.value.code == 2 and "expected a whole number >= 1" in capsys.readouterr().err
    assert np.isfinite(onnx_runtime.softmax(np.array([[1e30, -1e30]]))).all()
