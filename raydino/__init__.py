"""raydino: DINO self-supervised pretraining of retinal image models, at cluster scale with Ray.

Components (augment, model, loss, schedule, engine, checkpoint, probe, data.*) never import Ray;
the recipes (`python -m raydino.pretrain`, `.tune`, `.evaluate`, `.shard`, `.export`, `.bench`)
own every Ray call.  Importing the package imports nothing heavy.
"""

__version__ = "0.1.0"
