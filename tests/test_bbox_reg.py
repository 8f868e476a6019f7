import logging

import numpy as np
import pytest
import torch

from spp_detect.errors import UserError
from spp_detect.models.linear import BoxRegressors
from spp_detect.ops.boxes import decode_deltas, encode_deltas
from spp_detect.runtime.artifacts import remove_stale_temporaries
from spp_detect.stages.provenance import folder_token
from spp_detect.testing import cpu_and_cuda, uniform_boxes
from spp_detect.train.bbox_reg import (
    fit_box_regressor,
    fit_box_regressors,
    mean_iou_before_after,
    normal_equations,
    read_rows,
    ridge_solve,
    scaled_ridge_solve,
    solve_in_place,
    whitening,
)
from spp_detect.train.spill import ExampleSpill


def linear_problem(seed: int, count: int, dim: int):
    """Features, proposals and gt whose deltas are exactly features @ weight + bias."""
    rng = np.random.default_rng(seed)
    features = rng.normal(0, 1, (count, dim)).astype(np.float32)
    weight = rng.normal(0, 0.05, (dim, 4))
    bias = np.array([0.05, -0.02, 0.1, -0.1])
    proposals = uniform_boxes(rng, count, 300, (20, 150))
    gt_boxes = decode_deltas(proposals, features.astype(np.float64) @ weight + bias)
    return features, proposals, gt_boxes, weight, bias


def reference_fit(features, proposals, gt_boxes, ridge_lambda, whiten_eps):
    """The original's procedure written out: whiten, ridge on [x, 1], un-whiten on predict."""
    targets = encode_deltas(proposals, gt_boxes)
    mean = targets.mean(0)
    centred = targets - mean
    eigenvalues, vectors = np.linalg.eigh(centred.T @ centred / len(targets))
    whiten = vectors @ np.diag(1 / np.sqrt(eigenvalues + whiten_eps)) @ vectors.T
    unwhiten = vectors @ np.diag(np.sqrt(eigenvalues + whiten_eps)) @ vectors.T
    design = np.concatenate([features.astype(np.float64), np.ones((len(features), 1))], axis=1)
    beta = np.linalg.solve(
        design.T @ design + ridge_lambda * np.eye(design.shape[1]), design.T @ (centred @ whiten)
    )

    def predict(x):
        return np.concatenate([x, np.ones((len(x), 1))], axis=1) @ beta @ unwhiten + mean

    return predict


@pytest.mark.parametrize(("count", "dim"), [(300, 10), (40, 64)])  # primal and dual solves
def test_recovers_a_known_linear_map(count, dim):
    features, proposals, gt_boxes, weight, bias = linear_problem(0, count, dim)
    fitted_weight, fitted_bias = fit_box_regressor(features, proposals, gt_boxes, 1e-8, 1e-3)
    assert fitted_weight.shape == (dim, 4) and fitted_weight.dtype == np.float32
    probe = np.random.default_rng(1).normal(0, 1, (20, dim))
    if count > dim:  # determined: the map itself is recovered
        np.testing.assert_allclose(
            probe @ fitted_weight + fitted_bias, probe @ weight + bias, atol=1e-4
        )
    # in both cases the training deltas are reproduced
    train_deltas = features @ fitted_weight + fitted_bias
    np.testing.assert_allclose(train_deltas, features @ weight + bias, atol=1e-4)


@pytest.mark.parametrize(("count", "dim"), [(200, 12), (30, 50)])
def test_folded_model_equals_the_unfolded_reference(count, dim):
    rng = np.random.default_rng(2)
    features = rng.normal(0, 3, (count, dim)).astype(np.float32)
    proposals = uniform_boxes(rng, count, 300, (20, 150))
    gt_boxes = proposals + rng.normal(0, 8, (count, 4))  # noisy, not a linear map
    weight, bias = fit_box_regressor(features, proposals, gt_boxes, 4000.0, 1e-3)
    reference = reference_fit(features, proposals, gt_boxes, 4000.0, 1e-3)
    probe = rng.normal(0, 3, (15, dim))
    np.testing.assert_allclose(probe @ weight + bias, reference(probe), rtol=1e-4, atol=1e-6)


def test_ridge_primal_and_dual_agree():
    rng = np.random.default_rng(3)
    features = torch.from_numpy(rng.normal(size=(40, 40)))
    targets = torch.from_numpy(rng.normal(size=(40, 4)))
    for count in (40, 30):  # N = D + 1 takes the primal solve, N < D + 1 the dual
        beta = ridge_solve(features[:count, :39], targets[:count], 5.0)
        design = np.concatenate([features.numpy()[:count, :39], np.ones((count, 1))], 1)
        gram = design.T @ design + 5 * np.eye(40)
        expected = np.linalg.solve(gram, design.T @ targets.numpy()[:count])
        np.testing.assert_allclose(beta.numpy(), expected, atol=1e-10)


def test_whitening_whitens():
    targets = np.random.default_rng(4).normal(0, [0.1, 0.2, 0.3, 0.4], (500, 4))
    mean, whiten, unwhiten = whitening(targets, 0.0)
    white = (targets - mean) @ whiten
    np.testing.assert_allclose(white.T @ white / len(white), np.eye(4), atol=1e-9)
    np.testing.assert_allclose(whiten @ unwhiten, np.eye(4), atol=1e-9)


def test_feature_scale_is_folded():
    features, proposals, gt_boxes, _, _ = linear_problem(5, 100, 8)
    scale = 20.0 / 3.0
    weight, bias = fit_box_regressor(features, proposals, gt_boxes, 50.0, 1e-3, feature_scale=scale)
    scaled_weight, scaled_bias = fit_box_regressor(
        features * scale, proposals, gt_boxes, 50.0, 1e-3
    )
    np.testing.assert_allclose(
        features @ weight + bias, (features * scale) @ scaled_weight + scaled_bias, atol=1e-5
    )
    regressors = BoxRegressors(scaled_weight[None], scaled_bias[None]).fold_feature_scale(scale)
    np.testing.assert_allclose(regressors.weight[0], weight, rtol=1e-4, atol=1e-6)


def test_box_regressors_predict_and_apply():
    weight = np.zeros((2, 3, 4), np.float32)
    bias = np.zeros((2, 4), np.float32)
    bias[1] = [0.5, 0.0, np.log(2.0), 0.0]  # class 1: shift right by half a width, double width
    weight[0, 0] = [0.1, 0, 0, 0]  # class 0: t_x = 0.1 · feature 0
    regressors = BoxRegressors(weight, bias)
    features = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [2.0, 0, 0]])
    labels = torch.tensor([0, 1, 0])
    deltas = regressors.predict(features, labels)
    torch.testing.assert_close(deltas[:, 0], torch.tensor([0.1, 0.5, 0.2]))
    boxes = torch.tensor([[10.0, 10.0, 20.0, 20.0], [10.0, 10.0, 20.0, 20.0], [95, 0, 105, 10]])
    applied = regressors.apply(boxes, features, labels, image_hw=(50, 100))
    torch.testing.assert_close(applied[0], torch.tensor([11.0, 10.0, 21.0, 20.0]))
    torch.testing.assert_close(applied[1], torch.tensor([10.0, 10.0, 30.0, 20.0]))
    torch.testing.assert_close(applied[2], torch.tensor([97.0, 0.0, 100.0, 10.0]))  # clipped


def test_fit_box_regressors_identity_for_empty_class(caplog):
    features, proposals, gt_boxes, _, _ = linear_problem(6, 50, 5)
    empty = (np.zeros((0, 5), np.float32), np.zeros((0, 4)), np.zeros((0, 4)))
    with caplog.at_level(logging.WARNING):
        regressors, report = fit_box_regressors(
            [(features, proposals, gt_boxes), empty], 5, 4000.0, 1e-3
        )
    assert "class 1 has no regression examples" in caplog.text
    assert [r["skipped"] for r in report] == [False, True]
    np.testing.assert_array_equal(regressors.weight[1], 0)
    np.testing.assert_array_equal(regressors.bias[1], 0)
    assert np.abs(regressors.weight[0]).sum() > 0


def test_save_load_round_trip_and_bad_file(tmp_path):
    rng = np.random.default_rng(7)
    regressors = BoxRegressors(rng.normal(size=(3, 6, 4)), rng.normal(size=(3, 4)))
    regressors.save(tmp_path / "regressors.npz")
    loaded = BoxRegressors.load(tmp_path / "regressors.npz")
    np.testing.assert_array_equal(loaded.weight, regressors.weight)
    np.testing.assert_array_equal(loaded.bias, regressors.bias)
    np.savez(tmp_path / "bad.npz", weight=np.zeros((3, 6)))
    with pytest.raises(UserError, match=r"bad\.npz"):
        BoxRegressors.load(tmp_path / "bad.npz")


def test_regression_examples_take_windows_above_the_iou_and_their_best_gt():
    from spp_detect.train.bbox_reg import regression_examples

    gt = np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32)
    boxes = np.array(
        [[0, 0, 10, 10], [21, 21, 40, 40], [0, 0, 20, 20], [50, 50, 60, 60]], np.float32
    )
    rows, assigned = regression_examples(boxes, gt, 0.5)
    assert rows.tolist() == [0, 1] and assigned.tolist() == [0, 1]  # IoU 0.25 and 0 are out
    rows, _ = regression_examples(boxes, gt, 1.0)  # strictly above: IoU 1 is not > 1
    assert rows.tolist() == []
    rows, assigned = regression_examples(boxes, np.zeros((0, 4), np.float32), 0.5)
    assert rows.shape == assigned.shape == (0,)


# Chunked solve and spilled examples (issue 17). Both solves build the same normal equations;
# only the order of the float64 sums differs (within each 7-row chunk, then across chunks), a
# relative rounding of ~1e-16 per term that the solve amplifies by the condition number of
# AᵀA + λI (below 30 for these problems; the entries of β differ by ≤ 1e-13 relative, the
# smallest included): 1e-9 leaves a wide margin for other BLAS builds and still catches a
# missing or doubled chunk, which moves β by percents.
CHUNK_TOLERANCE = 1e-9
CHUNK = 7  # rows per chunk: smaller than R, and R is no multiple of it


@pytest.mark.parametrize(("count", "dim"), [(60, 9), (10, 9), (23, 4)])  # R ≥ D + 1, R = D + 1
def test_chunked_primal_solve_equals_the_in_memory_solve(count, dim):
    rng = np.random.default_rng(8)
    features = rng.normal(0, 2, (count, dim))
    targets = torch.from_numpy(rng.normal(size=(count, 4)))
    scale = 0.7
    expected = ridge_solve(torch.from_numpy(features * scale), targets, 3.0)
    gram, rhs = normal_equations(features, targets, scale, CHUNK)
    assert gram.dtype == rhs.dtype == torch.float64 and gram.shape == (dim + 1, dim + 1)
    beta = solve_in_place(gram, rhs, 3.0)
    torch.testing.assert_close(beta, expected, rtol=CHUNK_TOLERANCE, atol=0)
    torch.testing.assert_close(
        scaled_ridge_solve(features, targets, 3.0, scale, CHUNK), expected, rtol=CHUNK_TOLERANCE,
        atol=0,
    )  # fmt: skip


def spill_of(tmp_path, features, proposals, gt_boxes, labels, num_classes, pieces):
    """An entered ExampleSpill holding the examples, appended in ``pieces`` image-like parts."""
    spill = ExampleSpill(tmp_path, num_classes, features.shape[1]).__enter__()
    for part in np.array_split(np.arange(len(features)), pieces):
        for label in np.unique(labels[part]):
            rows = part[labels[part] == label]
            spill.append(int(label), features[rows], proposals[rows], gt_boxes[rows])
    return spill


@pytest.mark.parametrize(("count", "dim"), [(200, 12), (40, 50)])  # primal (2 classes), dual
def test_fitting_from_a_spill_equals_fitting_in_memory(tmp_path, count, dim):
    rng = np.random.default_rng(9)
    features = rng.normal(0, 3, (count, dim)).astype(np.float16)
    proposals = uniform_boxes(rng, count, 300, (20, 150))
    gt_boxes = proposals + rng.normal(0, 8, (count, 4))
    labels = rng.integers(0, 2, count) if count > dim else np.zeros(count, int)
    in_memory = [
        (features[labels == k], proposals[labels == k], gt_boxes[labels == k]) for k in range(3)
    ]  # class 2 has no examples
    expected, expected_report = fit_box_regressors(in_memory, dim, 4000.0, 1e-3, 0.3)
    spill = spill_of(tmp_path, features, proposals, gt_boxes, labels, 3, pieces=5)
    try:
        spilled = spill.examples()
        assert isinstance(spilled[0][0], np.memmap) and spilled[2][0].shape == (0, dim)
        fitted, report = fit_box_regressors(spilled, dim, 4000.0, 1e-3, 0.3, chunk_rows=CHUNK)
        for (features_k, *boxes), (spilled_k, *spilled_boxes) in zip(
            in_memory, spilled, strict=True
        ):
            np.testing.assert_array_equal(np.asarray(spilled_k), features_k)  # same order
            for a, b in zip(boxes, spilled_boxes, strict=True):
                np.testing.assert_array_equal(a, b)
        ious = [mean_iou_before_after(fitted, k, *spilled[k], chunk_rows=CHUNK) for k in (0, 1)]
    finally:
        spill.__exit__(None, None, None)
    assert report == expected_report
    np.testing.assert_allclose(fitted.weight, expected.weight, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fitted.bias, expected.bias, rtol=1e-5, atol=1e-7)
    assert ious == [mean_iou_before_after(expected, k, *in_memory[k]) for k in (0, 1)]
    # and both are still the original's procedure, on the scaled features
    features_0, proposals_0, gt_0 = in_memory[0]
    reference = reference_fit(features_0.astype(np.float64) * 0.3, proposals_0, gt_0, 4000.0, 1e-3)
    probe = rng.normal(0, 3, (15, dim))
    np.testing.assert_allclose(
        probe @ fitted.weight[0] + fitted.bias[0], reference(probe * 0.3), rtol=1e-4, atol=1e-6
    )


def test_spill_round_trips_and_removes_its_files(tmp_path):
    rng = np.random.default_rng(10)
    features = rng.normal(size=(25, 6)).astype(np.float16)
    boxes = uniform_boxes(rng, 25, 300, (20, 150)).astype(np.float32)
    labels = np.repeat([0, 2, 0], [10, 8, 7])
    (tmp_path / "regressors.npz").write_bytes(b"artefact")
    token = folder_token(tmp_path, "fingerprint")
    with ExampleSpill(tmp_path, 3, 6) as spill:
        for rows in (slice(0, 10), slice(10, 18), slice(18, 25)):
            spill.append(int(labels[rows][0]), features[rows], boxes[rows], boxes[rows] + 1)
        examples = spill.examples()
        assert folder_token(tmp_path, "fingerprint") == token  # spill files are no artefact
        np.testing.assert_array_equal(examples[0][0], features[labels == 0])
        np.testing.assert_array_equal(examples[0][1], boxes[labels == 0])
        np.testing.assert_array_equal(examples[2][2], boxes[labels == 2] + 1)
        assert examples[1][0].shape == (0, 6) and examples[1][1].shape == (0, 4)
        middle = read_rows(examples[0][0], 3, 12)  # read from the file, not through the map
        assert type(middle) is np.ndarray and middle.flags.writeable
        np.testing.assert_array_equal(middle, features[labels == 0][3:12])
        spill.append(2, features[:2], boxes[:2], boxes[:2])  # more after examples(): appended
        np.testing.assert_array_equal(spill.examples()[2][0][-2:], features[:2])
        del examples, middle
    assert sorted(p.name for p in tmp_path.iterdir()) == ["regressors.npz"]


def test_spill_files_go_on_an_error_and_after_a_killed_run(tmp_path):
    features = np.ones((3, 4), np.float16)
    boxes = np.zeros((3, 4), np.float32)
    with pytest.raises(RuntimeError, match="boom"), ExampleSpill(tmp_path, 2, 4) as spill:
        spill.append(1, features, boxes, boxes)
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    # a killed run never reaches __exit__: the next stage start (locked) removes what it left
    killed = ExampleSpill(tmp_path, 2, 4).__enter__()
    killed.append(0, features, boxes, boxes)
    killed.append(1, features, boxes, boxes)
    killed.examples()  # flushed, as a kill after the fit would leave them
    assert len(list(tmp_path.iterdir())) == 2
    assert remove_stale_temporaries(tmp_path) == 2
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"need features \(E, 4\)"):
        ExampleSpill(tmp_path, 2, 4).append(0, np.ones((3, 5)), boxes, boxes)


def test_a_full_disk_while_spilling_is_one_line_naming_the_file(tmp_path, monkeypatch):
    import errno

    from spp_detect.train import spill as spill_module

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spill_module, "open", full_disk, raising=False)
    boxes = np.zeros((2, 4), np.float32)
    written = r"\.examples\.class001\.f16\.tmp: could not write"
    with pytest.raises(UserError, match=written), ExampleSpill(tmp_path, 2, 3) as spill:
        spill.append(1, np.ones((2, 3)), boxes, boxes)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_chunked_solve_on_the_device_equals_the_cpu(device):
    rng = np.random.default_rng(11)
    features = rng.normal(size=(90, 20)).astype(np.float16)
    targets = torch.from_numpy(rng.normal(size=(90, 4)))
    cpu = scaled_ridge_solve(features, targets, 5.0, 0.5, CHUNK)
    solved = scaled_ridge_solve(features, targets.to(device), 5.0, 0.5, CHUNK)
    assert solved.device.type == device
    torch.testing.assert_close(solved.cpu(), cpu, rtol=CHUNK_TOLERANCE, atol=0)
