"""`spp-detect run`: every stage in order, skipping the ones already complete for this config."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from spp_detect.stages.context import StageContext
from spp_detect.stages.manifests import is_current
from spp_detect.stages.provenance import trunk_line
from spp_detect.stages.report import write_report

logger = logging.getLogger(__name__)


def pipeline(ctx: StageContext) -> list[tuple[str, str, Callable[[], str]]]:
    """(stage, split, call) in order: proposals and maps of both splits, training, test, eval."""
    from spp_detect.stages.eval import run_eval
    from spp_detect.stages.extract import run_extract
    from spp_detect.stages.finetune import run_finetune
    from spp_detect.stages.propose import run_propose
    from spp_detect.stages.test import run_test
    from spp_detect.stages.train_bbox import run_train_bbox
    from spp_detect.stages.train_svm import run_train_svm

    data = ctx.config.data
    train, test = data.train_split, data.test_split
    config = ctx.config
    steps = [
        ("propose", train, lambda: run_propose(ctx, train)),
        ("propose", test, lambda: run_propose(ctx, test)),
    ]
    extract = []
    if config.extract.cache == "disk":
        extract = [
            ("extract", train, lambda: run_extract(ctx, train)),
            ("extract", test, lambda: run_extract(ctx, test)),
        ]
    finetune = [("finetune", train, lambda: run_finetune(ctx, train))]
    # end-to-end fine-tuning trains the trunk whose conv5 maps extract then caches
    steps += finetune + extract if config.finetune.conv_from else extract + finetune
    if config.test.scorer == "svm":
        steps.append(("train-svm", train, lambda: run_train_svm(ctx, train)))
    if config.test.bbox_reg and config.test.regressor == "ridge":
        steps.append(("train-bbox", train, lambda: run_train_bbox(ctx, train)))
    steps += [
        ("test", test, lambda: run_test(ctx, test)),
        ("eval", test, lambda: run_eval(ctx, test, config.eval.use_07_metric)),
    ]
    return steps


def is_complete(ctx: StageContext, stage: str, split: str) -> bool:
    """Whether ``stage`` is current; under torchrun rank 0's answer, so that every rank runs or
    skips it alike."""
    return ctx.dist.broadcast(is_current(ctx.config, ctx.run_dir, stage, split, ctx.limit))


def run_all(ctx: StageContext) -> str:
    """Run the pipeline; returns the last stage's output and a time table of every stage."""
    rows, last_output = [], ""
    for stage, split, call in pipeline(ctx):
        if not ctx.force and is_complete(ctx, stage, split):
            rows.append((stage, split, "done before", 0.0))
            continue
        logger.info("== %s (%s)", stage, split)
        started = time.perf_counter()
        output = call()
        rows.append((stage, split, "ran", time.perf_counter() - started))
        logger.info(output.splitlines()[-1])
        last_output = output
    report = f"\nreport: {write_report(ctx.config, ctx.run_dir)}" if ctx.dist.is_main else ""
    return f"{last_output}\n\n{format_times(rows)}\n{trunk_line(ctx.config)}{report}"


def format_times(rows: list[tuple[str, str, str, float]]) -> str:
    lines = [f"{'stage':<11} {'split':<10} {'status':<12} {'seconds':>8}"]
    lines += [f"{s:<11} {p:<10} {st:<12} {t:8.1f}" for s, p, st, t in rows]
    lines.append(f"{'total':<35} {sum(r[3] for r in rows):8.1f}")
    return "\n".join(lines)
