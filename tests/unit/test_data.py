"""Shards, manifest and episode readers on a small synthetic dataset written by `synth`."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch

from metadist.config import from_dict
from metadist.data.format import DataError
from metadist.data.manifest import Manifest
from metadist.data.sampler import IndexEpisodes, StreamingEpisodes, fixed_episodes
from metadist.data.synth import synth_dataset
from metadist.tasks import build_tasks

CLASSES = {"train": 8, "val": 5, "test": 6}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    # Small shards, so that every split has several and two workers get disjoint sets.
    synth_dataset(out, per_class=12, size=20, seed=0, classes=CLASSES, shard_bytes=20_000)
    return out


def _cfg(path, **data):
    return from_dict({"task": {"family": "fewshot", "ways": 3, "shots": 1, "query": 2},
                      "model": {"name": "conv4", "channels": 3, "image_size": 20, "filters": 4},
                      "data": {"path": str(path), **data}})


def test_manifest_lists_classes_counts_shards_and_size(dataset):
    m = Manifest(dataset)
    assert m.image_size == 20 and m.channels == 3
    for split, n in CLASSES.items():
        counts = m.class_counts(split)
        assert len(counts) == n and set(counts.values()) == {12}
        assert len(m.split_shards(split)) >= 2
    # Random access by tar offset returns exactly the bytes stored in the shard.
    row = m.rows("val")[5]
    shard = m.samples["shard"][row]
    with tarfile.open(dataset / shard) as tar:
        member = tar.getmember(f"{m.samples['key'][row]}.{m.samples['ext'][row]}")
        assert tar.extractfile(member).read() == m.read(np.array([row]))[0]
    m.verify("hash")
    # The shard size target holds on the tar files' real sizes (one sample and tar's 10 KB record of slack).
    assert max(m.shards["bytes"]) <= 20_000 + 10_240 + 4_096


def test_streaming_workers_read_disjoint_shards_and_episodes_are_well_formed(dataset):
    m = Manifest(dataset)
    a = StreamingEpisodes(m, "train", ways=3, channels=3, size=20, seed=0, rank=0, world=2, buffer_per_class=6)
    b = StreamingEpisodes(m, "train", ways=3, channels=3, size=20, seed=0, rank=1, world=2, buffer_per_class=6)
    assert not set(a.shards) & set(b.shards) and len(a.shards) + len(b.shards) == len(m.split_shards("train"))
    ep = a.sample(0, range(4), shots=1, query=2)
    assert ep.xs.shape == (4, 3, 3, 20, 20) and ep.xq.shape == (4, 6, 3, 20, 20)
    assert ep.ys[0].tolist() == [0, 1, 2] and sorted(ep.yq[0].tolist()) == [0, 0, 1, 1, 2, 2]
    assert 0.0 <= ep.xs.min() and ep.xs.max() <= 1.0
    # Memory is bounded by the buffers, whatever has been streamed.
    for _ in range(20):
        a.sample(0, range(2), 1, 2)
    assert all(len(buf) <= 6 for buf in a.buffers.values())


def test_stream_position_restores_to_the_same_episodes(dataset):
    m = Manifest(dataset)
    kw = dict(ways=3, channels=3, size=20, seed=0, buffer_per_class=6)
    a = StreamingEpisodes(m, "train", **kw)
    for _ in range(15):  # past the end of the first epoch, too
        a.sample(0, range(2), 1, 2)
    state = a.state()
    expected = [a.sample(0, range(2), 1, 2) for _ in range(3)]
    b = StreamingEpisodes(m, "train", **kw)
    b.load_state(state)
    for e in expected:
        got = b.sample(0, range(2), 1, 2)
        assert torch.equal(got.xs, e.xs) and torch.equal(got.xq, e.xq)


def test_decoded_cache_gives_well_formed_episodes(dataset):
    tasks = build_tasks(_cfg(dataset, cache="decoded"))
    ep = tasks.sample(0, range(3), 1, 2)
    assert ep.xs.shape == (3, 3, 3, 20, 20)


def test_evaluation_episodes_are_fixed_by_seed_and_split(dataset):
    m = Manifest(dataset)
    kw = dict(ways=3, shots=1, query=2, channels=3, size=20)
    a = fixed_episodes(m, "test", 4, seed=0, **kw)
    b = fixed_episodes(m, "test", 6, seed=0, **kw)
    assert torch.equal(a.xs, b.xs[:4]) and torch.equal(a.xq, b.xq[:4])
    assert not torch.equal(fixed_episodes(m, "val", 4, seed=0, **kw).xs, a.xs)
    gray = fixed_episodes(m, "test", 1, seed=0, ways=3, shots=1, query=2, channels=1, size=20)
    assert gray.xs.shape == (1, 3, 1, 20, 20)


def _copy(dataset, tmp_path):
    import shutil
    dst = tmp_path / "copy"
    shutil.copytree(dataset, dst)
    return dst


def test_a_truncated_shard_is_a_clear_error_naming_it(dataset, tmp_path):
    d = _copy(dataset, tmp_path)
    shard = sorted(d.glob("train-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(DataError, match=f"shard .*{shard.name} has .* bytes, the manifest says"):
        Manifest(d).verify("size")
    # Unverified, both readers name the shard as soon as they map it.
    s = StreamingEpisodes(Manifest(d), "train", ways=3, channels=3, size=20, seed=0)
    s.shards, s._index = [shard.name], [Manifest(d).shards["shard"].index(shard.name)]  # stream this one
    with pytest.raises(DataError, match=f"{shard.name} has .* bytes but the manifest has samples up to byte"):
        s.sample(0, range(1), 1, 2)
    index = IndexEpisodes(Manifest(d), "train", ways=3, channels=3, size=20, seed=0)
    with pytest.raises(DataError, match=f"{shard.name} has .* bytes .* truncated or changed"):
        for step in range(20):
            index.sample(step, range(4), 1, 2)


def test_a_pickle_member_is_never_read(dataset, tmp_path):
    d = _copy(dataset, tmp_path)
    shard = sorted(d.glob("train-*.tar"))[0]
    with tarfile.open(shard, "a") as tar:
        # A payload that would run code if unpickled.
        payload = b"cos\nsystem\n(S'touch /tmp/metadist-pwned'\ntR."
        info = tarfile.TarInfo("train_9999999.pyd")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    # Readers take the image bytes at the manifest's offsets and nothing else; verify names the change.
    m = Manifest(d)
    for s in (StreamingEpisodes(m, "train", ways=3, channels=3, size=20, seed=0),
              IndexEpisodes(m, "train", ways=3, channels=3, size=20, seed=0)):
        for step in range(10):
            s.sample(step, range(2), 1, 2)
    with pytest.raises(DataError, match=f"{shard.name}: content hash differs"):
        m.verify("hash")
    import os
    assert not os.path.exists("/tmp/metadist-pwned")


def test_too_few_classes_for_the_ways_is_reported(dataset):
    m = Manifest(dataset)
    with pytest.raises(DataError, match="the val split has 5 classes with at least 3 images; 6-way"):
        fixed_episodes(m, "val", 1, ways=6, shots=1, query=2, channels=3, size=20, seed=0)
    with pytest.raises(DataError, match="no 'nope' split"):
        m.rows("nope")


def test_shards_read_through_a_file_url(dataset):
    url = f"file://{dataset}"
    m = Manifest(url)
    s = StreamingEpisodes(m, "train", ways=3, channels=3, size=20, seed=0)
    assert m.url(s.shards[0]).startswith("file://")
    assert s.sample(0, range(2), 1, 2).xs.shape == (2, 3, 3, 20, 20)
    ep = fixed_episodes(m, "test", 2, ways=3, shots=1, query=2, channels=3, size=20, seed=0)
    assert torch.equal(ep.xs, fixed_episodes(Manifest(dataset), "test", 2, ways=3, shots=1, query=2,
                                             channels=3, size=20, seed=0).xs)
    m.verify("size")
