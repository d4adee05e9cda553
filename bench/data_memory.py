"""Memory and speed of one worker's episode source on full-size synthetic mini-ImageNet.

Writes `metadist data synth` at full size (64 / 16 / 20 classes, 600 images per class, 84 px) unless the
directory already holds it, then measures in fresh processes, one per mode:
- `stream` (`data.access: stream`): bounded per-class buffers of encoded images, decoded when drawn;
- `index` (`data.access: index`): images read by tar offset from the memory-mapped train shards;
- `index`, `data.cache: decoded`: every image decoded once (here all of them, before timing) and kept.
Reported: peak RSS of the process (torch and the reader included, next to a process that only imports
them) and, at the end, its anonymous memory (its own) and file-backed memory (mapped shards: page cache
that every worker of the node shares, and that the OS can drop); start-up time (for `decoded`: decoding
every train image); and 5-way 1-shot 15-query episodes per second, drawn one at a time. Times are the
process's CPU time (one torch thread), so that other work on the machine changes them little. For scale:
learn2learn loads the train pickle as float32, 38,400 x 84 x 84 x 3 x 4 bytes = 3.25 GB.

    python bench/data_memory.py [DIR] [--episodes 300] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROBE = r"""
import json, resource, sys, time
import numpy as np
import torch
from metadist.data.manifest import Manifest
from metadist.data.sampler import IndexEpisodes, StreamingEpisodes
mode, root, episodes, buffer = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
out = {"mode": mode}
if mode != "baseline":
    t0 = time.process_time()
    m = Manifest(root)
    torch.set_num_threads(1)
    shape = dict(ways=5, channels=3, size=84, seed=0)
    if mode == "stream":
        s = StreamingEpisodes(m, "train", buffer_per_class=buffer, **shape)
    else:
        s = IndexEpisodes(m, "train", cache="decoded" if mode == "decoded" else "encoded", **shape)
        if mode == "decoded":
            for rows in np.array_split(m.rows("train"), 40):  # in pieces, as training decodes them
                s.pixels.rows(rows)
    s.sample(0, range(1), 1, 15)
    out["startup_s"] = time.process_time() - t0
    t0 = time.process_time()
    for step in range(episodes):
        s.sample(step, range(1), 1, 15)
    out["episodes_per_s"] = episodes / (time.process_time() - t0)
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
out["anon_mb"], out["file_mb"] = (int(status[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile"))
print(json.dumps(out))
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", nargs="?", default="data/synth-full")
    ap.add_argument("--episodes", type=int, default=300)
    ap.add_argument("--buffer", type=int, default=64, help="data.buffer_per_class")
    ap.add_argument("--workers", type=int, default=2, help="encoding processes for synth")
    args = ap.parse_args(argv)
    root = Path(args.dir)
    if not (root / "manifest.parquet").exists():
        from rich.progress import Progress

        from metadist.data.synth import synth_dataset
        t0 = time.perf_counter()
        with Progress() as progress:
            synth_dataset(root, per_class=600, size=84, workers=args.workers, progress=progress)
        print(f"synth: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    size_mb = sum(p.stat().st_size for p in root.glob("train-*.tar")) / 1e6
    rows = []
    for mode in ("baseline", "stream", "index", "decoded"):
        res = subprocess.run([sys.executable, "-c", PROBE, mode, str(root), str(args.episodes), str(args.buffer)],
                             capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"train shards: {size_mb:.0f} MB; buffer_per_class {args.buffer}; {args.episodes} episodes, 5-way 1-shot 15-query\n")
    print("| source | peak RSS (MB) | at the end: anonymous / file-backed (MB) | start-up (CPU s) | episodes/s |\n"
          "|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['peak_rss_mb']:.0f} | {r['anon_mb']:.0f} / {r['file_mb']:.0f} | "
              f"{r.get('startup_s', 0):.1f} | {r.get('episodes_per_s', float('nan')):.1f} |")


if __name__ == "__main__":
    main()
