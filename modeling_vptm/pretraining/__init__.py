"""Pre-training the backbones the project ships: BEiT's block masking and collator, the visual tokenizers (pixel
k-means, teacher features, VQ-KD), the contrastive teacher, Fashion-MNIST as tensors, and the converter from the
original BEiT checkpoints."""

from .convert import config_from_original, convert_beit_checkpoint, convert_original_state_dict
from .masking import BlockMaskGenerator, MaskedImageModelingCollator, TokenizingMIMModel
from .teacher import TEACHER_FILE, ContrastiveTeacher, TwoViewCollator, nt_xent, patch_encoder
from .tensors import ImageTensorDataset, to_pixel_values
from .tokenizers import (
    TOKENIZER_FILE,
    PatchKMeansTokenizer,
    TeacherFeatureTokenizer,
    VQKDTokenizer,
    codebook_usage,
    load_visual_tokenizer,
)


__all__ = [
    "TEACHER_FILE",
    "TOKENIZER_FILE",
    "BlockMaskGenerator",
    "ContrastiveTeacher",
    "ImageTensorDataset",
    "MaskedImageModelingCollator",
    "PatchKMeansTokenizer",
    "TeacherFeatureTokenizer",
    "TokenizingMIMModel",
    "TwoViewCollator",
    "VQKDTokenizer",
    "codebook_usage",
    "config_from_original",
    "convert_beit_checkpoint",
    "convert_original_state_dict",
    "load_visual_tokenizer",
    "nt_xent",
    "patch_encoder",
    "to_pixel_values",
]
