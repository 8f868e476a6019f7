"""The whole pipeline through the CLI: run, test, eval, detect, combine, and their bad inputs.

One small toy run (module fixture) serves most tests. Every test here runs the whole pipeline,
so the whole module is marked slow (deselect with ``-m "not slow"``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from spp_detect.runtime.artifacts import load_npz
from spp_detect.testing import (
    BF16_TRUNK_MAP_TOLERANCE,
    HALF_FMAP_TOLERANCE,
    MAP_TOLERANCE,
    assert_fc_precision_keeps_scores_and_map,
    detector_map,
    invoke,
    map_error,
    toy_args,
    trained_test_split,
)

pytestmark = pytest.mark.slow  # the module fixture runs every stage end to end


@pytest.fixture(scope="module")
def toy_run(toy_root, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    result = invoke("run", *toy_args(toy_root, run_dir))
    assert result.exit_code == 0, result.output
    return run_dir


def test_run_writes_a_self_contained_report(toy_run):
    page = (toy_run / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) >= 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    for part in (
        "efficientnet_lite0",
        "mAP",
        "Fine-tuning",
        "most confident hits",
        "Time and memory",
    ):
        assert part in page
    assert "RANDOM CONV WEIGHTS" not in page


def test_report_renders_its_images_in_a_browser(toy_run, tmp_path):
    """Headless Chromium draws the page: its screenshot holds the photos' many colours, which a
    page of text and broken-image icons does not."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    shot = tmp_path / "report.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--window-size=1200,3000", f"--screenshot={shot}", (toy_run / "report.html").as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    pixels = cv2.imread(str(shot))
    assert pixels is not None and pixels.shape[:2] == (3000, 1200)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 2000, len(colours)


def test_run_writes_every_artefact(toy_run):
    for path in [
        "config.yaml",
        "proposals/trainval/manifest.json",
        "features/test/manifest.json",
        "finetune/head.pt",
        "svm/svms.npz",
        "svm/report.json",
        "bbox_reg/regressors.npz",
        "detections/test.npz",
        "eval/test.json",
        "eval/test/comp4_det_test_circle.txt",
    ]:
        assert (toy_run / path).is_file(), path
    detections = load_npz(toy_run / "detections/test.npz")
    assert set(detections) == {"image_ids", "image_index", "boxes", "scores", "labels"}
    assert detections["boxes"].dtype == np.float32 and detections["boxes"].shape[1] == 4
    report = json.loads((toy_run / "eval/test.json").read_text())
    assert report["metric"] == "voc07_11point"
    assert set(report["ap"]) == {"circle", "square", "triangle"}
    assert report["mAP"] > 0.3  # far above chance even with this tiny training


def test_manifests_record_the_upstream_manifests_they_read(toy_run):
    def fingerprint_of(folder: str) -> str:  # the token naming that manifest's output
        return json.loads((toy_run / folder / "manifest.json").read_text())["token"]

    def upstream_of(folder: str) -> dict:
        return json.loads((toy_run / folder / "manifest.json").read_text())["upstream"]

    assert upstream_of("proposals/test") == {}
    assert upstream_of("finetune") == {
        "propose": fingerprint_of("proposals/trainval"),
        "extract": fingerprint_of("features/trainval"),
    }
    assert upstream_of("detections/test") == {
        "propose": fingerprint_of("proposals/test"),
        "extract": fingerprint_of("features/test"),
        "finetune": fingerprint_of("finetune"),
        "train-svm": fingerprint_of("svm"),
        "train-bbox": fingerprint_of("bbox_reg"),
    }
    assert upstream_of("eval/test") == {"test": fingerprint_of("detections/test")}


def test_run_again_skips_every_stage(toy_root, toy_run):
    result = invoke("run", *toy_args(toy_root, toy_run))
    assert result.exit_code == 0, result.output
    assert result.output.count("done before") == 9


def test_run_reevaluates_after_test_is_recomputed(toy_root, toy_run):
    assert invoke("test", *toy_args(toy_root, toy_run), "--force").exit_code == 0
    result = invoke("run", *toy_args(toy_root, toy_run))
    assert result.exit_code == 0, result.output
    assert result.output.count("done before") == 8
    assert re.search(r"^eval +test +ran", result.output, re.MULTILINE), result.output


def test_run_completes_a_split_left_partial_by_limit(toy_root, toy_run, tmp_path):
    run = Path(shutil.copytree(toy_run, tmp_path / "run"))
    args = toy_args(toy_root, run)
    assert invoke("propose", *args, "--split", "test", "--limit", "2", "--force").exit_code == 0
    result = invoke("run", *args)
    assert result.exit_code == 0, result.output
    for stage in ("propose", "test", "eval"):  # the 2 new proposal files: their detections too
        assert re.search(rf"^{stage} +test +ran", result.output, re.MULTILINE), result.output
    assert "test: 2 items" in result.output
    manifest = json.loads((run / "proposals/test/manifest.json").read_text())
    assert (manifest["count"], manifest["limit"]) == (6, None)


def test_eval_voc2007_and_saved_config(toy_run):
    result = invoke("eval", "--run-dir", toy_run, "--voc2007")
    assert result.exit_code == 0, result.output
    assert "mean" in result.output and "mAP" in result.output


def test_eval_combine_with_itself(toy_run):
    result = invoke("eval", "--run-dir", toy_run, "--combine", toy_run)
    assert result.exit_code == 0, result.output
    combined = json.loads((toy_run / "eval/test_combined.json").read_text())
    single = json.loads((toy_run / "eval/test.json").read_text())
    # NMS on the union of identical detections keeps one copy of each
    assert combined["mAP"] == pytest.approx(single["mAP"], abs=1e-6)


def test_detect_writes_json_and_png(toy_root, toy_run, tmp_path, monkeypatch):
    from spp_detect.evaluation import visualize

    captions = []  # every label drawn on the PNGs, in drawing order
    monkeypatch.setattr(visualize, "_draw_label", lambda _, text, *__: captions.append(text))
    images = sorted((toy_root / "JPEGImages").glob("*.jpg"))[:2]
    out = tmp_path / "out"
    result = invoke("detect", *images, "--run-dir", toy_run, "--out", out)
    assert result.exit_code == 0, result.output
    expected = []
    for image in images:
        found = json.loads((out / f"{image.stem}.json").read_text())
        assert found["width"] > 0 and isinstance(found["detections"], list)
        for detection in found["detections"]:
            assert detection["class"] in {"circle", "square", "triangle"}
            assert detection["score"] >= 0.0
        # drawn worst first, so the best lands on top; the captions are the JSON's, by name
        for detection in reversed(found["detections"]):
            expected.append(f"{detection['class']} {detection['score']:.2f}")
        assert (out / f"{image.stem}.png").stat().st_size > 0
    assert expected and captions == expected


def test_detect_on_a_file_that_is_not_an_image(toy_run, tmp_path):
    bogus = tmp_path / "notes.jpg"
    bogus.write_text("not an image")
    result = invoke("detect", bogus, "--run-dir", toy_run, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "notes.jpg" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_run_dir_without_a_trained_model_names_the_stage(toy_root, toy_run, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(toy_run, partial)
    shutil.rmtree(partial / "finetune")
    result = invoke("test", "--run-dir", partial, "--force")
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "spp-detect finetune" in errors[0]
    assert "Traceback" not in result.output


def test_detections_of_other_classes_are_refused(toy_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(toy_run, other)
    manifest_path = other / "detections/test/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["classes"] = ["cat", "dog", "bird"]
    manifest_path.write_text(json.dumps(manifest))
    result = invoke("eval", "--run-dir", toy_run, "--combine", other)
    assert result.exit_code == 2
    assert "classes" in result.output and "Traceback" not in result.output


def test_unknown_test_precision_is_one_line_and_loses_nothing(toy_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(toy_run, copy)
    result = invoke("test", "--run-dir", copy, "--set", "test.precision=fp8", "--force")
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "test.precision: must be one of fp32, bf16, fp16" in errors[0]
    assert (copy / "detections/test/manifest.json").is_file()


def _replace_keeping_size_and_mtime(path: Path) -> None:
    """Rewrite a trained file with other numbers of the same shapes and give it back its
    modification time, as a copy of another run's file (``cp -p``) would look."""
    stat = path.stat()
    if path.suffix == ".pt":
        state = torch.load(path, weights_only=False)
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value.add_(1.0)
        torch.save(state, path)
    else:
        arrays = load_npz(path)
        key = next(k for k, v in arrays.items() if v.dtype.kind == "f")
        arrays[key] = arrays[key] + 1
        np.savez(path, **arrays)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize(
    ("rel", "reader", "stage"),
    [
        ("finetune/head.pt", "test", "finetune"),
        ("svm/svms.npz", "test", "train-svm"),
        ("bbox_reg/regressors.npz", "test", "train-bbox"),
        ("detections/test.npz", "eval", "test"),
    ],
)
def test_a_trained_file_replaced_since_its_stage_closed_is_refused(
    toy_run, tmp_path, rel, reader, stage
):
    copy = Path(shutil.copytree(toy_run, tmp_path / "copy"))
    _replace_keeping_size_and_mtime(copy / rel)
    result = invoke(reader, "--run-dir", copy, "--force")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert str(copy / rel) in errors[0] and f"spp-detect {stage} --split" in errors[0]


def test_run_reruns_every_stage_after_the_dataset_is_regenerated_in_place(toy_run, tmp_path):
    from spp_detect.data.toy import make_toy_dataset

    root = tmp_path / "toy"
    make_toy_dataset(root, num_train=12, num_test=6, seed=0)
    run = tmp_path / "run"
    assert invoke("run", *toy_args(root, run)).exit_code == 0
    make_toy_dataset(root, num_train=12, num_test=6, seed=5)  # same ids, other images and boxes
    result = invoke("run", *toy_args(root, run))
    assert result.exit_code == 0, result.output
    assert "done before" not in result.output
    assert "propose: 12 items" in result.output  # every image's proposals made again


def test_changed_config_refuses_stale_artefacts(toy_run):
    result = invoke("test", "--run-dir", toy_run, "--set", "spp.offset=3.0")
    assert result.exit_code == 2
    assert "different config" in result.output


# The demo measured 95.6 with 2 torch threads and 92.8 with 1 (BENCHMARKS.md): the thread count
# changes the order of float sums, and 600 SGD iterations grow that into another model. The
# floor leaves that spread room; random conv weights (83-89 before the pretrained trunk) fail it.
DEMO_MAP_FLOOR = 0.90


@pytest.mark.slow
def test_demo_reaches_toy_map(tmp_path, monkeypatch):
    """The README's main job: `spp-detect demo` on the CPU reaches its toy mAP floor."""
    monkeypatch.chdir(tmp_path)
    result = invoke("demo", "--workers", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "runs/toy/eval/test.json").read_text())
    assert report["mAP"] >= DEMO_MAP_FLOOR, report
    assert len(list((tmp_path / "runs/toy/demo").glob("*.png"))) >= 1


# End-to-end fine-tuning on the demo's toy set, lighter than the demo (2 scales, fc 512), from
# stage 3 of the pretrained Lite0 trunk at 0.1 × the head's rate. On random ZF-5 (an earlier
# round) it measured 86.0 mAP with the SVMs and 85.7 with the softmax
# (docs/benchmarks-history.md).
CONV_TOY_SETTINGS = [
    "finetune.conv_from=stage3",
    "finetune.conv_lr_mult=0.1",
    "finetune.lr=0.003",
    "finetune.iterations=400",
    "finetune.lr_steps=[300]",
    "extract.scales=[240,360]",
    "finetune.fc_dim=512",
]


@pytest.mark.slow
def test_conv_fine_tuning_on_the_toy_set_end_to_end(tmp_path):
    """Conv layers trained through the pyramid: propose → finetune (images) → extract
    (fine-tuned trunk) → SVMs → regression → test; toy mAP >= 0.8, with the SVMs and with the
    head's softmax."""
    from spp_detect.data.toy import make_toy_dataset

    make_toy_dataset(tmp_path / "toy")
    run = tmp_path / "run"
    args = [
        "-c",
        "toy",
        "--run-dir",
        run,
        "--workers",
        "2",
        "--set",
        f"data.root={tmp_path / 'toy'}",
    ]
    for setting in CONV_TOY_SETTINGS:
        args += ["--set", setting]
    result = invoke("run", *args)
    assert result.exit_code == 0, result.output
    _assert_trained_from(run / "finetune/trunk.pt", "stage3")
    assert json.loads((run / "eval/test.json").read_text())["mAP"] >= 0.8
    softmax = [*args, "--set", "test.scorer=softmax"]
    assert invoke("test", *softmax, "--force").exit_code == 0
    assert invoke("eval", *softmax).exit_code == 0
    assert json.loads((run / "eval/test.json").read_text())["mAP"] >= 0.8


def _assert_trained_from(trunk_path: Path, first: str) -> None:
    """The saved trunk differs from the packaged weights in every layer from ``first`` on and
    nowhere before it."""
    from spp_detect.models.backbones import conv_layer_index
    from spp_detect.models.weights import build_backbone
    from spp_detect.runtime.artifacts import load_torch

    loaded = build_backbone("efficientnet_lite0", "imagenet")
    index = conv_layer_index(loaded, first)
    trained = load_torch(trunk_path)
    for name, tensor in loaded.state_dict().items():
        layer = int(name.split(".")[1])
        assert torch.equal(trained[name], tensor) == (layer < index), name


# The bundled raccoon config is the CI setting (1 small scale, short training) on the default
# pretrained Lite0 trunk. Seeds 6-10 measured 76.3 to 90.0 (BENCHMARKS.md: 40 test photos make
# a wide spread); the floor leaves room for seeds and thread counts, and random conv weights
# (55.2 to 61.4 on the same seeds) fail it.
RACCOON_MAP_FLOOR = 0.70


@pytest.mark.slow
def test_raccoon_end_to_end(raccoon_root, tmp_path):
    args = ["-c", "raccoon", "--run-dir", tmp_path / "run", "--workers", "2"]
    result = invoke("run", *args, "--set", f"data.root={raccoon_root}")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run/eval/test.json").read_text())
    assert report["mAP"] >= RACCOON_MAP_FLOOR, report


def test_changed_test_setting_recomputes_every_image(toy_run, tmp_path):
    """Per-image detections made with another test config are recomputed, not mixed in."""
    copy = tmp_path / "copy"
    shutil.copytree(toy_run, copy)
    result = invoke("test", "--run-dir", copy, "--set", "test.bbox_reg=false")
    assert result.exit_code == 0, result.output
    assert "test: 6 items" in result.output
    again = invoke("test", "--run-dir", copy, "--set", "test.bbox_reg=false")
    assert "test: 0 items" in again.output


def test_optimised_test_path_keeps_the_naive_map(toy_run):
    """Dedup, pooling order and batching against every window pooled in input order."""
    import torch

    from spp_detect.models.detector import TrainedDetector
    from spp_detect.stages.builders import build_detector, detection_settings, open_feature_source

    class NaiveDetector(TrainedDetector):
        def window_features(self, source, record, proposals):
            pooled, _ = source.pool(record, proposals)
            return pooled, self.head.features(pooled), torch.arange(len(proposals))

    config, run_dir, records = trained_test_split(toy_run)
    fast = build_detector(config, run_dir, "cpu")
    settings = detection_settings(config)
    naive = NaiveDetector(fast.head, _svms_of(fast), fast.regressors, settings, "cpu")
    source = open_feature_source(config, run_dir, config.data.test_split, "cpu")
    naive_map = detector_map(naive, source, config, run_dir, records)
    fast_map = json.loads((toy_run / "eval/test.json").read_text())["mAP"]
    assert abs(naive_map - fast_map) <= 0.005


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_fc_keeps_the_scores_and_the_map(toy_run, precision):
    from spp_detect.stages.builders import open_feature_source

    config, run_dir, records = trained_test_split(toy_run)
    source = open_feature_source(config, run_dir, config.data.test_split, "cpu")
    assert_fc_precision_keeps_scores_and_map(config, run_dir, records, source, precision, "cpu")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_trunk_keeps_the_maps_and_the_map(toy_run, precision):
    from dataclasses import replace

    import torch

    from spp_detect.stages.builders import build_detector, live_feature_source

    config, run_dir, records = trained_test_split(toy_run)
    half_config = replace(config, extract=replace(config.extract, precision=precision))
    full = live_feature_source(config, run_dir, "cpu")
    half = live_feature_source(half_config, run_dir, "cpu")
    for record in records:
        for full_fmap, half_fmap in zip(full.maps(record), half.maps(record), strict=True):
            assert half_fmap.dtype == torch.float32
            assert map_error(full_fmap, half_fmap) <= HALF_FMAP_TOLERANCE
    detector = build_detector(config, run_dir, "cpu")
    full_ap = detector_map(detector, full, config, run_dir, records)
    half_ap = detector_map(detector, half, config, run_dir, records)
    tolerance = BF16_TRUNK_MAP_TOLERANCE if precision == "bf16" else MAP_TOLERANCE
    assert abs(full_ap - half_ap) <= tolerance


def _svms_of(detector):
    from spp_detect.models.linear import SvmModel

    weight = detector.svm_weight.T.contiguous().numpy()
    return SvmModel(weight, detector.svm_bias.numpy())


def test_python_api_detects_as_test_does(toy_root, toy_run):
    from spp_detect import Detector
    from spp_detect.data.image import read_image

    detector = Detector.from_run(toy_run)
    image_id = sorted((toy_run / "detections/test").glob("*.npz"))[0].stem
    path = toy_root / "JPEGImages" / f"{image_id}.jpg"
    proposals = load_npz(toy_run / f"proposals/test/{image_id}.npz")["boxes"]
    found = detector.detect(path, proposals)
    expected = load_npz(toy_run / f"detections/test/{image_id}.npz")
    # test pools float16 cached maps, the API float32 live ones: the same detections, to rounding
    top = np.argsort(-expected["scores"])[:5]
    for i in top:
        j = int(np.argmin(np.abs(found.boxes - expected["boxes"][i]).sum(axis=1)))
        assert found.labels[j] == expected["labels"][i]
        assert np.abs(found.boxes[j] - expected["boxes"][i]).max() < 1.0
        assert abs(found.scores[j] - expected["scores"][i]) < 0.02
    named = detector(read_image(path), proposals)  # an array works as the file does
    assert [d.score for d in named] == sorted(found.scores.tolist(), reverse=True)
    assert {d.label for d in named} <= {"circle", "square", "triangle"}


def test_python_api_features_of_boxes(toy_root, toy_run):
    from spp_detect import Detector
    from spp_detect.errors import UserError

    detector = Detector.from_run(toy_run)
    path = sorted((toy_root / "JPEGImages").glob("*.jpg"))[0]
    boxes = np.array([[0, 0, 40, 40], [10, 20, 90, 70]], np.float32)
    pool5 = detector.features(path, boxes)
    fc7 = detector.features(path, boxes, layer="fc7")
    assert pool5.shape == (2, detector.source.feature_dim) and fc7.shape == (2, 256)
    with torch.no_grad():
        again = detector.core.fc7_features(torch.from_numpy(pool5)).numpy()
    assert np.allclose(fc7, again, atol=1e-5)
    with pytest.raises(UserError, match="layer='conv5'"):
        detector.features(path, boxes, layer="conv5")
