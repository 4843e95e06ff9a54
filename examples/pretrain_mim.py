"""Pre-trains a small BEiT with masked visual token modeling on Fashion-MNIST (the project's shipped backbone).

The recipe is BEiT's (Bao et al., 2021): a ``BeitForMaskedImageModeling`` with a shared relative position bias, no
absolute position embedding and layer scale sees images whose patches are block-masked (about 40 %), and learns
to predict the visual token of every masked patch. The tokens come from a k-means tokenizer fitted here on the
training images (``modeling_vptm.pretraining.tokenizers``). Labels of the training set are never used.

    # the shipped backbone's recipe (GPU)
    python examples/pretrain_mim.py --output_dir runs/tiny-beit --num_train_epochs 150 \
        --per_device_train_batch_size 1024 --learning_rate 1.5e-3 --bf16
    # a CPU run of a few minutes
    python examples/pretrain_mim.py --output_dir runs/cpu-beit --num_train_epochs 2 --max_train_samples 20000
    # second generation: tokens are codes of the first backbone's contextual features (BEiT v2's idea), and the
    # encoder starts from the first backbone's weights with a fresh MIM head
    python examples/pretrain_mim.py --output_dir runs/tiny-beit-v2 --teacher vptm:tiny-beit-fashion-mnist \
        --init_from vptm:tiny-beit-fashion-mnist --num_train_epochs 8 --learning_rate 5e-4
    # third generation (the shipped v3): tokens of a VQ-KD tokenizer distilled from a contrastive teacher
    # (examples/pretrain_teacher.py, examples/train_vqkd.py), the encoder starting from the second backbone
    python examples/pretrain_mim.py --output_dir runs/tiny-beit-v3 --tokenizer_from runs/vqkd \
        --init_from vptm:tiny-beit-fashion-mnist-v2 --num_train_epochs 6 --per_device_train_batch_size 256 \
        --learning_rate 5e-4 --warmup_steps 0.05 --weight_decay 0.05 --lr_scheduler_type cosine --seed 0

Resumable: rerunning with the same ``--output_dir`` continues from its last checkpoint (the tokenizer saved
there is reused, not refitted). Arguments can also come from one JSON file: ``python pretrain_mim.py args.json``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from transformers import (
    BeitConfig,
    BeitForMaskedImageModeling,
    BeitImageProcessor,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from modeling_vptm.atomic_write import give_default_permissions
from modeling_vptm.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
from modeling_vptm.pretraining import (
    BlockMaskGenerator,
    ImageTensorDataset,
    MaskedImageModelingCollator,
    TokenizingMIMModel,
)
from modeling_vptm.pretraining.tokenizers import (
    TOKENIZER_FILE,
    PatchKMeansTokenizer,
    TeacherFeatureTokenizer,
    VQKDTokenizer,
    load_visual_tokenizer,
)
from modeling_vptm.shipped import resolve_backbone_path
from modeling_vptm.standalone import run


logger = logging.getLogger(__name__)


@dataclass
class DataArguments:
    data_dir: str | None = field(default=None, metadata={"help": "Folder of the Fashion-MNIST IDX files."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_shift: int = field(default=2, metadata={"help": "Random translation in pixels during pre-training."})
    flip: bool = field(default=True, metadata={"help": "Random horizontal flips during pre-training."})
    mask_ratio: float = field(default=0.4, metadata={"help": "Fraction of patches masked (block-wise)."})
    min_mask_patches: int = field(default=4, metadata={"help": "Smallest masked block, in patches."})


@dataclass
class BackboneArguments:
    image_size: int = 28
    patch_size: int = 4
    hidden_size: int = 128
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    intermediate_size: int = 512
    layer_scale_init_value: float = 0.1
    drop_path_rate: float = 0.1
    vocab_size: int = field(default=512, metadata={"help": "Number of visual tokens (k-means codes)."})
    token_context: int = field(default=2, metadata={"help": "Pixels of context around each patch for its token."})
    tokenizer_samples: int = field(default=300_000, metadata={"help": "Patches used to fit the k-means tokenizer."})
    kmeans_iters: int = 40
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "Tokenise a frozen teacher's contextual patch features instead of pixels (a backbone folder, Hub "
            "id or vptm: name); the codebook is fitted by spherical k-means on the training images."
        },
    )
    tokenizer_from: str | None = field(
        default=None,
        metadata={
            "help": "Use the visual tokenizer saved in this folder (a VQ-KD tokenizer from examples/train_vqkd.py, or "
            "any backbone's) instead of fitting one; its vocabulary must be --vocab_size."
        },
    )
    teacher_layer: int = field(default=-1, metadata={"help": "Which of the teacher's hidden states is tokenised."})
    init_from: str | None = field(
        default=None,
        metadata={"help": "Start the encoder from this backbone's weights; the MIM head is always fresh."},
    )


def build_image_processor(image_size: int) -> BeitImageProcessor:
    return BeitImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_center_crop=False,
        do_rescale=True,
        do_normalize=True,
        image_mean=[FASHION_MNIST_MEAN] * 3,
        image_std=[FASHION_MNIST_STD] * 3,
        do_convert_rgb=True,
    )


def build_config(args: BackboneArguments) -> BeitConfig:
    return BeitConfig(
        image_size=args.image_size,
        patch_size=args.patch_size,
        num_channels=3,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size,
        use_mask_token=True,
        use_absolute_position_embeddings=False,
        use_relative_position_bias=False,
        use_shared_relative_position_bias=True,
        layer_scale_init_value=args.layer_scale_init_value,
        drop_path_rate=args.drop_path_rate,
        use_mean_pooling=True,
    )


def _requested_tokenizer(args: BackboneArguments) -> dict:
    if args.tokenizer_from is not None:
        return _saved_tokenizer(load_visual_tokenizer(args.tokenizer_from))
    if args.teacher is not None:
        return {"kind": "teacher_features", "teacher": args.teacher, "layer": args.teacher_layer,
                "vocab_size": args.vocab_size}  # fmt: skip
    return {"kind": "pixel_kmeans", "patch_size": args.patch_size, "vocab_size": args.vocab_size,
            "token_context": args.token_context}  # fmt: skip


def _saved_tokenizer(tokenizer: PatchKMeansTokenizer | TeacherFeatureTokenizer | VQKDTokenizer) -> dict:
    if isinstance(tokenizer, VQKDTokenizer):
        return {"kind": "vqkd", **tokenizer.settings}
    if isinstance(tokenizer, TeacherFeatureTokenizer):
        return {"kind": "teacher_features", "teacher": tokenizer.teacher_name, "layer": tokenizer.layer,
                "vocab_size": tokenizer.vocab_size}  # fmt: skip
    return {"kind": "pixel_kmeans", "patch_size": tokenizer.patch_size, "vocab_size": tokenizer.vocab_size,
            "token_context": tokenizer.context}  # fmt: skip


def fit_or_load_tokenizer(
    args: BackboneArguments, images: np.ndarray, output_dir: str, seed: int
) -> PatchKMeansTokenizer | TeacherFeatureTokenizer | VQKDTokenizer:
    if os.path.isfile(os.path.join(output_dir, TOKENIZER_FILE)):  # a resumed run: never refit, never mix
        saved = load_visual_tokenizer(output_dir)
        expected, found = _requested_tokenizer(args), _saved_tokenizer(saved)
        if found != expected:
            raise ValueError(
                f"{output_dir} holds a tokenizer with {found}, but this run asks for {expected}; use another "
                "--output_dir"
            )
        logger.info("Reusing the tokenizer saved in %s", output_dir)
        return saved
    if args.tokenizer_from is not None:  # trained elsewhere: used as it is
        tokenizer = load_visual_tokenizer(args.tokenizer_from)
        if tokenizer.vocab_size != args.vocab_size or tokenizer.patch_size != args.patch_size:
            raise ValueError(
                f"the tokenizer in {args.tokenizer_from} has vocab_size {tokenizer.vocab_size} and patch_size "
                f"{tokenizer.patch_size}; this run asks for vocab_size {args.vocab_size}, patch_size {args.patch_size}"
            )
        tokenizer.save_pretrained(output_dir)
        return tokenizer
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.teacher is not None:
        teacher = BeitForMaskedImageModeling.from_pretrained(resolve_backbone_path(args.teacher))
        tokenizer = TeacherFeatureTokenizer(teacher, args.teacher, args.vocab_size, args.teacher_layer)
    else:
        tokenizer = PatchKMeansTokenizer(args.patch_size, 3, args.vocab_size, args.token_context)
    tokenizer = tokenizer.to(device)
    pixels = ImageTensorDataset(images).pixel_values
    start = time.perf_counter()
    stats = tokenizer.fit(
        pixels,
        num_samples=args.tokenizer_samples,
        num_iters=args.kmeans_iters,
        generator=torch.Generator().manual_seed(seed),
    )
    logger.info("Fitted the tokenizer in %.1f s: %s", time.perf_counter() - start, stats)
    tokenizer = tokenizer.cpu()
    tokenizer.save_pretrained(output_dir)
    return tokenizer


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((DataArguments, BackboneArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        data_args, model_args, training_args = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        data_args, model_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    # The collator returns labels only for the masked patches; Trainer must keep our columns as they are.
    training_args.remove_unused_columns = False
    set_seed(training_args.seed)

    images, _ = load_fashion_mnist("train", data_args.data_dir)  # labels are never used for pre-training
    if data_args.max_train_samples is not None:
        images = images[: data_args.max_train_samples]
    os.makedirs(training_args.output_dir, exist_ok=True)
    tokenizer = fit_or_load_tokenizer(model_args, images, training_args.output_dir, training_args.seed)

    config = build_config(model_args)
    if model_args.init_from is not None:
        model = BeitForMaskedImageModeling.from_pretrained(resolve_backbone_path(model_args.init_from))
        # the architecture is the starting backbone's; only the vocabulary follows this run's tokenizer
        model.config.vocab_size = config.vocab_size
        model.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size)
        model.lm_head.apply(model._init_weights)  # a fresh head: the new tokens mean something else
        config = model.config
    else:
        model = BeitForMaskedImageModeling(config)
    grid = (config.image_size // config.patch_size,) * 2
    collator = MaskedImageModelingCollator(
        None,  # tokens are computed on the model's device by TokenizingMIMModel
        BlockMaskGenerator(grid, data_args.mask_ratio, data_args.min_mask_patches),
        max_shift=data_args.max_shift,
        flip=data_args.flip,
        seed=training_args.seed,
    )
    if isinstance(tokenizer, TeacherFeatureTokenizer) and tokenizer.patch_size != config.patch_size:
        raise ValueError(
            f"the teacher {tokenizer.teacher_name} has patch_size {tokenizer.patch_size}, the backbone being trained "
            f"{config.patch_size}: tokens must describe the same patches"
        )
    trainer = Trainer(
        model=TokenizingMIMModel(model, tokenizer),
        args=training_args,
        train_dataset=ImageTensorDataset(images),
        data_collator=collator,
    )

    last = training_args.resume_from_checkpoint or get_last_checkpoint(training_args.output_dir)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last)
    train_seconds = time.perf_counter() - start

    if trainer.is_world_process_zero():
        model.save_pretrained(training_args.output_dir)
        build_image_processor(config.image_size).save_pretrained(training_args.output_dir)
        tokenizer.save_pretrained(training_args.output_dir)
        give_default_permissions(training_args.output_dir)  # readable as any other file (safetensors writes 0600)
        summary = {
            "train_loss": result.training_loss,
            "train_seconds": round(train_seconds, 1),
            "epochs": training_args.num_train_epochs,
            "train_images": len(images),
            "parameters": sum(p.numel() for p in model.parameters()),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}",
            "data_args": asdict(data_args),
            "backbone_args": asdict(model_args),
        }
        with open(os.path.join(training_args.output_dir, "pretrain_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        logger.info("Pre-training summary: %s", summary)
        return summary
    return {}


if __name__ == "__main__":
    run(main)  # an anticipated error: one line and exit status 2, no traceback
