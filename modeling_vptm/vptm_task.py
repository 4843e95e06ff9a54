"""A VPTM (or VPT) task: everything that is trained and saved, nothing of the frozen backbone.

`VPTMTask` holds a task's prompts, its optional trained [MASK] embedding and its head: the prototypical verbalizer
(VPTM), two of them (`head_input="ensemble"`), or a linear head (`linear_cls`, the VPT baseline, or
`linear_mask`). It reads what the prompted backbone returns (`PromptedBackboneOutput`) and returns a named
`TaskHeadOutput`. `VPTMForImageClassification`, its class-mean prototype init and the multi-task server all use it,
and its `state_dict()` is exactly what a prompt checkpoint holds. This is a Hub code file: it imports only torch,
transformers and its sibling files.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers.utils import logging

from .checkpoint_checks import check_task_tensors
from .configuration_vptm import VPTMConfig
from .limits import MAX_TASK_PARAMETERS
from .prompted_backbone import PromptedBackboneOutput, SequenceLayout


logger = logging.get_logger(__name__)


class VPTMPromptEmbeddings(nn.Module):
    """The learnable prompts: `prompt_length` tokens for each prompted block, `(num_prompted_blocks, P, D)`."""

    def __init__(self, config: VPTMConfig) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.zeros(len(config.prompted_layers), config.prompt_length, config.hidden_size))

    def forward(self) -> torch.Tensor:
        return self.prompts


class PrototypicalVerbalizer(nn.Module):
    """Maps a read-out vector to class logits by cosine similarity with learnable class prototypes.

    `(batch, input_dim)` -> projection without bias to `prototype_dim` -> cosine with `num_labels *
    prototypes_per_class` prototypes -> max over each class's prototypes -> times a scale `s`. Knows nothing of
    BEiT: any `(batch, input_dim)` tensor works.
    """

    def __init__(
        self,
        input_dim: int,
        num_labels: int,
        prototype_dim: int = 64,
        prototypes_per_class: int = 1,
        logit_scale_init: float = 10.0,
        learn_logit_scale: bool = True,
    ) -> None:
        super().__init__()
        self.num_labels, self.prototypes_per_class = num_labels, prototypes_per_class
        self.logit_scale_init = logit_scale_init
        self.projection = nn.Linear(input_dim, prototype_dim, bias=False)
        self.prototypes = nn.Parameter(torch.zeros(num_labels * prototypes_per_class, prototype_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)), requires_grad=learn_logit_scale)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Unit-norm projected features, `(batch, prototype_dim)`."""
        return F.normalize(self.projection(features), dim=-1)

    def class_cosine(self, projected: torch.Tensor) -> torch.Tensor:
        """Cosine of unit-norm projected features with each class's best prototype, `(batch, num_labels)`."""
        return self.best_of_class(projected @ F.normalize(self.prototypes, dim=-1).T)

    def best_of_class(self, cosine: torch.Tensor) -> torch.Tensor:
        """`(rows, num_labels * M)` cosines with every prototype -> with each class's best, `(rows, num_labels)`."""
        return cosine.view(-1, self.num_labels, self.prototypes_per_class).amax(-1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns `(class_logits (batch, num_labels), projected (batch, prototype_dim), cosine (batch, num_labels))`:
        the scaled cosines, the unit-norm projected features, and their cosine with each class's best prototype."""
        projected = self.project(features)
        cosine = self.class_cosine(projected)
        return self.logit_scale * cosine, projected, cosine

    @torch.no_grad()
    def set_prototypes_from_features(self, features: torch.Tensor, labels: torch.Tensor) -> list[int]:
        """Sets every prototype of class k to the mean projected feature of class k (the `class_mean` init).

        Classes without examples keep their current prototypes; their indices are returned (and logged).
        """
        projected = self.project(features.to(self.projection.weight.dtype))
        missing = []
        for k in range(self.num_labels):
            chosen = labels == k
            if not chosen.any():
                missing.append(k)
                continue
            rows = slice(k * self.prototypes_per_class, (k + 1) * self.prototypes_per_class)
            self.prototypes[rows] = projected[chosen].mean(0)
        if missing:
            logger.warning("class-mean prototypes: no examples of classes %s; they keep their random init", missing)
        return missing


@dataclass
class TaskHeadOutput:
    r"""
    What a task's head makes of the prompted backbone's read-out.

    Attributes:
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Class scores (for `"ensemble"`, the mean of the two paths' per-image standardised class logits).
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            The training loss (see `VPTMTask.loss`), when labels were given.
        path_logits (`tuple(torch.FloatTensor)`):
            Class logits of each verbalizer (one, or two for `"ensemble"`: token path, then hidden path), or of the
            linear head; each path is trained with its own cross-entropy.
        projected (`tuple(torch.FloatTensor)`):
            Unit-norm projected features `(batch_size, prototype_dim)` of each verbalizer (empty for a linear head).
        prototype_cosine (`tuple(torch.FloatTensor)`):
            Cosine of those features with each class's best prototype, `(batch_size, num_labels)` per verbalizer.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    path_logits: tuple[torch.Tensor, ...] = ()
    projected: tuple[torch.Tensor, ...] = ()
    prototype_cosine: tuple[torch.Tensor, ...] = ()


class VPTMTask(nn.Module):
    """One task on a frozen BEiT MIM backbone: prompts, [MASK] embedding, read-out choice and head.

    The tensors keep the names prompt checkpoints have always used (`prompt_embeddings.prompts`,
    `trainable_mask_token`, `verbalizer.*`, `hidden_verbalizer.*`, `classifier.*`).
    """

    def __init__(self, config: VPTMConfig) -> None:
        super().__init__()
        self.config = config
        self._head_signature: tuple[Hashable, ...] | None = None  # see `head_signature`
        self.prompt_embeddings = VPTMPromptEmbeddings(config) if config.prompted_layers else None
        self.trainable_mask_token = (
            nn.Parameter(torch.zeros(1, 1, config.hidden_size))
            if config.train_mask_token and config.reads_mask_token
            else None
        )
        self.verbalizer = self.hidden_verbalizer = self.classifier = None
        if config.classifier == "prototypical_verbalizer":
            # "ensemble": `verbalizer` reads the MIM logits, `hidden_verbalizer` the hidden state
            self.verbalizer = self._verbalizer(
                config.hidden_size if config.head_input == "hidden" else config.vocab_size
            )
            if config.head_input == "ensemble":
                self.hidden_verbalizer = self._verbalizer(config.hidden_size)
        else:
            reads_logits = config.classifier == "linear_mask" and config.head_input != "hidden"
            self.classifier = nn.Linear(config.vocab_size if reads_logits else config.hidden_size, config.num_labels)

    def _verbalizer(self, input_dim: int) -> PrototypicalVerbalizer:
        config = self.config
        return PrototypicalVerbalizer(
            input_dim,
            config.num_labels,
            config.prototype_dim,
            config.prototypes_per_class,
            config.logit_scale_init,
            config.learn_logit_scale,
        )

    # ------------------------------------------------------------------------------- what the backbone takes
    @property
    def layout(self) -> SequenceLayout:
        """Where this task's tokens go; tasks with equal layouts can share one backbone pass."""
        return SequenceLayout.from_config(self.config)

    def prompts(self) -> torch.Tensor | None:
        """`(num_prompted_blocks, P, D)`, or `None` for a task without prompts (linear probe)."""
        return None if self.prompt_embeddings is None else self.prompt_embeddings()

    def mask_embedding(self) -> torch.Tensor | None:
        """The trained [MASK] embedding `(1, 1, D)`, or `None` for the backbone's pre-trained one."""
        return self.trainable_mask_token

    # -------------------------------------------------------------------------------------------------- head
    @property
    def head_signature(self) -> tuple[Hashable, ...]:
        """Tasks with equal signatures have heads of the same kind, reading the same features, with tensors of the same
        shapes (for verbalizers, also the same number of prototypes per class): what lets a server run their heads
        stacked (`head_logits`). Computed once: the config and the tensors' shapes are fixed from
        construction (loading weights keeps them), and a server asks on every call."""
        if self._head_signature is None:
            config = self.config
            reads = "hidden" if config.classifier == "linear_cls" else config.head_input  # linear_cls reads CLS
            per_class = config.prototypes_per_class if config.classifier == "prototypical_verbalizer" else None
            shapes = tuple((name, tuple(p.shape)) for m in self.head_modules() for name, p in m.named_parameters())
            self._head_signature = (config.classifier, reads, per_class, shapes)
        return self._head_signature

    def head_modules(self) -> list[nn.Module]:
        """The head's paths: the verbalizer (or the linear head), then, for `"ensemble"`, the hidden verbalizer."""
        paths = [self.verbalizer if self.classifier is None else self.classifier]
        return paths if self.hidden_verbalizer is None else [*paths, self.hidden_verbalizer]

    def head_features(self, readout: PromptedBackboneOutput) -> list[torch.Tensor]:
        """What each head path reads (`head_modules` order): the normed read-out state, or the MIM head's logits at
        [MASK] (raw, standardised per image, or as probabilities), by `head_input`."""
        config, normed, token_logits = self.config, readout.readout_hidden_state, readout.visual_token_logits
        if config.classifier == "linear_cls" or config.head_input == "hidden":
            features = normed
        elif config.head_input == "probs":
            features = token_logits.float().softmax(-1).to(token_logits.dtype)
        elif config.head_input == "normalized_logits":
            features = F.layer_norm(token_logits.float(), token_logits.shape[-1:]).to(token_logits.dtype)
        else:  # "logits", and the token path of "ensemble"
            features = token_logits
        return [features] if self.hidden_verbalizer is None else [features, normed]

    def head_inputs(self, readout: PromptedBackboneOutput) -> list[tuple[nn.Module, torch.Tensor]]:
        """Each head path with what it reads (`head_modules` with `head_features`)."""
        return list(zip(self.head_modules(), self.head_features(readout), strict=True))

    def forward(self, readout: PromptedBackboneOutput, labels: torch.Tensor | None = None) -> TaskHeadOutput:
        """Class logits (and, with `labels` `(batch,)`, the loss) from the prompted backbone's read-out."""
        head = head_logits([self], readout)
        if labels is not None:
            head.loss = self.loss(head, labels)
        return head

    def loss(self, head: TaskHeadOutput, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each path (averaged over paths) plus ProtoVerb's weighted contrastive terms."""
        config = self.config
        loss = torch.stack([F.cross_entropy(l.float(), labels) for l in head.path_logits]).mean()
        temperature = config.contrastive_temperature
        for feature, cosine in zip(head.projected, head.prototype_cosine, strict=True):
            if config.prototype_contrastive_weight > 0:
                loss = loss + config.prototype_contrastive_weight * prototype_contrastive_loss(
                    cosine.float(), labels, temperature
                )
            if config.instance_contrastive_weight > 0:
                loss = loss + config.instance_contrastive_weight * instance_contrastive_loss(
                    feature.float(), labels, temperature
                )
        return loss

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor], source: str = "the checkpoint") -> None:
        """Loads a prompt checkpoint's tensors, refusing missing, unexpected or wrongly shaped ones by name."""
        check_task_tensors(tensors, self.state_dict(), source)
        self.load_state_dict(tensors)

    @torch.no_grad()
    def set_class_mean_prototypes(self, features: list[torch.Tensor], labels: torch.Tensor) -> None:
        """The `class_mean` prototype init: each verbalizer's prototypes set to the mean projected feature of their
        class. `features` holds, per head path, what `head_inputs` gave for the examples; `labels` theirs."""
        if self.verbalizer is None:
            raise ValueError(
                f"class-mean prototypes need the prototypical verbalizer, not classifier={self.config.classifier!r}"
            )
        verbalizers = [v for v in (self.verbalizer, self.hidden_verbalizer) if v is not None]
        for verbalizer, path_features in zip(verbalizers, features, strict=True):
            verbalizer.set_prototypes_from_features(path_features, labels)


def head_logits(
    tasks: Sequence[VPTMTask], readout: PromptedBackboneOutput, own: torch.Tensor | None = None
) -> TaskHeadOutput:
    """What the heads of one task, or of several tasks whose heads have equal `head_signature`s, make of a read-out.

    One task (`own` None): each head path through its own modules, as they are trained (a PEFT adapter on them
    included). Several tasks (a server's mixed batch): each head operation runs once for all of them, their weights
    placed side by side (`len(tasks)` times one head's arithmetic, still far below the backbone's), and every image
    keeps its own task's output: `own` `(images,)` indexes the `(image, task)` pairs flattened as
    `image * len(tasks) + task`. Equal, to rounding, to each task's own head on its images.
    """
    if len(tasks) > 1 and len({task.head_signature for task in tasks}) != 1:
        signatures = sorted(map(str, {task.head_signature for task in tasks}))
        raise ValueError(f"heads stack only when their signatures are equal, got {signatures}")
    path_logits, projected, cosine = [], [], []
    paths = zip(*(task.head_modules() for task in tasks), strict=True)  # per path, its module in every task
    # what each path reads depends on the signature only, so the first task's features are every task's
    for modules, features in zip(paths, tasks[0].head_features(readout), strict=True):
        if isinstance(modules[0], PrototypicalVerbalizer):
            logits, path_projected, path_cosine = verbalize(modules, features, own)
            projected.append(path_projected)
            cosine.append(path_cosine)
        else:
            logits = linear_logits(modules, features, own)
        path_logits.append(logits)
    return TaskHeadOutput(
        logits=combine_path_logits(path_logits),
        path_logits=tuple(path_logits),
        projected=tuple(projected),
        prototype_cosine=tuple(cosine),
    )


def verbalize(
    verbalizers: Sequence[PrototypicalVerbalizer], features: torch.Tensor, own: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(class_logits, projected, cosine)` of `features` `(images, input_dim)` under one verbalizer (its forward), or
    each image under its own of several verbalizers of equal shapes, stacked (see `head_logits` for `own`)."""
    if len(verbalizers) == 1:
        return verbalizers[0](features)
    first, n, k = verbalizers[0], features.shape[0], len(verbalizers)
    projected = F.linear(features, torch.cat([v.projection.weight for v in verbalizers]))  # (n, k * dim)
    projected = F.normalize(projected.view(n * k, -1).index_select(0, own), dim=-1)  # (n, dim): each its own task's
    prototypes = F.normalize(torch.cat([v.prototypes for v in verbalizers]), dim=-1)  # (k * labels * M, dim)
    cosine = first.best_of_class((projected @ prototypes.T).view(n * k, -1))  # (n * k, labels)
    scales = torch.stack([v.logit_scale for v in verbalizers]).view(1, k, 1)
    logits = (scales * cosine.view(n, k, -1)).reshape(n * k, -1).index_select(0, own)  # (n, labels)
    return logits, projected, cosine.index_select(0, own)


def linear_logits(
    linears: Sequence[nn.Linear], features: torch.Tensor, own: torch.Tensor | None = None
) -> torch.Tensor:
    """Class logits of `features` under one linear head (its forward), or each image under its own of several linear
    heads of equal shapes, stacked (see `head_logits` for `own`)."""
    if len(linears) == 1:
        return linears[0](features)
    n, k = features.shape[0], len(linears)
    logits = F.linear(features, torch.cat([m.weight for m in linears]), torch.cat([m.bias for m in linears]))
    return logits.view(n * k, -1).index_select(0, own)  # (n, labels)


def task_tensor_shapes(config: VPTMConfig) -> dict[str, torch.Size]:
    """The names and shapes of the tensors a task of `config` holds (what its prompt checkpoint must hold), worked
    out on the meta device, so nothing is allocated; a task of more than `MAX_TASK_PARAMETERS` is refused."""
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in VPTMTask(config).state_dict().items()}
    total = sum(shape.numel() for shape in shapes.values())
    if total > MAX_TASK_PARAMETERS:
        sizes = ", ".join(f"{name} {tuple(shape)}" for name, shape in shapes.items())
        raise ValueError(
            f"a task of this config holds {total:,} parameters ({sizes}); at most {MAX_TASK_PARAMETERS:,}"
        )
    return shapes


def combine_path_logits(path_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """A head's class logits from its paths': the one path's, or (`"ensemble"`) the mean of their standardised ones."""
    if len(path_logits) == 1:
        return path_logits[0]
    return torch.stack([standardize_class_logits(l) for l in path_logits]).mean(0)  # (batch, num_labels)


def standardize_class_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-image z-score over the classes (zero mean, unit variance), so that verbalizers of different scales can be
    averaged, as ProtoVerb ensembles its verbalizers."""
    return F.layer_norm(logits.float(), logits.shape[-1:]).to(logits.dtype)


def prototype_contrastive_loss(cosine: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """ProtoVerb's instance–prototype loss: InfoNCE of each instance against the class prototypes.

    `cosine` `(batch, num_labels)` holds each instance's cosine with each class's prototype; the loss is
    `-log(exp(cos_iy / t) / sum_k exp(cos_ik / t))` averaged over the batch.
    """
    return F.cross_entropy(cosine / temperature, labels)


def instance_contrastive_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """ProtoVerb's instance–instance loss on unit-norm `(batch, d)` features.

    Each ordered pair (i, j) of distinct instances of the same class is contrasted with the instances of the other
    classes only: `-log(e_ij / (e_ij + sum_{k: y_k != y_i} e_ik))` with `e_ij = exp(cos(v_i, v_j) / t)`, averaged over
    the pairs (unlike the supervised contrastive loss of Khosla et al., the other positives are not in the
    denominator). Zero when the batch holds no such pair.
    """
    similarity = features @ features.T / temperature  # (batch, batch)
    same = labels[:, None] == labels[None, :]
    positives = same & ~torch.eye(len(features), dtype=torch.bool, device=features.device)
    negatives = similarity.masked_fill(same, float("-inf")).logsumexp(dim=1, keepdim=True)  # (batch, 1)
    # -log(e^s / (e^s + e^n)) = log(1 + e^(n - s)) = softplus(n - s); exp(-inf) = 0 when a row has no negatives
    pair_losses = F.softplus(negatives - similarity)  # (batch, batch)
    # the mean over the positive pairs as a masked sum over their count (at least 1): no data-dependent shape or
    # branch, so a training step never waits for the device to learn whether the batch holds a pair
    total = torch.where(positives, pair_losses, 0.0).sum()
    return total / positives.sum().clamp(min=1)


__all__ = ["PrototypicalVerbalizer", "TaskHeadOutput", "VPTMPromptEmbeddings", "VPTMTask"]


def check_training_batch(pixel_values: torch.Tensor, labels: torch.Tensor, num_labels: int) -> None:
    """Refuses a training batch whose labels are misshapen or out of `[0, num_labels)`, or whose images are not
    finite (training on them would silently turn the loss, then the prompts, into NaN). In inference a non-finite
    image only gives that image non-finite logits, so it is not checked there (the check would cost a device sync
    per batch). Both checks share one read of the device, and only a failing batch pays for the details."""
    if labels.shape != pixel_values.shape[:1]:
        raise ValueError(f"labels must have shape ({pixel_values.shape[0]},), got {tuple(labels.shape)}")
    finite = torch.isfinite(pixel_values).all()
    in_range = ((labels >= 0) & (labels < num_labels)).all().to(finite.device)
    if bool(finite & in_range):
        return
    if not finite:
        bad = (~torch.isfinite(pixel_values)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"pixel_values hold NaN or infinite values (images {bad} of the batch)")
    bad = labels[(labels < 0) | (labels >= num_labels)]
    raise ValueError(f"labels must be in [0, {num_labels}), got {bad.unique().tolist()}")
