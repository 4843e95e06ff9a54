"""The demo Space: its service (classify, look inside, bad input), the app served over HTTP to a real client, a
bounded concurrent load across three tasks, and the page drawn in a real headless browser."""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, make_backbone
from PIL import Image
from transformers import BeitImageProcessor

from modeling_vptm import VPTMForImageClassification
from modeling_vptm.pretraining import PatchKMeansTokenizer
from modeling_vptm.serving import patch_attention_map, render_visual_token, top_visual_tokens


os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no calls home from the app or the client
sys.path.insert(0, os.path.join(REPO_ROOT, "space"))

import app  # noqa: E402
import screenshot  # noqa: E402


TASKS = {
    "vptm-a": dict(num_labels=4),
    "vpt-b": dict(num_labels=3, classifier="linear_cls"),
    "vptm-c": dict(num_labels=5, prompt_length=2, prototype_dim=8),
}


def write_image(path, size=(20, 20), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """A tiny backbone with its image processor and k-means tokenizer, three tasks made on it, and images."""
    root = tmp_path_factory.mktemp("space")
    backbone = root / "backbone"
    make_backbone(backbone, seed=3)
    processor = BeitImageProcessor(size={"height": 20, "width": 20}, do_center_crop=False, image_mean=[0.5] * 3,
                                   image_std=[0.25] * 3)  # fmt: skip
    processor.save_pretrained(backbone)
    tokenizer = PatchKMeansTokenizer(patch_size=4, num_channels=3, vocab_size=37)
    tokenizer.fit(torch.randn(32, 3, 20, 20), num_iters=3, generator=torch.Generator().manual_seed(0))
    tokenizer.save_pretrained(backbone)
    tasks = {}
    for i, (name, fields) in enumerate(TASKS.items()):
        torch.manual_seed(i)
        fields = dict(fields)
        num_labels = fields.pop("num_labels")
        model = VPTMForImageClassification.from_backbone(
            str(backbone), num_labels=num_labels, id2label={k: f"{name}-class{k}" for k in range(num_labels)},
            label2id={f"{name}-class{k}": k for k in range(num_labels)}, **fields,
        )  # fmt: skip
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.3)  # as if trained
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
        tasks[name] = str(root / name)
    images = [write_image(root / f"image{i}.png", size=(20 + 7 * i, 20 + 3 * i), seed=i) for i in range(4)]
    service = app.DemoService(str(backbone), tasks)
    return {"root": root, "backbone": str(backbone), "tasks": tasks, "images": images, "service": service}


@pytest.fixture(scope="module")
def served(space):
    """The app launched on loopback for the whole module."""
    demo = app.build_demo(space["service"], max_batch_size=8).queue()
    _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


def client(url, tmp_path):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=str(tmp_path), analytics_enabled=False)


def predict_script(task_dir, images, top_k=3) -> list[list[dict]]:
    import predict

    return [row["predictions"] for row in predict.main(["--model", task_dir, "--top_k", str(top_k), *images])]


def assert_same_predictions(ours, expected):
    assert [p["label"] for p in ours] == [p["label"] for p in expected]
    np.testing.assert_allclose([p["score"] for p in ours], [p["score"] for p in expected], atol=1e-5)


# ------------------------------------------------------------------------------------------------------ service
def test_classify_batch_equals_the_predict_script_for_every_task(space):
    service, images = space["service"], space["images"]
    answers = service.classify_batch(images, [list(TASKS)] * len(images))
    for name, folder in space["tasks"].items():
        expected = predict_script(folder, images)
        for answer, top in zip(answers, expected, strict=True):
            assert_same_predictions(answer[name], top)


def test_bad_input_gets_a_message_and_the_rest_of_the_batch_is_served(space, tmp_path):
    service, good = space["service"], space["images"][0]
    tiny = write_image(tmp_path / "tiny.png", size=(1, 1))
    Image.new("L", (8000, 8000)).save(tmp_path / "huge.png")
    (tmp_path / "notes.png").write_text("not an image")
    requests = [
        (good, ["vptm-a"]),
        (tiny, ["vptm-a"]),
        (str(tmp_path / "huge.png"), ["vptm-a"]),
        (str(tmp_path / "notes.png"), ["vptm-a"]),
        (good, ["vptm-a", "no-such-task"]),
        (good, []),
        (None, ["vptm-a"]),
        (good, ["vpt-b"]),
    ]
    answers = service.classify_batch([r[0] for r in requests], [r[1] for r in requests])
    assert_same_predictions(answers[0]["vptm-a"], predict_script(space["tasks"]["vptm-a"], [good])[0])
    assert_same_predictions(answers[7]["vpt-b"], predict_script(space["tasks"]["vpt-b"], [good])[0])
    expected_errors = {
        1: r"image of 1 x 1 pixels; expected each side to be at least 8 pixels",
        2: r"image of 8000 x 8000 = 64000000 pixels; at most 16777216 pixels are read",
        3: r"not an image that can be read",
        4: r"unknown task\(s\) \['no-such-task'\]; the tasks are \['vptm-a', 'vpt-b', 'vptm-c'\]",
        5: r"no task chosen",
        6: r"no image: upload one or pick an example",
    }
    for index, pattern in expected_errors.items():
        assert set(answers[index]) == {"error"}, answers[index]
        assert __import__("re").search(pattern, answers[index]["error"]), answers[index]["error"]
    assert app.format_answer(answers[1]).startswith("**Cannot classify this image:** image of 1 x 1")


def test_look_inside_draws_the_models_own_attention_and_tokens(space):
    service, image = space["service"], space["images"][1]
    out = service.look_inside(image, ["vptm-a", "vpt-b"], num_tokens=4)
    pixel_values = service.pixel_values([service.read_image(image)])
    for name in ("vptm-a", "vpt-b"):
        model = VPTMForImageClassification.from_pretrained(space["tasks"][name]).eval()
        with torch.no_grad():
            reference = model(pixel_values, output_readout_attention=True)
        heatmap = patch_attention_map(reference.readout_attention[0], (5, 5))
        assert heatmap.shape == (5, 5) and abs(heatmap.sum() - 1) < 1e-9 and (heatmap >= 0).all()
        expected = reference.readout_attention[0, :, -25:].mean(0)
        np.testing.assert_allclose(heatmap.ravel(), (expected / expected.sum()).numpy(), atol=1e-6)
        if name == "vptm-a":
            tokens = top_visual_tokens(reference.visual_token_logits[0], 4)
            assert [t for t, _ in tokens] == reference.visual_token_logits[0].topk(4).indices.tolist()
            probs = reference.visual_token_logits[0].softmax(-1)
            np.testing.assert_allclose([p for _, p in tokens], probs.topk(4).values.numpy(), atol=1e-6)
    heatmaps, tokens = out["heatmaps"], out["tokens"]
    assert len(heatmaps) == 2 and heatmaps[0][0].shape == (app.DISPLAY_SIDE, app.DISPLAY_SIDE, 3)
    assert "vpt-b" in heatmaps[1][1] and "CLS" in heatmaps[1][1] and "[MASK]" in heatmaps[0][1]
    assert len(tokens) == 4 and all("vptm-a" in caption for _, caption in tokens)  # VPT predicts no token
    with pytest.raises(ValueError, match="unknown task"):
        service.look_inside(image, ["nope"])


def test_a_token_is_drawn_from_its_k_means_code(space):
    tokenizer = space["service"].tokenizer
    drawn = render_visual_token(tokenizer, 5, image_mean=0.5, image_std=0.25)
    window = tokenizer.centroids[5] * tokenizer.std + tokenizer.mean  # normalised grey values
    expected = ((window.double() * 0.25 + 0.5).clamp(0, 1) * 255).round().reshape(4, 4).numpy()
    assert drawn.dtype == np.uint8 and np.array_equal(drawn, expected.astype(np.uint8))
    with pytest.raises(ValueError, match=r"token_id must be in \[0, 37\), got 37"):
        render_visual_token(tokenizer, 37, 0.5, 0.25)


def test_a_checkpoint_of_another_backbone_is_reported_and_the_others_serve(space, tmp_path):
    other = tmp_path / "other-backbone"
    make_backbone(other, seed=11)
    VPTMForImageClassification.from_backbone(str(other), num_labels=2).save_pretrained(tmp_path / "foreign")
    tasks = {"vptm-a": space["tasks"]["vptm-a"], "foreign": str(tmp_path / "foreign")}
    service = app.DemoService(space["backbone"], tasks)
    assert service.task_names == ["vptm-a"] and "was made on backbone" in service.refused["foreign"]
    assert "~~foreign~~ not loaded" in service.describe_tasks()
    answer = service.classify_batch([space["images"][0]], [["vptm-a"]])[0]
    assert_same_predictions(answer["vptm-a"], predict_script(space["tasks"]["vptm-a"], space["images"][:1])[0])


def test_a_task_saved_with_another_image_processor_is_refused(space, tmp_path):
    other = tmp_path / "other-processor"
    VPTMForImageClassification.from_pretrained(space["tasks"]["vptm-a"]).save_pretrained(other)
    BeitImageProcessor(size={"height": 20, "width": 20}, image_mean=[0.1] * 3, image_std=[0.25] * 3,
                       do_center_crop=False).save_pretrained(other)  # fmt: skip
    service = app.DemoService(space["backbone"], {"vptm-a": space["tasks"]["vptm-a"], "other": str(other)})
    assert service.task_names == ["vptm-a"]
    assert "image processor differs from the backbone's in ['image_mean']" in service.refused["other"]


def test_a_mistyped_task_folder_is_refused_at_once_not_tried_on_the_hub(space, tmp_path, monkeypatch):
    """`--task mine=runs/vtpm` (runs/ exists) is reported as a missing folder without a Hub lookup; offline mode is
    lifted so that the check, not the mode, is what keeps the Space from retrying the Hub."""
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)

    def no_hub(*args, **kwargs):
        raise AssertionError("a local path was looked up on the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr("transformers.utils.hub.hf_hub_download", no_hub, raising=False)
    service = app.DemoService(space["backbone"], {"vptm-a": space["tasks"]["vptm-a"], "typo": "runs/vtpm"})
    assert service.task_names == ["vptm-a"]
    refused = service.refused["typo"]
    assert refused.startswith("CheckpointNotFoundError: prompt checkpoint folder 'runs/vtpm' not found")


def test_tasks_come_from_flags_or_the_environment():
    assert app.parse_tasks(["a=runs/a", " b = me/b "]) == {"a": "runs/a", "b": "me/b"}
    with pytest.raises(ValueError, match=r"NAME=FOLDER_OR_HUB_ID, got 'runs/a'"):
        app.parse_tasks(["runs/a"])
    assert set(app.bundled_tasks()) == {"fashion-vptm", "fashion-vpt", "digits-vptm"}


# --------------------------------------------------------------------------------------------- served over HTTP
def test_the_served_app_answers_a_real_client_like_the_predict_script(space, served, tmp_path):
    from gradio_client import handle_file

    images = space["images"][:2]
    api = client(served, tmp_path)
    for image, expected in zip(images, predict_script(space["tasks"]["vptm-c"], images), strict=True):
        markdown, answer = api.predict(handle_file(image), ["vptm-c", "vpt-b"], 3, api_name="/classify")
        assert_same_predictions(answer["vptm-c"], expected)
        assert markdown.startswith("**vptm-c**") and expected[0]["label"] in markdown
    _, answer = api.predict(handle_file(images[0]), ["vptm-c", "vpt-b"], 5, api_name="/classify")
    assert len(answer["vptm-c"]) == 5 and len(answer["vpt-b"]) == 3  # top-k, at most the task's labels
    heatmaps, tokens, summary = api.predict(handle_file(images[0]), ["vptm-a"], api_name="/look_inside")
    assert len(heatmaps) == 1 and len(tokens) == 5 and "vptm-a" in summary
    # a bad request is answered with a message; the server goes on serving
    markdown, answer = api.predict(handle_file(write_image(tmp_path / "t.png", (2, 2))), ["vptm-a"], 2,
                                   api_name="/classify")  # fmt: skip
    assert "error" in answer and markdown.startswith("**Cannot classify this image:**")


def test_bad_requests_sharing_a_batch_do_not_fail_the_others(space, served, tmp_path):
    """Inputs Gradio itself cannot prepare (not an image, a task that is not a choice, a top-k out of range) are
    answered for their own request only, while good requests submitted with them get their answers."""
    from gradio_client import handle_file

    (tmp_path / "notes.png").write_text("not an image")
    good = space["images"][2]
    requests = [(good, ["vptm-a"], 3), (str(tmp_path / "notes.png"), ["vptm-a"], 3), (good, ["nope"], 3),
                (good, ["vpt-b"], 20), (good, ["vpt-b", "vptm-a"], 2)] * 3  # fmt: skip
    api = client(served, tmp_path)
    jobs = [api.submit(handle_file(i), t, k, api_name="/classify") for i, t, k in requests]
    answers = [job.result(timeout=120)[1] for job in jobs]
    expected = predict_script(space["tasks"]["vptm-a"], [good])[0]
    for k in range(0, len(requests), 5):
        assert_same_predictions(answers[k]["vptm-a"], expected)
        assert "not an image that can be read" in answers[k + 1]["error"]
        assert "unknown task(s) ['nope']" in answers[k + 2]["error"]
        assert "labels per task" in answers[k + 3]["error"] and "20" in answers[k + 3]["error"]
        assert list(answers[k + 4]) == ["vpt-b", "vptm-a"] and len(answers[k + 4]["vptm-a"]) == 2


def test_concurrent_clients_across_three_tasks_all_get_their_own_answer(space, served, tmp_path):
    """96 requests from 8 concurrent clients over 3 tasks: every answer arrives and equals the answer to the same
    request made alone."""
    from gradio_client import handle_file

    images, names = space["images"], list(TASKS)
    alone = {(i, n): space["service"].classify_batch([images[i]], [[n]])[0] for i in range(4) for n in names}
    requests = [(k % 4, names[(k // 4) % 3]) for k in range(96)]
    results, errors = [None] * len(requests), []

    def user(worker):
        try:
            api = client(served, tmp_path / f"client{worker}")
            jobs = [(k, api.submit(handle_file(images[i]), [n], 3, api_name="/classify"))
                    for k, (i, n) in enumerate(requests) if k % 8 == worker]  # fmt: skip
            for k, job in jobs:
                results[k] = job.result(timeout=120)[1]
        except Exception as error:  # reported below, with the worker
            errors.append((worker, error))

    threads = [threading.Thread(target=user, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert all(r is not None for r in results)
    for (i, n), answer in zip(requests, results, strict=True):
        assert list(answer) == [n]
        assert_same_predictions(answer[n], alone[(i, n)][n])


# ----------------------------------------------------------------------------------------------------- browser
def test_the_page_in_a_headless_browser_shows_labels_and_heatmaps(space, served, tmp_path):
    if screenshot.find_browser() is None and not os.environ.get("VPTM_REQUIRE_BROWSER"):
        pytest.skip("no Chromium with its driver here (apt-get install chromium chromium-driver)")
    output = os.path.join(os.environ.get("VPTM_TEST_ARTIFACTS", str(tmp_path)), "space-page.png")
    shown = screenshot.capture(served, space["images"][0], output)
    expected = predict_script(space["tasks"]["vptm-a"], space["images"][:1])[0][0]["label"]
    assert expected in shown["predictions"] and shown["heatmaps"] == 3  # the three tasks chosen by default
    assert shown["tokens"] == 10  # five per VPTM task; the VPT task predicts none
    page = np.asarray(Image.open(output).convert("RGB"))
    assert page.shape[0] >= 800 and page.shape[1] >= 1200
    assert len(np.unique(page.reshape(-1, 3), axis=0)) > 50  # a rendered page, not a blank one


# ------------------------------------------------------------------------------------------------ Space layout
def test_the_space_card_and_its_publication(monkeypatch, tmp_path):
    import gradio
    import push_space
    from huggingface_hub import HfApi, SpaceCard

    card = SpaceCard.load(os.path.join(REPO_ROOT, "space", "README.md"))
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py" and card.data.title
    assert card.data.sdk_version.split(".")[0] == gradio.__version__.split(".")[0]
    assert len(card.data.short_description) <= 60  # the Hub refuses longer ones
    calls = []

    def upload_folder(api, repo_id, folder_path, repo_type=None, delete_patterns=None, **kw):
        files = {os.path.relpath(os.path.join(r, f), folder_path) for r, _, fs in os.walk(folder_path) for f in fs}
        card = SpaceCard.load(os.path.join(folder_path, "README.md"))
        calls.append(("upload", repo_id, repo_type, delete_patterns, files, card))

    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    url = push_space.main(["--repo_id", "me/demo", "--model", "me/tiny-beit"])
    assert url == "https://huggingface.co/spaces/me/demo"
    assert calls[0] == ("create", "me/demo", {"repo_type": "space", "space_sdk": "gradio", "private": False,
                                              "exist_ok": True})  # fmt: skip
    assert len(calls) == 2  # one commit: the Space rebuilds once, with the app and the package together
    _, _, repo_type, delete_patterns, files, pushed_card = calls[1]
    assert repo_type == "space" and pushed_card.data.models == ["me/tiny-beit"] and pushed_card.data.sdk == "gradio"
    assert {
        "app.py",
        "requirements.txt",
        "examples/bag.png",
        "tasks/fashion-vptm/model.safetensors",
        "modeling_vptm/serving/multitask.py",
        "modeling_vptm/shipped/tiny-beit-fashion-mnist/model.safetensors",
    } <= files
    assert not any("__pycache__" in f or f.endswith(".pyc") or "fashion-mnist-1k" in f for f in files)
    assert "tasks/**" in delete_patterns  # a task removed here is removed from the Space too
