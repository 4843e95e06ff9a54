"""Runs that need no network make no network call: the main job on the shipped data and backbone, and the Space on
its bundled tasks, in a fresh process *without* the offline switches the rest of the suite sets, with every socket
address lookup and connection recorded by an audit hook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import REPO_ROOT


# Prepended to each script: records every address lookup and connection; at exit writes the ones not to this machine.
AUDIT = """
import json, sys
calls = []

def audit(event, args):
    if event in ("socket.getaddrinfo", "socket.connect"):
        calls.append([event, repr(args)[:200]])

sys.addaudithook(audit)

def report():
    local = ("127.0.0.1", "localhost", "::1", "AF_UNIX")
    outside = [call for call in calls if not any(host in call[1] for host in local)]
    with open(sys.argv[1], "w") as f:
        json.dump({"outside": outside, "all": len(calls)}, f)

import atexit
atexit.register(report)
"""


def network_calls(script: str, tmp_path) -> dict:
    """Runs `script` after the audit hook in a fresh process without the suite's offline switches."""
    (tmp_path / "audited.py").write_text(AUDIT + textwrap.dedent(script))
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE") and k != "HF_UPDATE_DOWNLOAD_COUNTS"}
    env.update(PYTHONPATH=os.pathsep.join([REPO_ROOT, os.path.join(REPO_ROOT, "examples")]),
               HF_HOME=str(tmp_path / "hf"))  # fmt: skip
    result = subprocess.run([sys.executable, "audited.py", str(tmp_path / "calls.json")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp_path / "calls.json").read_text())


def test_the_main_job_makes_no_network_call(tmp_path):
    calls = network_calls(
        """
        import run_classification
        results = run_classification.main(["--output_dir", "run", "--max_steps", "2", "--max_eval_samples", "40"])
        assert results["eval_images"] == 40
        """,
        tmp_path,
    )
    assert calls["outside"] == [], calls  # e.g. the datasets library's download counter for the parquet builder


def test_the_space_makes_no_network_call(tmp_path):
    calls = network_calls(
        f"""
        import sys, urllib.request
        sys.path.insert(0, {os.path.join(REPO_ROOT, "space")!r})
        import app

        service = app.DemoService(app.SHIPPED_BACKBONE, app.bundled_tasks())
        demo = app.build_demo(service).queue()
        _, url, _ = demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True)
        assert b"VPTM" in urllib.request.urlopen(url).read()
        urllib.request.urlopen(url + "config").read()
        demo.close()
        """,
        tmp_path,
    )
    assert calls["all"] > 0  # the page was fetched over loopback, so the hook saw it
    assert calls["outside"] == [], calls  # e.g. Gradio's analytics and version check
