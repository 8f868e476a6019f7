"""The run report: one self-contained HTML page, every plot and picture inline (PNG in base64).

Shapes: M detections, G gt boxes of an image.

The page is built from plain values (``ReportInputs``); ``spp_detect.stages.report`` reads them
from a run directory. Sections: provenance (config, trunk, weights, versions), the per-class AP
table and PR curves, the fine-tuning loss and accuracy, the time and peak memory of each stage,
proposal recall, and a grid of test images: the most confident hits, the worst misses and the
most confident false positives.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TILE_SIDE = 320  # px: the longer side of each picture in the grid
TILES_PER_KIND = 4  # hits, misses and false positives shown
PLOT_DPI = 100
MISS_COLOUR = (255, 255, 255)  # a missed gt box, drawn white with a black outline


@dataclass(frozen=True)
class Tile:
    """One picture of the grid: an RGB image (H, W, 3) uint8 already drawn, and its caption."""

    image: np.ndarray
    caption: str


@dataclass(frozen=True)
class ReportInputs:
    """What the page shows; every part but ``title`` may be empty (a run not finished)."""

    title: str
    provenance: Mapping[str, str] = field(default_factory=dict)
    trunk_is_random: bool = False
    config_yaml: str = ""
    ap_rows: Sequence[tuple[str, float, float, int]] = ()  # class, AP 07, AP area, positives
    metric_line: str = ""
    pr_curves: Sequence[tuple[str, np.ndarray, np.ndarray]] = ()  # class, recall, precision
    history: Sequence[Mapping[str, float]] = ()  # finetune/history.json entries
    stage_rows: Sequence[tuple[str, str, float, float]] = ()  # stage, split, s, peak MiB
    recall_rows: Sequence[tuple[str, str, float, float, float]] = ()  # split, top-k, R@.5/.7, AR
    tiles: Mapping[str, Sequence[Tile]] = field(default_factory=dict)  # kind → pictures


def render(inputs: ReportInputs) -> str:
    """The whole page as one HTML string."""
    parts = [
        _header(inputs),
        _provenance(inputs),
        _accuracy(inputs),
        _training(inputs),
        _stages(inputs),
        _recall(inputs),
        _grid(inputs),
        "</body></html>\n",
    ]
    return "\n".join(part for part in parts if part)


def png_data_uri(image_rgb: np.ndarray) -> str:
    """``data:image/png;base64,...`` of an RGB uint8 image (H, W, 3)."""
    import cv2

    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("could not encode the picture as PNG")
    return "data:image/png;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


def shrink(image_rgb: np.ndarray, side: int = TILE_SIDE) -> tuple[np.ndarray, float]:
    """The image with its longer side at most ``side`` px (area interpolation), and the
    factor its boxes scale by (≤ 1): boxes are drawn after shrinking, so lines stay visible."""
    import cv2

    height, width = image_rgb.shape[:2]
    scale = side / max(height, width)
    if scale >= 1:
        return image_rgb, 1.0
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image_rgb, size, interpolation=cv2.INTER_AREA), scale


def draw_missed(image_rgb: np.ndarray, boxes: np.ndarray, thickness: int = 2) -> np.ndarray:
    """A copy of the image with gt boxes (G, 4) no detection found, white on a black outline."""
    import cv2

    canvas = np.ascontiguousarray(image_rgb).copy()
    for x1, y1, x2, y2 in np.round(boxes).astype(int).tolist():
        corners = (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1))
        cv2.rectangle(canvas, *corners, (0, 0, 0), thickness + 2)
        cv2.rectangle(canvas, *corners, MISS_COLOUR, thickness)
    return canvas


# ---- sections ---------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; } td, th { padding: 0.2em 0.8em; border-bottom: 1px solid #eee; }
th { text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.warn { background: #fdd; border: 2px solid #c00; padding: 0.6em; font-weight: bold; }
.grid { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } figcaption { font-size: 0.85em; max-width: 320px; }
pre { background: #f6f6f6; padding: 0.8em; max-height: 24em; overflow: auto; font-size: 0.85em; }
"""


def _header(inputs: ReportInputs) -> str:
    title = html.escape(inputs.title)
    warning = ""
    if inputs.trunk_is_random:
        warning = (
            '<p class="warn">RANDOM CONV WEIGHTS (extract.weights=none): these figures come '
            "from random conv layers and say nothing about a real detector.</p>"
        )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{STYLE}</style></head><body><h1>{title}</h1>{warning}"
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            numeric = isinstance(cell, int | float) and not isinstance(cell, bool)
            css = ' class="n"' if numeric else ""
            cells.append(f"<td{css}>{html.escape(_text(cell))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _text(cell: Any) -> str:
    return f"{cell:.2f}" if isinstance(cell, float) else str(cell)


def _provenance(inputs: ReportInputs) -> str:
    rows = [(key, value) for key, value in inputs.provenance.items()]
    config = ""
    if inputs.config_yaml:
        config = f"<details><summary>config.yaml</summary><pre>{html.escape(inputs.config_yaml)}</pre></details>"  # noqa: E501
    return f"<h2>Provenance</h2>{_table(('', ''), rows)}{config}"


def _accuracy(inputs: ReportInputs) -> str:
    if not inputs.ap_rows:
        return "<h2>Accuracy</h2><p>No evaluation yet: run <code>spp-detect eval</code>.</p>"
    rows = [(name, 100 * ap07, 100 * area, npos) for name, ap07, area, npos in inputs.ap_rows]
    plot = _figure_img(_pr_figure(inputs.pr_curves)) if inputs.pr_curves else ""
    metric = f"<p>{html.escape(inputs.metric_line)}</p>" if inputs.metric_line else ""
    table = _table(("class", "AP (VOC07 11-point, %)", "AP (area, %)", "positives"), rows)
    return f"<h2>Accuracy</h2>{metric}{table}{plot}"


def _training(inputs: ReportInputs) -> str:
    if not inputs.history:
        return "<h2>Fine-tuning</h2><p>No fine-tuning history in this run.</p>"
    return f"<h2>Fine-tuning</h2>{_figure_img(_history_figure(inputs.history))}"


def _stages(inputs: ReportInputs) -> str:
    if not inputs.stage_rows:
        return ""
    rows = [(stage, split, seconds, peak) for stage, split, seconds, peak in inputs.stage_rows]
    table = _table(("stage", "split", "seconds", "peak memory (MiB)"), rows)
    note = "<p>Peak memory: the largest resident set of the stage's main process.</p>"
    return f"<h2>Time and memory per stage</h2>{table}{note}"


def _recall(inputs: ReportInputs) -> str:
    if not inputs.recall_rows:
        return ""
    rows = [
        (split, top, 100 * r50, 100 * r70, 100 * ar)
        for split, top, r50, r70, ar in inputs.recall_rows
    ]
    header = ("split", "proposals", "recall IoU 0.5 (%)", "recall IoU 0.7 (%)", "average recall")
    return f"<h2>Proposal recall</h2>{_table(header, rows)}"


def _grid(inputs: ReportInputs) -> str:
    sections = []
    for kind, tiles in inputs.tiles.items():
        figures = "".join(
            f'<figure><img src="{png_data_uri(tile.image)}" alt="{html.escape(tile.caption)}">'
            f"<figcaption>{html.escape(tile.caption)}</figcaption></figure>"
            for tile in tiles
        )
        body = f'<div class="grid">{figures}</div>' if tiles else "<p>None.</p>"
        sections.append(f"<h3>{html.escape(kind)}</h3>{body}")
    if not sections:
        return ""
    return "<h2>Test images</h2>" + "".join(sections)


# ---- plots (matplotlib, drawn off-screen) ----------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure_img(figure) -> str:
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PLOT_DPI, bbox_inches="tight")
    plt.close(figure)
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<p><img src="{uri}" alt="plot"></p>'


def _pr_figure(curves: Sequence[tuple[str, np.ndarray, np.ndarray]]):
    figure, axes = _pyplot().subplots(figsize=(6, 4.5))
    for name, recall, precision in curves:
        axes.plot(recall, precision, label=name)
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01), title="PR curves")
    axes.legend(fontsize="small", loc="lower left")
    return figure


def _history_figure(history: Sequence[Mapping[str, float]]):
    figure, (loss_axes, accuracy_axes) = _pyplot().subplots(1, 2, figsize=(10, 3.5))
    iterations = [entry["iteration"] for entry in history]
    loss_axes.plot(iterations, [entry["loss"] for entry in history])
    loss_axes.set(xlabel="iteration", ylabel="loss", title="training loss")
    accuracy_axes.plot(iterations, [entry["accuracy"] for entry in history], label="train")
    if "val_accuracy" in history[-1]:
        held_out = [(e["iteration"], e["val_accuracy"]) for e in history if "val_accuracy" in e]
        accuracy_axes.plot(*zip(*held_out, strict=True), label="held out")
    accuracy_axes.set(xlabel="iteration", ylabel="window accuracy", title="accuracy")
    accuracy_axes.legend(fontsize="small")
    return figure
