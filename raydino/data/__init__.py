"""raydino's data layer: synthetic fundus photographs, Parquet shards, storage URIs, catalog.

Components only (no Ray here; the recipes `raydino.shard` and `raydino.synth` are the CLIs):

* `storage`     URI (path, file://, s3://) -> pyarrow filesystem; S3 endpoint, retries, redaction
* `imagebytes`  recognise / strip metadata from / validate encoded images
* `sources`     list a folder, RETFound-layout tree or CSV of photographs
* `writer`      shard a source into Parquet + manifest.json, in parallel and resumably
* `shards`      the shard format, manifest, and the verifying reader (`open_shards`)
* `synth`       procedural colour fundus photographs with DR and glaucoma labels
* `catalog`     the paper's downstream datasets (classes, split sizes) and tree checks
* `loader`      in-process multi-crop batches from shards (single-process training)
* `labelled`    labelled splits (RETFound trees or shards) for probes
"""

from __future__ import annotations

from typing import Any

__all__ = ["ShardError", "ShardSet", "StorageOptions", "open_shards", "resolve"]
_HOME = {"ShardError": "shards", "ShardSet": "shards", "open_shards": "shards", "StorageOptions": "storage", "resolve": "storage"}


def __getattr__(name: str) -> Any:
    # Lazy: worker processes that only need `synth` should not pay for importing pyarrow.
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f"raydino.data.{_HOME[name]}"), name)
    raise AttributeError(f"module 'raydino.data' has no attribute {name!r}")
