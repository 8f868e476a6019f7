"""Artefact files: atomic writes, strict loads, manifests."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from spp_detect import __version__
from spp_detect.errors import UserError
from spp_detect.runtime.artifacts import (
    atomic_path,
    atomic_write_text,
    load_json,
    load_npz,
    load_torch,
    save_json,
    save_npz,
    save_torch,
)
from spp_detect.stages.manifests import (
    MANIFEST,
    clear_manifest,
    read_manifest,
    require_manifest,
    write_manifest,
)
from spp_detect.stages.provenance import folder_token


def test_atomic_path_success_leaves_only_target(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("done")
        assert not target.exists()  # not visible before the block ends
    assert target.read_text() == "done"
    assert os.listdir(target.parent) == ["a.txt"]


def test_atomic_path_exception_leaves_nothing_and_keeps_old(tmp_path):
    target = tmp_path / "a.npz"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
    atomic_write_text(tmp_path / "keep.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "keep.txt") as tmp:
        tmp.write_text("new but unfinished")
        raise RuntimeError("killed")
    assert (tmp_path / "keep.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["keep.txt"]


@pytest.mark.parametrize("compress", [False, True])
def test_npz_round_trip(tmp_path, compress):
    arrays = {
        "boxes": np.arange(12, dtype=np.float32).reshape(3, 4),
        "fmap_0": np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float16),
        "image_ids": np.array(["a", "bb"]),
        "scales": np.array([480, 688]),
    }
    save_npz(tmp_path / "x.npz", compress=compress, **arrays)
    loaded = load_npz(tmp_path / "x.npz")
    assert loaded.keys() == arrays.keys()
    for key, value in arrays.items():
        assert loaded[key].dtype == value.dtype
        np.testing.assert_array_equal(loaded[key], value)
    assert os.listdir(tmp_path) == ["x.npz"]


def test_npz_refuses_pickled_objects(tmp_path):
    with pytest.raises(ValueError):
        save_npz(tmp_path / "o.npz", objects=np.array([{"a": 1}], dtype=object))
    assert not (tmp_path / "o.npz").exists()
    np.savez(tmp_path / "p.npz", objects=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UserError, match=r"p\.npz: unreadable"):
        load_npz(tmp_path / "p.npz")


def corrupt(path, start=100):
    data = bytearray(path.read_bytes())
    for i in range(start, min(start + 100, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("compress", [False, True])
def test_corrupt_npz_is_user_error(tmp_path, compress):
    path = tmp_path / "c.npz"
    save_npz(path, compress=compress, a=np.random.default_rng(1).random(2000))
    corrupt(path)
    with pytest.raises(UserError, match=r"c\.npz: unreadable .*delete it and rerun"):
        load_npz(path)
    full = path.read_bytes()
    path.write_bytes(full[: len(full) // 2])  # truncated by a crash of another tool
    with pytest.raises(UserError, match=r"c\.npz: unreadable"):
        load_npz(path)
    path.write_bytes(b"plain text")
    with pytest.raises(UserError, match=r"c\.npz: unreadable"):
        load_npz(path)
    with pytest.raises(UserError, match=r"missing\.npz: file not found"):
        load_npz(tmp_path / "missing.npz")


def test_json_and_torch_round_trip_and_corrupt(tmp_path):
    save_json(tmp_path / "a.json", {"x": [1, 2.5], "y": "z"})
    assert load_json(tmp_path / "a.json") == {"x": [1, 2.5], "y": "z"}
    (tmp_path / "b.json").write_text("{half")
    with pytest.raises(UserError, match=r"b\.json: unreadable JSON"):
        load_json(tmp_path / "b.json")
    state = {"fc6.weight": torch.randn(3, 2), "meta": {"levels": [6, 3]}}
    save_torch(tmp_path / "h.pt", state)
    loaded = load_torch(tmp_path / "h.pt")
    assert (
        torch.equal(loaded["fc6.weight"], state["fc6.weight"]) and loaded["meta"] == state["meta"]
    )
    (tmp_path / "c.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"c\.pt: unreadable"):
        load_torch(tmp_path / "c.pt")
    with pytest.raises(UserError, match=r"d\.pt: file not found"):
        load_torch(tmp_path / "d.pt")


def test_manifest_write_require_mismatch_clear(tmp_path):
    stage_dir = tmp_path / "proposals" / "trainval"
    with pytest.raises(UserError, match=r"no completed 'propose' output; run `spp-detect propose"):
        require_manifest(stage_dir, "propose", "abc")
    write_manifest(stage_dir, "propose", "trainval", 12, "abc", upstream={"x": "1"}, extra={"k": 2})
    manifest = require_manifest(stage_dir, "propose", "abc")
    assert manifest.pop("token") == folder_token(stage_dir, "abc")
    assert manifest == {
        "stage": "propose", "split": "trainval", "count": 12, "fingerprint": "abc",
        "upstream": {"x": "1"}, "version": __version__, "k": 2,
    }  # fmt: skip
    before = (stage_dir / MANIFEST).read_bytes()
    with pytest.raises(UserError, match=r"manifest\.json: made with a different config.*--force"):
        require_manifest(stage_dir, "propose", "other")
    assert (stage_dir / MANIFEST).read_bytes() == before  # a refusal changes nothing
    clear_manifest(stage_dir)
    assert read_manifest(stage_dir) is None
    clear_manifest(stage_dir)  # clearing twice is fine


def test_atomic_files_get_the_umask_mode(tmp_path):
    import os
    import stat

    from spp_detect.runtime.artifacts import atomic_write_text

    path = tmp_path / "a.txt"
    atomic_write_text(path, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_a_file_named_by_a_long_id_is_written(tmp_path):
    """<id>.npz of a 240-character id (250 bytes in UTF-8): the temporary name, 14 bytes
    longer, went past the file system's 255 and the write failed (issue 27)."""
    target = tmp_path / ("é" * 5 + "x" * 235 + ".npz")
    save_npz(target, boxes=np.zeros((1, 4), np.float32))
    assert load_npz(target)["boxes"].shape == (1, 4)
    assert os.listdir(tmp_path) == [target.name]
