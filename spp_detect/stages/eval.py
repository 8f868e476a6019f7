"""`spp-detect eval`: VOC AP of a split's detections, devkit result files, PR curves.

Steps (docs/method.md#evaluation-rules):
1. the split's detections (running `test` first when they are missing), optionally merged with
   another run's by NMS on the union (the paper's model combination);
2. AP per class with the devkit rules: 11-point and area; with `--metric coco` also the COCO
   figures through pycocotools (docs/coco.md#the-coco-metric);
3. `eval/<name>.json`, the devkit files (and the COCO results JSON), the PR-curve PNG when
   matplotlib is there, the table.
"""

from __future__ import annotations

from pathlib import Path

from spp_detect.data import coco
from spp_detect.errors import UserError
from spp_detect.evaluation.coco_eval import (
    evaluate_coco,
    format_coco_line,
    require_pycocotools,
    results_json,
)
from spp_detect.evaluation.combine import combine_detections
from spp_detect.evaluation.voc_eval import (
    evaluate_all_classes,
    format_ap_table,
    plot_pr_curves,
    summarize,
    write_devkit_files,
)
from spp_detect.runtime.artifacts import load_npz, save_json
from spp_detect.runtime.run_dir import RunDir
from spp_detect.stages.context import StageContext, Summary, locked, split_records
from spp_detect.stages.manifests import (
    check_classes,
    check_data_of,
    check_file,
    clear_manifest,
    close_stage,
    read_manifest,
    require_upstream,
)
from spp_detect.stages.provenance import RANDOM_TRUNK_NOTE, trunk_provenance
from spp_detect.structures import Detections


@locked("eval")
def run_eval(
    ctx: StageContext,
    split: str,
    use_07_metric: bool,
    combine: Path | None = None,
    metric: str | None = None,
) -> str:
    """``metric``: voc, or coco for the COCO figures too (default eval.metric)."""
    config, run_dir = ctx.config, ctx.run_dir
    summary = Summary("eval")
    metric = metric or config.eval.metric
    if metric == "coco":
        require_pycocotools()  # before any work
    # 1. detections
    records = split_records(config, split, ctx.limit)
    detections = _own_detections(ctx, split)
    name = split
    if combine is not None:
        other = load_detections(RunDir(combine), split, config.data.classes)
        detections = combine_detections(detections, other, config.test.nms_thresh)
        name = f"{split}_combined"
    out_dir = run_dir.devkit_dir(name)
    clear_manifest(out_dir)
    # 2. AP
    results = evaluate_all_classes(
        detections, records, len(config.data.classes), config.eval.iou_thresh
    )
    report = summarize(
        results, config.data.classes, use_07_metric, config.eval.iou_thresh, len(records)
    )
    report["trunk"] = trunk_provenance(config)
    if combine is not None:
        report["combined_with"] = str(combine)
    if metric == "coco":
        report["coco"] = _coco_figures(ctx, split, name, records, detections)
    # 3. outputs
    save_json(run_dir.eval_path(name), report)
    write_devkit_files(
        detections, config.data.classes, run_dir.devkit_paths(name, split, config.data.classes)
    )
    curves = run_dir.pr_curve_path(name)
    plotted = plot_pr_curves(results, config.data.classes, curves)
    close_stage(ctx, "eval", split, len(records), folder=out_dir)
    summary.items = len(records)
    summary.notes.append(f"mAP {100 * report['mAP']:.2f} ({report['metric']})")
    if report["trunk"]["random"]:
        summary.notes.append(RANDOM_TRUNK_NOTE)
    notes = [format_ap_table(report), f"wrote {run_dir.eval_path(name)} and {out_dir}/"]
    if "coco" in report:
        notes.insert(1, format_coco_line(report["coco"]))
    notes.append(
        f"PR curves: {curves}" if plotted else "PR curves: install matplotlib to draw them"
    )
    return "\n".join([*notes, summary.line()])


def _coco_figures(
    ctx: StageContext, split: str, name: str, records: list, detections: Detections
) -> dict:
    """The COCO figures (docs/coco.md#the-coco-metric); the detections are written as a COCO
    results JSON, with the annotation file's category ids when the data is in COCO format."""
    config = ctx.config
    classes = config.data.classes
    category_ids = list(range(1, len(classes) + 1))
    if config.data.format == "coco":
        path = coco.annotation_path(config.data.root, config.data.annotations, split)
        category_ids = coco.category_ids(path, classes)
    results = results_json(detections, records, category_ids)
    save_json(ctx.run_dir.coco_results_path(name), results)
    return evaluate_coco(records, results, classes, category_ids)


def _own_detections(ctx: StageContext, split: str) -> Detections:
    """This run's detections of ``split``, made with the current config."""
    config, run_dir = ctx.config, ctx.run_dir
    manifest = require_upstream(config, run_dir, "test", split)
    check_data_of(config, manifest, run_dir.detections_path(split), "test", split)
    return load_detections(run_dir, split, config.data.classes)


def has_detections(ctx: StageContext, split: str) -> bool:
    """Whether `test` has closed ``split`` (with any config: a stale one is refused later)."""
    return read_manifest(ctx.run_dir.stage_dir("test", split)) is not None


def load_detections(run_dir: RunDir, split: str, classes: tuple[str, ...]) -> Detections:
    """Another run's detections of ``split``, refused if made for other classes."""
    manifest = read_manifest(run_dir.stage_dir("test", split))
    if manifest is None:
        raise UserError(
            f"{run_dir.root}: no detections for split {split!r}; run `spp-detect test` there first"
        )
    check_classes(manifest, classes, run_dir.detections_path(split), "test")
    check_file(manifest, run_dir.detections_path(split), "test", split)
    arrays = load_npz(run_dir.detections_path(split))
    try:
        return Detections(**arrays)
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"{run_dir.detections_path(split)}: not a detections file ({exc})"
        ) from None
