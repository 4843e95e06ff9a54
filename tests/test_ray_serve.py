"""The Ray Serve application over HTTP, with Ray started here on 2 CPUs: mixed-task requests answered as
`MultiTaskVPTM` alone answers them, tasks loaded on demand, evicted and reloaded to the same answers, the errors of one
request costing no other, requests of many clients batched together. Marked `ray` (Ray's start-up takes tens of
seconds): `python -m pytest -m ray -n 0`, a step of its own in CI."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import socket
import tempfile
import threading

import pytest
from conftest import make_task_root
from PIL import Image


pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray", reason="the Ray Serve application needs the serve extra: pip install -e '.[serve]'")

from modeling_vptm.serving import MultiTaskVPTM  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(backbone_dir, tmp_path_factory):
    """Ray on 2 CPUs and the application on a free port: the tasks of a task root (three, a broken one, one made on
    other weights) and one named task, a task cache holding about two of them, batches of up to 16 rows."""
    from transformers import BeitImageProcessor

    from modeling_vptm.serving.ray_app import build

    root = make_task_root(backbone_dir, tmp_path_factory)
    processor = BeitImageProcessor(size={"height": 20, "width": 20}, do_center_crop=False)
    processor.save_pretrained(backbone_dir)  # the processor the server reads (the tiny backbone has none of its own)
    task_bytes = sum(t.numel() * 4 for t in __import__("safetensors.torch").torch.load_file(
        str(root / "a" / "model.safetensors")).values())  # fmt: skip
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", RAY_SERVE_LOG_TO_STDERR="0")
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR", _temp_dir=temp)
    from ray import serve

    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build({"backbone": backbone_dir, "tasks": f"named={root / 'a'}", "task_root": str(root),
                     "task_cache_mb": 2.5 * task_bytes / 2**20, "max_batch_size": 16, "batch_wait_timeout_s": 0.05,
                     "torch_threads": 1, "num_cpus": 1})  # fmt: skip
        serve.run(app, name="vptm", route_prefix="/", blocking=False)
        yield {"port": port, "root": root, "processor": processor}
    finally:
        serve.shutdown()
        ray.shutdown()
        os.remove(os.path.join(backbone_dir, "preprocessor_config.json"))
        shutil.rmtree(temp, ignore_errors=True)


def call(port: int, method: str, path: str = "/", body=None, headers: dict | None = None) -> tuple[int, object]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    payload = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    heads = {"Content-Type": "application/json"} if isinstance(body, (dict, list)) else {}
    connection.request(method, path, body=payload, headers={**heads, **(headers or {})})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (value, 40, 200 - value)).save(buffer, "PNG")
    return buffer.getvalue()


def expected_scores(backbone_dir, root, processor, task: str, image: bytes) -> list[float]:
    server = MultiTaskVPTM(backbone_dir)
    server.add_task(task, str(root / task))
    x = processor([Image.open(io.BytesIO(image)).convert("RGB")], return_tensors="pt")["pixel_values"]
    return sorted(server(x, [task])[0].softmax(-1).tolist(), reverse=True)


def test_mixed_task_requests_over_http_equal_each_task_alone(served, backbone_dir):
    images = [png(10), png(120), png(230)]
    body = {"inputs": [base64.b64encode(i).decode() for i in images], "parameters": {"tasks": ["a", "b", "c"],
            "top_k": 5}}  # fmt: skip
    status, answer = call(served["port"], "POST", body=body)
    assert status == 200 and len(answer) == 3 and all(set(per_image) == {"a", "b", "c"} for per_image in answer)
    for per_image, image in zip(answer, images, strict=True):
        for task, top in per_image.items():
            expected = expected_scores(backbone_dir, served["root"], served["processor"], task, image)
            assert [p["score"] for p in top] == pytest.approx(expected[:5], abs=1e-5)
    # the image's bytes and query parameters, as curl sends them: the same answer
    status, raw = call(
        served["port"], "POST", "/?tasks=a&top_k=2", body=images[0], headers={"Content-Type": "image/png"}
    )
    assert status == 200 and [p["score"] for p in raw] == pytest.approx([p["score"] for p in answer[0]["a"][:2]])
    status, default = call(served["port"], "POST", body={"inputs": base64.b64encode(images[0]).decode()})
    assert status == 200 and len(default) == 3  # no task named: the named task, its 3 classes
    assert call(served["port"], "GET", "/health")[1]["status"] == "ok"


def test_tasks_load_on_demand_and_reload_to_the_same_answers_after_eviction(served):
    body = {"inputs": base64.b64encode(png(90)).decode(), "parameters": {"tasks": ["b"], "top_k": 4}}
    first = call(served["port"], "POST", body=body)[1]
    assert "b" in call(served["port"], "GET", "/tasks")[1]["loaded"]
    for task in ("a", "c", "b", "a", "c"):  # three tasks in a cache of about two: evicted and loaded again
        call(served["port"], "POST", body={**body, "parameters": {"tasks": [task]}})
    tasks = call(served["port"], "GET", "/tasks")[1]
    assert tasks["cache"]["evictions"] >= 2 and tasks["cache"]["bytes"] <= tasks["cache"]["max_bytes"]
    assert call(served["port"], "POST", body=body)[1] == first


def test_the_errors_of_a_request_cost_no_other_and_a_failed_task_is_not_tried_again(served):
    good = base64.b64encode(png(50)).decode()
    body = {"inputs": [good, "bm90IGFuIGltYWdl"], "parameters": {"tasks": ["a", "broken", "foreign", "nope"]}}
    loads_before = call(served["port"], "GET", "/tasks")[1]["cache"]["loads"]
    for _ in range(3):
        status, answer = call(served["port"], "POST", body=body)
        assert status == 200 and "not an image that can be read" in answer[1]["error"]
        rows = answer[0]
        assert isinstance(rows["a"], list) and "truncated or not a safetensors file" in rows["broken"]["error"]
        assert "weights fingerprint" in rows["foreign"]["error"] and "unknown task 'nope'" in rows["nope"]["error"]
    cache = call(served["port"], "GET", "/tasks")[1]["cache"]
    assert cache["failed"] == 2 and cache["loads"] - loads_before <= 3  # broken and foreign tried once each
    assert call(served["port"], "POST", body=b"{not json", headers={"Content-Type": "application/json"})[0] == 400
    assert call(served["port"], "POST", body={"inputs": good, "parameters": {"top_k": 0}})[0] == 400
    assert call(served["port"], "GET", "/nowhere")[0] == 404
    status, answer = call(served["port"], "POST", body=b"x", headers={"Content-Length": str(65 * 2**20)})
    assert status == 413 and "at most" in answer["error"]
    assert call(served["port"], "POST", body={"inputs": good, "parameters": {"tasks": ["a"]}})[0] == 200


def test_the_requests_of_many_clients_are_batched_together(served):
    before = call(served["port"], "GET", "/tasks")[1]
    answers = []

    def client(k: int) -> None:
        body = {"inputs": base64.b64encode(png(k * 7)).decode(), "parameters": {"tasks": [["a", "b"][k % 2]]}}
        answers.append(call(served["port"], "POST", body=body))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = call(served["port"], "GET", "/tasks")[1]
    assert len(answers) == 32 and all(status == 200 for status, _ in answers)
    rows, batches = after["rows"] - before["rows"], after["batches"] - before["batches"]
    assert rows == 32 and batches < 16, (rows, batches)  # mixed-task batches, of more than two rows on average


def test_the_serving_benchmark_writes_its_table_and_plot(tmp_path):
    """experiments/benchmark_serving.py in its quick mode, in a process of its own (it starts its own Ray)."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "experiments", "benchmark_serving.py"), "--output_dir",
         str(tmp_path), "--quick"], capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.load(open(tmp_path / "results.json"))
    assert [r["tasks"] for r in results["vptm"]] == [1, 3] and [r["tasks"] for r in results["lora"]] == [1, 2]
    for row in results["vptm"] + results["lora"]:
        assert (
            row["errors"] == 0 and row["requests"] == 24 and row["images_per_s"] > 0 and row["p99_ms"] >= row["p50_ms"]
        )
    assert "square" in results["lora_not_measured"]["3"]
    table = open(tmp_path / "results.md").read()
    assert "| 3 | " in table and "VPTM / LoRA" in table and os.path.getsize(tmp_path / "serving.png") > 10_000
    assert "| 2 | not measured |" in table  # a count measured for LoRA only has its row too
    assert "3 tasks: VPTM at " in table and "LoRA with 2 adapters, the most measured" in table


def test_the_builder_hands_replicas_absolute_folders(tmp_path, monkeypatch):
    """Replicas are other processes, on other machines in a cluster: a folder given relative to the driver's working
    folder reaches them absolute; names that are no folder here (Hub ids, shipped names) pass unchanged."""
    from modeling_vptm.serving.ray_app import local_path

    (tmp_path / "runs" / "vptm").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert local_path("runs/vptm") == str(tmp_path / "runs" / "vptm")
    assert local_path("me/fashion-vptm") == "me/fashion-vptm"
    assert local_path("vptm:tiny-beit-fashion-mnist") == "vptm:tiny-beit-fashion-mnist"
    assert local_path(None) is None
