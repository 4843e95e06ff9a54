"""The README's Ray Serve commands as written: `examples/serve_ray.py` started in a process of its own on the tasks the
README's training commands leave (runs/vptm and runs/vpt-shallow, on the shipped backbone), on a free port; the
README's curl request sent to it, answered as `MultiTaskVPTM` answers the same image in this process; Ctrl-C stops
it with exit status 0. Marked `ray`, as tests/test_ray_serve.py."""

from __future__ import annotations

import http.client
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse

import pytest
from conftest import REPO_ROOT
from test_readme import bash_commands


pytestmark = pytest.mark.ray
pytest.importorskip("ray", reason="the Ray Serve application needs the serve extra: pip install -e '.[serve]'")


def readme_command(start: str) -> list[str]:
    (command,) = [command for _, command in bash_commands() if command.startswith(start)]
    return shlex.split(command)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_readme_server_answers_the_readme_request(tmp_path):
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor

    from modeling_vptm import SHIPPED_BACKBONE, VPTMForImageClassification, shipped_backbone_path
    from modeling_vptm.serving import MultiTaskVPTM

    processor = AutoImageProcessor.from_pretrained(shipped_backbone_path())
    folders = {"runs/vptm": {}, "runs/vpt-shallow": dict(classifier="linear_cls", prompt_layers="shallow")}
    for seed, (folder, fields) in enumerate(folders.items()):
        torch.manual_seed(seed)
        model = VPTMForImageClassification.from_backbone(SHIPPED_BACKBONE, num_labels=10, **fields)
        model.save_pretrained(tmp_path / folder)
        processor.save_pretrained(tmp_path / folder)

    serve_command = readme_command("python examples/serve_ray.py")
    curl = readme_command('curl -s -X POST "http://127.0.0.1')
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, os.path.join(REPO_ROOT, serve_command[1]), *serve_command[2:], "--port", str(port)],
        cwd=tmp_path,  # the task folders are relative, as in the README: the replica must find them all the same
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    printed: list[str] = []
    ready = threading.Event()

    def read_output() -> None:
        for line in process.stdout:
            printed.append(line)
            if line.startswith("serving "):
                ready.set()
        ready.set()  # the process ended

    threading.Thread(target=read_output, daemon=True).start()
    try:
        assert ready.wait(300) and process.poll() is None, "".join(printed)[-3000:]
        url = urllib.parse.urlsplit(next(word for word in curl if word.startswith("http://")))
        image_path = next(word for word in curl if word.startswith("@"))[1:]
        body = open(os.path.join(REPO_ROOT, image_path), "rb").read()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        connection.request("POST", f"{url.path}?{url.query}", body=body)
        response = connection.getresponse()
        answer = json.loads(response.read())
        assert response.status == 200, answer

        query = urllib.parse.parse_qs(url.query)
        names, top_k = query["tasks"][0].split(","), int(query["top_k"][0])
        sources = dict(word.split("=", 1) for word in serve_command if "=" in word)
        server = MultiTaskVPTM(SHIPPED_BACKBONE)
        for name in names:
            server.add_task(name, str(tmp_path / sources[name]))
        pixel_values = processor([Image.open(os.path.join(REPO_ROOT, image_path)).convert("RGB")] * len(names),
                                 return_tensors="pt")["pixel_values"]  # fmt: skip
        with torch.no_grad():
            expected = dict(zip(names, server(pixel_values, names), strict=True))
        assert sorted(answer) == sorted(names)
        for name, logits in expected.items():
            scores, indices = logits.softmax(-1).topk(top_k)
            assert [p["label"] for p in answer[name]] == [f"LABEL_{i}" for i in indices.tolist()]
            torch.testing.assert_close(torch.tensor([p["score"] for p in answer[name]]), scores, atol=1e-5, rtol=0)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            returncode = process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert returncode == 0, "".join(printed)[-3000:]
