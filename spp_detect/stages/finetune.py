"""`spp-detect finetune`: train fc6, fc7 and the (K+1)-way classifier on pooled windows
(docs/method.md#fine-tuning-and-sampling), or, with ``finetune.conv_from``, the conv layers from
there on too, end to end from images (docs/method.md#conv-fine-tuning).

Shapes: D pooled feature dim, K foreground classes.

The stage gathers the labelled windows and builds the schedule from ``finetune``; the SGD loop,
its checkpoint and the resume guarantee live in ``spp_detect.train.finetune``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from tqdm import tqdm

from spp_detect.config import Config, FinetuneConfig, sized_finetune
from spp_detect.errors import UserError
from spp_detect.models.head import head_state
from spp_detect.models.weights import is_random, trunk_state
from spp_detect.runtime.artifacts import check_free_space, save_json, save_torch, tensor_bytes
from spp_detect.runtime.run_dir import RunDir
from spp_detect.stages.builders import load_proposals, open_feature_source, pool_geometry
from spp_detect.stages.context import StageContext, Summary, locked, split_records
from spp_detect.stages.manifests import (
    check_classes,
    clear_manifest,
    close_stage,
    is_current,
    read_manifest,
    require_upstream,
)
from spp_detect.stages.provenance import file_digest, log_trunk, stage_fingerprint
from spp_detect.structures import ImageRecord
from spp_detect.train import finetune
from spp_detect.train.sampling import WindowPool, build_window_pool, warn_missing_classes

logger = logging.getLogger(__name__)

# Fast R-CNN's rate for pretrained conv layers (lr 0.001, conv at the head's rate). On raccoon
# the Lite0 trunk trained at 10x it lost most of its ImageNet features (BENCHMARKS.md)
PRETRAINED_CONV_LR = 1e-3
CONV_LR_WARN_FACTOR = 3.0  # warn above this multiple of PRETRAINED_CONV_LR


@locked("finetune", sharded=True)
def run_finetune(ctx: StageContext, split: str, stop_after: int | None = None) -> str:
    """Fine-tune the head on ``split`` (and the conv layers from ``finetune.conv_from`` on,
    from images); ``stop_after`` (tests) stops after that many iterations as a kill would,
    leaving only the last regular checkpoint behind.

    Under torchrun the model trains data parallel (``finetune.train``,
    ``finetune_conv.end_to_end_step``), the global minibatch that of one process: the head's
    windows, or end to end its images, shared by the ranks."""
    config, run_dir, settings = ctx.config, ctx.run_dir, ctx.config.finetune
    summary = Summary("finetune")
    dist = ctx.dist
    if dist.world > settings.batch_size:
        raise UserError(
            f"finetune.batch_size: {settings.batch_size} windows cannot be shared by "
            f"{dist.world} ranks; use fewer ranks or a larger batch"
        )
    if settings.conv_from and dist.world > settings.images_per_batch:
        raise UserError(
            f"finetune.images_per_batch: {settings.images_per_batch} images cannot be shared by "
            f"{dist.world} ranks end to end; set it to at least {dist.world} (each rank runs "
            "the trunk on its own images)"
        )
    fingerprint = stage_fingerprint(config, "finetune")
    # 1. Done already?
    if ctx.force:
        run_dir.checkpoint_path.unlink(missing_ok=True)
    elif _is_complete(ctx, split):
        summary.notes.append(f"already complete in {run_dir.finetune_dir} (use --force to redo)")
        return summary.line()
    clear_manifest(run_dir.finetune_dir)
    # 2. Upstream manifests.
    manifests = _check_upstream(config, run_dir, split)
    # 3.-5. Windows, a new or resumed trainer, SGD up to `total`.
    iterations = sized_settings(ctx, split).iterations
    total = iterations if stop_after is None else min(stop_after, iterations)
    identity = {
        "fingerprint": fingerprint, "split": split, "limit": ctx.limit or 0,
        # a CUDA generator's dropout state does not load into a CPU one, nor the other way
        "device": torch.device(ctx.device).type,
    }  # fmt: skip
    train = _train_end_to_end if settings.conv_from else _train_head
    trainer, notes = train(ctx, split, manifests, identity, total)
    summary.items = trainer.progress.iteration
    summary.notes += notes
    if trainer.progress.iteration < iterations:
        summary.notes.append(f"stopped at iteration {summary.items} of {iterations}")
        return summary.line()
    if not dist.is_main:
        return f"rank {dist.rank}: {summary.items} iterations on its share of each minibatch"
    # 6. Outputs: the last iteration's head (and trunk), the curve, the manifest last.
    summary.bytes_written = _save_outputs(ctx, split, trainer)
    history = trainer.progress.history
    if history:
        summary.notes.append(f"loss {history[-1]['loss']:.3f}")
        summary.notes.append(f"train window acc {history[-1]['accuracy']:.3f}")
    if history and "val_accuracy" in history[-1]:
        summary.notes.append(f"{settings.val_split} window acc {history[-1]['val_accuracy']:.3f}")
    return summary.line()


def _train_head(
    ctx: StageContext, split: str, manifests: dict, identity: dict, total: int
) -> tuple[finetune.Trainer, list[str]]:
    """Head-only fine-tuning (the paper's) on pooled windows of cached or live conv5 maps."""
    config, settings = ctx.config, sized_settings(ctx, split)
    schedule = _schedule(settings)
    # flipped copies when the cache holds them: extract flips only the training split
    flip = bool(manifests["extract"].get("flip")) if "extract" in manifests else config.extract.flip
    windows = _training_windows(config, ctx.run_dir, split, ctx.limit, ctx.device, flip)
    validation = None
    if settings.val_split and ctx.dist.is_main:  # rank 0 alone writes the history
        validation = evaluation_windows(config, ctx.run_dir, settings.val_split, ctx.limit,
                                        ctx.device)  # fmt: skip
    identity = {**identity, "feature_dim": windows.feature_dim,
                "block_iterations": windows.block_iterations}  # fmt: skip
    source = windows.source
    trainer = _new_trainer(config, ctx.run_dir, source.channels, source.device, schedule, identity)
    finetune.resume(ctx.run_dir.checkpoint_path, trainer)
    start = trainer.progress.iteration
    pool_seconds, step_seconds = finetune.train(
        trainer, windows, schedule, ctx.run_dir.checkpoint_path, total, validation, ctx.dist
    )
    notes = []
    if step_seconds > 0:
        rate = (trainer.progress.iteration - start) / step_seconds
        notes.append(f"{rate:.1f} SGD it/s, {pool_seconds:.1f} s pooling")
    return trainer, notes


def _train_end_to_end(
    ctx: StageContext, split: str, manifests: dict, identity: dict, total: int
) -> tuple[finetune.Trainer, list[str]]:
    """Conv layers from ``finetune.conv_from`` on, the pyramid and the head, from images
    (docs/method.md#conv-fine-tuning)."""
    from spp_detect.train import finetune_conv

    config, settings = ctx.config, sized_settings(ctx, split)
    warn_fast_conv_rate(settings, config.extract.weights)
    schedule = _schedule(settings)
    model = _end_to_end_model(ctx, split)
    trainer = _new_trainer(
        config,
        ctx.run_dir,
        model.trunk.channels,
        model.device,
        schedule,
        identity,
        trunk=model.trunk,
    )
    finetune_conv.add_trunk_to_optimizer(
        trainer.optimizer, model.trunk, model.first_trainable, settings.conv_lr_mult
    )
    finetune.resume(ctx.run_dir.checkpoint_path, trainer)
    if trainer.normalize_inputs and trainer.progress.iteration == 0:
        trainer.head.set_input_normalization(*finetune_conv.input_statistics(model, schedule))
    start = trainer.progress.iteration
    step = finetune_conv.end_to_end_step(trainer, model, schedule, ctx.dist)
    checkpoints = ctx.run_dir.checkpoint_path if ctx.dist.is_main else None
    seconds = finetune.run_sgd(trainer, schedule, checkpoints, total, step)
    notes = []
    if seconds > 0:
        notes.append(f"{(trainer.progress.iteration - start) / seconds:.2f} SGD it/s end to end")
    return trainer, notes


def warn_fast_conv_rate(settings: FinetuneConfig, weights: str) -> None:
    """Warn when pretrained conv layers would train well above Fast R-CNN's rate: the run
    works, and quietly ends worse than head-only fine-tuning."""
    rate = settings.lr * settings.conv_lr_mult
    if is_random(weights) or rate <= CONV_LR_WARN_FACTOR * PRETRAINED_CONV_LR:
        return
    logger.warning(
        "finetune: the pretrained conv layers train at lr x conv_lr_mult = %g, %.0fx Fast "
        "R-CNN's %g, which wears away their ImageNet features; set finetune.conv_lr_mult=%g",
        rate, rate / PRETRAINED_CONV_LR, PRETRAINED_CONV_LR, PRETRAINED_CONV_LR / settings.lr,
    )  # fmt: skip


def _end_to_end_model(ctx: StageContext, split: str):
    """The split's labelled windows (each image also mirrored) and the trunk, frozen below
    ``finetune.conv_from``, as a ``finetune_conv.EndToEnd``."""
    from spp_detect.models.backbones import conv_layer_index
    from spp_detect.models.features import check_scales_fit
    from spp_detect.models.weights import build_backbone
    from spp_detect.runtime.device import resolve_device
    from spp_detect.train import finetune_conv

    config, settings, extract = ctx.config, ctx.config.finetune, ctx.config.extract
    records = split_records(config, split, ctx.limit)
    pool = _window_pool(config, ctx.run_dir, split, records, flip=True)
    if len(pool.labels) == 0:
        raise _no_windows(ctx.run_dir, split, settings)
    warn_missing_classes(pool, config.data.classes)
    device = resolve_device(ctx.device)
    log_trunk(config)
    trunk = build_backbone(extract.backbone, extract.weights, extract.last_stage).to(device)
    check_scales_fit(trunk, extract.scales)
    first = conv_layer_index(trunk, settings.conv_from)
    finetune_conv.freeze_below(trunk, first)
    geometry = pool_geometry(config, trunk.stride, trunk.offset0)
    return finetune_conv.EndToEnd(
        trunk=trunk, first_trainable=first, device=device,
        images=finetune_conv.TrainingImages.from_pool(records, pool, geometry),
        sampling=finetune_conv.ImageSampling(
            settings.images_per_batch, tuple(extract.scales), extract.max_long_side
        ),
    )  # fmt: skip


def _save_outputs(ctx: StageContext, split: str, trainer: finetune.Trainer) -> int:
    """head.pt (and trunk.pt), history.json, the checkpoint removed, then the manifest; returns
    the bytes written."""
    config, run_dir = ctx.config, ctx.run_dir
    settings = sized_settings(ctx, split)
    save_torch(run_dir.head_path, head_state(trainer.head))
    written = [run_dir.head_path]
    extra = {"classes": list(config.data.classes), "feature_dim": trainer.head.in_dim,
             "fc_dim": settings.fc_dim}  # fmt: skip
    if trainer.trunk is not None:
        save_torch(run_dir.trunk_path, trunk_state(trainer.trunk))
        written.append(run_dir.trunk_path)
        extra["trunk_digest"] = file_digest(run_dir.trunk_path)
    save_json(
        run_dir.history_path,
        {"split": split, "val_split": settings.val_split or None, "iterations": settings.iterations,
         "batch_size": settings.batch_size, "conv_from": settings.conv_from or None,
         "entries": trainer.progress.history},
    )  # fmt: skip
    # Gone before the manifest, whose token covers the folder's files: a kill in between
    # retrains from the start, to the same weights.
    run_dir.checkpoint_path.unlink(missing_ok=True)
    close_stage(ctx, "finetune", split, settings.iterations, extra=extra, files=written)
    return sum(path.stat().st_size for path in written)


def sized_settings(ctx: StageContext, split: str) -> FinetuneConfig:
    """``finetune`` with its iteration count and lr step sized to the split when
    ``finetune.iterations`` is 0 (``config.sized_finetune``)."""
    return sized_finetune(ctx.config.finetune, len(split_records(ctx.config, split, ctx.limit)))


def _schedule(settings: FinetuneConfig) -> finetune.SgdSchedule:
    return finetune.SgdSchedule(
        iterations=settings.iterations, batch_size=settings.batch_size,
        fg_fraction=settings.fg_fraction, lr=settings.lr, lr_steps=tuple(settings.lr_steps),
        momentum=settings.momentum, weight_decay=settings.weight_decay, seed=settings.seed,
        checkpoint_every=settings.checkpoint_every, log_every=settings.log_every,
        box_loss_weight=settings.bbox_loss_weight,
    )  # fmt: skip


def evaluation_windows(
    config: Config, run_dir: RunDir, split: str, limit: int | None, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out windows of ``split``: features (R, D) at the best scale and labels (R,).

    Drawn the training way (``finetune.held_out_windows``), without flips. Needs the split's
    proposals (and features when cached).
    """
    _check_upstream(config, run_dir, split)
    records = split_records(config, split, limit)
    # the training split's source has named the trunk: one trunk line per stage
    source = open_feature_source(config, run_dir, split, device, announce=False)
    pool = _window_pool(config, run_dir, split, records, flip=False)
    settings = config.finetune
    if len(pool.labels) == 0:  # the pool keeps only fg and bg windows: nothing to draw
        raise _no_windows(run_dir, split, settings)
    return finetune.held_out_windows(
        source, records, pool, settings.batch_size, settings.fg_fraction
    )


def _is_complete(ctx: StageContext, split: str) -> bool:
    """Whether the head (and trunk) of ``split`` are there and current (``is_current``: this
    config and ``--limit``, the same data, the upstream outputs it was trained from)."""
    run_dir = ctx.run_dir
    manifest = read_manifest(run_dir.finetune_dir)
    return (
        manifest is not None
        and manifest.get("split") == split
        and is_current(ctx.config, run_dir, "finetune", split, ctx.limit)
        and run_dir.head_path.is_file()
        and (not manifest.get("trunk_digest") or run_dir.trunk_path.is_file())
    )


def _check_upstream(config: Config, run_dir: RunDir, split: str) -> dict[str, dict]:
    """Manifests of the split's proposals (and cached features); their classes must match."""
    manifests = {"propose": require_upstream(config, run_dir, "propose", split)}
    # end-to-end fine-tuning reads images: a conv5 cache would come from the untrained trunk
    if config.extract.cache == "disk" and not config.finetune.conv_from:
        manifests["extract"] = require_upstream(config, run_dir, "extract", split)
    for stage, manifest in manifests.items():
        check_classes(manifest, config.data.classes, run_dir.stage_dir(stage, split), stage)
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
        load_proposals(config, run_dir, split, record)
        for record in tqdm(records, desc=f"label windows ({split})", unit="img", leave=False)
    ]
    return build_window_pool(
        records, proposals, len(config.data.classes), settings.fg_thresh,
        settings.bg_thresh_lo, settings.bg_thresh_hi, flip=flip,
    )  # fmt: skip


def _training_windows(
    config: Config, run_dir: RunDir, split: str, limit: int | None, device: str, flip: bool
) -> finetune.TrainingWindows:
    settings = config.finetune
    records = split_records(config, split, limit)
    source = open_feature_source(config, run_dir, split, device)
    pool = _window_pool(config, run_dir, split, records, flip=flip)
    if len(pool.labels) == 0:
        raise _no_windows(run_dir, split, settings)
    warn_missing_classes(pool, config.data.classes)
    feature_dim = source.geometry.feature_dim(source.channels)
    return finetune.TrainingWindows(
        records=records,
        source=source,
        pool=pool,
        labels=torch.as_tensor(pool.labels, device=source.device),
        feature_dim=feature_dim,
        block_iterations=finetune.block_size(settings.batch_size, feature_dim),
    )


def _new_trainer(
    config: Config,
    run_dir: RunDir,
    channels: int,
    device: torch.device,
    schedule: finetune.SgdSchedule,
    identity: dict,
    trunk: torch.nn.Module | None = None,
) -> finetune.Trainer:
    """A trainer for a trunk of ``channels`` conv5 channels, whose fc6/fc7 start from the
    backbone's pretrained classifier when it has one (``trunk``: conv layers it trains too)."""
    from spp_detect.models.weights import load_classifier_state

    classifier = load_classifier_state(config.extract.backbone, config.extract.weights)
    shape = _head_shape(config, channels)
    trainer = finetune.new_trainer(shape, schedule, classifier, identity, device, trunk=trunk)
    _check_checkpoint_space(run_dir, trainer)
    if classifier is not None:
        logger.info("fc6/fc7 start from the %s classifier", config.extract.backbone)
    return trainer


def _check_checkpoint_space(run_dir: RunDir, trainer: finetune.Trainer) -> None:
    """Weights and optimizer state of a checkpoint, twice (the new one is written beside the
    old one before it replaces it), plus the final head and trunk."""
    weights = tensor_bytes(trainer.head.state_dict())
    if trainer.trunk is not None:
        weights += tensor_bytes(trainer.trunk.state_dict())
    state = tensor_bytes(trainer.optimizer.state_dict())
    needed = 2 * (weights + max(state, weights)) + weights  # momentum buffers appear at step 1
    check_free_space(run_dir.finetune_dir, needed, "fine-tuning checkpoints")


def _head_shape(config: Config, channels: int) -> finetune.HeadShape:
    settings = config.finetune
    return finetune.HeadShape(
        channels=channels, levels=tuple(config.spp.levels), fc_dim=settings.fc_dim,
        num_classes=len(config.data.classes), dropout=settings.dropout,
        box_branch=settings.bbox_loss_weight > 0,
    )  # fmt: skip
