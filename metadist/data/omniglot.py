"""Reading Omniglot as its users have it on disk, and splitting its characters into train/val/test.

Layouts (`metadist data convert --format omniglot SRC OUT`), SRC being any of:
- the original release: `images_background/` and `images_evaluation/`, each `<alphabet>/<character>/*.png`
  (105 x 105 one-bit images, 20 drawings per character, 964 + 659 = 1,623 characters);
- the same as `images_background.zip` and `images_evaluation.zip`, read in place (nothing is unpacked);
- torchvision's download folder, `omniglot-py/` holding either of the above (SRC may be it or its parent).

A class is a character, named `<alphabet>/<character>`. Splits (`--split`):
- `maml` (default): the MAML reference code's policy. Every character of both sets, in a fixed order
  (sorted by name; the reference code shuffled `os.listdir` order, which differs between machines),
  shuffled by `random.Random(seed).shuffle` (seed 1, the reference code's), then the first 1,100 for
  training, the next 100 for validation and the rest (423) for testing.
- `vinyals`: the background alphabets for training and the evaluation alphabets for testing (the split
  of Vinyals et al. and Lake et al.); the validation split is 100 background characters drawn with the
  seed, left out of training.
The policy, seed and sizes go into the manifest (`Manifest.source`).

Characters with fewer than `min_drawings` drawings are left out of their split, after the split is made
(so the other characters' splits do not move), and counted; so are files that are not PNG images and
alphabets with no character in them.
"""

from __future__ import annotations

import random
import zipfile
from collections import defaultdict
from functools import lru_cache
from pathlib import Path, PurePosixPath

from metadist.data.format import DataError

SETS = ("images_background", "images_evaluation")
SIZES = (1100, 100)  # maml: train and val characters (the rest is test); vinyals: val (the second)
SPLIT_POLICIES = ("maml", "vinyals")


class ZipMember(tuple):
    """(zip path, member name): an image read from inside a zip file, by any worker process."""

    def __new__(cls, path: str, name: str):
        return super().__new__(cls, (str(path), name))

    def read(self) -> bytes:
        return _open_zip(self[0]).read(self[1])


@lru_cache(maxsize=8)
def _open_zip(path: str) -> zipfile.ZipFile:
    # One open archive per process: its directory of 20,000 names is read once, not per image.
    return zipfile.ZipFile(path)


def _locate(src: Path) -> dict[str, Path]:
    """Each set's folder or zip under `src` or `src/omniglot-py`."""
    for base in (src, src / "omniglot-py"):
        found = {}
        for name in SETS:
            if (base / name).is_dir():
                found[name] = base / name
            elif (base / f"{name}.zip").is_file():
                found[name] = base / f"{name}.zip"
        if len(found) == len(SETS):
            return found
        if found:
            missing = [n for n in SETS if n not in found]
            raise DataError(f"{base}: has {', '.join(sorted(found))} but not {' / '.join(missing)} "
                            f"(as a folder or a .zip)")
    raise DataError(f"{src}: not Omniglot: expected images_background/ and images_evaluation/ (folders or "
                    f".zip files), here or in omniglot-py/")


def _list_folder(root: Path, notes: defaultdict) -> dict[tuple[str, str], list]:
    chars: dict[tuple[str, str], list] = {}
    for alphabet in sorted(p for p in root.iterdir() if p.is_dir()):
        characters = sorted(p for p in alphabet.iterdir() if p.is_dir())
        if not characters:
            notes["empty alphabet"].append(str(alphabet))
        for character in characters:
            files = sorted(f for f in character.iterdir() if f.is_file())
            notes["not a PNG file"].extend(str(f) for f in files if f.suffix.lower() != ".png")
            chars[(alphabet.name, character.name)] = [str(f) for f in files if f.suffix.lower() == ".png"]
    return chars


def _list_zip(path: Path, name: str, notes: defaultdict) -> dict[tuple[str, str], list]:
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{path}: not a readable zip file ({err})") from None
    chars: dict[tuple[str, str], list] = defaultdict(list)
    alphabets = set()
    for member in sorted(members):
        parts = PurePosixPath(member).parts
        if not parts or parts[0] != name:
            raise DataError(f"{path}: not Omniglot's {name}.zip: {member!r} is outside {name}/")
        if member.endswith("/"):
            if len(parts) >= 2:
                alphabets.add(parts[1])
            continue
        if len(parts) != 4:
            notes["not <alphabet>/<character>/<drawing>"].append(f"{path}:{member}")
            continue
        alphabets.add(parts[1])
        if PurePosixPath(member).suffix.lower() != ".png":
            notes["not a PNG file"].append(f"{path}:{member}")
            continue
        chars[(parts[1], parts[2])].append(ZipMember(path, member))
    notes["empty alphabet"].extend(f"{path}:{name}/{a}" for a in sorted(alphabets - {a for a, _ in chars}))
    return dict(chars)


def split_characters(background: list, evaluation: list, policy: str, seed: int,
                     sizes: tuple[int, int] = SIZES) -> dict[str, list]:
    """The characters ((alphabet, character) pairs) of each split under `policy` ("maml" or "vinyals");
    `sizes`: (train, val) characters for maml, (-, val) for vinyals (a small fixture's, in tests)."""
    n_train, n_val = sizes
    if policy == "maml":
        chars = sorted(background + evaluation)
        random.Random(seed).shuffle(chars)
        if len(chars) <= n_train + n_val:
            raise DataError(f"--split maml needs more than {n_train + n_val} characters ({n_train} train, "
                            f"{n_val} val, the rest test); found {len(chars)}")
        return {"train": chars[:n_train], "val": chars[n_train:n_train + n_val], "test": chars[n_train + n_val:]}
    if policy == "vinyals":
        chars = sorted(background)
        random.Random(seed).shuffle(chars)
        if len(chars) <= n_val or not evaluation:
            raise DataError(f"--split vinyals needs more than {n_val} background characters and some "
                            f"evaluation characters; found {len(chars)} and {len(evaluation)}")
        return {"train": sorted(chars[n_val:]), "val": sorted(chars[:n_val]), "test": sorted(evaluation)}
    raise DataError(f"--split {policy!r}: allowed: {', '.join(SPLIT_POLICIES)}")


def read_omniglot(src: Path, split: str = "maml", seed: int = 1, min_drawings: int = 20, sizes=SIZES,
                  log=print) -> tuple[dict[str, list], dict]:
    """Omniglot at `src` as split -> [(class name, source)], and what the manifest records of it."""
    notes: defaultdict = defaultdict(list)
    sets = {}
    for name, path in _locate(Path(src)).items():
        sets[name] = _list_folder(path, notes) if path.is_dir() else _list_zip(path, name, notes)
        if not sets[name]:
            raise DataError(f"{path}: no <alphabet>/<character>/ folders with drawings in it")
    files = {**sets["images_background"], **sets["images_evaluation"]}
    if len(files) != len(sets["images_background"]) + len(sets["images_evaluation"]):
        raise DataError(f"{src}: an alphabet/character pair is in both images_background and images_evaluation")
    splits = split_characters(list(sets["images_background"]), list(sets["images_evaluation"]), split, seed, sizes)
    out, short = {}, []
    for name, chars in splits.items():
        items = []
        for alphabet, character in chars:
            drawings = files[(alphabet, character)]
            if len(drawings) < min_drawings:
                short.append(f"{alphabet}/{character} ({len(drawings)})")
                continue
            items += [(f"{alphabet}/{character}", d) for d in drawings]
        out[name] = items
    if short:
        notes[f"fewer than {min_drawings} drawings, character left out"] = short
    for what, where in notes.items():
        if where:
            log(f"omniglot: skipped {len(where)} ({what}), e.g. {where[0]}")
    meta = {"format": "omniglot", "split": split, "split_seed": seed,
            "characters": {k: len(v) for k, v in splits.items()},
            "skipped_characters": len(short)}
    return out, meta
