"""raydino: DINO self-supervised pretraining of retinal image models, at cluster scale with Ray.

    core/        DINO itself: model, loss, schedule, step, loop, checkpoint, weights
    augment/     multi-crop augmentation: cpu, opencv, device (GPU)
    data/        storage URIs, Parquet shards, sources, labelled sets, synthetic fundus images
    eval/        frozen-backbone evaluation: features, probes, metrics, report
    search/      search specs, result tables and reports
    runs/        a run's directory in storage, its metrics and plots
    distributed/ everything that touches Ray: init_ray, the TorchTrainer factory, capacity checks, the stream
    bench/       python -m raydino.bench
    pretrain tune evaluate export analyze shard synth: the recipes (`python -m raydino.X`)

Components never import Ray, `distributed` or a recipe; recipes never import each other (`make lint`).
Importing the package imports nothing heavy.
"""

__version__ = "0.1.0"
