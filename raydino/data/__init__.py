"""raydino's data layer: synthetic fundus photographs, Parquet shards, storage URIs, catalog.

Components only (no Ray here; the recipes `raydino.shard` and `raydino.synth` are the CLIs):

* `storage`     URI (path, file://, s3://, gs://) -> pyarrow filesystem; endpoints, retries, redaction
* `imagebytes`  recognise / strip metadata from / validate encoded images
* `sources`     list a folder, RETFound-layout tree or CSV of photographs
* `writer`      shard a source into Parquet + manifest.json, in parallel and resumably
* `shardplan`   the job's plan, fingerprints and receipts (what a rerun keeps)
* `shardwork`   reading and preparing images in pool processes, writing one shard
* `shards`      the shard format, manifest, and the verifying reader (`open_shards`)
* `fundus`      drawing one procedural colour fundus photograph
* `synth`       synthetic datasets of them, with DR and glaucoma labels (and the cached shards)
* `catalog`     the paper's downstream datasets (classes, split sizes) and tree checks
* `loader`      in-process multi-crop batches from shards (single-process training)
* `labelled`    labelled splits (RETFound trees or shards) for probes
* `overlap`     pixel and perceptual hashes of a dataset's rows: duplicates, and the leakage guard (`--overlap`)
"""
