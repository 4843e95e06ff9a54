"""The frozen BEiT MIM backbone, run on a sequence with a task's added tokens (prompts, [MASK]).

`PromptedBackbone` holds the three parts of transformers' `BeitForMaskedImageModeling` under the same names
(`beit`, `layernorm`, `lm_head`), so every BEiT MIM checkpoint loads into it 1:1, and adds what prompting needs:

* `SequenceLayout`: where a task's tokens go. Tasks with equal layouts can share one pass (the multi-task server
  groups a mixed batch by it).
* the relative position bias extended to the added tokens (`extend_relative_position_bias`), kept between calls
  because the bias tables are frozen;
* the block loop, with exact savings: outputs nobody reads are not computed. Each block is BEiT's own layer, called
  as a module (`PromptedBeitLayer`), so forward hooks on it fire once per block, gradient checkpointing included, and
  transformers' output capturing (`output_hidden_states`, `output_attentions`) works as on BEiT;
* the read-out: the state of the read-out token ([MASK], or CLS), normed by the MIM head's layer norm, and the MIM
  head's visual-token logits there.

It is a `PreTrainedModel` (the base model of `VPTMForImageClassification`), and knows nothing of classes or
verbalizers. This is a Hub code file: it imports only torch and transformers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers import BeitConfig, BeitForMaskedImageModeling, BeitModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.beit.modeling_beit import BeitLayer, BeitPreTrainedModel, eager_attention_forward
from transformers.utils import ModelOutput
from transformers.utils.output_capturing import capture_outputs

from .configuration_vptm import patch_grid


# The backbone's parts, named as in `BeitForMaskedImageModeling`.
BACKBONE_MODULES = ("beit", "layernorm", "lm_head")
BIAS_CACHE_SIZE = 8  # a few layouts and image sizes at most; the oldest is dropped


@dataclass(frozen=True)
class SequenceLayout:
    """Where a task's added tokens go in the backbone's input sequence.

    The documented order is `[CLS] + P prompts + [MASK]? + patches` (with `mask_token="replace"`, [MASK] takes the
    place of patch `mask_position` instead). Blocks in `prompted_layers` get their own prompts; blocks before the
    first of them see no prompts.

    Attributes:
        prompt_length: P, prompts per prompted block (0 when no block is prompted).
        prompted_layers: indices of the blocks that get prompts, ascending.
        mask_token: `"append"`, `"replace"`, or `None` to read out at CLS (the VPT baseline).
        mask_position: patch index (raster order) replaced by [MASK] under `"replace"`, else 0.
        extra_token_bias: relative position bias of the added tokens, `"cls"` or `"zero"` (see
            `extend_relative_position_bias`).
    """

    prompt_length: int = 0
    prompted_layers: tuple[int, ...] = ()
    mask_token: str | None = None
    mask_position: int = 0
    extra_token_bias: str = "cls"

    def __post_init__(self) -> None:
        if bool(self.prompt_length) != bool(self.prompted_layers):
            raise ValueError(
                f"a layout with prompts needs prompted layers and the reverse, got prompt_length={self.prompt_length}"
                f" and prompted_layers={self.prompted_layers}"
            )
        if self.mask_token not in (None, "append", "replace"):
            raise ValueError(f"mask_token must be 'append', 'replace' or None, got {self.mask_token!r}")

    @classmethod
    def from_config(cls, config) -> SequenceLayout:
        """The layout a `VPTMConfig` describes."""
        prompted = tuple(config.prompted_layers)
        mask = config.mask_token_mode if config.reads_mask_token else None
        position = 0
        if mask == "replace":
            position = config.num_patches // 2 if config.mask_token_position is None else config.mask_token_position
        return cls(
            prompt_length=config.prompt_length if prompted else 0,
            prompted_layers=prompted,
            mask_token=mask,
            mask_position=position,
            extra_token_bias=config.extra_token_bias,
        )

    @property
    def readout_offset(self) -> int:
        """Index of the read-out token in `[CLS] + [MASK]? + patches`: [MASK] (appended or in place of a patch),
        else CLS. Prompts, once in, come before all of these in the stored order (see
        `PromptedBackbone.run_blocks`)."""
        if self.mask_token == "append":
            return 1
        if self.mask_token == "replace":
            return 1 + self.mask_position
        return 0


@dataclass
class PromptedBackboneOutput(ModelOutput):
    r"""
    What the prompted backbone computed for one batch.

    Args:
        readout_hidden_state (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            Final state of the read-out token ([MASK], or CLS when the layout has no [MASK]) after the MIM head's
            layer norm: what the MIM head and the task heads read.
        visual_token_logits (`torch.FloatTensor` of shape `(batch_size, vocab_size)`, *optional*):
            The frozen MIM head's prediction at [MASK]; `None` when the layout reads CLS.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Input of the first block (with its prompts when it is prompted) and output of every block,
            `(batch_size, sequence_length, hidden_size)` each, when `output_hidden_states` asks for them (`True`, or
            the indices of the ones wanted: the others are `None`, as transformers' models return them); tokens in the
            documented order `[CLS] + P prompts + [MASK]? + patches` (no prompts before the first prompted block).
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            Each block's attention probabilities, `(batch_size, num_heads, sequence_length, sequence_length)`, tokens
            in the order of `hidden_states`, when `output_attentions=True` and the attention implementation returns
            them (`"eager"`; as with BEiT, `"sdpa"` warns and returns none).
        readout_attention (`torch.FloatTensor` of shape `(batch_size, num_heads, sequence_length)`, *optional*):
            The last block's attention from the read-out token to every token (each head's row sums to 1), tokens
            in the order of `hidden_states`, so the last `num_patches` columns are the image patches; when
            `output_readout_attention=True`, with any attention implementation.
    """

    readout_hidden_state: torch.FloatTensor | None = None
    visual_token_logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    readout_attention: torch.FloatTensor | None = None


class PromptedBeitLayer(BeitLayer):
    """transformers' `BeitLayer` (same weights, same names), which `PromptedBackbone` also runs on a sequence with
    added tokens: given `rows`, `attention_mask` is the complete attention bias of that sequence (the layer's own
    relative position bias included, extended to the added tokens, see `compute_position_biases`) and only the outputs
    of the query tokens `rows` are computed (`prompted_block`). Called without `rows`, as `BeitModel.forward` calls
    its layers, it is the library's layer.

    The backbone calls each block as a module, so forward hooks on it (transformers' output capturing among them) see
    each block once per pass. With `checkpoint=True` the block is recomputed in the backward pass instead of keeping
    its activations, inside `forward`, as transformers' own layers do it: the recomputation runs the block only, not
    the hooks again. (transformers' layers checkpoint only in train mode; the frozen backbone never leaves eval mode,
    so its holder says when to.)
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *args,
        rows: slice | None = None,
        checkpoint: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        if rows is None:  # the library's layer
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        if checkpoint:

            def block(hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
                return self.forward(hidden, bias, rows=rows, **kwargs)  # the block again, not its hooks

            # the tensors positional, as reentrant checkpointing needs them
            return self._gradient_checkpointing_func(block, hidden_states, attention_mask)
        return prompted_block(self, hidden_states, attention_mask, rows=rows, **kwargs)


class PromptedBackbone(BeitPreTrainedModel):
    """A frozen BEiT masked-image-modeling backbone that runs with a task's prompts and [MASK] token.

    `forward` reads as embed -> run the blocks -> read out. The backbone is composed, not forked: `beit` is
    transformers' `BeitModel`, and `layernorm` / `lm_head` sit beside it as in `BeitForMaskedImageModeling`, so its
    state dict is that model's. It is the base model of `VPTMForImageClassification` (as `BeitModel` is BEiT's): a
    `PreTrainedModel` that saves with `save_pretrained` and records its blocks' outputs with transformers' output
    capturing.
    """

    # BeitLayer's blocks become PromptedBeitLayer (see __init__): neither may be split across devices
    _no_split_modules = ["BeitLayer", "PromptedBeitLayer"]

    def __init__(self, config: BeitConfig) -> None:
        super().__init__(config)
        self.beit = BeitModel(config, add_pooling_layer=False)
        for layer in self.beit.layers:
            # the same module, with the prompted forward too: BeitModel builds library layers, and rebuilding them
            # would initialise every block twice
            layer.__class__ = PromptedBeitLayer
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self._bias_cache: dict[tuple, BlockBiases] = {}  # see position_biases
        # of the weights as loaded (float32), so that a later cast to bf16 does not change what tasks are checked on
        self.loaded_fingerprint: str | None = None
        self.post_init()
        self.eval()

    # ----------------------------------------------------------------------------------------------- weights
    def load_mim_weights(self, mim: BeitForMaskedImageModeling) -> None:
        """Copies the weights of a loaded BEiT MIM checkpoint in and freezes them; refuses missing or misshapen
        tensors (nothing is left random)."""
        source = mim.state_dict()
        own = self.state_dict()
        check_backbone_tensors(own, source)
        with torch.no_grad():
            for name, tensor in own.items():
                tensor.copy_(source[name])
        self.loaded_fingerprint = backbone_fingerprint(source)
        self.freeze()

    def freeze(self) -> None:
        """No gradients and eval mode (no dropout, no drop-path) for every backbone tensor."""
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> PromptedBackbone:
        # frozen: never in train mode (drop-path and dropout would change the features), whatever holds it
        return super().train(False)

    def fingerprint(self) -> str:
        """SHA-256 of the backbone weights as loaded (see `backbone_fingerprint`); of the current weights when they
        were not loaded from a checkpoint."""
        return self.loaded_fingerprint or backbone_fingerprint(self.state_dict())

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid `(rows, columns)` of the configured image size."""
        return patch_grid(self.config)

    @property
    def pretrained_mask_token(self) -> torch.Tensor:
        """The [MASK] embedding the backbone was pre-trained with, `(1, 1, D)`."""
        return self.beit.embeddings.mask_token

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # ------------------------------------------------------------------------------------------------ inputs
    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        check_pixel_values(pixel_values, self.config)

    # ------------------------------------------------------------------------------------------------ forward
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor,
        layout: SequenceLayout,
        prompts: torch.Tensor | None = None,
        mask_embeddings: torch.Tensor | None = None,
        output_readout_attention: bool = False,
        skip_unread_outputs: bool = True,
        gradient_checkpointing: bool = False,
        **kwargs,
    ) -> PromptedBackboneOutput:
        """Runs the backbone on `pixel_values` `(batch, C, H, W)` laid out as `layout`.

        `prompts`: `(num_prompted_blocks, P, D)` for the whole batch or `(batch, num_prompted_blocks, P, D)` per
        image (needed when the layout has prompts). `mask_embeddings`: the [MASK] embedding, `(1, 1, D)` or per
        image `(batch, 1, D)`; default: the pre-trained one. `skip_unread_outputs`: compute only the outputs that
        are read later (exact; off when hidden states or attentions are recorded). `gradient_checkpointing`:
        recompute each block flagged by `gradient_checkpointing_enable()` in the backward pass instead of keeping its
        activations (the holder passes whether it trains: the backbone itself is always in eval mode). `kwargs`:
        transformers' `output_hidden_states`, `output_attentions` and `return_dict` (default: the config's), read by
        its output capturing, and what the attention implementation takes.
        """
        if layout.prompted_layers and prompts is None:
            raise ValueError(f"the layout prompts blocks {list(layout.prompted_layers)}, but no prompts were given")
        if prompts is not None and prompts.ndim == 3:
            prompts = prompts.unsqueeze(0).expand(pixel_values.shape[0], -1, -1, -1)  # (batch, blocks, P, D)
        # what transformers' output capturing records (the blocks' inputs, outputs and attentions) is every output
        recorded = any(
            kwargs.get(f"output_{name}", getattr(self.config, f"output_{name}", False))
            for name in ("hidden_states", "attentions")
        )
        window = tuple(s // self.config.patch_size for s in pixel_values.shape[2:])
        hidden = self.embed(pixel_values, layout, window, mask_embeddings)  # (batch, 1 + 1? + N, D)
        state, attention = self.run_blocks(
            hidden,
            layout,
            prompts,
            window,
            output_readout_attention=output_readout_attention,
            skip_unread_outputs=skip_unread_outputs and not recorded,
            gradient_checkpointing=gradient_checkpointing,
            **kwargs,
        )
        return self.read_out(state, layout, attention)

    def embed(
        self,
        pixel_values: torch.Tensor,
        layout: SequenceLayout,
        window: tuple[int, int],
        mask_embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Patch embeddings with CLS and [MASK] in place, before any prompt: `[CLS] + [MASK] + patches` when
        [MASK] is appended, `[CLS] + patches` (one of them replaced by [MASK], or none) otherwise."""
        batch = pixel_values.shape[0]
        bool_masked_pos = None
        if layout.mask_token == "replace":  # BEiT's embeddings put the pre-trained token in place, as in pre-training
            bool_masked_pos = torch.zeros(batch, window[0] * window[1], dtype=torch.bool, device=pixel_values.device)
            bool_masked_pos[:, layout.mask_position] = True
        embeddings = self.beit.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)  # (batch, 1 + N, D)
        if layout.mask_token is None or (layout.mask_token == "replace" and mask_embeddings is None):
            return embeddings
        mask = self.pretrained_mask_token if mask_embeddings is None else mask_embeddings
        mask = mask.to(embeddings.dtype).expand(batch, 1, -1)  # (batch, 1, D)
        if layout.mask_token == "append":
            return torch.cat([embeddings[:, :1], mask, embeddings[:, 1:]], dim=1)
        # another [MASK] embedding in place of the pre-trained one, keeping what the embeddings added to the slot
        # (an absolute position embedding, on backbones that have them)
        position = 1 + layout.mask_position
        slot = embeddings[:, position : position + 1]
        mask = mask + (slot - self.pretrained_mask_token.to(embeddings.dtype))
        return torch.cat([embeddings[:, :position], mask, embeddings[:, position + 1 :]], dim=1)

    def run_blocks(
        self,
        hidden: torch.Tensor,
        layout: SequenceLayout,
        prompts: torch.Tensor | None,
        window: tuple[int, int],
        output_readout_attention: bool = False,
        skip_unread_outputs: bool = True,
        gradient_checkpointing: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The blocks over the embedded sequence; prompts `(batch, blocks, P, D)` enter at each prompted block.

        Returns the read-out token's final state `(batch, D)` (before any layer norm) and the last block's read-out
        attention; `kwargs` go to each block's attention.

        Skipping unread outputs, prompts are stored *before* CLS, `P + [CLS] + [MASK]? + patches`, with the relative
        bias permuted to match: the same attention as the documented order `[CLS] + P + [MASK]? + patches` (attention
        has no order but the bias), and the prompt slots become a prefix, so skipping their outputs is a view instead
        of three copies per block. Computing every output, the blocks run on the documented order, which is what their
        hooks (transformers' hidden states and attentions) see. The read-out attention is in the documented order.
        """
        prompted, num_prompts = layout.prompted_layers, layout.prompt_length
        leading = num_prompts if skip_unread_outputs else 0  # prompts stored before CLS, or after it
        biases_before, biases_after = self.layout_biases(layout, window, leading)
        # gradient_checkpointing_enable() flags each BeitLayer and gives it its checkpoint function; the layers never
        # checkpoint by themselves here because the frozen backbone stays in eval mode, so this loop honours the flags.
        checkpointing = gradient_checkpointing and torch.is_grad_enabled()
        inserted = has_slots = False
        last = len(self.beit.layers) - 1
        attention = query = None
        for i, layer in enumerate(self.beit.layers):
            if i in prompted:
                block_prompts = prompts[:, prompted.index(i)].to(hidden.dtype)  # (batch, P, D)
                hidden = insert_prompts(hidden, block_prompts, bool(leading), num_prompts if has_slots else 0)
                inserted = has_slots = True
            biases = biases_after if inserted or not prompted else biases_before
            # of the read-out token, as stored; prompts are in by the last block
            index = token_index(layout.readout_offset, num_prompts if inserted else 0, bool(leading))
            if output_readout_attention and i == last:
                attention = readout_attention_probs(layer, hidden, biases[i], index)  # (batch, heads, L)
                if inserted and leading:
                    attention = attention[..., documented_order(num_prompts, hidden.shape[1])]
            query = index if skip_unread_outputs and i == last else None
            skip = 0
            if skip_unread_outputs and i < last and has_slots and (i + 1) in prompted:
                skip, has_slots = num_prompts, False  # the next block overwrites the prompt slots
            start, stop = (query, query + 1) if query is not None else (skip, hidden.shape[1])
            bias_rows = biases.rows(i, start, stop)  # of the queries computed
            checkpoint = checkpointing and layer.gradient_checkpointing
            hidden = layer(hidden, bias_rows, rows=slice(start, stop), checkpoint=checkpoint, **kwargs)
        state = hidden[:, 0] if query is not None else hidden[:, index]  # (batch, D)
        return state, attention

    def read_out(
        self, state: torch.Tensor, layout: SequenceLayout, attention: torch.Tensor | None = None
    ) -> PromptedBackboneOutput:
        """The read-out token's final state through the MIM head's layer norm, and the MIM head's prediction there
        when the layout has [MASK]."""
        state = self.beit.layernorm(state)  # per token; Identity for MIM checkpoints with mean pooling
        normed = self.layernorm(state)  # (batch, D)
        token_logits = self.lm_head(normed) if layout.mask_token is not None else None  # (batch, V)
        return PromptedBackboneOutput(
            readout_hidden_state=normed,
            visual_token_logits=token_logits,
            readout_attention=attention,
        )

    # ------------------------------------------------------------------------------------- position biases
    def layout_biases(
        self, layout: SequenceLayout, window: tuple[int, int], leading: int = 0
    ) -> tuple[BlockBiases | None, BlockBiases]:
        """The biases of the blocks before the first prompted one (None when there are none) and from it on, with the
        prompts stored before CLS when `leading` is the number of prompts, after it when 0."""
        num_extra_before = 1 if layout.mask_token == "append" else 0
        mode, num_prompts = layout.extra_token_bias, layout.prompt_length
        before = None
        if layout.prompted_layers and layout.prompted_layers[0] > 0:
            before = self.position_biases(window, num_extra_before, mode)
        return before, self.position_biases(window, num_extra_before + num_prompts, mode, leading=leading)

    def position_biases(self, window: tuple[int, int], num_extra: int, mode: str, leading: int = 0) -> BlockBiases:
        """Per-block attention bias, `(1, heads, L, L)` each, for a `window` patch grid with `num_extra` added tokens,
        `leading` of them before CLS (see `extend_relative_position_bias`).

        The bias tables are frozen, so the biases are constants: they are kept for the next call (keyed by the
        tables' storage and version counters, which `.to()`, `load_state_dict` and in-place edits change) instead
        of being interpolated, gathered and extended again for every batch, and so are the rows of them that
        partial blocks read. Trainable tables (and compilation) are never cached.
        """
        tables = [module.relative_position_bias_table for module in bias_modules(self.beit)]
        key = None
        if not torch.compiler.is_compiling() and not any(table.requires_grad for table in tables):
            key = (window, num_extra, mode, leading, torch.is_inference_mode_enabled())
            key += tuple((table.device, table.dtype, table.data_ptr(), table._version) for table in tables)
            if key in self._bias_cache:
                return self._bias_cache[key]
        biases = compute_position_biases(self.beit, window, num_extra, mode, leading)
        biases = BlockBiases(biases, keep_rows=key is not None)
        if key is not None:
            if len(self._bias_cache) >= BIAS_CACHE_SIZE:
                self._bias_cache.pop(next(iter(self._bias_cache)))
            self._bias_cache[key] = biases
        return biases

    def _apply(self, fn, *args, **kwargs):
        # .to(), .half(), .cuda() move or convert the tables; the kept biases would be stale copies holding memory
        self._bias_cache = {}
        return super()._apply(fn, *args, **kwargs)


class BlockBiases:
    """The attention bias of each block, `(1, heads, L, L)` (`None` for a block without one), for one layout and image
    size, and the rows of it that blocks computing only some outputs read (`rows`)."""

    def __init__(self, biases: list[torch.Tensor | None], keep_rows: bool) -> None:
        self.biases, self.keep_rows = biases, keep_rows
        self._rows: dict[tuple[int, int, int], torch.Tensor] = {}

    def __getitem__(self, block: int) -> torch.Tensor | None:
        return self.biases[block]

    def __len__(self) -> int:
        return len(self.biases)

    def rows(self, block: int, start: int, stop: int) -> torch.Tensor | None:
        """Rows `start:stop` of block `block`'s bias, `(1, heads, stop - start, L)`: the whole bias when those are all
        its rows, else a copy, kept with the biases when they are kept.

        A copy, not a view: a row slice of a bias whose length is not a multiple of 8 (61 tokens on the tiny backbone:
        1 + 10 prompts + [MASK] + 49 patches) starts at an offset that is not 16-byte aligned, which the compiled fused
        attention kernels misread on CUDA ("misaligned address"); a fresh tensor starts aligned, as the full-length
        bias of the other blocks does.
        """
        bias = self.biases[block]
        if bias is None or (start == 0 and stop == bias.shape[-2]):
            return bias
        key = (id(bias), start, stop)  # blocks sharing one bias tensor share its rows; the list keeps it alive
        if key in self._rows:
            return self._rows[key]
        rows = bias[:, :, start:stop].contiguous()
        if self.keep_rows:
            self._rows[key] = rows
        return rows


def check_backbone_tensors(own: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> None:
    """Refuses a checkpoint `source` that lacks a tensor of the backbone `own` or has one of another shape."""
    missing = sorted(set(own) - set(source))
    if missing:
        raise ValueError(f"the backbone checkpoint lacks {len(missing)} tensors VPTM needs, e.g. {missing[:5]}")
    for name, tensor in own.items():
        if tensor.shape != source[name].shape:
            raise ValueError(
                f"backbone tensor {name} has shape {tuple(source[name].shape)} in the checkpoint but "
                f"{tuple(tensor.shape)} in this model's config"
            )


def check_pixel_values(pixel_values: torch.Tensor, config: BeitConfig) -> None:
    """Refuses what a backbone of `config` cannot read, naming what it expected: not a 4-d float tensor, another
    channel count or image size, an empty batch."""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
        raise ValueError(f"pixel_values must be a tensor (batch, channels, height, width), got {shape}")
    if pixel_values.shape[1] != config.num_channels:
        raise ValueError(
            f"pixel_values must have {config.num_channels} channels (the backbone's num_channels), got "
            f"{pixel_values.shape[1]} in shape {tuple(pixel_values.shape)}"
        )
    height, width = pixel_values.shape[2:]
    expected = config.image_size
    expected = tuple(expected) if isinstance(expected, (list, tuple)) else (expected, expected)
    if (height, width) != expected:
        raise ValueError(
            f"pixel_values must be {expected[0]}x{expected[1]} (the backbone's image_size), got {height}x{width}; "
            "resize with the backbone's image processor"
        )
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values must be a floating-point tensor, got dtype {pixel_values.dtype}")
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values is an empty batch (batch size 0)")


def bias_modules(beit: BeitModel) -> list[nn.Module]:
    """`beit`'s relative position bias modules: the shared one and each block's own."""
    modules = [beit.shared_position_bias] if beit.shared_position_bias is not None else []
    return modules + [l.relative_position_bias for l in beit.layers if l.relative_position_bias is not None]


def compute_position_biases(
    beit: BeitModel, window: tuple[int, int], num_extra: int, mode: str, leading: int
) -> list[torch.Tensor | None]:
    """Each block's attention bias for a `window` patch grid with `num_extra` added tokens (`PromptedBackbone.
    position_biases` keeps them)."""
    num_tokens = 1 + window[0] * window[1]
    shared = None
    if beit.shared_position_bias is not None:
        shared = beit.shared_position_bias(window, dim_size=num_tokens)  # (1, heads, 1 + N, 1 + N)
        shared = extend_relative_position_bias(shared, num_extra, mode, leading)  # extended once for all blocks
    biases = []
    for layer in beit.layers:
        bias = shared
        if layer.relative_position_bias is not None:
            own = layer.relative_position_bias(window, dim_size=num_tokens)
            own = extend_relative_position_bias(own, num_extra, mode, leading)
            bias = own if bias is None else bias + own
        biases.append(bias)
    return biases


def extend_relative_position_bias(bias: torch.Tensor, num_extra: int, mode: str, leading: int = 0) -> torch.Tensor:
    """Extends a BEiT relative position bias `(1, heads, 1 + N, 1 + N)` to `num_extra` added tokens placed around
    CLS: `leading` of them before it, the rest right after it, the patches last.

    `mode="cls"` gives each added token the CLS entries: added->patch = CLS->patch, patch->added = patch->CLS,
    added<->added and added<->CLS = CLS->CLS. `mode="zero"` gives them zero bias. The CLS+patch block is copied
    unchanged. Returns `(1, heads, 1 + num_extra + N, 1 + num_extra + N)`.
    """
    if not 0 <= leading <= num_extra:
        raise ValueError(f"leading must be in [0, num_extra={num_extra}], got {leading}")
    if num_extra == 0:
        return bias
    length = bias.shape[-1]
    # position in the extended sequence -> position in the original one (added tokens act as CLS)
    index = torch.cat([torch.zeros(1 + num_extra, dtype=torch.long), torch.arange(1, length, dtype=torch.long)]).to(
        bias.device
    )
    extended = bias[:, :, index][:, :, :, index]  # (1, heads, 1 + E + N, 1 + E + N)
    if mode == "zero":
        added = [position for position in range(1 + num_extra) if position != leading]  # every slot but CLS
        extended = extended.clone()
        extended[:, :, added, :] = 0
        extended[:, :, :, added] = 0
    return extended


def backbone_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of the backbone tensors (float32 on the CPU), from a
    `BeitForMaskedImageModeling` or `PromptedBackbone` state dict (the same names)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        if not name.startswith(tuple(m + "." for m in BACKBONE_MODULES)):
            continue
        tensor = state_dict[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def documented_order(num_prompts: int, length: int) -> list[int]:
    """Index that turns the stored order `P + [CLS] + rest` into the documented `[CLS] + P + rest`."""
    return [num_prompts, *range(num_prompts), *range(num_prompts + 1, length)]


def insert_prompts(hidden: torch.Tensor, prompts: torch.Tensor, leading: bool, slots: int) -> torch.Tensor:
    """`hidden` `(batch, L, D)` with `prompts` `(batch, P, D)` in place of its first `slots` prompt slots (none when
    0): before CLS when `leading`, else right after it (the documented order)."""
    if leading:
        return torch.cat([prompts, hidden[:, slots:]], dim=1)  # (batch, P + 1 + 1? + N, D)
    return torch.cat([hidden[:, :1], prompts, hidden[:, 1 + slots :]], dim=1)  # (batch, 1 + P + 1? + N, D)


def token_index(offset: int, num_prompts: int, leading: bool) -> int:
    """Where the token at `offset` of `[CLS] + [MASK]? + patches` is once `num_prompts` prompts are in: all tokens
    move when the prompts are stored before CLS, all but CLS when they follow it."""
    return offset + num_prompts if leading or offset > 0 else offset


def prompted_block(
    layer: BeitLayer, hidden: torch.Tensor, bias: torch.Tensor | None, rows: slice, **kwargs
) -> torch.Tensor:
    """One BEiT block with an explicit attention bias (the layer's own bias is in `bias` already), computing the
    outputs of the query tokens `rows` only: every token stays a key and value, so skipping outputs nobody reads is
    exact.

    `rows` all of them (`slice(0, L)`) gives `(batch, L, D)`, through the layer's own attention module (which takes
    `kwargs`: transformers' `output_attentions`, ...); a single row, the read-out token alone, `(batch, 1, D)`;
    `slice(skip, L)`, every output but the first `skip` rows (the prompt slots that the next block overwrites),
    `(batch, L - skip, D)`. `bias` holds the rows of the outputs computed (`BlockBiases.rows`).
    """
    normed = layer.layernorm_before(hidden)
    if rows.start == 0 and rows.stop == hidden.shape[1]:
        attention, _ = layer.attention(normed, attention_mask=bias, **kwargs)
        residual = hidden
    else:
        residual = hidden[:, rows]  # a view, no copy
        attention = partial_attention(layer.attention, normed, rows, bias)
    hidden = layer.drop_path(layer.lambda_1 * layer.dropout(attention)) + residual
    mlp = layer.dropout(layer.mlp(layer.layernorm_after(hidden)))
    return layer.drop_path(layer.lambda_2 * mlp) + hidden


def partial_attention(attention, normed: torch.Tensor, rows: slice, bias_rows: torch.Tensor | None) -> torch.Tensor:
    """`BeitAttention` for the query tokens `rows` of `normed` `(batch, L, D)` against all L keys and values."""
    batch, length, _ = normed.shape
    heads, head_dim = attention.num_attention_heads, attention.head_dim
    if rows.stop is not None and rows.stop - rows.start == 1:
        query = attention.q_proj(normed[:, rows.start])  # (batch, D): a strided matrix, still one matmul
    else:
        # the projection of every row, then the view of the wanted ones: one matmul, where projecting the rows'
        # view (not a matrix) takes a batched matmul and a separate bias add, or a copy first
        query = attention.q_proj(normed)[:, rows]
    num_queries = query.shape[1] if query.ndim == 3 else 1
    query = query.view(batch, num_queries, heads, head_dim).transpose(1, 2)
    key = attention.k_proj(normed).view(batch, length, heads, head_dim).transpose(1, 2)
    value = attention.v_proj(normed).view(batch, length, heads, head_dim).transpose(1, 2)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager_attention_forward)
    # bias_rows: (1, heads, Lq, L)
    out, _ = interface(attention, query, key, value, bias_rows, dropout=0.0, scaling=attention.scaling)
    return attention.o_proj(out.reshape(batch, num_queries, heads * head_dim))


def readout_attention_probs(
    layer: BeitLayer, hidden: torch.Tensor, bias: torch.Tensor | None, index: int
) -> torch.Tensor:
    """Attention probabilities of token `index` over all tokens in `layer`, `(batch, heads, L)`; the same scores
    the block computes (scaled dot product plus the relative position bias), made explicit because fused attention
    kernels do not return them."""
    attention = layer.attention
    normed = layer.layernorm_before(hidden)
    batch, length, _ = normed.shape
    heads, head_dim = attention.num_attention_heads, attention.head_dim
    query = attention.q_proj(normed[:, index : index + 1]).view(batch, 1, heads, head_dim).transpose(1, 2)
    key = attention.k_proj(normed).view(batch, length, heads, head_dim).transpose(1, 2)
    scores = (query @ key.transpose(-1, -2)).float() * attention.scaling  # (batch, heads, 1, L)
    if bias is not None:
        scores = scores + bias[:, :, index : index + 1].float()
    return scores.softmax(-1)[:, :, 0]


__all__ = [
    "PromptedBackbone",
    "PromptedBackboneOutput",
    "PromptedBeitLayer",
    "SequenceLayout",
    "backbone_fingerprint",
    "extend_relative_position_bias",
]
