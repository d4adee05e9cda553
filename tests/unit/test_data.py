"""Shards, manifest and episode readers on a small synthetic dataset written by `synth`."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from metadist.config import from_dict, to_dict
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


# -- data.access: index ---------------------------------------------------------------------------

def _fewshot(path, **over):
    cfg = _cfg(path, access=over.pop("access", "index"), **over.pop("data", {}))
    return from_dict({**to_dict(cfg), **over}) if over else cfg


def test_index_episodes_do_not_depend_on_how_the_meta_batch_is_split(dataset):
    from metadist.runtime.local import split_tasks

    tasks = build_tasks(_fewshot(dataset))
    assert tasks.access == "index" and tasks.state() is None  # the step is the position
    whole = tasks.sample(5, range(6), 1, 2)
    assert whole.ys[0].tolist() == [0, 1, 2] and sorted(whole.yq[0].tolist()) == [0, 0, 1, 1, 2, 2]
    for world in (2, 3):
        # Each worker draws its own share (global task indices) in its own process, as the executors do.
        parts = [build_tasks(_fewshot(dataset), rank, world).sample(5, share, 1, 2)
                 for rank, share in enumerate(split_tasks(6, world))]
        for name in ("xs", "ys", "xq", "yq"):
            assert torch.equal(getattr(whole, name), torch.cat([getattr(p, name) for p in parts])), (world, name)
    # Tasks differ from one another and from step to step; a redraw (a replaced worker) is identical.
    assert not torch.equal(whole.xs[0], whole.xs[1])
    assert not torch.equal(tasks.sample(6, range(6), 1, 2).xs, whole.xs)
    assert torch.equal(tasks.sample(5, range(6), 1, 2).xq, whole.xq)
    # A decoded cache gives the very same episodes.
    decoded = build_tasks(_fewshot(dataset, data={"cache": "decoded"}))
    assert torch.equal(decoded.sample(5, range(6), 1, 2).xq, whole.xq)


def test_index_meta_gradient_is_the_same_from_one_or_two_workers(dataset):
    from metadist.algorithms import init_meta_params, make_spec
    from metadist.runtime.local import TaskShard, split_tasks

    cfg = _fewshot(dataset, algorithm={"task_parallel": "loop"}, runtime={"threads": 1})
    threads = torch.get_num_threads()  # TaskShard sets runtime.threads for the process
    try:
        one = TaskShard(cfg)
        params = init_meta_params(one.model, cfg)
        grads, _ = one.compute(params, 3, make_spec(cfg), range(4))
        shares = [TaskShard(cfg, rank, 2).compute(params, 3, make_spec(cfg), share)[0]
                  for rank, share in enumerate(split_tasks(4, 2))]
    finally:
        torch.set_num_threads(threads)
    for k, g in grads.items():
        assert torch.allclose(g, shares[0][k] + shares[1][k], rtol=1e-5, atol=1e-6), k


def test_auto_access_is_index_for_local_or_small_data_else_stream(dataset, monkeypatch):
    import fsspec

    from metadist.data import sampler

    fs = fsspec.filesystem("memory")
    for f in dataset.iterdir():
        fs.pipe(f"/remote-synth/{f.name}", f.read_bytes())
    try:
        remote = "memory://remote-synth"
        assert build_tasks(_fewshot(dataset, access="auto")).access == "index"
        tasks = build_tasks(_fewshot(remote, access="auto"))  # 2 GiB or less: held in memory
        assert tasks.access == "index" and not tasks.manifest.local
        local = build_tasks(_fewshot(dataset)).sample(2, range(3), 1, 2)
        assert torch.equal(tasks.sample(2, range(3), 1, 2).xq, local.xq)
        monkeypatch.setattr(sampler, "INDEX_AUTO_BYTES", 0)
        assert build_tasks(_fewshot(remote, access="auto")).access == "stream"
        assert build_tasks(_fewshot(remote, access="auto", data={"cache": "decoded"})).access == "index"
        assert build_tasks(_fewshot(dataset, access="auto")).access == "index"
    finally:
        fs.rm("/remote-synth", recursive=True)


# -- data.access: stream, checked before training ----------------------------------------------

def test_a_stream_that_cannot_form_an_episode_fails_before_training_in_one_line(dataset, tmp_path):
    from typer.testing import CliRunner

    from metadist.cli import app

    # 12 images per class over several shards: 1 worker has all 12 of each class, 2 workers about 6.
    two = {"runtime": {"executor": "ray", "workers": 2}, "task": {"family": "fewshot", "ways": 3, "shots": 1,
                                                                  "query": 9}}
    assert build_tasks(_fewshot(dataset, access="stream", task=two["task"])).access == "stream"
    with pytest.raises(DataError) as err:
        build_tasks(_fewshot(dataset, access="stream", **two))
    msg = str(err.value)
    assert "\n" not in msg and "worker" in msg and "of 2" in msg and "K + Q = 1 + 9" in msg
    assert "a 3-way episode needs 3" in msg and "data.access: index" in msg
    assert build_tasks(_fewshot(dataset, access="index", **two)).access == "index"  # by index it is fine
    with pytest.raises(DataError, match="the train split has 0 classes with at least 13 images; 3-way"):
        build_tasks(_fewshot(dataset, access="index", task={**two["task"], "query": 12}))
    with pytest.raises(DataError, match="data.buffer_per_class=6 keeps fewer images of a class than an episode"):
        build_tasks(_fewshot(dataset, access="stream", data={"buffer_per_class": 6}, task=two["task"]))
    # From the command line: one line, exit 2, before any Ray worker or run folder exists.
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({**to_dict(_fewshot(dataset, access="stream", **two)),
                               "tracking": {"enabled": False}, "train": {"out_dir": str(tmp_path / "runs")}}))
    res = CliRunner().invoke(app, ["train", str(job), "--no-progress"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "a 3-way episode needs 3" in " ".join(res.output.split())
    assert not (tmp_path / "runs").exists()


# -- decoding -------------------------------------------------------------------------------------

def test_the_direct_decoder_gives_pillows_pixels_and_falls_back_for_the_rest():
    from PIL import Image

    from metadist.data.format import decode_into, pixel_batch

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)

    def encoded(img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    for channels, mode in ((1, "L"), (3, "RGB")):
        src = Image.fromarray(rgb).convert(mode)
        blobs = [encoded(src, "PNG"), encoded(src, "JPEG", quality=90),
                 encoded(src, "PNG", optimize=True), encoded(src, "JPEG", progressive=True),
                 encoded(src.convert("RGB" if mode == "L" else "L"), "PNG"),  # the other mode: converted
                 encoded(src.resize((16, 16)), "JPEG"),  # another size: resized
                 encoded(src.convert("P"), "PNG")]  # a palette: Pillow's reader
        out = decode_into(pixel_batch(len(blobs), 12, channels), blobs, "test")
        for got, blob in zip(out, blobs):
            with Image.open(io.BytesIO(blob)) as img:
                want = np.asarray(img.convert(mode).resize((12, 12), Image.Resampling.BILINEAR))
            assert np.array_equal(got, want.reshape(12, 12, channels))
    for cut in (encoded(Image.fromarray(rgb), "JPEG")[:200], encoded(Image.fromarray(rgb), "PNG")[:20],
                encoded(Image.fromarray(rgb), "JPEG")[:25]):  # data, or a header, cut short
        with pytest.raises(DataError, match="somewhere: cannot decode image"):
            decode_into(pixel_batch(1, 12, 3), [cut], "somewhere")


def test_readers_give_the_same_episodes_when_the_manifest_keeps_one_shard_mapped(dataset, monkeypatch):
    from metadist.data import manifest as manifest_module

    def draws():
        m = Manifest(dataset)
        shape = dict(ways=3, channels=3, size=20, seed=0)
        stream, index = StreamingEpisodes(m, "train", **shape), IndexEpisodes(m, "train", **shape)
        out = []
        for step in range(6):  # interleaved, so each reader's shard is unmapped by the other's reads
            out += [stream.sample(step, range(2), 1, 2).xq, index.sample(step, range(2), 1, 2).xq,
                    fixed_episodes(m, "val", 2, ways=3, shots=1, query=2, channels=3, size=20, seed=0).xq]
        return out

    wide = draws()
    monkeypatch.setattr(manifest_module, "_OPEN", 1)
    assert all(torch.equal(a, b) for a, b in zip(wide, draws()))


def _turns(plain: torch.Tensor, turned: torch.Tensor, ways: int) -> list[list[int]]:
    """Per episode and class: the quarter turn k with turned == rot90(plain, k) for all the class's images
    (support or query, (tasks, ways·n, C, H, W) in class order); -1 where there is none."""
    out = []
    for p, t in zip(plain, turned):
        p, t = p.view(ways, -1, *p.shape[1:]), t.view(ways, -1, *t.shape[1:])
        out.append([next((k for k in range(4) if torch.equal(torch.rot90(p[w], k, (-2, -1)), t[w])), -1)
                    for w in range(ways)])
    return out


def test_rotations_turn_each_class_of_an_episode_by_one_drawn_quarter(dataset):
    m = Manifest(dataset)
    kw = dict(ways=3, shots=2, query=2, channels=3, size=20, seed=0)
    plain = fixed_episodes(m, "test", 20, **kw)
    assert torch.equal(fixed_episodes(m, "test", 20, rotations=(0,), **kw).xs, plain.xs)  # draws as before
    turned = fixed_episodes(m, "test", 20, rotations=(0, 90, 180, 270), **kw)
    support, query = _turns(plain.xs, turned.xs, 3), _turns(plain.xq, turned.xq, 3)
    assert support == query  # one turn per class for all its images, support and query alike
    flat = [k for episode in support for k in episode]
    assert -1 not in flat and set(flat) == {0, 1, 2, 3}  # the same images, each class turned by 0..3
    assert torch.equal(fixed_episodes(m, "test", 20, rotations=(0, 90, 180, 270), **kw).xs, turned.xs)
    only = fixed_episodes(m, "test", 20, rotations=(180,), **kw)
    assert {k for e in _turns(plain.xs, only.xs, 3) for k in e} == {2}
    # The streaming reader: its first episode is the same images, turned the same way per class.
    shape = dict(ways=3, channels=3, size=20, seed=0, buffer_per_class=6)
    a = StreamingEpisodes(m, "train", **shape).sample(0, range(1), 2, 2)
    b = StreamingEpisodes(m, "train", rotations=(90, 270), **shape).sample(0, range(1), 2, 2)
    turns = _turns(a.xs, b.xs, 3)[0]
    assert set(turns) <= {1, 3} and turns == _turns(a.xq, b.xq, 3)[0]
    # From the config: the run's fewshot tasks turn their episodes.
    cfg = from_dict({**to_dict(_cfg(dataset)), "task": {"family": "fewshot", "ways": 3, "shots": 2, "query": 2,
                                                         "rotations": [0, 90, 180, 270]}})
    ep = build_tasks(cfg).fixed("test", 20, 2, 2)
    assert torch.equal(ep.xs, turned.xs)
