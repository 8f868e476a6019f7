import logging
import sys

import numpy as np
import pytest

from spp_detect.config import load_config
from spp_detect.errors import UserError
from spp_detect.models.linear import SvmModel
from spp_detect.train.svm import (
    SKIPPED_CLASS_BIAS,
    HardNegativeMiner,
    SvmParams,
    _ClassCache,
    cache_cap,
    fold_feature_scale,
    mine_and_train,
    pack_keys,
    svm_objective,
    train_linear_svm,
    unpack_keys,
)

# The solver settings of docs/method.md#svm-training; the mining tests use a larger C so that a
# handful of points already pull the hyperplane where the hand analysis says.
PAPER_PARAMS = SvmParams(
    C=1e-3,
    pos_weight=2.0,
    intercept_scaling=10.0,
    tol=0.1,
    hard_thresh=-1.0001,
    evict_thresh=-1.2,
    retrain_limit=2000,
)
MINING_PARAMS = SvmParams(
    C=10.0,
    pos_weight=1.0,
    intercept_scaling=10.0,
    tol=1e-6,
    hard_thresh=-1.0001,
    evict_thresh=-1.2,
    retrain_limit=5,
    max_iter=100_000,
)


def points(x0: list[float], dim: int = 3) -> np.ndarray:
    """Rows with first coordinate x0 and zeros elsewhere."""
    rows = np.zeros((len(x0), dim), np.float32)
    rows[:, 0] = x0
    return rows


def blobs(seed: int, count: int = 60, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pos = rng.normal(0, 1, (count, dim)).astype(np.float32)
    neg = rng.normal(0, 1, (3 * count, dim)).astype(np.float32)
    pos[:, 0] += 4
    neg[:, 0] -= 4
    return pos, neg


def test_separates_separable_data():
    pos, neg = blobs(0)
    params = SvmParams(**{**PAPER_PARAMS.__dict__, "C": 1.0})
    weight, bias, objective = train_linear_svm(pos, neg, params)
    assert weight.shape == (8,) and weight.dtype == np.float32
    assert (pos @ weight + bias > 0).all() and (neg @ weight + bias < 0).all()
    assert objective == pytest.approx(svm_objective(weight, bias, pos, neg, params))


def test_solution_is_the_optimum_of_the_documented_objective():
    """The objective (pos_weight on positives, bias regularised as (b/B)²) is minimal there."""
    pos, neg = blobs(1, count=30, dim=4)
    neg[:5, 0] += 6  # overlapping classes, so the hinge terms matter
    pos[:, 0] += 10  # a boundary far from the origin, so the bias penalty matters
    neg[:, 0] += 10
    params = SvmParams(**{**PAPER_PARAMS.__dict__, "C": 0.1, "tol": 1e-8, "max_iter": 100_000})
    weight, bias, objective = train_linear_svm(pos, neg, params)
    rng = np.random.default_rng(0)
    for _ in range(200):
        step = rng.normal(0, 1e-2, 5)
        moved = svm_objective(
            weight + step[:4].astype(np.float32), bias + step[4], pos, neg, params
        )
        assert moved >= objective - 1e-5


def test_hard_negative_mining_adds_hard_and_evicts_easy():
    # Positives at x0 = 2. Image 0: negatives at −2 (kept) and −10 (easy, evicted after the first
    # training: w ≈ 0.5, b ≈ 0 puts −10 at ≈ −5). Images 1–4: two easy negatives at −10 (never
    # added) and one hard negative at 0 (score ≈ 0 > −1.0001, added). The last retrain moves the
    # boundary to x0 = 1, which makes the negatives at −2 easy (≈ −3): evicted.
    positives = [points([2.0] * 10)]
    miner = HardNegativeMiner(positives, MINING_PARAMS)
    miner.add_image([(points([-2, -2, -2, -10, -10]), np.arange(5))], is_last=False)
    np.testing.assert_array_equal(miner.cached_keys(0), [[0, 0], [0, 1], [0, 2]])
    for image in range(1, 5):
        miner.add_image([(points([-10, 0, -10]), np.array([7, 8, 9]))], is_last=image == 4)
        if image == 1:
            np.testing.assert_array_equal(miner.cached_keys(0), [[0, 0], [0, 1], [0, 2], [1, 8]])
    np.testing.assert_array_equal(miner.cached_keys(0), [[1, 8], [2, 8], [3, 8], [4, 8]])
    model = miner.model()
    assert model.report[0]["retrains"] == 2  # first image + last image (4 added ≤ limit 5)
    assert model.report[0]["negatives"] == 4 and not model.report[0]["skipped"]
    score = model.scores(points([1.0, 0.0, 2.0]))[:, 0]
    np.testing.assert_allclose(score, [0.0, -1.0, 1.0], atol=1e-3)


def test_retrain_limit_triggers_a_retrain():
    positives = [points([2.0] * 10)]
    miner = HardNegativeMiner(positives, MINING_PARAMS)
    miner.add_image([(points([-2.0]), np.array([0]))], is_last=False)
    hard = points([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])  # 6 > retrain_limit 5
    miner.add_image([(hard, np.arange(6))], is_last=False)
    assert miner.model().report[0]["retrains"] == 2


def test_already_cached_negatives_are_not_added_twice():
    positives = [points([2.0] * 10)]
    miner = HardNegativeMiner(positives, MINING_PARAMS)
    miner.add_image([(points([0.0, 0.0]), np.array([3, 3]))], is_last=False)
    assert len(miner.cached_keys(0)) == 1


def test_mine_and_train_matches_the_miner_and_folds_the_scale():
    rng = np.random.default_rng(2)
    positives = [rng.normal(1, 1, (20, 6)).astype(np.float32) + 2 for _ in range(2)]
    images = [
        [(rng.normal(0, 1, (15, 6)).astype(np.float32), np.arange(15)) for _ in range(2)]
        for _ in range(6)
    ]
    scale = 0.25
    model = mine_and_train(positives, iter(images), MINING_PARAMS, feature_scale=scale)
    miner = HardNegativeMiner([p * scale for p in positives], MINING_PARAMS)
    for number, image in enumerate(images):
        miner.add_image([(f * scale, k) for f, k in image], is_last=number == len(images) - 1)
    reference = miner.model()
    features = rng.normal(0, 1, (10, 6)).astype(np.float32)
    np.testing.assert_allclose(
        model.scores(features), reference.scores(features * scale), rtol=1e-4, atol=1e-4
    )


def test_fold_feature_scale_gives_the_scores_of_scaled_features():
    rng = np.random.default_rng(3)
    weight, bias = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=3)
    features = rng.normal(size=(7, 5)).astype(np.float32)
    folded_weight, folded_bias = fold_feature_scale(weight, bias, 20.0 / 7.0)
    np.testing.assert_allclose(
        features @ folded_weight.T + folded_bias,
        (features * (20.0 / 7.0)) @ weight.T + bias,
        rtol=1e-5,
        atol=1e-5,
    )


def test_class_without_positives_or_negatives_is_skipped(caplog):
    positives = [points([2.0] * 5), np.zeros((0, 3), np.float32), points([2.0] * 5)]
    images = [
        [(points([-2.0]), np.array([0])), (points([-2.0]), np.array([0])), (points([]), [])],
        [(points([-1.0]), np.array([0])), (points([-1.0]), np.array([0])), (points([]), [])],
    ]
    with caplog.at_level(logging.WARNING):
        model = mine_and_train(positives, images, MINING_PARAMS)
    assert [r["skipped"] for r in model.report] == [False, True, True]
    assert "class 1 has no positives" in caplog.text and "class 2 saw no negatives" in caplog.text
    np.testing.assert_array_equal(model.weight[1:], 0)
    np.testing.assert_array_equal(model.bias[1:], SKIPPED_CLASS_BIAS)
    assert model.report[0]["negatives"] >= 1 and model.report[1]["objective"] is None


def test_class_trains_once_it_first_sees_negatives():
    positives = [points([2.0] * 5)]
    images = [[(points([]), [])], [(points([-2.0, -3.0]), np.array([0, 1]))], [(points([]), [])]]
    model = mine_and_train(positives, images, MINING_PARAMS)
    assert model.report[0]["retrains"] == 2 and not model.report[0]["skipped"]


def test_model_save_load_round_trip(tmp_path):
    model = SvmModel(np.ones((2, 3), np.float32), np.array([0.5, -1.0], np.float32))
    model.save(tmp_path / "svms.npz")
    loaded = SvmModel.load(tmp_path / "svms.npz")
    np.testing.assert_array_equal(loaded.weight, model.weight)
    np.testing.assert_array_equal(loaded.bias, model.bias)


def test_negative_candidates_dedup_by_key_and_keep_negatives_of_any_class():
    import torch

    from spp_detect.train.svm import negative_candidates

    gt = np.array([[0, 0, 10, 10]], np.float32)
    boxes = np.array(
        [[0, 0, 10, 10], [50, 50, 60, 60], [50, 50, 61, 61], [0, 0, 9, 10]], np.float32
    )
    # windows 1 and 2 share a conv5 key: only the first is a candidate
    keys = torch.tensor([[0, 0, 1, 1, 0], [5, 5, 6, 6, 0], [5, 5, 6, 6, 0], [0, 0, 1, 2, 0]])
    candidates, is_negative = negative_candidates(boxes, keys, gt, np.array([0]), 2, 0.3)
    # window 0 (IoU 1) and 3 (IoU 0.9) are class-0 positives-ish, but negatives of class 1
    assert candidates.tolist() == [0, 1, 3]
    assert is_negative.tolist() == [[False, True], [True, True], [False, True]]


# ------------------------------------------------------------------------- negative cache cap

# Overlapping classes, so that most negatives stay within the margin and the caches keep growing.
CAP_PARAMS = SvmParams(
    C=1.0,
    pos_weight=2.0,
    intercept_scaling=10.0,
    tol=1e-3,
    hard_thresh=-1.0001,
    evict_thresh=-1.2,
    retrain_limit=5,
)


def overlapping_problem(seed: int, classes: int = 2, dim: int = 6, images: int = 12):
    """K positives (30, F) and per image K (features (Q, F), window keys (Q,)) with repeats."""
    rng = np.random.default_rng(seed)
    positives = [rng.normal(0.5, 1, (30, dim)).astype(np.float32) for _ in range(classes)]
    per_image = []
    for _ in range(images):
        count = int(rng.integers(0, 25))
        windows = rng.integers(0, 40, count)  # some windows repeat inside an image
        per_image.append(
            [(rng.normal(0, 1, (count, dim)).astype(np.float32), windows) for _ in range(classes)]
        )
    return positives, per_image


def gib_for(cap: int, classes: int, dim: int) -> float:
    """The svm.cache_gib that gives ``cap`` rows per class (exact: a power-of-two division)."""
    return cap * classes * dim * 4 / 2**30


def uncapped_reference(positives, images, params):
    """The mining loop as it was before the cap (a set of (image, window) tuples per class):
    the per-class (weight, bias)."""
    dim = positives[0].shape[1]
    models = [(np.zeros(dim, np.float32), 0.0) for _ in positives]
    negatives = [np.zeros((0, dim), np.float32) for _ in positives]
    keys: list[list[tuple[int, int]]] = [[] for _ in positives]
    added, trained = [0] * len(positives), [False] * len(positives)
    for number, image in enumerate(images):
        for k, (features, windows) in enumerate(image):
            weight, bias = models[k]
            fresh, seen = [], set(keys[k])
            for i in np.flatnonzero(features @ weight + bias > params.hard_thresh):
                if (number, int(windows[i])) not in seen:
                    seen.add((number, int(windows[i])))
                    fresh.append(i)
            negatives[k] = np.concatenate([negatives[k], features[fresh]])
            keys[k] += [(number, int(windows[i])) for i in fresh]
            added[k] += len(fresh)
            last = number == len(images) - 1
            if not trained[k] or last or added[k] > params.retrain_limit:
                added[k] = 0
                if len(negatives[k]) == 0:
                    continue
                weight, bias, _ = train_linear_svm(positives[k], negatives[k], params)
                models[k], trained[k] = (weight, bias), True
                keep = negatives[k] @ weight + bias >= params.evict_thresh
                negatives[k] = negatives[k][keep]
                keys[k] = [key for key, kept in zip(keys[k], keep, strict=True) if kept]
    return models


def test_cache_cap_splits_the_budget_over_classes_in_float32_rows():
    assert cache_cap(3.0, 20, 4096) == 9_830  # the default at VOC: ⌊3·2³⁰ / (20·4096·4)⌋
    assert cache_cap(4.0, 20, 4096) == 13_107
    assert cache_cap(1.0, 1, 4096) == 65_536
    assert cache_cap(4.0, 3, 4096) == 87_381  # floor of 87,381.3
    assert cache_cap(gib_for(12, 2, 6), 2, 6) == 12
    assert cache_cap(1e-9, 20, 4096) == 0
    assert cache_cap(float("inf"), 20, 4096) == sys.maxsize  # no cap


def test_packed_keys_round_trip_and_refuse_what_does_not_fit():
    packed = pack_keys(5011, np.array([0, 7, 2**32 - 1]))
    assert packed.dtype == np.int64
    np.testing.assert_array_equal(unpack_keys(packed), [[5011, 0], [5011, 7], [5011, 2**32 - 1]])
    assert len(pack_keys(0, [])) == 0
    for image, windows in [(0, [-1]), (0, [2**32]), (-1, [0]), (2**31, [0])]:
        with pytest.raises(ValueError, match="out of range"):
            pack_keys(image, np.array(windows))


def test_a_huge_cap_gives_the_uncapped_results_bit_for_bit():
    positives, images = overlapping_problem(4)
    reference = uncapped_reference(positives, images, CAP_PARAMS)
    for cache_gib in (3.0, float("inf")):  # the default cap does not bite on this problem
        params = SvmParams(**{**CAP_PARAMS.__dict__, "cache_gib": cache_gib})
        miner = HardNegativeMiner(positives, params)
        for number, image in enumerate(images):
            miner.add_image(image, is_last=number == len(images) - 1)
        for cache, (weight, bias) in zip(miner.caches, reference, strict=True):
            assert cache.retrains > 2  # the retrain limit and eviction are exercised
            np.testing.assert_array_equal(cache.weight, weight)
            assert cache.bias == bias
        assert [r["capped"] for r in miner.model().report] == [0, 0]


def test_capped_retrain_keeps_the_hardest_and_counts_the_rest():
    rng = np.random.default_rng(7)
    cache = _ClassCache(
        positives=rng.normal(0.5, 1, (30, 6)).astype(np.float32), weight=np.zeros(6, np.float32)
    )
    negatives = rng.normal(0, 1, (60, 6)).astype(np.float32)
    keys = pack_keys(3, np.arange(60))
    cache.add(negatives, keys)
    cap = 20  # keeps cap − min(retrain_limit 5, cap // 2) = 15
    dropped = cache.retrain(CAP_PARAMS, cap)
    scores = negatives @ cache.weight + cache.bias
    above = int((scores >= CAP_PARAMS.evict_thresh).sum())
    assert above > cap  # the cap bites after eviction
    assert cache.size == 15 and dropped == above - 15 and cache.capped == dropped
    kept_negatives, kept_keys = cache.negatives()
    hardest = np.sort(np.argsort(-scores)[:15])  # the 15 highest scores, in cache order
    np.testing.assert_array_equal(kept_keys, keys[hardest])
    np.testing.assert_array_equal(kept_negatives, negatives[hardest])
    np.testing.assert_array_equal(cache.sorted_keys, np.sort(keys[hardest]))
    cache.add(negatives[:5], keys[:5])  # dropped keys can be cached again
    assert cache.size == 15 + len(set(range(5)) - set(hardest.tolist()))


@pytest.mark.parametrize("retrain_limit", [5, 50])  # 50: only the cap triggers retrains
def test_cap_bounds_every_cache_and_is_reported(caplog, retrain_limit):
    positives, images = overlapping_problem(5, images=20)
    cap = 12
    params = SvmParams(
        **{**CAP_PARAMS.__dict__, "cache_gib": gib_for(cap, 2, 6), "retrain_limit": retrain_limit}
    )
    miner = HardNegativeMiner(positives, params)
    assert miner.cap == cap
    with caplog.at_level(logging.INFO, logger="spp_detect.train.svm"):
        for number, image in enumerate(images):
            miner.add_image(image, is_last=number == len(images) - 1)
            for label in range(2):  # over the cap it is retrained at once, so never seen over
                assert len(miner.cached_keys(label)) <= cap
    report = miner.model().report
    assert all(r["capped"] > 0 for r in report)
    for label in range(2):  # logged once per class, the first time only
        assert caplog.text.count(f"class {label}: negative cache over its cap of 12") == 1
    uncapped = mine_and_train(positives, images, CAP_PARAMS)
    assert all(r["capped"] == 0 for r in uncapped.report)
    assert max(r["negatives"] for r in uncapped.report) > cap  # the cap did change something


def test_a_budget_below_one_row_per_class_is_refused():
    params = SvmParams(**{**CAP_PARAMS.__dict__, "cache_gib": 1e-9})
    with pytest.raises(UserError, match=r"svm.cache_gib = 1e-09 GiB holds less than one"):
        HardNegativeMiner([points([2.0] * 3)], params)


@pytest.mark.parametrize("value", ["0", "-1", ".nan"])
def test_non_positive_cache_budget_is_one_config_line(value):
    with pytest.raises(UserError, match=r"^svm\.cache_gib must be positive, got "):
        load_config(None, [f"svm.cache_gib={value}"])


def test_the_stage_passes_the_cache_budget():
    from spp_detect.stages.train_svm import _params

    assert load_config().svm.cache_gib == 3.0
    assert _params(load_config(None, ["svm.cache_gib=0.5"]).svm).cache_gib == 0.5
