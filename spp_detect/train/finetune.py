"""Fine-tuning of the head by SGD on pooled windows, with a resumable checkpoint
(docs/method.md#fine-tuning-and-sampling).

Shapes: I iterations of a block, B windows per minibatch, R windows (of the pool or held out),
D pooled feature dim, K foreground classes.

Windows are redrawn every block of I iterations; a block's draw depends only on (seed, block), so
a run resumed from a checkpoint (head, optimizer, dropout RNG, running sums, taken every
``checkpoint_every`` iterations) ends with the same weights as one never interrupted. The last
iteration is kept: no model selection on any split
(docs/method.md#where-we-differ-from-the-original, test-set leakage).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from spp_detect.errors import UserError
from spp_detect.models.features import FeatureSource
from spp_detect.models.head import (
    BOX_DELTA_STDS,
    BatchRows,
    Head,
    init_from_classifier,
    init_random,
    normalization_from_moments,
    pooled_moments,
)
from spp_detect.ops.spp import pyramid_dim
from spp_detect.runtime.artifacts import load_torch, save_torch
from spp_detect.runtime.distributed import Dist
from spp_detect.structures import ImageRecord
from spp_detect.train.sampling import (
    Block,
    WindowPool,
    group_by_entry,
    sample_block,
    sample_eval_windows,
)

logger = logging.getLogger(__name__)

# Pooled float16 features held for one block of iterations (1 GiB: 327 iterations at D = 12,800).
# Every block reads the maps of every image it samples from, about the whole split, as the
# original does every 500 iterations (docs/method.md#fine-tuning-and-sampling): larger blocks
# mean fewer passes over the cache.
BLOCK_BYTES = 1 << 30
MAX_BLOCK_ITERATIONS = 500  # windows are redrawn every 500 iterations, as in the original
EVAL_BATCHES = 500  # held-out accuracy on up to 500 minibatches at the best scale, as the original
EVAL_SEED = 0  # fixed draw of the held-out windows, the same for every run
POSTFIX_EVERY = 10  # iterations between tqdm loss updates


BIAS_LR_MULT = 2.0  # biases learn twice as fast as weights (released code: Caffe blobs_lr 1/2)
LR_STEP_FACTOR = 0.1  # lr × 0.1 at each step (released code's "vstep")


def make_optimizer(head: Head, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with the released code's multipliers (docs/method.md#fine-tuning-and-sampling):
    lr ×1 weights, ×2 biases; no weight decay on the classifier bias. Each group's ``lr_mult``
    scales the rate ``set_learning_rate`` gives."""
    groups = [
        {"params": [head.fc6.weight, head.fc7.weight, head.cls.weight], "lr_mult": 1.0},
        {"params": [head.fc6.bias, head.fc7.bias], "lr_mult": BIAS_LR_MULT},
        {"params": [head.cls.bias], "lr_mult": BIAS_LR_MULT, "weight_decay": 0.0},
    ]
    if head.bbox is not None:
        groups.append({"params": [head.bbox.weight], "lr_mult": 1.0})
        groups.append({"params": [head.bbox.bias], "lr_mult": BIAS_LR_MULT, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=0.0, momentum=momentum, weight_decay=weight_decay)


def step_learning_rate(iteration: int, base_lr: float, lr_steps: Sequence[int]) -> float:
    """The rate at (0-based) ``iteration``: ``base_lr`` × 0.1 per step boundary reached."""
    return base_lr * LR_STEP_FACTOR ** sum(iteration >= step for step in lr_steps)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]


@dataclass(frozen=True)
class SgdSchedule:
    """SGD and sampling settings (the config's `finetune` section; defaults and sources live
    there)."""

    iterations: int
    batch_size: int
    fg_fraction: float
    lr: float
    lr_steps: tuple[int, ...]
    momentum: float
    weight_decay: float
    seed: int
    checkpoint_every: int
    log_every: int
    box_loss_weight: float = 0.0  # > 0: the head's box branch trains with smooth L1 (Fast R-CNN)


@dataclass
class _Progress:
    """What the training loop carries between iterations, checkpointed with the weights."""

    iteration: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    history: list[dict] = field(default_factory=list)

    def add(self, loss: float, correct: int, count: int) -> None:
        self.iteration += 1
        self.loss_sum += loss * count
        self.correct += correct
        self.seen += count

    def flush(self, lr: float) -> dict:
        entry = {
            "iteration": self.iteration,
            "loss": self.loss_sum / max(self.seen, 1),
            "accuracy": self.correct / max(self.seen, 1),
            "lr": lr,
        }
        self.history.append(entry)
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0
        return entry


@dataclass
class TrainingWindows:
    """The training split, ready to sample: records, feature source, labelled windows."""

    records: Sequence[ImageRecord]
    source: FeatureSource
    pool: WindowPool
    labels: torch.Tensor  # (R,) int64 on the device, the pool's labels
    feature_dim: int
    block_iterations: int  # I


@dataclass
class Trainer:
    """Everything a checkpoint saves: weights, optimizer, dropout RNG, progress.

    ``identity`` (plain values naming the run's settings) must match for a checkpoint to resume.
    """

    head: Head
    optimizer: torch.optim.SGD
    generator: torch.Generator
    identity: dict
    normalize_inputs: bool  # random fc6/fc7: standardise pooled inputs, stats of block 0
    progress: _Progress = field(default_factory=_Progress)
    trunk: torch.nn.Module | None = None  # end-to-end fine-tuning: the conv trunk it trains


@dataclass(frozen=True)
class HeadShape:
    """What a new head is built for: pooled inputs D = C·Σn² from ``channels`` C and pyramid
    ``levels``, ``fc_dim`` F, ``num_classes`` K, ``dropout``."""

    channels: int
    levels: tuple[int, ...]
    fc_dim: int
    num_classes: int
    dropout: float
    box_branch: bool = False

    @property
    def feature_dim(self) -> int:
        return pyramid_dim(self.channels, self.levels)


def new_trainer(
    shape: HeadShape,
    schedule: SgdSchedule,
    classifier: Mapping[str, torch.Tensor] | None,
    identity: dict,
    device: torch.device,
    trunk: torch.nn.Module | None = None,
) -> Trainer:
    """A head of ``shape`` on ``device``, initialised from the pretrained ``classifier``
    (fc6/fc7 state) when there is one, else at random (seeded); its SGD optimizer and dropout
    generator. ``trunk``: conv layers trained with it (their parameters join the optimizer
    through ``finetune_conv.add_trunk_to_optimizer``)."""
    head = Head(shape.feature_dim, shape.fc_dim, shape.num_classes, shape.dropout, shape.box_branch)
    init_random(head, torch.Generator().manual_seed(schedule.seed))
    if classifier is not None:
        init_from_classifier(head, classifier, shape.channels, shape.levels)
    head.to(device)
    return Trainer(
        head=head,
        optimizer=make_optimizer(head, schedule.momentum, schedule.weight_decay),
        generator=torch.Generator(device=device).manual_seed(schedule.seed + 1),
        identity=identity,
        normalize_inputs=classifier is None,
        trunk=trunk,
    )


# step(iteration) runs one SGD step and returns (mean loss, windows right, windows seen)
StepFn = Callable[[int], tuple[float, int, int]]


def train(
    trainer: Trainer,
    windows: TrainingWindows,
    schedule: SgdSchedule,
    checkpoint_path: Path,
    total: int,
    validation: tuple[torch.Tensor, torch.Tensor] | None,
    dist: Dist | None = None,
) -> tuple[float, float]:
    """Fine-tune the head on pooled windows from the trainer's iteration up to ``total``
    (≤ ``schedule.iterations``): a block of I iterations is drawn and pooled every I iterations.
    ``validation``: held-out features (R, D) and labels (R,) whose window accuracy each history
    entry records.

    ``dist`` (under torchrun): data parallel with the global minibatch of one process. Every
    rank draws the same blocks, pools and steps on its own columns of each minibatch
    (``RankShare``), and the gradients are summed over the ranks before every step, so each
    rank holds the model one process would train, up to the order of float sums. Only rank 0
    writes checkpoints.

    Returns the seconds spent pooling blocks and in SGD steps.
    """
    head = trainer.head
    dist = dist or Dist()
    state: dict = {"index": -1, "seconds": 0.0}

    def step(iteration: int) -> tuple[float, int, int]:
        if iteration // windows.block_iterations != state["index"]:
            started = time.perf_counter()
            state["index"] = iteration // windows.block_iterations
            state["block"], state["features"], state["share"] = _pool_next_block(
                trainer, windows, schedule, state["index"], dist
            )
            state["seconds"] += time.perf_counter() - started
        row = iteration - state["index"] * windows.block_iterations
        width = state["block"].window_index.shape[1]  # this rank's windows per minibatch
        rows = slice(row * width, (row + 1) * width)
        window_index = state["block"].window_index[row]
        targets = windows.labels[torch.as_tensor(window_index)]
        box_targets = torch.as_tensor(windows.pool.box_targets[window_index])
        loss, correct = train_step(
            head, trainer.optimizer, state["features"][rows], targets, trainer.generator,
            box_targets, schedule.box_loss_weight, state["share"],
        )  # fmt: skip
        share = state["share"]
        return loss, correct, share.rows.total if share else len(targets)

    def validate() -> float | None:
        if validation is None:
            return None
        accuracy = window_accuracy(head, *validation)
        head.train()
        return accuracy

    checkpoints = checkpoint_path if dist.is_main else None
    seconds = run_sgd(trainer, schedule, checkpoints, total, step, validate)
    return state["seconds"], seconds - state["seconds"]


def run_sgd(
    trainer: Trainer,
    schedule: SgdSchedule,
    checkpoint_path: Path | None,
    total: int,
    step: StepFn,
    validate: Callable[[], float | None] = lambda: None,
) -> float:
    """The SGD loop shared by head-only and end-to-end fine-tuning: from the trainer's
    iteration up to ``total``, set the stepped learning rate, ``step``, log every
    ``log_every`` (with ``validate()``'s accuracy when it gives one), checkpoint every
    ``checkpoint_every`` to ``checkpoint_path`` (None: no checkpoints, as on the ranks other
    than 0). Returns the seconds spent in ``step``."""
    progress = trainer.progress
    seconds = 0.0
    trainer.head.train()
    bar = tqdm(total=schedule.iterations, initial=progress.iteration, desc="finetune", unit="it")
    with bar:
        while progress.iteration < total:
            lr = step_learning_rate(progress.iteration, schedule.lr, schedule.lr_steps)
            set_learning_rate(trainer.optimizer, lr)
            started = time.perf_counter()
            loss, correct, count = step(progress.iteration)
            seconds += time.perf_counter() - started
            _check_loss(loss, progress.iteration, schedule.lr)
            progress.add(loss, correct, count)
            bar.update(1)
            if progress.iteration % POSTFIX_EVERY == 0:
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.0e}", refresh=False)
            done = progress.iteration == schedule.iterations
            if progress.iteration % schedule.log_every == 0 or done:
                entry = progress.flush(lr)
                accuracy = validate()
                if accuracy is not None:
                    entry["val_accuracy"] = accuracy
            # the finished run saves its head instead; a checkpoint there would only be deleted
            due = progress.iteration % schedule.checkpoint_every == 0 and not done
            if due and checkpoint_path is not None:
                _save_checkpoint(checkpoint_path, trainer)
    return seconds


def _pool_next_block(
    trainer: Trainer,
    windows: TrainingWindows,
    schedule: SgdSchedule,
    block_index: int,
    dist: Dist,
) -> tuple[Block, torch.Tensor, RankShare | None]:
    """Draw block ``block_index`` (shorter at the end of training) and pool it, or under
    torchrun this rank's columns of it (then the block returned holds those columns, and the
    share says which); the first block of a randomly initialised head also sets its input
    normalisation, from the moments of every rank's windows."""
    block_start = block_index * windows.block_iterations
    block = sample_block(
        windows.pool, block_index, min(windows.block_iterations, schedule.iterations - block_start),
        schedule.batch_size, schedule.fg_fraction, len(windows.source.scales), schedule.seed,
    )  # fmt: skip
    share = RankShare.of(dist, block.window_index.shape[1])
    if share is not None:
        columns = slice(share.rows.start, share.rows.stop)
        block = Block(block.window_index[:, columns], block.scale_index[:, columns])
    features = pool_block(windows.source, windows.records, windows.pool, block)
    if block_index == 0 and trainer.normalize_inputs:
        moments = dist.all_reduce_sum(pooled_moments(features))
        trainer.head.set_input_normalization(*normalization_from_moments(moments))
    return block, features, share


@dataclass(frozen=True)
class RankShare:
    """This rank's columns of every minibatch (``rows`` of the B windows) under torchrun."""

    rows: BatchRows
    dist: Dist

    @classmethod
    def of(cls, dist: Dist, batch: int) -> RankShare | None:
        """Contiguous columns, their counts within one of each other; None for one process."""
        if not dist.active:
            return None
        start, stop = batch * dist.rank // dist.world, batch * (dist.rank + 1) // dist.world
        return cls(BatchRows(start, stop, batch), dist)

    def sum_gradients(
        self, params: list[torch.nn.Parameter], loss: float, correct: int
    ) -> tuple[float, int]:
        """Make every rank's gradients of ``params`` (those the optimizer steps: the head's,
        and the trunk's trainable layers end to end) those of the whole minibatch's mean loss:
        this rank's gradients of its own mean, weighted by its share of the rows, summed over
        the ranks (one all-reduce, which also sums the weighted loss and the windows right).
        Returns the minibatch's loss and windows right."""
        weight = (self.rows.stop - self.rows.start) / self.rows.total
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]) * weight
        flat = torch.cat([flat, flat.new_tensor([loss * weight, correct])])
        self.dist.all_reduce_sum(flat)
        offset = 0
        for param in params:
            param.grad = flat[offset : offset + param.numel()].view_as(param).clone()
            offset += param.numel()
        return float(flat[-2]), round(float(flat[-1]))


def _check_loss(loss: float, iteration: int, lr: float) -> None:
    if not math.isfinite(loss):
        raise UserError(
            f"finetune: the loss is {loss} at iteration {iteration + 1}; "
            f"lower finetune.lr (now {lr}) and rerun with --force"
        )


def block_size(batch_size: int, feature_dim: int) -> int:
    """Iterations per block I: as many as fit BLOCK_BYTES of float16 features, at most 500."""
    per_iteration = batch_size * feature_dim * 2
    return max(1, min(MAX_BLOCK_ITERATIONS, BLOCK_BYTES // per_iteration))


def pool_block(
    source: FeatureSource, records: Sequence[ImageRecord], pool: WindowPool, block: Block
) -> torch.Tensor:
    """Pooled features (I·B, D) float16 of a block's windows, rows in minibatch order.

    Each image (or flipped copy) is read once per block.
    """
    flat_windows = block.window_index.reshape(-1)
    flat_scales = torch.as_tensor(block.scale_index.reshape(-1))
    features: torch.Tensor | None = None
    groups = group_by_entry(block.window_index, pool)
    for entry, positions in tqdm(groups, desc="pool windows", unit="img", leave=False):
        record = records[pool.entry_image[entry]]
        # rows land at their block positions below, so the pooling order needs no reorder
        pooled, rows = source.pool(
            record, pool.boxes[flat_windows[positions]], flat_scales[positions],
            flipped=bool(pool.entry_flipped[entry]), keep_order=False,
        )  # fmt: skip
        if features is None:
            features = pooled.new_empty((len(flat_windows), pooled.shape[1]), dtype=torch.float16)
        targets = torch.as_tensor(positions)[rows]
        features[targets.to(pooled.device)] = pooled.to(torch.float16)
    assert features is not None
    return features


def train_step(
    head: Head,
    optimizer: torch.optim.Optimizer,
    features: torch.Tensor,
    targets: torch.Tensor,
    generator: torch.Generator,
    box_targets: torch.Tensor | None = None,
    box_weight: float = 0.0,
    share: RankShare | None = None,
) -> tuple[float, int]:
    """One SGD step on a minibatch: features (B, D), targets (B,) in 0 … K on the head's
    device (with a box branch, ``box_targets`` (B, 4) weighted by ``box_weight``). ``share``
    (under torchrun): these are this rank's rows of the minibatch, whose gradients are summed
    with the other ranks' before the step.

    Returns the mean loss and the number of windows classified right (dropout on), of the
    whole minibatch.
    """
    rows = share.rows if share is not None else None
    loss, logits = window_loss(
        head, features.float(), targets, generator, box_targets, box_weight, rows
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    value = float(loss.detach())
    correct = int((logits.argmax(dim=1) == targets).sum())
    if share is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        value, correct = share.sum_gradients(params, value, correct)
    optimizer.step()
    return value, correct


def window_loss(
    head: Head,
    features: torch.Tensor,
    targets: torch.Tensor,
    generator: torch.Generator,
    box_targets: torch.Tensor | None = None,
    box_weight: float = 0.0,
    rows: BatchRows | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fine-tuning loss of a minibatch (B windows) and its logits (B, K+1): softmax cross
    entropy, plus with a box branch ``box_weight`` × the smooth L1 loss of the foreground
    windows' normalised deltas, summed and divided by B (Fast R-CNN's multi-task loss).
    ``rows``: the B windows are these rows of a larger minibatch (dropout masks drawn whole)."""
    if head.bbox is None or box_targets is None or box_weight == 0.0:
        logits = head(features, generator=generator, rows=rows)
        return F.cross_entropy(logits, targets), logits
    logits, deltas = head.forward_with_boxes(features, generator=generator, rows=rows)
    foreground = torch.nonzero(targets < head.num_classes).squeeze(1)
    predicted = deltas[foreground, targets[foreground]]
    stds = torch.tensor(BOX_DELTA_STDS, device=predicted.device)
    wanted = box_targets.to(predicted.device)[foreground] / stds  # built on the CPU
    box_loss = F.smooth_l1_loss(predicted, wanted, reduction="sum", beta=1.0) / len(targets)
    return F.cross_entropy(logits, targets) + box_weight * box_loss, logits


def held_out_windows(
    source: FeatureSource,
    records: Sequence[ImageRecord],
    pool: WindowPool,
    batch_size: int,
    fg_fraction: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out windows of a non-empty ``pool``: features (R, D) float16 at the best scale and
    labels (R,) on the source's device.

    Drawn the training way (fg/bg fraction, docs/method.md#fine-tuning-and-sampling), up to
    EVAL_BATCHES minibatches of the fixed EVAL_SEED, so every run scores the same windows.
    """
    chosen = sample_eval_windows(pool, EVAL_BATCHES, batch_size, fg_fraction, EVAL_SEED)
    if len(chosen) == 0:
        raise ValueError("held_out_windows: the pool has no windows")
    features, order = [], []
    for entry, positions in group_by_entry(chosen, pool):
        record = records[pool.entry_image[entry]]
        pooled, _ = source.pool(record, pool.boxes[chosen[positions]], None)
        features.append(pooled.to(torch.float16))
        order.append(positions)
    labels = pool.labels[chosen[np.concatenate(order)]]
    return torch.cat(features), torch.as_tensor(labels, device=features[0].device)


@torch.no_grad()
def window_accuracy(head: Head, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of windows (R, D) whose argmax class (background K included) is their label.

    Leaves the head in eval mode.
    """
    head.eval()
    predictions = torch.cat([head(chunk.float()).argmax(dim=1) for chunk in features.split(4096)])
    return float((predictions == labels).float().mean())


def majority_rate(labels: torch.Tensor) -> float:
    """Accuracy of always predicting the most frequent label."""
    return float(torch.bincount(labels).max()) / max(len(labels), 1)


def _normalization_of(head: Head) -> list[torch.Tensor]:
    """[shift, scale] of the head's input normalisation, [] when it has none."""
    if head.input_shift is None or head.input_scale is None:
        return []
    return [head.input_shift.cpu(), head.input_scale.cpu()]


def _save_checkpoint(path: Path, trainer: Trainer) -> None:
    progress = trainer.progress
    save_torch(
        path,
        {
            "identity": trainer.identity,
            "head": trainer.head.state_dict(),
            "trunk": trainer.trunk.state_dict() if trainer.trunk is not None else {},
            "input_normalization": _normalization_of(trainer.head),
            "optimizer": trainer.optimizer.state_dict(),
            "dropout_rng": trainer.generator.get_state(),
            "progress": {
                "iteration": progress.iteration,
                "loss_sum": progress.loss_sum,
                "correct": progress.correct,
                "seen": progress.seen,
                "history": progress.history,
            },
        },
    )


def resume(path: Path, trainer: Trainer) -> None:
    """Restore the checkpoint at ``path`` into ``trainer`` if there is one with the same
    identity; one with another identity is ignored (a new run overwrites it)."""
    if not path.is_file():
        return
    checkpoint = load_torch(path)
    try:
        if checkpoint["identity"] != trainer.identity:
            logger.warning("%s: made with other settings; starting over", path)
            return
        trainer.head.load_state_dict(checkpoint["head"])
        if trainer.trunk is not None:
            trainer.trunk.load_state_dict(checkpoint["trunk"])
        if checkpoint["input_normalization"]:
            trainer.head.set_input_normalization(*checkpoint["input_normalization"])
        trainer.optimizer.load_state_dict(checkpoint["optimizer"])
        trainer.generator.set_state(checkpoint["dropout_rng"])
        trainer.progress = _Progress(**checkpoint["progress"])
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise UserError(
            f"{path}: not a usable checkpoint ({type(exc).__name__}); delete it or use --force"
        ) from None
    logger.info("resuming from iteration %d (%s)", trainer.progress.iteration, path)
