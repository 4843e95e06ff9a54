"""Writes (and optionally pushes) a Hugging Face Inference Endpoints repository serving prompt checkpoints.

    # one task: the checkpoint at the root, plus handler.py, requirements.txt, endpoint.json and the exported graph
    python examples/make_endpoint.py --model runs/vptm --output endpoint-vptm
    # several tasks on one backbone: tasks/<name>/ per checkpoint, one backbone graph per sequence layout
    python examples/make_endpoint.py --task fashion=runs/vptm --task fashion-vpt=runs/vpt --output endpoint-multi
    # served by MultiTaskVPTM in PyTorch instead (needs a container with transformers >= 5.17: a custom image)
    python examples/make_endpoint.py --task fashion=runs/vptm --backend pytorch --output endpoint-pytorch
    # straight to the Hub (one commit), then create the endpoint from that repository
    python examples/make_endpoint.py --task fashion=runs/vptm --task fashion-vpt=runs/vpt --repo_id me/vptm-endpoint

The default backend, `onnx`, runs on the stock Inference Endpoints container: its handler needs numpy, Pillow and
onnxruntime only, while the container's toolkit pins transformers 4.51 and does not start under transformers 5 (see
modeling_vptm/standalone/onnx_endpoint.py). The repository is loaded with its own handler before it is written out or
pushed, so one that would not serve (checkpoints of different backbones, different image processors, not VPTM) is
refused here, not on the endpoint.
"""

from __future__ import annotations

import argparse
import json

from modeling_vptm.standalone import run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="One prompt checkpoint (folder or Hub id); served as 'default'.")
    parser.add_argument("--task", action="append", default=[],
                        help="NAME=SOURCE prompt checkpoint of a multi-task endpoint (repeatable).")  # fmt: skip
    parser.add_argument("--output", default=None, help="Write the repository to this new (or empty) folder.")
    parser.add_argument("--repo_id", default=None, help="Push the repository to this Hub model repository.")
    parser.add_argument("--private", action="store_true", help="Create the Hub repository private.")
    parser.add_argument("--revision", default=None, help="Revision of Hub checkpoints.")
    parser.add_argument("--backend", default="onnx", choices=["onnx", "pytorch"],
                        help="onnx: exported graphs in ONNX Runtime (runs on the stock container); pytorch: "
                        "MultiTaskVPTM (needs transformers >= 5.17 in the container).")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from modeling_vptm.deploy import push_endpoint_repository, write_endpoint_repository
    from modeling_vptm.serving import parse_named_sources

    if bool(args.model) == bool(args.task):
        raise ValueError("give one prompt checkpoint with --model, or several tasks with --task NAME=SOURCE")
    if not (args.output or args.repo_id):
        raise ValueError("say where the repository goes: --output FOLDER and/or --repo_id ID")
    # one task is named "default"
    tasks = parse_named_sources(args.task, names_required=True) if args.task else {"default": args.model}
    multi_task = bool(args.task)
    result = {}
    if args.output:
        result["config"] = write_endpoint_repository(args.output, tasks, multi_task, args.revision, args.backend)
        result["folder"] = args.output
    if args.repo_id:
        result["url"] = push_endpoint_repository(args.repo_id, tasks, multi_task, private=args.private,
                                                 revision=args.revision, backend=args.backend)  # fmt: skip
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    run(main)  # an anticipated error: one line and exit status 2, no traceback
