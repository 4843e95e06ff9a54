"""Trains a VQ-KD visual tokenizer (BEiT v2's recipe, small) on the Fashion-MNIST training images, without labels.

The tokenizer (``modeling_vptm.pretraining.VQKDTokenizer``) learns to reconstruct the patch features of a frozen
semantic teacher (``examples/pretrain_teacher.py``) through a cosine codebook of ``--vocab_size`` codes. It is saved
as ``visual_tokenizer.safetensors`` in ``--output_dir`` with ``tokenizer_summary.json`` (codebook usage on the
training images); ``examples/pretrain_mim.py --tokenizer_from DIR`` pre-trains a backbone on its tokens.

    # the tokenizer of the shipped backbone v3
    python examples/train_vqkd.py --teacher runs/teacher --output_dir runs/vqkd --num_train_epochs 6 \
        --per_device_train_batch_size 256 --learning_rate 2e-3 --warmup_steps 0.05 --lr_scheduler_type cosine \
        --save_strategy no --report_to none
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from modeling_vptm.atomic_write import give_default_permissions
from modeling_vptm.data import load_fashion_mnist, random_shift_flip
from modeling_vptm.pretraining import ContrastiveTeacher, ImageTensorDataset, VQKDTokenizer, codebook_usage
from modeling_vptm.standalone import run
from modeling_vptm.training import write_run_summary


logger = logging.getLogger(__name__)


@dataclass
class VQKDArguments:
    teacher: str = field(metadata={"help": "Folder holding teacher.safetensors (examples/pretrain_teacher.py)."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder of the Fashion-MNIST IDX files."})
    max_train_samples: int | None = None
    vocab_size: int = field(default=512, metadata={"help": "Number of codes: the backbone's vocab_size."})
    code_dim: int = 32
    width: int = 32
    hidden_dim: int = 96
    decay: float = 0.99


class Distillation(torch.nn.Module):
    """The tokenizer with its frozen teacher, which gives the targets of each (shifted, flipped) batch."""

    def __init__(self, tokenizer: VQKDTokenizer, teacher: ContrastiveTeacher) -> None:
        super().__init__()
        self.tokenizer, self.teacher = tokenizer, teacher.requires_grad_(False)
        self.generator = torch.Generator().manual_seed(0)

    def train(self, mode: bool = True) -> Distillation:
        super().train(mode)
        self.teacher.eval()  # its batch-norm statistics stay those it was trained with
        return self

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
        if self.training:  # the positions and mirror images MIM pre-training will show the tokenizer
            pixel_values = random_shift_flip(pixel_values, 2, True, self.generator)
        with torch.no_grad():
            targets = self.teacher.patch_features(pixel_values)
        return {"loss": self.tokenizer(pixel_values, targets)["loss"]}


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((VQKDArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        args, training_args = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    training_args.remove_unused_columns = False
    set_seed(training_args.seed)

    teacher = ContrastiveTeacher.from_pretrained(args.teacher)
    tokenizer = VQKDTokenizer(teacher.patch_size, args.vocab_size, args.code_dim, args.width, args.hidden_dim,
                              teacher.feature_dim, args.decay)  # fmt: skip
    images, _ = load_fashion_mnist("train", args.data_dir)  # labels are never used
    if args.max_train_samples is not None:
        images = images[: args.max_train_samples]
    dataset = ImageTensorDataset(images)
    trainer = Trainer(model=Distillation(tokenizer, teacher), args=training_args, train_dataset=dataset)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    summary = {}
    if trainer.is_world_process_zero():
        tokenizer = tokenizer.cpu().eval()
        pixels = dataset.pixel_values
        tokens = torch.cat([tokenizer.encode(pixels[s : s + 1000]) for s in range(0, len(pixels), 1000)])
        tokenizer.save_pretrained(training_args.output_dir)
        give_default_permissions(training_args.output_dir)
        summary = {
            "train_loss": result.training_loss,
            "train_seconds": round(time.perf_counter() - start, 1),
            "epochs": training_args.num_train_epochs,
            "codebook_usage": codebook_usage(tokens, args.vocab_size),
            "vqkd_args": asdict(args),
        }
        summary = write_run_summary(training_args.output_dir, "tokenizer_summary.json", summary)
        logger.info("Tokenizer summary: %s", summary)
    return summary


if __name__ == "__main__":
    run(main)  # an anticipated error: one line and exit status 2, no traceback
