"""`spp-detect finetune`: train fc6, fc7 and the (K+1)-way classifier on pooled windows (SPEC §6).

Shapes: B iterations of a block, D pooled feature dim, K foreground classes.

Windows are redrawn every block of B iterations; a block's draw depends only on (seed, block), so
a run resumed from a checkpoint (head, optimizer, dropout RNG, running sums, taken every
``finetune.checkpoint_every`` iterations) ends with the same weights as one never interrupted.
The last iteration is kept: no model selection on any split (SPEC §13, test-set leakage).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from spp_detect.artifacts import (
    clear_manifest,
    load_torch,
    read_manifest,
    save_json,
    save_torch,
    write_manifest,
)
from spp_detect.config import Config, FinetuneConfig
from spp_detect.errors import UserError
from spp_detect.features import FeatureSource
from spp_detect.head import (
    Head,
    head_state,
    init_from_classifier,
    init_random,
    input_normalization_for,
    make_optimizer,
    set_learning_rate,
    step_learning_rate,
)
from spp_detect.run_dir import RunDir
from spp_detect.sampling import (
    Block,
    WindowPool,
    build_window_pool,
    group_by_entry,
    sample_block,
    sample_eval_windows,
    warn_missing_classes,
)
from spp_detect.stages.common import (
    Summary,
    check_classes,
    fingerprint,
    load_proposals,
    open_feature_source,
    require_upstream,
    split_records,
    stage_dir,
)
from spp_detect.structures import ImageRecord

logger = logging.getLogger(__name__)

# Pooled float16 features held for one block of iterations (1 GiB: 327 iterations at D = 12,800).
# Every block reads the maps of every image it samples from, about the whole split, as the
# original does every 500 iterations (SPEC §6): larger blocks mean fewer passes over the cache.
BLOCK_BYTES = 1 << 30
MAX_BLOCK_ITERATIONS = 500  # windows are redrawn every 500 iterations (SPEC §6)
EVAL_BATCHES = 500  # held-out accuracy on up to 500 minibatches at the best scale (SPEC §6)
EVAL_SEED = 0  # fixed draw of the held-out windows, the same for every run
POSTFIX_EVERY = 10  # iterations between tqdm loss updates


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
class _Windows:
    """The training split, ready to sample: records, feature source, labelled windows."""

    records: Sequence[ImageRecord]
    source: FeatureSource
    pool: WindowPool
    labels: torch.Tensor  # (N,) int64 on the device, the pool's labels
    feature_dim: int
    block_iterations: int


@dataclass
class _Trainer:
    """Everything a checkpoint saves: weights, optimizer, dropout RNG, progress."""

    head: Head
    optimizer: torch.optim.SGD
    generator: torch.Generator
    identity: dict
    normalize_inputs: bool  # random fc6/fc7: standardise pooled inputs, stats of block 0
    progress: _Progress = field(default_factory=_Progress)


def run_finetune(ctx, split: str, stop_after: int | None = None) -> str:
    """Fine-tune the head on ``split``; ``stop_after`` (tests) stops after that many iterations
    as a kill would, leaving only the last regular checkpoint behind."""
    config, run_dir, settings = ctx.config, ctx.run_dir, ctx.config.finetune
    summary = Summary("finetune")
    stage_fingerprint = fingerprint(config, "finetune")
    # 1. Done already?
    if ctx.force:
        run_dir.checkpoint_path.unlink(missing_ok=True)
    elif _is_complete(run_dir, split, stage_fingerprint):
        summary.notes.append(f"already complete in {run_dir.finetune_dir} (use --force to redo)")
        return summary.line()
    check_settings(settings)
    clear_manifest(run_dir.finetune_dir)
    # 2. Upstream artefacts, labelled windows, held-out windows.
    manifests = _check_upstream(config, run_dir, split)
    # flipped copies when the cache holds them (extract flips only the training split)
    flip = bool(manifests["extract"].get("flip")) if "extract" in manifests else config.extract.flip
    windows = _training_windows(config, run_dir, split, ctx.limit, ctx.device, flip)
    validation = None
    if settings.val_split:
        validation = evaluation_windows(config, run_dir, settings.val_split, ctx.limit, ctx.device)
    # 3. A new head, or the state of an interrupted run.
    identity = {
        "fingerprint": stage_fingerprint,
        "split": split,
        "limit": ctx.limit or 0,
        "feature_dim": windows.feature_dim,
        "block_iterations": windows.block_iterations,
    }
    trainer = _new_trainer(config, windows, identity)
    _resume(run_dir, trainer)
    # 4. Train, block by block.
    total = settings.iterations if stop_after is None else min(stop_after, settings.iterations)
    start = trainer.progress.iteration
    pool_seconds, step_seconds = _train(trainer, windows, config, run_dir, total, validation)
    summary.items = trainer.progress.iteration
    if step_seconds > 0:
        rate = (summary.items - start) / step_seconds
        summary.notes.append(f"{rate:.1f} SGD it/s, {pool_seconds:.1f} s pooling")
    if trainer.progress.iteration < settings.iterations:
        summary.notes.append(f"stopped at iteration {summary.items} of {settings.iterations}")
        return summary.line()
    # 5. Outputs: the last iteration's head, the curve, the manifest last.
    history = trainer.progress.history
    save_torch(run_dir.head_path, head_state(trainer.head))
    save_json(
        run_dir.history_path,
        {"split": split, "val_split": settings.val_split or None, "iterations": settings.iterations,
         "batch_size": settings.batch_size, "entries": history},
    )  # fmt: skip
    write_manifest(
        run_dir.finetune_dir, "finetune", split, settings.iterations, stage_fingerprint,
        upstream={stage: manifest["fingerprint"] for stage, manifest in manifests.items()},
        extra={"classes": list(config.data.classes), "feature_dim": windows.feature_dim,
               "fc_dim": settings.fc_dim},
    )  # fmt: skip
    run_dir.checkpoint_path.unlink(missing_ok=True)
    summary.bytes_written = run_dir.head_path.stat().st_size
    if history:
        summary.notes.append(f"loss {history[-1]['loss']:.3f}")
        summary.notes.append(f"train window acc {history[-1]['accuracy']:.3f}")
    if history and "val_accuracy" in history[-1]:
        summary.notes.append(f"{settings.val_split} window acc {history[-1]['val_accuracy']:.3f}")
    return summary.line()


def _train(
    trainer: _Trainer,
    windows: _Windows,
    config: Config,
    run_dir: RunDir,
    total: int,
    validation: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[float, float]:
    """SGD from the trainer's iteration up to ``total``: redraw and pool a block every B
    iterations, log every ``log_every``, checkpoint every ``checkpoint_every``.

    Returns the seconds spent pooling blocks and in SGD steps.
    """
    settings, progress, head = config.finetune, trainer.progress, trainer.head
    pool_seconds = step_seconds = 0.0
    block_index, block, features = -1, None, None
    head.train()
    bar = tqdm(total=settings.iterations, initial=progress.iteration, desc="finetune", unit="it")
    with bar:
        while progress.iteration < total:
            started = time.perf_counter()
            if progress.iteration // windows.block_iterations != block_index:
                block_index = progress.iteration // windows.block_iterations
                block, features = _pool_next_block(trainer, windows, settings, block_index)
                pool_seconds += time.perf_counter() - started
                started = time.perf_counter()
            row = progress.iteration - block_index * windows.block_iterations
            lr = step_learning_rate(progress.iteration, settings.lr, settings.lr_steps)
            set_learning_rate(trainer.optimizer, lr)
            rows = slice(row * settings.batch_size, (row + 1) * settings.batch_size)
            targets = windows.labels[torch.as_tensor(block.window_index[row])]
            loss, correct = train_step(
                head, trainer.optimizer, features[rows], targets, trainer.generator
            )
            step_seconds += time.perf_counter() - started
            _check_loss(loss, progress.iteration, settings.lr)
            progress.add(loss, correct, settings.batch_size)
            bar.update(1)
            if progress.iteration % POSTFIX_EVERY == 0:
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.0e}", refresh=False)
            done = progress.iteration == settings.iterations
            if progress.iteration % settings.log_every == 0 or done:
                entry = progress.flush(lr)
                if validation is not None:
                    entry["val_accuracy"] = window_accuracy(head, *validation)
                    head.train()
            if progress.iteration % settings.checkpoint_every == 0 and not done:
                _save_checkpoint(run_dir, trainer)
    return pool_seconds, step_seconds


def _pool_next_block(
    trainer: _Trainer, windows: _Windows, settings: FinetuneConfig, block_index: int
) -> tuple[Block, torch.Tensor]:
    """Draw and pool block ``block_index`` (shorter at the end of training); the first block
    of a randomly initialised head also sets its input normalisation."""
    block_start = block_index * windows.block_iterations
    block = sample_block(
        windows.pool, block_index, min(windows.block_iterations, settings.iterations - block_start),
        settings.batch_size, settings.fg_fraction, len(windows.source.scales), settings.seed,
    )  # fmt: skip
    features = pool_block(windows.source, windows.records, windows.pool, block)
    if block_index == 0 and trainer.normalize_inputs:
        trainer.head.set_input_normalization(*input_normalization_for(features))
    return block, features


def _check_loss(loss: float, iteration: int, lr: float) -> None:
    if not math.isfinite(loss):
        raise UserError(
            f"finetune: the loss is {loss} at iteration {iteration + 1}; "
            f"lower finetune.lr (now {lr}) and rerun with --force"
        )


def check_settings(settings: FinetuneConfig) -> None:
    """UserError for finetune values that cannot train."""
    problems = []
    for key in ("fc_dim", "batch_size", "checkpoint_every", "log_every"):
        if getattr(settings, key) < 1:
            problems.append(f"finetune.{key} must be at least 1")
    if settings.iterations < 0:
        problems.append("finetune.iterations must be at least 0")
    if not 0.0 <= settings.fg_fraction <= 1.0:
        problems.append("finetune.fg_fraction must lie in [0, 1]")
    if not 0.0 <= settings.dropout < 1.0:
        problems.append("finetune.dropout must lie in [0, 1)")
    if not settings.bg_thresh_lo <= settings.bg_thresh_hi <= settings.fg_thresh:
        problems.append("finetune thresholds need bg_thresh_lo <= bg_thresh_hi <= fg_thresh")
    if settings.lr <= 0:
        problems.append("finetune.lr must be positive")
    if problems:
        raise UserError("; ".join(problems))


def block_size(batch_size: int, feature_dim: int) -> int:
    """Iterations per block: as many as fit BLOCK_BYTES of float16 features, at most 500."""
    per_iteration = batch_size * feature_dim * 2
    return max(1, min(MAX_BLOCK_ITERATIONS, BLOCK_BYTES // per_iteration))


def pool_block(
    source: FeatureSource, records: Sequence[ImageRecord], pool: WindowPool, block: Block
) -> torch.Tensor:
    """Pooled features (B·batch, D) float16 of a block's windows, rows in minibatch order.

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
) -> tuple[float, int]:
    """One SGD step on a minibatch: features (batch, D), targets (batch,) on the head's device.

    Returns the mean loss and the number of windows classified right (dropout on).
    """
    logits = head(features.float(), generator=generator)
    loss = F.cross_entropy(logits, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    correct = int((logits.argmax(dim=1) == targets).sum())
    return float(loss.detach()), correct


@torch.no_grad()
def window_accuracy(head: Head, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of windows (N, D) whose argmax class (background K included) is their label.

    Leaves the head in eval mode.
    """
    head.eval()
    predictions = torch.cat([head(chunk.float()).argmax(dim=1) for chunk in features.split(4096)])
    return float((predictions == labels).float().mean())


def evaluation_windows(
    config: Config, run_dir: RunDir, split: str, limit: int | None, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out windows of ``split``: features (N, D) at the best scale and labels (N,).

    Drawn the training way (fg/bg thresholds and fraction, SPEC §6), up to EVAL_BATCHES
    minibatches, without flips. Needs the split's proposals (and features when cached).
    """
    _check_upstream(config, run_dir, split)
    records = split_records(config, split, limit)
    source = open_feature_source(config, run_dir, split, device)
    pool = _window_pool(config, run_dir, split, records, flip=False)
    settings = config.finetune
    chosen = sample_eval_windows(
        pool, EVAL_BATCHES, settings.batch_size, settings.fg_fraction, EVAL_SEED
    )
    if len(chosen) == 0:
        raise _no_windows(run_dir, split, settings)
    features, order = [], []
    for entry, positions in group_by_entry(chosen, pool):
        record = records[pool.entry_image[entry]]
        pooled, _ = source.pool(record, pool.boxes[chosen[positions]], None)
        features.append(pooled.to(torch.float16))
        order.append(positions)
    labels = pool.labels[chosen[np.concatenate(order)]]
    return torch.cat(features), torch.as_tensor(labels, device=features[0].device)


def majority_rate(labels: torch.Tensor) -> float:
    """Accuracy of always predicting the most frequent label."""
    return float(torch.bincount(labels).max()) / max(len(labels), 1)


def _is_complete(run_dir: RunDir, split: str, stage_fingerprint: str) -> bool:
    manifest = read_manifest(run_dir.finetune_dir)
    return (
        manifest is not None
        and manifest.get("fingerprint") == stage_fingerprint
        and manifest.get("split") == split
        and run_dir.head_path.is_file()
    )


def _check_upstream(config: Config, run_dir: RunDir, split: str) -> dict[str, dict]:
    """Manifests of the split's proposals (and cached features); their classes must match."""
    manifests = {"propose": require_upstream(config, run_dir, "propose", split)}
    if config.extract.cache == "disk":
        manifests["extract"] = require_upstream(config, run_dir, "extract", split)
    for stage, manifest in manifests.items():
        check_classes(manifest, config.data.classes, stage_dir(run_dir, stage, split), stage)
    return manifests


def _no_windows(run_dir: RunDir, split: str, settings: FinetuneConfig) -> UserError:
    return UserError(
        f"{run_dir.proposals_dir(split)}: no window of split {split!r} overlaps a gt box by "
        f"≥ {settings.bg_thresh_lo}; check data.classes and the annotations"
    )


def _window_pool(
    config: Config, run_dir: RunDir, split: str, records: Sequence[ImageRecord], flip: bool
) -> WindowPool:
    settings = config.finetune
    proposals = [
        load_proposals(run_dir, split, record.image_id)
        for record in tqdm(records, desc=f"label windows ({split})", unit="img", leave=False)
    ]
    return build_window_pool(
        records, proposals, len(config.data.classes), settings.fg_thresh,
        settings.bg_thresh_lo, settings.bg_thresh_hi, flip=flip,
    )  # fmt: skip


def _training_windows(
    config: Config, run_dir: RunDir, split: str, limit: int | None, device: str, flip: bool
) -> _Windows:
    settings = config.finetune
    records = split_records(config, split, limit)
    source = open_feature_source(config, run_dir, split, device)
    pool = _window_pool(config, run_dir, split, records, flip=flip)
    if len(pool.labels) == 0:
        raise _no_windows(run_dir, split, settings)
    warn_missing_classes(pool, config.data.classes)
    feature_dim = source.geometry.feature_dim(source.channels)
    return _Windows(
        records=records,
        source=source,
        pool=pool,
        labels=torch.as_tensor(pool.labels, device=source.device),
        feature_dim=feature_dim,
        block_iterations=block_size(settings.batch_size, feature_dim),
    )


def _new_trainer(config: Config, windows: _Windows, identity: dict) -> _Trainer:
    """A head initialised from the pretrained classifier when the backbone has one, else at
    random (seeded), its SGD optimizer and the dropout generator."""
    from spp_detect.backbones import load_classifier_state

    settings = config.finetune
    head = Head(windows.feature_dim, settings.fc_dim, len(config.data.classes), settings.dropout)
    init_random(head, torch.Generator().manual_seed(settings.seed))
    classifier = load_classifier_state(config.extract.backbone, config.extract.weights)
    pretrained = classifier is not None
    if pretrained:
        geometry = windows.source.geometry
        init_from_classifier(head, classifier, windows.source.channels, geometry.levels)
        logger.info("fc6/fc7 start from the %s classifier", config.extract.backbone)
    head.to(windows.source.device)
    return _Trainer(
        head=head,
        optimizer=make_optimizer(head, settings.momentum, settings.weight_decay),
        generator=torch.Generator(device=windows.source.device).manual_seed(settings.seed + 1),
        identity=identity,
        normalize_inputs=not pretrained,
    )


def _normalization_of(head: Head) -> list[torch.Tensor]:
    """[shift, scale] of the head's input normalisation, [] when it has none."""
    if head.input_shift is None or head.input_scale is None:
        return []
    return [head.input_shift.cpu(), head.input_scale.cpu()]


def _save_checkpoint(run_dir: RunDir, trainer: _Trainer) -> None:
    progress = trainer.progress
    save_torch(
        run_dir.checkpoint_path,
        {
            "identity": trainer.identity,
            "head": trainer.head.state_dict(),
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


def _resume(run_dir: RunDir, trainer: _Trainer) -> None:
    """Restore an interrupted run with the same settings into ``trainer``, if there is one."""
    path = run_dir.checkpoint_path
    if not path.is_file():
        return
    checkpoint = load_torch(path)
    try:
        if checkpoint["identity"] != trainer.identity:
            logger.warning("%s: made with other settings; starting over", path)
            return
        trainer.head.load_state_dict(checkpoint["head"])
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
