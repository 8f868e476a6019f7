"""Stages under torchrun: the rank split, the shared run-directory check, 2 ranks against 1
process, and a rank killed mid-extract.

The multi-process tests (``slow``) start ``python -m torch.distributed.run --nproc-per-node 2``
on the CPU (gloo) on a 4 + 2 image toy set. torchrun sets OMP_NUM_THREADS=1 in every rank, and
a conv layer's float sums depend on the thread count, so the 1-process reference runs with
OMP_NUM_THREADS=1 too: then every array is equal, not merely close.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from spp_detect.cli import _one_process_only
from spp_detect.config import load_config
from spp_detect.data.voc import read_split
from spp_detect.errors import UserError
from spp_detect.runtime.artifacts import load_torch
from spp_detect.runtime.device import rank_device
from spp_detect.runtime.distributed import Dist, balanced_shards, from_env
from spp_detect.runtime.run_dir import RunDir
from spp_detect.stages import sharding
from spp_detect.stages.context import StageContext
from spp_detect.stages.finetune import run_finetune
from spp_detect.stages.sharding import check_shared_run_dir, split_todo

CLASSES = ("circle", "square", "triangle")
OVERRIDES = [
    "data.classes=[circle,square,triangle]", "propose.max_side=200", "extract.scales=[96]",
    "finetune.iterations=20", "finetune.fc_dim=64", "finetune.lr_steps=[]",
]  # fmt: skip


def _options(overrides: list[str]) -> list[str]:
    """Command-line options: ``--set`` each override, on the CPU."""
    return [*(arg for override in overrides for arg in ("--set", override)), "--device", "cpu"]


SETTINGS = _options(OVERRIDES)
# manifest fields that name one run's files (digests of names, sizes and mtimes), not content
RUN_SPECIFIC = {"token", "upstream"}
# per-item fields that differ between two runs of the same inputs: the seconds proposals took,
# and the test parts' fingerprints, which hold their upstream files' mtimes
TIMING_LIKE = {"seconds", "fingerprint"}


# --- one process: the split, the environment, the shared-folder check -------------------------


def test_balanced_shards_hand_case():
    # largest first to the least-loaded rank: 9 → r0 (a tie: the lower rank), 7 → r1,
    # 5 → r1 (7 < 9), 4 → r0 (9 < 12), 3 → r1 (12 < 13), 1 → r0 (13 < 15)
    sizes = [4, 9, 1, 7, 3, 5]
    assert balanced_shards(sizes, 2) == [[0, 1, 2], [3, 4, 5]]
    assert [sum(sizes[i] for i in shard) for shard in balanced_shards(sizes, 2)] == [14, 15]
    # equal sizes: round robin in index order
    assert balanced_shards([1, 1, 1, 1, 1], 2) == [[0, 2, 4], [1, 3]]
    assert balanced_shards([2, 2], 3) == [[0], [1], []]
    assert balanced_shards([], 2) == [[], []]


def test_every_item_in_exactly_one_shard():
    sizes = list(np.random.default_rng(0).integers(1, 1000, size=101))
    shards = balanced_shards(sizes, 8)
    assert sorted(i for shard in shards for i in shard) == list(range(101))
    loads = [sum(sizes[i] for i in shard) for shard in shards]
    assert max(loads) - min(loads) <= max(sizes)  # the greedy bound


def test_without_torchrun_one_process():
    dist = from_env({})
    assert (dist.rank, dist.world, dist.active, dist.is_main) == (0, 1, False, True)
    assert from_env({"WORLD_SIZE": "1", "RANK": "0"}) == Dist()
    # every collective is the identity, the share is everything, and nothing is imported
    dist.barrier()
    dist.wait_for_all()
    assert dist.broadcast("x") == "x" and dist.all_gather(3) == [3]
    assert dist.share(["a", "b"], [1, 2]) == ["a", "b"]
    assert rank_device(dist, "cuda") == "cuda"


def test_torchrun_environment():
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    dist = from_env(env)
    assert (dist.rank, dist.world, dist.local_rank, dist.local_world) == (3, 4, 1, 2)
    assert dist.active and not dist.is_main
    assert rank_device(dist, "cuda") == "cuda:1"
    assert rank_device(dist, "cuda:0") == "cuda:0" and rank_device(dist, "cpu") == "cpu"
    with pytest.raises(UserError, match="RANK is not set"):
        from_env({"WORLD_SIZE": "2"})


class _FakeRank(Dist):
    """One rank of two without a process group: ``answers`` stands for what the collectives
    would bring back from the other rank."""

    def __init__(self, rank: int, answers: dict):
        super().__init__(rank=rank, world=2)
        object.__setattr__(self, "answers", answers)

    def broadcast(self, obj):
        return obj if self.is_main else self.answers["broadcast"]

    def all_gather(self, obj, work=False):
        other = self.answers["all_gather"]
        return [obj, other] if self.is_main else [other, obj]


def test_ranks_that_do_not_share_the_run_dir_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sharding, "SHARED_CHECK_TRIES", 1)
    # rank 1 on a node whose --run-dir is another folder: rank 0's token is not there
    rank1 = _FakeRank(1, {"broadcast": "0123abcd", "all_gather": True})
    with pytest.raises(UserError, match=r"rank\(s\) \[1\] do not see .*NFS"):
        check_shared_run_dir(rank1, RunDir(tmp_path / "node1"), "extract", "trainval")
    # rank 0 learns the same and refuses too
    rank0 = _FakeRank(0, {"all_gather": False})
    with pytest.raises(UserError, match=r"rank\(s\) \[1\]"):
        check_shared_run_dir(rank0, RunDir(tmp_path / "node0"), "extract", "trainval")
    token = RunDir(tmp_path / "node0").rank_token_path("extract", "trainval").read_text()
    # a shared folder: rank 1 reads back the token rank 0 wrote
    rank1 = _FakeRank(1, {"broadcast": token, "all_gather": True})
    check_shared_run_dir(rank1, RunDir(tmp_path / "node0"), "extract", "trainval")


def test_split_todo_uses_rank_0_list(toy_root):
    records = read_split(toy_root, "trainval", CLASSES)[:6]
    # rank 1 looked later and already sees two files written: rank 0's list still decides
    rank1 = _FakeRank(1, {"broadcast": [r.image_id for r in records]})
    agreed, mine = split_todo(rank1, records, records[2:])
    assert agreed == records
    areas = [r.height * r.width for r in records]
    assert mine == [records[i] for i in balanced_shards(areas, 2)[1]]
    assert split_todo(Dist(), records, records[2:]) == (records[2:], records[2:])


def test_stage_context_defaults_to_one_process(toy_root):
    ctx = StageContext(load_config(None, []), RunDir(Path("x")), "cpu", 1, None, False)
    assert ctx.dist == Dist()


def test_detect_and_demo_refuse_torchrun():
    ctx = StageContext(load_config(None, []), RunDir(Path("x")), "cpu", 1, None, False,
                       dist=Dist(rank=0, world=2))  # fmt: skip
    for verb in ("detect", "demo"):
        with pytest.raises(UserError, match=f"{verb}: runs as one process, not under torchrun"):
            _one_process_only(ctx, verb)


def test_finetune_batch_smaller_than_the_ranks_is_refused(toy_root, tmp_path):
    config = load_config(
        None, [f"data.root={toy_root}", "finetune.batch_size=1", "finetune.images_per_batch=1"]
    )
    rank0 = _FakeRank(0, {"all_gather": True})
    ctx = StageContext(config, RunDir(tmp_path), "cpu", 1, None, False, dist=rank0)
    with pytest.raises(UserError, match=r"finetune\.batch_size: 1 windows cannot be shared by 2"):
        run_finetune(ctx, "trainval")


# --- torchrun, 2 ranks on the CPU ------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "spp_detect", *args]


def _torchrun(*args: str, log_dir: Path | None = None) -> list[str]:
    logs = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir else []
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--monitor-interval", "0.1", *logs, "-m", "spp_detect", *args,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun sets it in each rank


def _check_run(command: list[str]) -> str:
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def small_toy(tmp_path_factory) -> Path:
    from spp_detect.data.toy import make_toy_dataset

    root = tmp_path_factory.mktemp("dist") / "toy"
    make_toy_dataset(root, num_train=4, num_test=2, seed=0)
    return root


def _arrays(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".pt":
        return {key: value.numpy() for key, value in load_torch(path).items()}
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files if key not in TIMING_LIKE}


def _artefacts(folder: Path) -> list[Path]:
    return sorted(
        p.relative_to(folder.parent) for p in folder.rglob("*") if p.suffix in {".npz", ".pt"}
    )


def _assert_same_artefacts(one: Path, two: Path, folders: list[str]) -> int:
    """Every .npz and .pt under ``folders`` equal array by array; manifests equal but for
    tokens. Returns the count of files compared."""
    compared = 0
    for folder in folders:
        files = _artefacts(one / folder)
        assert files == _artefacts(two / folder)
        for name in files:
            a, b = _arrays(one / name), _arrays(two / name)
            assert a.keys() == b.keys(), name
            for key in a:
                assert np.array_equal(a[key], b[key]), f"{name}: {key}"
            compared += 1
        for manifest in sorted((one / folder).rglob("manifest.json")):
            _assert_same_manifest(manifest.parent, two / manifest.parent.relative_to(one))
    return compared


def _assert_same_manifest(one: Path, two: Path, also_differ: frozenset | set = frozenset()) -> None:
    """The manifests of two stage folders, equal but for the fields naming one run's files
    (and ``also_differ``)."""
    a, b = (json.loads((folder / "manifest.json").read_text()) for folder in (one, two))
    ignored = RUN_SPECIFIC | set(also_differ)
    assert {k: v for k, v in a.items() if k not in ignored} == {
        k: v for k, v in b.items() if k not in ignored
    }, one


@pytest.mark.slow
def test_two_ranks_give_the_artefacts_of_one_process(small_toy, tmp_path):
    """`run` under torchrun against one process. All on 2 ranks: the same proposals and conv5
    maps bit for bit, a head the same up to float order (data-parallel fine-tuning). With
    the head fine-tuned as one process (README, "Beyond one machine"), the rest on 2 ranks:
    the same SVMs, regressors, detections and APs bit for bit."""
    args = ["--set", f"data.root={small_toy}", *SETTINGS]
    one, two, mixed = tmp_path / "one", tmp_path / "two", tmp_path / "mixed"
    _check_run(_cli("run", "--run-dir", str(one), *args))
    output = _check_run(_torchrun("run", "--run-dir", str(two), *args))
    assert "eval: rank 1 idle, rank 0 runs this stage" in output
    # 6 proposal files, 6 conv5 files; manifests but for tokens, finetune's included
    assert _assert_same_artefacts(one, two, ["proposals", "features"]) == 12
    # but for the head's content digest: the head is the same up to float order (below)
    _assert_same_manifest(one / "finetune", two / "finetune", also_differ={"digests"})
    heads = [load_torch(run / "finetune/head.pt") for run in (one, two)]
    for key in heads[0]:
        torch.testing.assert_close(heads[0][key], heads[1][key], rtol=1e-4, atol=1e-5)
    # 2 ranks' proposals and maps, a head fine-tuned as one process, then 2 ranks again
    shutil.copytree(two, mixed, ignore=shutil.ignore_patterns("finetune", "svm", "bbox_reg"))
    _check_run(_cli("finetune", "--run-dir", str(mixed), *args))
    _check_run(_torchrun("run", "--run-dir", str(mixed), *args))
    # head, SVMs, regressors, 2 test parts and their merge
    folders = ["finetune", "svm", "bbox_reg", "detections"]
    assert _assert_same_artefacts(one, mixed, folders) == 6
    eval_one = json.loads((one / "eval/test.json").read_text())
    assert eval_one == json.loads((mixed / "eval/test.json").read_text())


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the torchrun worker of ``rank`` (a child of the ``launcher`` process)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_a_rank_killed_mid_extract(small_toy, tmp_path):
    """kill -9 of rank 1 once the first conv5 file is there: rank 0 ends with one line and no
    traceback; a rerun keeps every file written and ends with the 1-process artefacts."""
    args = ["extract", "--set", f"data.root={small_toy}", *SETTINGS, "--set",
            "extract.scales=[480,640]"]  # fmt: skip
    run, logs = tmp_path / "two", tmp_path / "logs"
    launcher = subprocess.Popen(
        _torchrun(*args, "--run-dir", str(run), log_dir=logs), env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    folder = run / "features" / "trainval"
    deadline = time.monotonic() + 300
    while not list(folder.glob("*.npz")) and launcher.poll() is None:
        assert time.monotonic() < deadline, "no conv5 file after 300 s"
        time.sleep(0.05)
    victim = _rank_pid(launcher.pid, 1)
    assert victim is not None, "rank 1 already gone"
    os.kill(victim, signal.SIGKILL)
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    (rank0_err,) = logs.rglob("attempt_0/0/stderr.log")
    lines = [line for line in rank0_err.read_text().splitlines() if "stopped" in line]
    assert lines == ["rank 0: stopped: another rank failed; rerun to resume"]
    assert "Traceback" not in rank0_err.read_text()
    assert (folder / "manifest.json").exists() is False
    written = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npz")}
    output = _check_run(_torchrun(*args, "--run-dir", str(run)))
    assert f"{len(written)} already cached" in output
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npz") if p.name in written} == (
        written
    )
    _check_run(_cli(*args, "--run-dir", str(tmp_path / "one")))
    assert _assert_same_artefacts(tmp_path / "one", run, ["features"]) == 4


@pytest.mark.slow
def test_data_parallel_finetune_follows_one_process(small_toy, tmp_path):
    """finetune on 2 ranks (each pools and steps on half of every minibatch, gradients summed)
    against 1 process, from the same conv5 cache: the same loss curve within 1e-4 over 20
    iterations, dropout and the box branch on; and the same when 2 ranks resume a checkpoint
    one process left at iteration 10. Not bit for bit: each rank's fc products run on 32 rows
    instead of 64, and the gradients are summed in another order."""
    overrides = [f"data.root={small_toy}", *OVERRIDES, "finetune.log_every=1",
                 "finetune.bbox_loss_weight=1", "finetune.batch_size=64",
                 "finetune.checkpoint_every=10"]  # fmt: skip
    args = _options(overrides)
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    for stage in ("propose", "extract"):
        _check_run(_cli(stage, "--run-dir", str(one), *args))
    shutil.copytree(one, two)
    shutil.copytree(one, resumed)
    _check_run(_cli("finetune", "--run-dir", str(one), *args))
    output = _check_run(_torchrun("finetune", "--run-dir", str(two), *args))
    assert "rank 1: 20 iterations" in output
    # one process stopped as a kill would after iteration 10 (checkpoint), 2 ranks resume
    config = load_config(None, overrides)
    run_finetune(StageContext(config, RunDir(resumed), "cpu", 1, None, False), "trainval", 10)
    assert (resumed / "finetune/checkpoint.pt").is_file()
    _check_run(_torchrun("finetune", "--run-dir", str(resumed), *args))
    for run in (two, resumed):
        _assert_same_training(one, run)


@pytest.mark.slow
def test_data_parallel_end_to_end_finetune_follows_one_process(small_toy, tmp_path):
    """End-to-end fine-tuning (stage 4 on) on 2 ranks, each running the trunk on one of the
    minibatch's 2 images, gradients of the head and the conv layers summed, against 1 process:
    the same loss curve within 1e-4 over 20 iterations and the same trunk and head within float
    tolerance (the sums run in another order). A third rank is refused: 2 images a batch."""
    overrides = [f"data.root={small_toy}", *OVERRIDES, "finetune.log_every=1",
                 "finetune.conv_from=stage4", "finetune.conv_lr_mult=0.1",
                 "finetune.images_per_batch=2", "finetune.batch_size=32",
                 "finetune.checkpoint_every=10"]  # fmt: skip
    args = _options(overrides)
    one, two = tmp_path / "one", tmp_path / "two"
    _check_run(_cli("propose", "--run-dir", str(one), *args))
    shutil.copytree(one, two)
    _check_run(_cli("finetune", "--run-dir", str(one), *args))
    output = _check_run(_torchrun("finetune", "--run-dir", str(two), *args))
    assert "rank 1: 20 iterations" in output
    _assert_same_training(one, two)
    trunks = [load_torch(r / "finetune/trunk.pt") for r in (one, two)]
    for key in trunks[0]:
        torch.testing.assert_close(trunks[0][key], trunks[1][key], rtol=1e-4, atol=1e-5)
    config = load_config(None, overrides)
    three = StageContext(config, RunDir(tmp_path / "three"), "cpu", 1, None, False, Dist(0, 3))
    with pytest.raises(UserError, match=r"images_per_batch: 2 images cannot be shared by 3"):
        run_finetune.__wrapped__(three, "trainval")


def _assert_same_training(one: Path, two: Path) -> None:
    """The loss curves (every iteration) within 1e-4 and the heads within float tolerance."""
    curves = [json.loads((r / "finetune/history.json").read_text())["entries"] for r in (one, two)]
    assert [e["iteration"] for e in curves[0]] == [e["iteration"] for e in curves[1]]
    assert len(curves[0]) == 20
    for a, b in zip(*curves, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
        assert abs(a["accuracy"] - b["accuracy"]) <= 1 / 64  # one window's argmax at most
    heads = [load_torch(r / "finetune/head.pt") for r in (one, two)]
    for key in heads[0]:
        torch.testing.assert_close(heads[0][key], heads[1][key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sharded_mining_gives_the_svms_of_one_process(small_toy, tmp_path):
    """train-svm on 2 ranks (each computes the fc7 of every other image, rank 0 mines and
    solves in the image order of one process) against 1 process: the same SVMs. They are
    equal bit for bit, better than the solver's tolerance, since the solver sees the same
    examples in the same order (svm.retrain_limit 50: retrains inside the pass)."""
    args = ["--set", f"data.root={small_toy}", *SETTINGS, "--set", "svm.retrain_limit=50"]
    one, two = tmp_path / "one", tmp_path / "two"
    output = _one_process_and_two_ranks(
        "train-svm", ["propose", "extract", "finetune"], args, one, two
    )
    assert "rank 1: fc7 of its share of 4 images" in output
    assert _assert_same_artefacts(one, two, ["svm"]) == 1
    reports = [json.loads((run / "svm/report.json").read_text()) for run in (one, two)]
    for a, b in zip(reports[0]["classes"], reports[1]["classes"], strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == {
            k: v for k, v in b.items() if k != "seconds"
        }
    assert sum(c["retrains"] for c in reports[0]["classes"]) > 3  # more than one per class


@pytest.mark.slow
def test_sharded_bbox_examples_give_the_regressors_of_one_process(small_toy, tmp_path):
    """train-bbox on 2 ranks (each pools the examples of every other image, rank 0 spills and
    fits them in the image order of one process) against 1 process: the same regressors, bit
    for bit, since the fit sees the same rows in the same order."""
    args = ["--set", f"data.root={small_toy}", *SETTINGS]
    one, two = tmp_path / "one", tmp_path / "two"
    output = _one_process_and_two_ranks("train-bbox", ["propose", "extract"], args, one, two)
    assert "rank 1: pool5 of its share of 4 images" in output
    assert _assert_same_artefacts(one, two, ["bbox_reg"]) == 1
    reports = [json.loads((run / "bbox_reg/report.json").read_text()) for run in (one, two)]
    assert reports[0] == reports[1]


def _one_process_and_two_ranks(
    stage: str, upstream: list[str], args: list[str], one: Path, two: Path
) -> str:
    """``upstream`` stages in ``one``, copied to ``two``; then ``stage`` as one process in
    ``one`` and on 2 ranks in ``two``. Returns the 2-rank run's output."""
    for name in upstream:
        _check_run(_cli(name, "--run-dir", str(one), *args))
    shutil.copytree(one, two)
    _check_run(_cli(stage, "--run-dir", str(one), *args))
    return _check_run(_torchrun(stage, "--run-dir", str(two), *args))
