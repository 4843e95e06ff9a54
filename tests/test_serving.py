"""One backbone, many tasks: mixed batches equal each task's model run alone; tasks come and go without reloads."""

from __future__ import annotations

import pytest
import torch
from conftest import make_backbone, save_task_checkpoints

import modeling_vptm.serving.multitask as serving
from modeling_vptm import VPTMForImageClassification, VPTMTask
from modeling_vptm.serving import MultiTaskVPTM


TASKS = {
    "deep": dict(prompt_length=3, num_labels=4),
    "deep-other": dict(prompt_length=3, num_labels=2, prototype_dim=8),  # same layout as "deep"
    "vpt-shallow": dict(prompt_length=2, prompt_layers="shallow", classifier="linear_cls", num_labels=3),
    "replace-trained-mask": dict(prompt_length=1, mask_token_mode="replace", train_mask_token=True, num_labels=5),
    "hidden-linear": dict(prompt_length=3, classifier="linear_mask", head_input="hidden", num_labels=3),
    "ensemble": dict(prompt_length=3, head_input="ensemble", num_labels=4),  # same layout as "deep"
    # other weights, same layout and head shapes as their namesakes: their heads run stacked in a mixed batch
    "deep-twin": dict(prompt_length=3, num_labels=4),
    "vpt-shallow-twin": dict(prompt_length=2, prompt_layers="shallow", classifier="linear_cls", num_labels=3),
    "ensemble-twin": dict(prompt_length=3, head_input="ensemble", num_labels=4),
}


@pytest.fixture(scope="module")
def checkpoints(backbone_dir, tmp_path_factory):
    return save_task_checkpoints(backbone_dir, tmp_path_factory.mktemp("tasks"), TASKS, noise=0.1)


def test_mixed_batch_equals_each_task_alone(backbone_dir, checkpoints):
    server = MultiTaskVPTM(backbone_dir)
    for name, path in checkpoints.items():
        server.add_task(name, path)
    names = list(TASKS) * 2 + ["deep", "vpt-shallow"]
    pixel_values = torch.randn(len(names), 3, 20, 20, generator=torch.Generator().manual_seed(0))
    outputs = server(pixel_values, tasks=names)
    for name, path in checkpoints.items():
        alone = VPTMForImageClassification.from_pretrained(path)
        rows = [i for i, n in enumerate(names) if n == name]
        with torch.no_grad():
            expected = alone(pixel_values[rows]).logits
        for k, row in enumerate(rows):
            assert outputs[row].shape == (TASKS[name]["num_labels"],)
            torch.testing.assert_close(outputs[row], expected[k], atol=1e-5, rtol=1e-5)


def test_predict_gives_each_image_its_tasks_tokens_and_attention(backbone_dir, checkpoints):
    server = MultiTaskVPTM(backbone_dir)
    for name, path in checkpoints.items():
        server.add_task(name, path)
    names = ["vpt-shallow", "deep", "replace-trained-mask", "deep-other", "deep", "deep-twin"]
    pixel_values = torch.randn(len(names), 3, 20, 20, generator=torch.Generator().manual_seed(3))
    predictions = server.predict(pixel_values, tasks=names, output_readout_attention=True)
    assert [p.task for p in predictions] == names
    for row, (name, prediction) in enumerate(zip(names, predictions, strict=True)):
        alone = VPTMForImageClassification.from_pretrained(checkpoints[name]).eval()
        with torch.no_grad():
            expected = alone(pixel_values[row : row + 1], output_readout_attention=True)
        torch.testing.assert_close(prediction.logits, expected.logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(prediction.readout_attention, expected.readout_attention[0], atol=1e-5, rtol=1e-5)
        if name == "vpt-shallow":  # reads CLS: no visual-token prediction
            assert prediction.visual_token_logits is None
        else:
            torch.testing.assert_close(
                prediction.visual_token_logits, expected.visual_token_logits[0], atol=1e-5, rtol=1e-5
            )
    assert all(p.readout_attention is None for p in server.predict(pixel_values, tasks=names))


def test_heads_of_equal_shapes_run_stacked_once_per_group(backbone_dir, checkpoints, monkeypatch):
    server = MultiTaskVPTM(backbone_dir)
    for name, path in checkpoints.items():
        server.add_task(name, path)
    signatures = {name: task.head_signature for name, task in server.tasks.items()}
    for twin in ("deep", "vpt-shallow", "ensemble"):
        assert signatures[twin] == signatures[f"{twin}-twin"]
    assert len(set(signatures.values())) == len(TASKS) - 3  # only the twins share (deep-other: other sizes)
    stacked, alone = [], []
    original_stacked, original_head = serving.head_logits, VPTMTask.forward
    monkeypatch.setattr(serving, "head_logits", lambda tasks, readout, own: stacked.append(
        (sorted(t.config.num_labels for t in tasks), len(own))) or original_stacked(tasks, readout, own))  # fmt: skip
    monkeypatch.setattr(VPTMTask, "forward", lambda self, readout, labels=None: alone.append(
        len(readout.readout_hidden_state)) or original_head(self, readout, labels))  # fmt: skip
    names = ["deep-twin", "deep", "deep-other", "vpt-shallow", "deep", "vpt-shallow-twin", "ensemble"]
    pixel_values = torch.randn(len(names), 3, 20, 20, generator=torch.Generator().manual_seed(4))
    logits = server(pixel_values, tasks=names)
    # one stacked run for deep and its twin (3 images), one for the linear twins (2); deep-other and ensemble alone
    assert sorted(stacked) == [([3, 3], 2), ([4, 4], 3)] and sorted(alone) == [1, 1]
    for row, name in enumerate(names):
        with torch.no_grad():
            expected = server.tasks[name](server.backbone(pixel_values[row : row + 1], server.tasks[name].layout,
                                                          prompts=server.tasks[name].prompts())).logits[0]  # fmt: skip
        torch.testing.assert_close(logits[row], expected, atol=1e-5, rtol=1e-5)


HEAD_KINDS = {  # one layout ([MASK] read out, 2 prompts per block), every head that reads [MASK]
    "logits": dict(head_input="logits"),
    "probs": dict(head_input="probs"),
    "normalized": dict(head_input="normalized_logits"),
    "hidden-3-per-class": dict(head_input="hidden", prototypes_per_class=3),
    "linear-mask": dict(classifier="linear_mask", head_input="logits"),
    "ensemble": dict(head_input="ensemble"),
}


def test_every_head_kind_stacks_exactly_and_groups_are_capped(backbone_dir, monkeypatch):
    def signature(num_labels=3, **fields):
        model = VPTMForImageClassification.from_backbone(backbone_dir, num_labels=num_labels, **fields)
        return model.task.head_signature

    # what a head does not read does not keep it apart; what gives its tensors' shapes another meaning does
    assert signature(classifier="linear_cls", head_input="probs") == signature(classifier="linear_cls")
    assert signature(classifier="linear_mask", prototypes_per_class=2) == signature(classifier="linear_mask")
    assert signature(num_labels=6) != signature(num_labels=3, prototypes_per_class=2)  # both hold 6 prototypes
    server = MultiTaskVPTM(backbone_dir)
    for kind, fields in HEAD_KINDS.items():
        for copy in range(3):
            torch.manual_seed(copy)
            model = VPTMForImageClassification.from_backbone(backbone_dir, num_labels=3, prompt_length=2, **fields)
            with torch.no_grad():
                for p in model.task.parameters():
                    p.add_(torch.randn_like(p) * 0.3)
            server.add_task(f"{kind}-{copy}", model)
    monkeypatch.setattr(serving, "MAX_STACKED_HEADS", 2)  # three tasks of a kind: a stacked pair, then one alone
    stacked, alone = [], []
    original_stacked, original_head = serving.head_logits, VPTMTask.forward
    monkeypatch.setattr(serving, "head_logits", lambda tasks, readout, own: stacked.append(len(tasks)) or
                        original_stacked(tasks, readout, own))  # fmt: skip
    monkeypatch.setattr(VPTMTask, "forward", lambda self, readout, labels=None: alone.append(1) or original_head(
        self, readout, labels))  # fmt: skip
    names = [f"{kind}-{copy}" for copy in (2, 0, 1) for kind in HEAD_KINDS] * 2  # each kind's tasks interleaved
    pixel_values = torch.randn(len(names), 3, 20, 20, generator=torch.Generator().manual_seed(5))
    logits = server(pixel_values, tasks=names)
    assert stacked == [2] * len(HEAD_KINDS) and len(alone) == len(HEAD_KINDS)
    monkeypatch.undo()
    for row, name in enumerate(names):
        task = server.tasks[name]
        with torch.no_grad():
            expected = task(server.backbone(pixel_values[row : row + 1], task.layout, prompts=task.prompts())).logits
        torch.testing.assert_close(logits[row], expected[0], atol=1e-5, rtol=1e-5)


def test_a_batch_runs_with_the_tasks_it_started_with(backbone_dir, checkpoints, monkeypatch):
    # a server shared by threads (an endpoint's, your own app's): a task replaced by one thread while another's batch
    # runs must not reach that batch halfway (here: after its backbone pass, before its heads), nor relabel it after
    server = MultiTaskVPTM(backbone_dir)
    server.add_task("a", checkpoints["deep"])
    server.add_task("b", checkpoints["deep-twin"])  # stacked with "a"
    names = ["b", "a", "b"]
    pixel_values = torch.randn(3, 3, 20, 20, generator=torch.Generator().manual_seed(6))
    before = server.predict(pixel_values, tasks=names)
    assert before[0].id2label == server.tasks["b"].config.id2label and len(before[0].id2label) == 4
    original = type(server.backbone).forward

    def forward_then_replace(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        server.add_task("b", checkpoints["deep-other"])  # another head size
        return out

    monkeypatch.setattr(type(server.backbone), "forward", forward_then_replace)
    during = server.predict(pixel_values, tasks=names)
    monkeypatch.undo()
    for found, expected in zip(during, before, strict=True):
        torch.testing.assert_close(found.logits, expected.logits, rtol=0, atol=0)
        assert found.id2label == expected.id2label
    after = server.predict(pixel_values, tasks=names)  # the next call has the new "b"
    assert [len(p.logits) for p in after] == [2, 4, 2] and len(after[0].id2label) == 2


def test_tasks_come_and_go_without_reloading_the_backbone(backbone_dir, checkpoints, monkeypatch):
    server = MultiTaskVPTM(backbone_dir)
    backbone = server.backbone.beit
    calls = []
    monkeypatch.setattr(serving, "load_mim_backbone", lambda *a, **k: calls.append(a))
    server.add_task("deep", checkpoints["deep"])
    server.add_task("vpt", checkpoints["vpt-shallow"])
    server.remove_task("deep")
    server.add_task("deep", checkpoints["deep"])
    assert calls == [] and server.backbone.beit is backbone and sorted(server.tasks) == ["deep", "vpt"]
    with pytest.raises(KeyError, match=r"no task 'gone'"):
        server.remove_task("gone")
    with pytest.raises(KeyError, match=r"unknown tasks \['gone'\]"):
        server(torch.randn(1, 3, 20, 20), tasks=["gone"])
    with pytest.raises(ValueError, match=r"one task per image: got 1 task names for 2 images"):
        server(torch.randn(2, 3, 20, 20), tasks=["deep"])


def test_checkpoints_of_another_backbone_are_refused(backbone_dir, checkpoints, tmp_path):
    make_backbone(tmp_path / "other", seed=5)
    other = VPTMForImageClassification.from_backbone(str(tmp_path / "other"), num_labels=2)
    other.save_pretrained(tmp_path / "other-task")
    server = MultiTaskVPTM(backbone_dir)
    with pytest.raises(ValueError, match=r"was made on backbone .*other.* but this server holds"):
        server.add_task("other", str(tmp_path / "other-task"))
    other_revision = VPTMForImageClassification.from_backbone(backbone_dir, num_labels=2)
    other_revision.config.backbone_revision = "v2"
    with pytest.raises(ValueError, match=r"\(revision v2\), but this server holds .* \(revision None\)"):
        server.add_task("r", other_revision)
    same_name_other_weights = VPTMForImageClassification.from_backbone(backbone_dir, num_labels=2)
    same_name_other_weights.config.backbone_fingerprint = "0" * 64
    with pytest.raises(ValueError, match=r"task .* was trained on backbone .* do not fit these weights"):
        server.add_task("x", same_name_other_weights)
    assert sorted(server.tasks) == []  # nothing refused was kept


def test_serve_batch_cli_matches_each_model(tmp_path, capsys):
    import os

    import numpy as np
    import serve_batch
    from PIL import Image
    from transformers import AutoImageProcessor

    from modeling_vptm import SHIPPED_BACKBONE, shipped_backbone_path

    models = {}
    for seed, (name, fields) in enumerate(
        {"a": dict(num_labels=3), "b": dict(num_labels=4, classifier="linear_cls", prompt_layers="shallow")}.items()
    ):
        torch.manual_seed(seed)
        model = VPTMForImageClassification.from_backbone(SHIPPED_BACKBONE, **fields)
        model.save_pretrained(tmp_path / name)
        models[name] = model.eval()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        os.makedirs(tmp_path / f"in-{name}")
        for j in range(3):
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(tmp_path / f"in-{name}" / f"{j}.png")
    results = serve_batch.main(["--backbone", SHIPPED_BACKBONE, "--task", f"a={tmp_path / 'a'}", "--task",
                                f"b={tmp_path / 'b'}", "--input", f"a={tmp_path / 'in-a'}", "--input",
                                f"b={tmp_path / 'in-b'}", "--batch_size", "4", "--top_k", "2"])  # fmt: skip
    assert [r["task"] for r in results] == ["a"] * 3 + ["b"] * 3
    processor = AutoImageProcessor.from_pretrained(shipped_backbone_path())
    for r in results:
        pixel_values = processor(Image.open(r["file"]).convert("RGB"), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            probs = models[r["task"]](pixel_values).logits[0].softmax(-1)
        best = int(probs.argmax())
        assert r["predictions"][0]["label"] == models[r["task"]].config.id2label[best]
        assert abs(r["predictions"][0]["score"] - float(probs[best])) < 1e-5
    assert len(capsys.readouterr().out.strip().splitlines()) == 6
    with pytest.raises(ValueError, match=r"--input names task 'c', but the tasks are \['a', 'b'\]"):
        serve_batch.main(["--backbone", SHIPPED_BACKBONE, "--task", f"a={tmp_path / 'a'}", "--task",
                          f"b={tmp_path / 'b'}", "--input", f"c={tmp_path / 'in-a'}"])  # fmt: skip


def test_tasks_share_a_pass_exactly_when_their_layouts_are_equal(backbone_dir, checkpoints, monkeypatch):
    server = MultiTaskVPTM(backbone_dir)
    for name, path in checkpoints.items():
        server.add_task(name, path)
    layouts = {name: task.layout for name, task in server.tasks.items()}
    # these differ in their heads only (verbalizer sizes, two verbalizers, a linear head at [MASK])
    assert layouts["deep"] == layouts["deep-other"] == layouts["ensemble"] == layouts["hidden-linear"]
    assert len({layouts["deep"], layouts["vpt-shallow"], layouts["replace-trained-mask"]}) == 3
    assert len(set(layouts.values())) == 3
    passes = []
    original = type(server.backbone).forward
    monkeypatch.setattr(type(server.backbone), "forward", lambda self, x, layout, **kw: passes.append(
        (len(x), layout)) or original(self, x, layout, **kw))  # fmt: skip
    server(torch.randn(6, 3, 20, 20), tasks=["deep", "ensemble", "vpt-shallow", "deep-other", "deep", "vpt-shallow"])
    assert sorted(n for n, _ in passes) == [2, 4] and {layout for _, layout in passes} == {
        layouts["deep"],
        layouts["vpt-shallow"],
    }


def test_from_model_shares_the_loaded_backbone(backbone_dir, checkpoints, pixel_values):
    model = VPTMForImageClassification.from_pretrained(checkpoints["replace-trained-mask"])
    server = MultiTaskVPTM.from_model(model, "mine")
    assert server.backbone is model.backbone and list(server.tasks) == ["mine"]
    server.train()  # training what holds the frozen backbone leaves it in eval mode
    assert not any(m.training for m in server.backbone.modules())
    half = VPTMForImageClassification.from_pretrained(checkpoints["deep"], dtype=torch.bfloat16)
    assert MultiTaskVPTM.from_model(half, "deep").fingerprint == server.fingerprint  # of the weights as loaded
    server.add_task("deep", checkpoints["deep"])  # a checkpoint of the same backbone is accepted beside it
    with torch.no_grad():
        expected = model(pixel_values).logits
    for row, logits in enumerate(server(pixel_values, tasks=["mine"] * 3)):
        torch.testing.assert_close(logits, expected[row], atol=1e-5, rtol=1e-5)


def test_one_task_batch_runs_without_per_image_copies(backbone_dir, checkpoints, monkeypatch):
    # one task: the pass reads the caller's batch itself and the task's prompts once, broadcast by the backbone; mixed
    # tasks out of order: one reordering, and each task's prompts expanded to its images only
    server = MultiTaskVPTM(backbone_dir)
    for name in ("deep", "deep-other"):
        server.add_task(name, checkpoints[name])
    passes = []
    original = type(server.backbone).forward
    monkeypatch.setattr(type(server.backbone), "forward", lambda self, x, layout, prompts=None, **kw: passes.append(
        (x, prompts)) or original(self, x, layout, prompts=prompts, **kw))  # fmt: skip
    pixel_values = torch.randn(4, 3, 20, 20)
    server(pixel_values, tasks=["deep"] * 4)
    ((x, prompts),) = passes
    assert x.data_ptr() == pixel_values.data_ptr() and x.shape == pixel_values.shape
    assert prompts is server.tasks["deep"].prompts()
    passes.clear()
    names = ["deep-other", "deep", "deep-other", "deep"]
    logits = server(pixel_values, tasks=names)
    ((x, prompts),) = passes
    torch.testing.assert_close(x, pixel_values[[0, 2, 1, 3]], rtol=0, atol=0)  # by task, first seen first
    expected = torch.stack([server.tasks[n].prompts() for n in ("deep-other", "deep-other", "deep", "deep")])
    torch.testing.assert_close(prompts, expected, rtol=0, atol=0)
    assert [len(row) for row in logits] == [TASKS[n]["num_labels"] for n in names]
