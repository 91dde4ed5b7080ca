"""Typed configuration for every raydino job.

One `Config` object per run, validated before any work starts. It is built from
defaults (DINO's published ViT-S/16 recipe), then a YAML preset shipped in
`raydino/configs/` or a user's file, then `--set key=value` overrides.  Every bad
field is reported with its dotted name, the value given and what is allowed.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


def _takes_number_not_bool(annotation: Any) -> bool:
    """Whether a field of this type takes an int or float and never a bool."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    return bool({int, float} & set(args)) and bool not in args


class NoBoolNumbers(BaseModel):
    """A model whose int and float fields refuse true/false (pydantic alone reads true as 1)."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, v: Any, info: Any) -> Any:
        # pydantic reads true as 1 for an int or float field; a YAML `yes` or a misplaced `true` is a mistake.
        # (ConfigDict(strict=True) would refuse bools too, but also the lists YAML gives for tuple fields.)
        if isinstance(v, bool) and _takes_number_not_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError("a number is expected, not a boolean (YAML reads true/false/yes/no/on/off as one)")
        return v


class _Strict(NoBoolNumbers):
    # extra="forbid": an unknown key is an error, never silently ignored; nan and inf are no setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _check_scale(name: str, value: tuple[float, float]) -> tuple[float, float]:
    lo, hi = value
    if not (0.0 < lo <= 1.0 and 0.0 < hi <= 1.0):
        raise ValueError(f"{name}={list(value)}: both ends must lie in (0, 1]")
    if lo > hi:
        raise ValueError(f"{name}={list(value)}: min {lo} is greater than max {hi}")
    return value


# Where data, runs and experiments may live: kept in step with raydino.data.storage.REMOTE_SCHEMES (a
# test compares them; this module imports no data layer).  The full check (bucket names, query keys,
# reachability) is raydino.data.storage.resolve's, before any work; these catch typos at config time.
URI_SCHEMES = {"s3": ("s3", "s3a"), "gs": ("gs", "gcs")}
URI_QUERY_KEYS = {"s3": ("endpoint_override", "scheme", "region"), "gs": ("endpoint_override", "scheme")}
_ALLOWED_URIS = "a local path, file:///abs/path, " + ", ".join(f"{k}://bucket/prefix" for k in URI_SCHEMES)


def safe_uri(value: str) -> str:
    """`value` without user info or query string: a credential in a URI or endpoint is never echoed."""
    m = re.match(r"([A-Za-z][A-Za-z0-9+.\-]*://)?(?:[^/@?#]*@)?([^?#]*)", value)
    return (m.group(1) or "") + m.group(2) if m else value


def check_storage_uri(name: str, value: str | None) -> str | None:
    """A local path, file:///path or a known object store's scheme://bucket[/prefix]; refuses gs:/b, gs://,
    http://... (the messages never repeat the value: `_format_errors` shows it, without credentials)."""
    if value is None:
        return value
    v = value.strip()
    if not v:
        raise ValueError(f"empty; expected {_ALLOWED_URIS}")
    m = re.match(r"([A-Za-z][A-Za-z0-9+.\-]+):", v)  # a drive letter (C:/x) is one letter: a path
    if not m:
        return value
    scheme, rest = m.group(1).lower(), v[m.end() :]
    remote = {alias: k for k, aliases in URI_SCHEMES.items() for alias in aliases}
    if scheme == "file":
        if not (rest.startswith("///") or rest.startswith("//localhost/")):
            raise ValueError("a file URI is file:///absolute/path (three slashes); or give a plain path")
    elif scheme in remote:
        if not rest.startswith("//"):
            raise ValueError(f"{scheme}: needs two slashes ({scheme}://{rest.lstrip('/') or 'bucket/prefix'})")
        netloc = re.split(r"[/?#]", rest[2:], maxsplit=1)[0]
        if "@" in netloc:
            raise ValueError("credentials in a URI are refused: they come from the cloud's own chain (see docs/data.md)")
        if not netloc:
            raise ValueError(f"no bucket; expected {remote[scheme]}://bucket/prefix")
        keys = sorted({kv.split("=", 1)[0] for kv in rest.partition("?")[2].split("&") if kv} - set(URI_QUERY_KEYS[remote[scheme]]))
        if keys:  # only the names: a value (access_token=...) is never echoed, nor kept in a run's config.yaml
            raise ValueError(f"unknown query key(s) {keys}; allowed: {', '.join(URI_QUERY_KEYS[remote[scheme]])}")
    elif rest.startswith("//"):
        raise ValueError(f"scheme {scheme}:// is not supported; allowed: {_ALLOWED_URIS}")
    return value  # e.g. runs:2024, a folder name


def check_endpoint(name: str, value: str | None) -> str | None:
    """http(s)://host[:port] or host[:port] (https), nothing else: no path, no user info, no query."""
    if value is None:
        return value
    m = re.fullmatch(r"(?:(https?)://)?([A-Za-z0-9.\-_]+|\[[0-9A-Fa-f:.]+\])(?::(\d{1,5}))?/?", value.strip())
    if not m or (m.group(3) and not 0 < int(m.group(3)) < 65536):
        raise ValueError("expected http(s)://host[:port], or host[:port] for https (e.g. http://127.0.0.1:9000); credentials never go here")
    return value


# The paper's Table 2 (Cheng et al., MIDL 2025).  Anything not listed keeps DINO's default.
AUGMENT_PRESETS: dict[str, dict[str, Any]] = {
    "strong": {  # DINO's natural-image defaults
        "global_crop_scale": (0.4, 1.0),
        "local_crop_scale": (0.05, 0.4),
        "jitter_brightness": 0.4,
        "jitter_contrast": 0.4,
    },
    "weak": {
        "global_crop_scale": (0.5, 1.0),
        "local_crop_scale": (0.2, 0.5),
        "jitter_brightness": 0.2,
        "jitter_contrast": 0.2,
    },
    "weak_med": {
        "global_crop_scale": (0.5, 1.0),
        "local_crop_scale": (0.2, 0.5),
        "jitter_brightness": 0.2,
        "jitter_contrast": 0.2,
        "med_blur_sigma": 0.1,
        "med_blur_p": 0.5,
        "noise_std": 0.1,
        "noise_p": 0.5,
        "bias_field": 0.1,
        "bias_field_p": 0.5,
    },
}


class AugmentConfig(_Strict):
    """Multi-crop augmentation.  Defaults are DINO's; `preset` fills in the paper's numbers.

    Explicit fields win over the preset, so `preset: weak` plus `n_local_crops: 4` is
    the paper's weak scales with four local crops.
    """

    preset: Literal["strong", "weak", "weak_med"] = "strong"
    global_crop_size: int = Field(224, ge=8)
    local_crop_size: int = Field(96, ge=8)
    n_global_crops: Literal[2] = 2
    n_local_crops: int = Field(8, ge=0)
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    flip_p: float = Field(0.5, ge=0, le=1)
    jitter_p: float = Field(0.8, ge=0, le=1)
    jitter_brightness: float = Field(0.4, ge=0)
    jitter_contrast: float = Field(0.4, ge=0)
    jitter_saturation: float = Field(0.2, ge=0)
    jitter_hue: float = Field(0.1, ge=0, le=0.5)
    grayscale_p: float = Field(0.2, ge=0, le=1)
    blur_p_global1: float = Field(1.0, ge=0, le=1)
    blur_p_global2: float = Field(0.1, ge=0, le=1)
    blur_p_local: float = Field(0.5, ge=0, le=1)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p_global2: float = Field(0.2, ge=0, le=1)
    solarize_threshold: int = Field(128, ge=0, le=255)
    # The paper's medical artefacts (weak_med): fixed-sigma blur, additive Gaussian noise on
    # [0, 1] intensities, and a smooth multiplicative bias field of the given strength.
    med_blur_sigma: float = Field(0.0, ge=0)
    med_blur_p: float = Field(0.0, ge=0, le=1)
    noise_std: float = Field(0.0, ge=0)
    noise_p: float = Field(0.0, ge=0, le=1)
    bias_field: float = Field(0.0, ge=0, le=1)
    bias_field_p: float = Field(0.0, ge=0, le=1)
    # Where the crops are made: "cpu" (Ray Data tasks, on any node's CPUs: the default) or "cuda"
    # (on each training worker's GPU, batched; Ray Data then only streams the encoded images).
    device: Literal["cpu", "cuda"] = "cpu"

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and "preset" in data:
            name = data["preset"]
            if name not in AUGMENT_PRESETS:
                return data  # the Literal check reports it with the allowed names
            return {**AUGMENT_PRESETS[name], **data}
        return data

    @field_validator("global_crop_scale", "local_crop_scale")
    @classmethod
    def _scale_in_range(cls, v: tuple[float, float], info: Any) -> tuple[float, float]:
        return _check_scale(info.field_name, v)

    @field_validator("blur_sigma", "crop_ratio")
    @classmethod
    def _ordered_positive(cls, v: tuple[float, float], info: Any) -> tuple[float, float]:
        if not (0 < v[0] <= v[1]):
            raise ValueError(f"{info.field_name}={list(v)}: need 0 < min <= max")
        return v


class ModelConfig(_Strict):
    arch: str = "vit_small_patch16_224"
    pretrained_init: str | None = Field(None, alias="init")  # local timm/safetensors or DINO checkpoint
    drop_path_rate: float = Field(0.1, ge=0, lt=1)
    out_dim: int = Field(65536, ge=2)
    head_hidden_dim: int = Field(2048, ge=1)
    head_bottleneck_dim: int = Field(256, ge=1)
    head_layers: int = Field(3, ge=1)
    head_use_bn: bool = False
    norm_last_layer: bool = True
    sync_batchnorm: bool = True  # used when the backbone has BatchNorm and DDP runs

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        import timm  # local import: config validation of other sections stays cheap

        if v not in timm.list_models():
            close = difflib.get_close_matches(v, timm.list_models(), n=5, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise ValueError(f"unknown timm backbone {v!r}{hint} (see timm.list_models())")
        return v


class LossConfig(_Strict):
    student_temp: float = Field(0.1, gt=0)
    teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp_epochs: int = Field(0, ge=0)
    center_momentum: float = Field(0.9, ge=0, le=1)
    # DINOv2's KoLeo regulariser on the student's backbone features of each global crop (0: off, DINO v1;
    # DINOv2 uses 0.1).  It keeps a short run's features from collapsing onto a few directions.
    koleo_weight: float = Field(0.0, ge=0)


class OptimConfig(_Strict):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(5e-4, gt=0)  # base lr for a global batch of 256 (scaled linearly)
    min_lr: float = Field(1e-6, ge=0)
    warmup_epochs: float = Field(10, ge=0)
    weight_decay: float = Field(0.04, ge=0)
    weight_decay_end: float = Field(0.4, ge=0)
    momentum_teacher: float = Field(0.996, ge=0, le=1)
    clip_grad: float = Field(3.0, ge=0)  # 0 disables clipping
    freeze_last_layer_epochs: int = Field(1, ge=0)
    sgd_momentum: float = Field(0.9, ge=0, lt=1)
    # torch's fused AdamW/SGD kernels (one kernel for all parameters, and a non-finite step is skipped
    # on the device without a host sync).  None: fused on CUDA, foreach elsewhere.
    fused: bool | None = None


class TrainConfig(_Strict):
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(64, ge=1)  # per worker
    steps_per_epoch: int | None = Field(None, ge=1)  # None: dataset rows // global batch
    max_steps: int | None = Field(None, ge=1)  # stop early (smoke runs, tune budgets)
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU; bf16: bf16 autocast on any device
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(500, ge=1)  # steps; also at every epoch end
    keep_checkpoints: int = Field(3, ge=1)
    # Upload checkpoints in the background (Ray Train's ASYNC upload mode): training goes on while a
    # checkpoint travels to storage, instead of every worker waiting at the report for the upload.
    async_checkpoint: bool = True
    threads: int | None = Field(None, ge=1)  # torch intra-op threads per worker
    # torch.compile the student's and teacher's backbone and head (first steps pay the compile time).
    compile: bool = False
    # torch.compile's mode when `compile` is on.  "reduce-overhead" replays the compiled graphs as CUDA
    # graphs: one launch instead of hundreds, for a step the host cannot launch fast enough (the paper's
    # batch-64 ViT-S/16 on an H200 is one, docs/performance.md); not yet measured on a GPU.
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # Under bf16 autocast, the head's last layer (out_dim logits) in fp32; see docs/core.md.
    fp32_head_logits: bool = False
    # Fewer kernel launches per eager step, the same training: the stochastic-depth masks of a forward
    # drawn in one op (core/droppath.py) and, under bf16, the teacher's matmul weights kept in bf16
    # (core/castcopy.py, bit-exact).  A switch so that `bench gpu` measures it on its own.
    fewer_launches: bool = True
    # The whole step captured as one CUDA graph and replayed (core/graphstep.py) from the first step
    # after the head's last-layer freeze; on a CPU the same step runs uncaptured.  Not yet run on a GPU.
    cuda_graph: bool = False


class DataConfig(_Strict):
    uri: str | None = None  # shards (local dir, file://, s3:// or gs://); None: synthetic default
    synthetic_n: int = Field(600, ge=1)
    synthetic_size: int = Field(128, ge=16, le=4096)  # raydino.synth's MAX_SIZE
    synthetic_seed: int = 0
    # The label the synthetic set's class folders (and so the demo's probe) carry: "dr" (ICDR grade,
    # lesions of a few pixels) or "glaucoma" (cup-to-disc class, visible at 64 px).  Pretraining never
    # sees labels; only the probe after it does.
    synthetic_task: Literal["dr", "glaucoma"] = "dr"
    # The DR lesions' radius and number, times the generator's default (raydino.data.fundus.LesionScale):
    # at 128 px a default haemorrhage is 1-3 px across.
    synthetic_lesion_size: float = Field(1.0, gt=0, le=20)
    synthetic_lesion_count: float = Field(1.0, gt=0, le=20)
    # train, val, test fractions of the synthetic set.  Pretraining reads only `train`; a larger test
    # split narrows the interval of the probe that judges it (the demo: 0.28, 0.10, 0.62).
    synthetic_splits: tuple[float, float, float] = (0.7, 0.15, 0.15)
    s3_endpoint: str | None = None  # S3-compatible storage: http(s)://host[:port]; None: AWS_ENDPOINT_URL(_S3) or AWS
    s3_region: str | None = None
    gcs_endpoint: str | None = None  # a GCS emulator or private endpoint: http(s)://host[:port]; None: STORAGE_EMULATOR_HOST or Google

    @field_validator("s3_endpoint", "gcs_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None, info: Any) -> str | None:
        return check_endpoint(info.field_name, v)

    @field_validator("uri")
    @classmethod
    def _data_uri(cls, v: str | None, info: Any) -> str | None:
        return check_storage_uri(info.field_name, v)

    @field_validator("synthetic_splits")
    @classmethod
    def _fractions(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) < 0 or abs(sum(v) - 1) > 1e-6 or v[0] == 0:
            raise ValueError(f"{list(v)}: need train, val, test fractions >= 0 that sum to 1, with train > 0")
        return v

    decode_batch_size: int = Field(32, ge=1)
    augment_concurrency: int | None = Field(None, ge=1)  # cap on concurrent augmentation tasks; None: as many as free CPUs allow
    augment_cpus: float = Field(1.0, gt=0)  # logical CPUs each data task (Parquet read, augmentation) reserves
    # Pin decoding/augmentation to labelled CPU nodes (e.g. {"raydino/role": "cpu-data"} on the
    # clusters in cluster/); None lets Ray place it anywhere (local runs).
    node_labels: dict[str, str] | None = None
    # Every epoch a fresh order, as DINO's DistributedSampler(shuffle=True) + set_epoch gives:
    # the shard files in a new seeded order (from train.seed and the epoch), then a shuffle buffer
    # of this many rows in each training worker (seeded from train.seed, epoch and rank).  Capped
    # at a quarter of a worker's epoch, so the first batch never waits for the whole epoch's crops.
    # 0 turns the buffer off.  With augment.device=cpu the buffer holds crops (about 0.5 MB a row
    # at 2x224 + 8x96 px), else encoded images.
    shuffle_buffer: int = Field(1024, ge=0)
    shuffle_files: bool = True


# A run's or experiment's name: one directory under its storage (no `/`, no `..`, nothing hidden).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


def check_name(value: str | None) -> str | None:
    """A run or experiment name, which becomes one folder under its storage."""
    if value is not None and not re.fullmatch(NAME_PATTERN, value):
        raise ValueError("a name is one folder: letters, digits, '.', '_' and '-', starting with a letter or digit")
    return value


class NameAndStorage(BaseModel):
    """The checks of a model with a `name` (one folder) and a `storage` URI: a run, a search."""

    @field_validator("storage", check_fields=False)
    @classmethod
    def _storage_uri(cls, v: str, info: Any) -> str:
        return check_storage_uri(info.field_name, v)

    @field_validator("name", check_fields=False)
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return check_name(v)


class RunConfig(_Strict, NameAndStorage):
    name: str | None = None  # the run's directory under `storage`
    storage: str = "runs"  # a directory, s3://bucket/prefix or gs://bucket/prefix
    workers: int = Field(2, ge=1)
    gpus_per_worker: float = Field(0, ge=0)
    cpus_per_worker: float = Field(1, gt=0)
    max_failures: int = Field(3, ge=-1)  # worker / node failures the run recovers from (-1: any number)
    # Spot reclaims Ray saw announced (a node drained for preemption), counted apart from max_failures so a
    # day of spot replacements never uses up the budget for real failures (-1: any number).
    max_preemptions: int = Field(-1, ge=-1)
    # With an autoscaler: how long each wait for nodes that can host the workers may last (at the start
    # and after every lost node) before the run fails (None: forever).  A bound per wait, not per run.
    # Without one, a run that cannot fit fails before training (check_resources).
    max_node_wait_s: float | None = Field(3600, gt=0)
    # Local paths (data.uri, run.storage, probe.data) on a filesystem every node mounts at the same path.
    # False: on a multi-node (or autoscaling) cluster a local path is refused before training.
    shared_fs: bool = False


class ProbeConfig(_Strict):
    """Downstream probe settings.  The `paper` probe's defaults are the authors' evaluation exactly:
    their eval.sh (batch 16, 50 epochs, seeds 0-4) running their eval_finetune.py, which is DINO's
    eval_linear.py (lr 0.001 per 256 images, SGD momentum 0.9, no weight decay, cosine to 0) with the
    training view RandomResizedCrop(224) at torchvision's defaults (scale 0.08-1, bilinear) and no flip."""

    data: str | None = None  # labelled shards or RETFound tree; None: the synthetic set's labels
    kind: Literal["fast", "paper", "knn"] = "fast"
    # At every epoch end of pretraining, the teacher's validation AUROC under this cheap probe on
    # `data` (or the synthetic labels): learning, or its absence, visible during the run.  The test
    # split is never read.  "off" when no labelled set is at hand.
    monitor: Literal["fast", "knn", "off"] = "fast"
    image_size: int | None = Field(None, ge=8)  # None: augment.global_crop_size
    batch_size: int = Field(64, ge=1)  # feature extraction (eval views); not the paper probe's training batch
    seeds: list[int] | None = None  # None: paper 0-4 (eval.sh), fast / knn [0] (deterministic)
    knn_k: int = Field(20, ge=1)
    knn_temperature: float = Field(0.07, gt=0)
    feature_dtype: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast extraction (faster on GPU, not the protocol)
    # The paper probe (eval.sh + eval_finetune.py = DINO eval_linear):
    epochs: int = Field(50, ge=1)
    lr: float = Field(0.001, gt=0)  # per 256 images: the SGD lr is lr x train_batch_size / 256
    train_batch_size: int = Field(16, ge=1)
    train_crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop scale, from the full-resolution image
    train_interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    train_flip: bool = False

    @field_validator("data")
    @classmethod
    def _probe_data_uri(cls, v: str | None, info: Any) -> str | None:
        return check_storage_uri(info.field_name, v)

    @field_validator("monitor", mode="before")
    @classmethod
    def _monitor_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `off` (in a file or `--set probe.monitor=off`) as false: that is "off".
        return "off" if v is False else v

    @field_validator("seeds")
    @classmethod
    def _seeds_given(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and not v:
            raise ValueError("an empty list: give at least one seed, or leave it out (paper 0-4, fast / knn 0)")
        return v

    @field_validator("train_crop_scale")
    @classmethod
    def _train_scale_in_range(cls, v: tuple[float, float], info: Any) -> tuple[float, float]:
        return _check_scale(info.field_name, v)

    def probe_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `raydino.eval.probes.probe_backbone` that this config sets."""
        return {
            "seeds": self.seeds, "batch_size": self.batch_size, "feature_dtype": self.feature_dtype,
            "knn_k": self.knn_k, "knn_temperature": self.knn_temperature, "epochs": self.epochs, "lr": self.lr,
            "train_batch_size": self.train_batch_size, "train_crop_scale": self.train_crop_scale,
            "train_interpolation": self.train_interpolation, "train_flip": self.train_flip,
        }  # fmt: skip


class Config(_Strict):
    model: ModelConfig = ModelConfig()
    augment: AugmentConfig = AugmentConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    run: RunConfig = RunConfig()
    probe: ProbeConfig = ProbeConfig()

    @model_validator(mode="after")
    def _cuda_graph_needs_a_plain_fused_step(self) -> Config:
        if not self.train.cuda_graph:
            return self
        clashes = [
            (self.train.compile, "train.compile=true (compiled networks bring their own graphs: train.compile_mode=reduce-overhead)"),
            (self.optim.optimizer != "adamw", f"optim.optimizer={self.optim.optimizer!r} (only adamw)"),
            (self.optim.fused is False, "optim.fused=false (the graph needs the fused AdamW)"),
            (self.model.head_use_bn, "model.head_use_bn=true (BatchNorm statistics are broadcast outside the step)"),
        ]
        found = [why for clash, why in clashes if clash]
        if found:
            raise ValueError("train.cuda_graph=true cannot be combined with " + "; ".join(found))
        return self

    @model_validator(mode="after")
    def _gpu_augmentation_needs_gpus(self) -> Config:
        if self.augment.device == "cuda" and self.run.gpus_per_worker <= 0:
            raise ValueError(
                "augment.device='cuda' makes the crops on each training worker's GPU, but run.gpus_per_worker="
                f"{self.run.gpus_per_worker:g}: set run.gpus_per_worker >= 1 (--gpus-per-worker), or augment.device=cpu"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------- loading


def preset_names() -> list[str]:
    return sorted(p.stem for p in resources.files("raydino.configs").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(name_or_path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset or YAML file as a dict, its `base:` chain merged under it (a file's `base` path is read
    relative to that file, then to the working directory; a chain that comes back to a file is an error)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.exists():
            raise ConfigError(f"config file {name_or_path!r} does not exist")
        key = str(path.resolve())
        if key in seen:
            raise ConfigError(f"config {name_or_path!r}: its base: chain comes back to it ({' -> '.join(seen + (key,))})")
        seen = (*seen, key)
        text = path.read_text()
    else:
        names = preset_names()
        if name_or_path not in names:
            close = difflib.get_close_matches(name_or_path, names, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config {name_or_path!r}{hint}; presets: {', '.join(names)}, or a YAML file path")
        text = resources.files("raydino.configs").joinpath(f"{name_or_path}.yaml").read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {name_or_path!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {name_or_path!r} must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)  # a config may extend another preset or file
    if base:
        if not isinstance(base, str):
            raise ConfigError(f"config {name_or_path!r}: base must be a preset name or a YAML path, got {base!r}")
        beside = path.parent / base
        if path.is_file() and not Path(base).is_absolute() and beside.is_file():
            base = str(beside)  # a file's base sits beside it (else: a preset, or a path from the working directory)
        return _deep_merge(_read_yaml(base, seen), data)
    return data


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _known_keys(model: type[BaseModel]) -> list[str]:
    keys: list[str] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += [f"{name}.{k}" for k in _known_keys(ann)]
        else:
            keys.append(field.alias or name)
    return keys


def apply_override(data: dict[str, Any], assignment: str) -> dict[str, Any]:
    """Apply one `section.key=value` override; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. --set train.epochs=5")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    known = _known_keys(Config)
    if key not in known:
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"--set {key}: unknown config key{hint}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    out = _deep_merge(data, {})
    set_dotted(out, key, value)
    return out


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """`data["a"]["b"] = value` for key "a.b", creating sections; shared by config and search specs."""
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p} is not a section")
    node[parts[-1]] = value


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith("function-"))
        msg = e["msg"].removeprefix("Value error, ")
        value = e.get("input")
        if isinstance(value, str) and ("://" in value or str(e["loc"][-1]).endswith("endpoint")):
            value = safe_uri(value)  # a URI's or endpoint's credentials are never echoed
        if e["type"] == "extra_forbidden":
            section = e["loc"][:-1]
            model: type[BaseModel] = Config
            for s in section:
                ann = model.model_fields[str(s)].annotation if str(s) in model.model_fields else None
                model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else model
            names = list(model.model_fields)
            close = difflib.get_close_matches(str(e["loc"][-1]), names, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; allowed: {', '.join(names)}"
            lines.append(f"  {loc}: unknown key{hint}")
        elif not loc:  # a check across sections: its message names the fields itself
            lines.append(f"  {msg}")
        elif isinstance(value, (dict, list)) and e["type"] != "literal_error":
            lines.append(f"  {loc}: {msg}")
        elif isinstance(value, bool) and e["type"] == "literal_error":
            lines.append(f"  {loc}={value!r}: {msg} (YAML reads a bare on/off/yes/no as a boolean: quote the word)")
        else:
            lines.append(f"  {loc}={value!r}: {msg}")
    return "\n".join(lines)


def build_config(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_config(name_or_path: str = "demo", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Preset name or YAML path, then `key=value` overrides; raises ConfigError on any bad field."""
    data = _read_yaml(name_or_path)
    for o in overrides:
        data = apply_override(data, o)
    cfg = build_config(data, source=name_or_path)
    check_consistency(cfg)
    return cfg


def check_consistency(cfg: Config) -> None:
    """Cross-field rules that no single field can express."""
    problems = []
    if cfg.optim.min_lr > cfg.optim.lr:
        problems.append(f"optim.min_lr={cfg.optim.min_lr} is above optim.lr={cfg.optim.lr}")
    if cfg.augment.local_crop_size > cfg.augment.global_crop_size:
        problems.append(f"augment.local_crop_size={cfg.augment.local_crop_size} exceeds augment.global_crop_size={cfg.augment.global_crop_size}")
    if not math.isfinite(cfg.optim.lr):
        problems.append("optim.lr must be finite")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------- resuming a run

# Keys a resumed run may not change: they decide the model, the data, steps per epoch, total steps and
# every schedule (lr, weight decay, teacher momentum and temperature), so a changed value would silently
# train a different run from the middle of the old one.  Every other key (logging, checkpoint cadence,
# probe, failure budgets, CPUs, storage endpoints) may change; `python -m raydino.pretrain` records it.
RESUME_FIXED = (
    "model.", "loss.", "optim.", "augment.", "run.workers", "train.batch_size", "train.epochs", "train.max_steps",
    "train.steps_per_epoch", "train.seed", "data.uri", "data.synthetic_",
)  # fmt: skip


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def resume_changes(old: dict[str, Any], new: Config) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Compare a run's first config (its config.yaml) with the config of a later start.

    Returns the refusals (one message per fixed key whose value changed, naming it with both values)
    and the allowed changes `{key: {"old": ..., "new": ...}}`.  A key the old config lacks (added by a
    later raydino) is an allowed change: the old run never chose a value for it.
    """
    before, after = _flatten(old), _flatten(json.loads(json.dumps(new.to_dict())))
    refused, allowed = [], {}
    for key in sorted(set(before) | set(after)):
        if key == "run.name" or before.get(key) == after.get(key):
            continue
        if key in before and key in after and key.startswith(RESUME_FIXED):
            refused.append(f"{key}: this run started with {before[key]!r}, now {after[key]!r}")
        else:
            allowed[key] = {"old": before.get(key), "new": after.get(key)}
    return refused, allowed
