"""Shards written by metadist are plain WebDataset tars: Ray Data's read_webdataset reads them too."""

from __future__ import annotations

from metadist.data.manifest import Manifest
from metadist.data.synth import synth_dataset


def test_ray_data_reads_the_shards(tmp_path, local_ray):
    import ray.data

    synth_dataset(tmp_path, per_class=3, size=16, classes={"train": 4, "val": 3, "test": 3}, shard_bytes=5000)
    m = Manifest(tmp_path)
    shards = [str(tmp_path / s) for s in m.split_shards("train")]
    rows = ray.data.read_webdataset(shards, decoder=None).take_all()
    assert len(rows) == 12
    assert {"__key__", "jpg", "cls", "json"} <= set(rows[0])
    assert sorted(int(r["cls"]) if not isinstance(r["cls"], bytes) else int(r["cls"].decode()) for r in rows) == \
        sorted(m.samples["class_id"][m.rows("train")].tolist())
