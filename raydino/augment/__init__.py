"""Multi-crop augmentation on uint8 tensors. No Ray.

* `cpu`      `MultiCropAugment`, the pipeline (crop, resize, photometric ops) on one CPU core
* `params`   every random draw of a batch, made up front (`CropParams`, `sample_params`)
* `decode`   image input: encoded bytes (JPEG draft-mode decode) or decoded arrays
* `ops`      the photometric ops batched on float tensors, and the one `normalize` into model input
* `opencv`   the same ops crop by crop with OpenCV (the CPU default)
* `device`   the pipeline batched on a torch device (GPU)
"""
