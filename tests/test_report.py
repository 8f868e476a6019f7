"""The run report (spp_detect/evaluation/report.py): one self-contained HTML page."""

from __future__ import annotations

import re

import numpy as np

from spp_detect.evaluation.report import ReportInputs, Tile, render, shrink

IMAGE_SOURCE = re.compile(r'<img src="([^"]*)"')


def _inputs(**changes) -> ReportInputs:
    picture = np.full((60, 80, 3), 200, np.uint8)
    values = dict(
        title="run r",
        provenance={"trunk": "efficientnet_lite0", "weights": "imagenet"},
        config_yaml="name: r\n",
        ap_rows=[("cat", 0.5, 0.55, 3)],
        metric_line="mAP 50.00",
        pr_curves=[("cat", np.array([0.1, 0.5]), np.array([1.0, 0.6]))],
        history=[
            {"iteration": 10, "loss": 1.0, "accuracy": 0.5},
            {"iteration": 20, "loss": 0.5, "accuracy": 0.7},
        ],
        stage_rows=[("extract", "test", 1.5, 300.0)],
        recall_rows=[("test", "2000", 0.9, 0.6, 0.5)],
        tiles={"most confident hits": [Tile(picture, "im1: cat 1.20")], "worst misses": []},
    )
    values.update(changes)
    return ReportInputs(**values)


def test_every_section_and_only_inline_images():
    page = render(_inputs())
    headings = (
        "Provenance", "Accuracy", "Fine-tuning", "Time and memory per stage", "Proposal recall",
        "Test images", "most confident hits", "worst misses",
    )  # fmt: skip
    for heading in headings:
        assert f">{heading}</h" in page
    sources = IMAGE_SOURCE.findall(page)
    assert len(sources) == 3  # PR curves, training curves, one tile
    assert all(source.startswith("data:image/png;base64,") for source in sources)
    assert "RANDOM CONV WEIGHTS" not in page and "im1: cat 1.20" in page


def test_random_weights_are_said_at_the_top():
    page = render(_inputs(trunk_is_random=True))
    assert page.index("RANDOM CONV WEIGHTS") < page.index("Provenance")


def test_a_run_without_evaluation_says_what_to_run():
    page = render(_inputs(ap_rows=[], pr_curves=[], history=[], tiles={}))
    assert "spp-detect eval" in page and "No fine-tuning history" in page


def test_shrink_keeps_the_aspect_and_scales_boxes():
    small, scale = shrink(np.zeros((640, 1280, 3), np.uint8), side=320)
    assert small.shape == (160, 320, 3) and scale == 0.25
    same, one = shrink(np.zeros((100, 50, 3), np.uint8), side=320)
    assert same.shape == (100, 50, 3) and one == 1.0
