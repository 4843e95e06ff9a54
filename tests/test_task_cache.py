"""Tasks served by name (`serving.task_cache`, `serving.service`): where a name's checkpoint may come from, loading on
first use, eviction by bytes and reloading to the same answers, failed loads remembered, the service's rows equal to
`MultiTaskVPTM` alone; and the Ray Serve example without Ray. The Ray Serve application itself: test_ray_serve.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, make_task_root
from PIL import Image

from modeling_vptm.serving import MultiTaskVPTM
from modeling_vptm.serving.service import TaskService
from modeling_vptm.serving.task_cache import TaskCache, TaskSources


@pytest.fixture(scope="module")
def root(backbone_dir, tmp_path_factory):
    return make_task_root(backbone_dir, tmp_path_factory)


def pixels(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 20, 20, generator=torch.Generator().manual_seed(seed))


def alone(backbone_dir, root, name: str, x: torch.Tensor) -> torch.Tensor:
    server = MultiTaskVPTM(backbone_dir)
    server.add_task(name, str(root / name))
    return torch.stack(server(x, [name] * len(x)))


def test_a_task_name_resolves_only_to_what_the_server_was_given(root, tmp_path):
    sources = TaskSources({"named": str(root / "a")}, task_root=str(root))
    assert sources.resolve("named").checkpoint == str(root / "a")
    assert sources.resolve("b").checkpoint == str(root / "b")
    for name in ("../a", "a/../b", "..", ".", "/etc", "no-such-task", "x" * 10_000, "org/repo@" + "0" * 40):
        with pytest.raises(ValueError, match=r"unknown task .*; a task is the tasks \['named'\], a folder of") as e:
            sources.resolve(name)
        assert len(str(e.value)) < 600
    hub = TaskSources(allow_hub_tasks=True)
    assert (hub.resolve("org/repo@" + "a" * 40).checkpoint, hub.resolve("org/repo@" + "a" * 40).revision) == (
        "org/repo", "a" * 40
    )  # fmt: skip
    for unpinned in ("org/repo", "org/repo@main", "org/repo@" + "a" * 39, "../x@" + "a" * 40):
        with pytest.raises(ValueError, match="a Hub repository at a pinned commit"):
            hub.resolve(unpinned)
    with pytest.raises(ValueError, match="task names are letters, digits"):
        TaskSources({"../up": "x"})
    with pytest.raises(ValueError, match="is not a folder"):
        TaskSources(task_root=str(tmp_path / "missing"))


def test_tasks_load_on_first_use_are_evicted_by_bytes_and_reload_to_the_same_answers(backbone_dir, root):
    server = MultiTaskVPTM(backbone_dir)
    cache = TaskCache(server, TaskSources(task_root=str(root)), max_bytes=10**9)
    assert cache.ensure(["a"]) == {} and list(server.tasks) == ["a"] and cache.loads == 1
    one_task = cache.bytes
    assert one_task == sum(t.numel() * t.element_size() for t in server.tasks["a"].state_dict().values())
    x = pixels(4)
    first = {name: alone(backbone_dir, root, name, x) for name in ("a", "b", "c")}
    cache.max_bytes = 2 * one_task  # room for two tasks of a's size
    assert cache.ensure(["b"]) == {} and cache.ensure(["c"]) == {}
    assert "a" not in server.tasks and cache.evictions >= 1 and cache.bytes <= cache.max_bytes
    for name in ("a", "b", "c", "a"):  # every one evicted and reloaded on the way: the same answers each time
        assert cache.ensure([name]) == {}
        torch.testing.assert_close(torch.stack(server(x, [name] * 4)), first[name], rtol=0, atol=0)
    assert cache.loads >= 5
    # the tasks of one call are never evicted by one another; a call whose tasks alone do not fit is told why
    cache.max_bytes = one_task
    errors = cache.ensure(["a", "b"])
    assert "a" in server.tasks and set(errors) == {"b"} and "does not fit the task cache" in errors["b"]


def test_a_task_that_fails_to_load_is_not_tried_again_on_every_request(backbone_dir, root, monkeypatch):
    now = [0.0]
    server = MultiTaskVPTM(backbone_dir)
    cache = TaskCache(server, TaskSources(task_root=str(root)), failure_ttl_s=60, clock=lambda: now[0])
    tries = []
    original = server.add_task
    monkeypatch.setattr(server, "add_task", lambda *a, **k: tries.append(a[0]) or original(*a, **k))
    for _ in range(5):
        errors = cache.ensure(["broken", "foreign", "a", "no-such-task"])
        assert set(errors) == {"broken", "foreign", "no-such-task"} and "a" in server.tasks
    assert "truncated or not a safetensors file" in errors["broken"]
    assert "weights fingerprint" in errors["foreign"] and "unknown task 'no-such-task'" in errors["no-such-task"]
    assert tries == ["broken", "foreign", "a"]  # each load tried once; an unknown name costs no load
    now[0] = 61.0  # after the failure's time to live: tried again
    cache.ensure(["broken"])
    assert tries[-1] == "broken" and cache.stats()["failed"] == 2


def test_the_service_answers_as_each_task_alone_and_an_error_costs_only_its_rows(backbone_dir, root):
    from transformers import BeitImageProcessor

    processor = BeitImageProcessor(size={"height": 20, "width": 20}, do_center_crop=False)
    service = TaskService(MultiTaskVPTM(backbone_dir), TaskSources(task_root=str(root)), processor)
    images = [Image.new("RGB", (20, 20), (i * 40, 30, 90)) for i in range(3)]
    tops = service.classify(images * 2, ["a", "b", "broken", "c", "a", "no-such-task"], top_k=2)
    x = processor(images * 2, return_tensors="pt")["pixel_values"]
    for row, name in ((0, "a"), (1, "b"), (3, "c"), (4, "a")):
        expected = alone(backbone_dir, root, name, x[row : row + 1])[0].softmax(-1)
        assert [p["score"] for p in tops[row]] == pytest.approx(expected.topk(2).values.tolist(), abs=1e-6)
    assert "truncated or not a safetensors file" in tops[2]["error"] and "unknown task" in tops[5]["error"]
    with pytest.raises(ValueError, match="name the tasks to run"):  # nothing named and no default: say what to do
        service.parse({"inputs": b"x"})
    with pytest.raises(ValueError, match="a request names at most 64 tasks"):
        service.parse({"inputs": b"x", "parameters": {"tasks": [f"t{i}" for i in range(65)]}})


def test_the_ray_example_without_ray_names_the_extra_to_install(tmp_path):
    code = "import sys; sys.modules['ray'] = None; sys.argv[1:] = ['--port', '8123']; import runpy; " + (
        f"runpy.run_path({os.path.join(REPO_ROOT, 'examples', 'serve_ray.py')!r}, run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=REPO_ROOT))  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        'error: serving with Ray needs Ray Serve: pip install -e ".[serve]" (or pip install "ray[serve]")'
    )


def test_the_ray_application_refuses_bad_arguments_in_one_line_before_ray_starts(tmp_path, capsys):
    """The builder and the example check what they are given in the process that starts the server: a task root that
    is no folder, a count or a setting out of range is one line there, not a replica failing to start on every
    machine of a cluster."""
    ray = pytest.importorskip("ray", reason="the Ray Serve application needs the serve extra: pip install '.[serve]'")
    import serve_ray

    from modeling_vptm.serving.ray_app import build
    from modeling_vptm.standalone import run

    missing = str(tmp_path / "no-such-folder")
    for args, message in (
        ({"task_root": missing}, f"task_root {missing!r} is not a folder"),
        ({"num_cpus": "-1"}, "num_cpus must be a number > 0, got '-1'"),
        ({"num_replicas": "0"}, "num_replicas must be a whole number >= 1, got '0'"),
        ({"torch_threads": "two"}, "torch_threads must be a whole number >= 1, got 'two'"),
        ({"batch_wait_timeout_s": 99}, r"batch_wait_timeout_s must be in \[0.0, 10.0\], got 99"),
        ({"task_cache_mb": "lots"}, "task_cache_mb must be a number, got 'lots'"),
    ):
        with pytest.raises(ValueError, match=message):
            build(args)
    for argv, message in (
        (["--task_root", missing], f"error: task_root {missing!r} is not a folder"),
        (["--port", "70000"], "expected a port from 1 to 65535, got 70000"),
        (["--cpus_per_replica", "0"], "expected a number > 0, got '0'"),
        (["--task_cache_mb", "-5"], "error: task_cache_mb must be in [0.001, 1073741824.0], got -5.0"),
    ):
        with pytest.raises(SystemExit) as exit_:
            run(serve_ray.main, argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and message in err[-1], err
    assert not ray.is_initialized()
