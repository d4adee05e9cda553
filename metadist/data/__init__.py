"""Few-shot image data: WebDataset shards with a Parquet manifest, writers, converters, episode readers.

Layout of a dataset directory:
- `<split>-<nnnnn>.tar`: WebDataset shards. Each sample is an image exactly as stored (`.jpg`/`.png`),
  its class id within the split (`.cls`) and `.json` with the class name (e.g. the wnid) and the split.
- `manifest.parquet`: one row per sample (split, class id and name, shard, tar offset and size of the
  image bytes); the dataset's image size and format version sit in the schema metadata.
- `shards.parquet`: one row per shard (split, bytes, samples, sha256), so a changed or truncated shard is
  detected.

Readers decode only images, integers and JSON: a pickle member in a shard is an error, never code.
"""

from metadist.data.format import DataError

__all__ = ["DataError"]
