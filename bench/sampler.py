"""Episode sampling speed against the one-core decode limit, for both data.access modes.

Two image sets, written by `metadist.data.synth` unless the directory already holds them:
- full-size synthetic mini-ImageNet: 84 px RGB JPEG, 64 train classes x 600 images (as bench/data_memory.py);
- a character set: 28 px grayscale PNG, 964 train classes x 20 images (Omniglot's layout).
For each, in one process on one core (torch.set_num_threads(1)):
- the limit: a core decoding the bytes of 4,000 of the split's images, already in memory, with Pillow
  and nothing else (`np.asarray(Image.open(io.BytesIO(b)))`), in images/s;
- the same bytes through the sampler's own decoder alone (`decode_into`), which reads no file and draws
  nothing: the sampler can at most reach it;
- `index` and `stream` sampling: meta-batches of 8 5-way 1-shot 15-query episodes (80 images each) as a
  worker draws them, float tensors out, in images/s and episodes/s, and the ratio to both figures.
Rates are per second of the process's CPU time (user and system), measured interleaved over rounds,
and the median of each kept, so that a machine shared with other work changes them little. `index`
with `data.cache: decoded` is shown too: once every image is decoded, a draw is a gather and a cast.

    python bench/sampler.py [--dir data] [--rounds 3] [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

SETS = {
    "84 px JPEG (mini-ImageNet)": dict(name="synth-full", per_class=600, size=84, fmt="jpg", channels=3,
                                       classes=None),
    "28 px PNG (characters)": dict(name="synth-chars", per_class=20, size=28, fmt="png", channels=1,
                                   classes={"train": 964, "val": 20, "test": 20}),
}
WAYS, SHOTS, QUERY, TASKS = 5, 1, 15, 8


def ensure(root: Path, spec: dict, workers: int) -> None:
    if (root / "manifest.parquet").exists():
        return
    from rich.progress import Progress

    from metadist.data.synth import synth_dataset
    t0 = time.perf_counter()
    with Progress() as progress:
        synth_dataset(root, per_class=spec["per_class"], size=spec["size"], fmt=spec["fmt"],
                      channels=spec["channels"], classes=spec["classes"], workers=workers, progress=progress)
    print(f"synth {root}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def rate(fn, seconds: float) -> float:
    """Calls of fn per second of this process's CPU time (user and system: page faults count), over at
    least `seconds`: on a machine shared with other work, a figure for one core that the others' load
    changes little."""
    n, t0 = 0, time.process_time()
    while (dt := time.process_time() - t0) < seconds or n < 2:
        fn()
        n += 1
    return n / dt


def measure(root: Path, spec: dict, rounds: int, seconds: float) -> list[dict]:
    from metadist.data.format import decode_into, pil_formats, pixel_batch
    from metadist.data.manifest import Manifest
    from metadist.data.sampler import IndexEpisodes, StreamingEpisodes

    m = Manifest(root)
    rows = np.random.default_rng(0).choice(m.rows("train"), 4000, replace=False)
    blobs = [bytes(b) for b in m.read(rows)]
    formats = pil_formats(np.unique(m.samples["ext"][rows]))
    out = pixel_batch(len(blobs), spec["size"], spec["channels"])
    shape = dict(ways=WAYS, channels=spec["channels"], size=spec["size"], seed=0)
    index = IndexEpisodes(m, "train", **shape)
    decoded = IndexEpisodes(m, "train", cache="decoded", **shape)
    stream = StreamingEpisodes(m, "train", buffer_per_class=64, **shape)
    step = iter(range(10 ** 9))
    tasks = range(TASKS)
    images = TASKS * WAYS * (SHOTS + QUERY)
    for s in (index, stream):
        s.sample(0, tasks, SHOTS, QUERY)  # fill the stream's buffers, map the shards
    # Every image once, so that `decoded` is measured warm.
    decoded.pixels.rows(m.rows("train"))

    def pillow():
        for b in blobs:
            np.asarray(Image.open(io.BytesIO(b)))

    probes = {
        "limit": (lambda: pillow(), len(blobs)),
        "decoder": (lambda: decode_into(out, blobs, "bench", formats), len(blobs)),
        "index": (lambda: index.sample(next(step), tasks, SHOTS, QUERY), images),
        "stream": (lambda: stream.sample(next(step), tasks, SHOTS, QUERY), images),
        "index, cache: decoded": (lambda: decoded.sample(next(step), tasks, SHOTS, QUERY), images),
    }
    runs: dict[str, list[float]] = {k: [] for k in probes}
    for _ in range(rounds):
        for name, (fn, per_call) in probes.items():
            runs[name].append(rate(fn, seconds) * per_call)
    return [{"mode": k, "images_per_s": statistics.median(v)} for k, v in runs.items()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="data", help="where the image sets are (or are written)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.0, help="per measurement and round")
    ap.add_argument("--workers", type=int, default=2, help="encoding processes for synth")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"one core; meta-batches of {TASKS} {WAYS}-way {SHOTS}-shot {QUERY}-query episodes "
          f"({WAYS * (SHOTS + QUERY)} images each); medians of {args.rounds} interleaved rounds\n")
    print("| images | source | images/s | episodes/s | vs Pillow decode | vs decoder alone |\n|---|---|---|---|---|---|")
    for label, spec in SETS.items():
        root = Path(args.dir) / spec["name"]
        ensure(root, spec, args.workers)
        res = {r["mode"]: r["images_per_s"] for r in measure(root, spec, args.rounds, args.seconds)}
        limit, decoder = res["limit"], res["decoder"]
        for mode, ips in res.items():
            name = {"limit": "one-core decode limit: Pillow, bytes in memory",
                    "decoder": "the sampler's decoder alone, bytes in memory"}.get(mode, f"`{mode}` sampling")
            eps = "" if mode in ("limit", "decoder") else f"{ips / (WAYS * (SHOTS + QUERY)):.0f}"
            print(f"| {label} | {name} | {ips:,.0f} | {eps} | {ips / limit:.2f} | {ips / decoder:.2f} |")


if __name__ == "__main__":
    main()
