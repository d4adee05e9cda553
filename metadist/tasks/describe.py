"""What a run's task source is, for the record: a name, a split, a digest that changes when the data does.

The tracker logs these as the run's dataset inputs. Procedural families are described by their
parameters (the tasks are a pure function of them and the seed); image datasets by their shards' hashes.
"""

from __future__ import annotations

import hashlib
import json


def digest(payload) -> str:
    """A short content digest of a JSON-serialisable description."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def procedural(family: str, split: str, params: dict) -> dict:
    """The description of procedurally generated tasks of `split`, drawn from `params`. The split is part
    of the digest: its tasks come from other seeds."""
    return {"name": family, "split": split, "digest": digest({"family": family, "split": split, **params}),
            "source_type": "procedural", "source": f"metadist.tasks.{family}", "profile": json.dumps(params)}
