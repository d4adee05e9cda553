"""The repository stands alone: no pointer to development notes outside it, and no broken doc links."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# What a user gets: the README, the docs, the library, the benchmarks, the jobs and the deployment files.
SCANNED = ["README.md", "docs", "metadist", "bench", "jobs", "cluster", "infra", "Makefile", "pyproject.toml"]
# Notes that live beside the development tree, never in the repository.
OUTSIDE = re.compile(rb"\.\./shared|DESIGN\.md|ANCHORS\.md|STACK\.md")
# Inline links [text](target "title") and reference definitions [label]: target.
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^\s*\[[^\]]+\]:\s*(\S+)", re.M)
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def scanned_files(root: Path) -> list[Path]:
    files = []
    for name in SCANNED:
        path = root / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [p for p in sorted(path.rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    return files


def outside_pointers(files: list[Path], root: Path) -> list[str]:
    """`path:line: text` of every line that names a note outside the repository."""
    hits = []
    for path in files:
        for n, line in enumerate(path.read_bytes().splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(root)}:{n}: {line.decode(errors='replace').strip()}")
    return hits


def slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    text = FENCE.sub("", md.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def broken_links(md: Path, root: Path) -> list[str]:
    """Relative links of `md` whose file (or, for a Markdown file, whose heading anchor) does not exist."""
    bad = []
    text = FENCE.sub("", md.read_text())
    for m in LINK.finditer(text):
        target = m.group(1) or m.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        file_part, _, fragment = target.partition("#")
        dest = (md.parent / file_part).resolve() if file_part else md
        where = f"{md.relative_to(root)}: {target}"
        if not dest.exists():
            bad.append(f"{where} (no such file)")
        elif not dest.is_relative_to(root):
            bad.append(f"{where} (outside the repository)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            bad.append(f"{where} (no heading #{fragment} in {dest.relative_to(root)})")
    return bad


def markdown_docs(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def test_nothing_points_at_notes_outside_the_repository():
    files = scanned_files(ROOT)
    assert len(files) > 50  # the scan reached the library, not an empty folder
    assert outside_pointers(files, ROOT) == []


@pytest.mark.parametrize("md", markdown_docs(ROOT), ids=lambda p: p.name)
def test_relative_links_point_at_files_that_exist(md):
    assert md.is_file()
    assert broken_links(md, ROOT) == []


def test_the_checks_catch_a_pointer_and_a_broken_link(tmp_path):
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "a.md").write_text("# A page\n\n## Determinism\n")
    (tmp_path / "notes.md").write_text("# beside the repository\n")
    (root / "README.md").write_text(
        "See `../shared/DESIGN.md`.\n[ok](docs/a.md#determinism) [web](https://example.org/x.md)\n"
        "[gone](docs/missing.md) [anchor](docs/a.md#nowhere) [up](../notes.md)\n"
        "```\n[in a code block](not/checked.md)\n```\n")
    assert outside_pointers(scanned_files(root), root) == ["README.md:1: See `../shared/DESIGN.md`."]
    assert broken_links(root / "README.md", root) == [
        "README.md: docs/missing.md (no such file)",
        "README.md: docs/a.md#nowhere (no heading #nowhere in docs/a.md)",
        "README.md: ../notes.md (outside the repository)"]


def test_the_worker_count_claims_hold(tmp_path):
    # README ("On Ray") and docs/architecture.md ("Determinism"): procedural tasks, and image episodes
    # drawn by index (data.access: index), do not depend on how the meta-batch is split across workers;
    # streamed image episodes (data.access: stream) do.
    from metadist.data.manifest import Manifest
    from metadist.data.sampler import IndexEpisodes, StreamingEpisodes
    from metadist.data.synth import synth_dataset
    from metadist.runtime.local import split_tasks
    from metadist.tasks import SinusoidTasks

    sine = SinusoidTasks(seed=0)
    whole = sine.sample(3, range(25), 10, 10)
    parts = [sine.sample(3, r, 10, 10) for r in split_tasks(25, 2)]
    assert torch.equal(whole.xs, torch.cat([p.xs for p in parts]))
    assert torch.equal(whole.yq, torch.cat([p.yq for p in parts]))

    synth_dataset(tmp_path, per_class=12, size=20, seed=0, classes={"train": 8, "val": 5, "test": 6},
                  shard_bytes=20_000)
    manifest = Manifest(tmp_path)
    shape = dict(ways=3, channels=3, size=20, seed=0)
    index = IndexEpisodes(manifest, "train", **shape)
    one = index.sample(0, range(4), 1, 2).xs
    assert torch.equal(one, torch.cat([IndexEpisodes(manifest, "train", **shape).sample(0, r, 1, 2).xs
                                       for r in split_tasks(4, 2)]))

    def stream(rank, world):
        return StreamingEpisodes(manifest, "train", rank=rank, world=world, buffer_per_class=6, **shape)
    one = stream(0, 1).sample(0, range(4), 1, 2).xs
    two = torch.cat([stream(rank, 2).sample(0, r, 1, 2).xs for rank, r in enumerate(split_tasks(4, 2))])
    assert one.shape == two.shape and not torch.equal(one, two)
