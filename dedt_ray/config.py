"""The typed config tree of a run: YAML + dotted overrides, validated before any Ray work.

Every section is a pydantic model that forbids unknown keys, so a typo fails loudly with the
key's dotted path and, for choices, the allowed values. Types are strict: a boolean is not a
number (`train.steps=true` fails) and a string is not a number; an int is accepted where a
float is expected. YAML numbers such as `1e-3` (a string to YAML 1.1) read as floats.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dedt_ray.registry import CRITERIA, ENCODERS, choice

EncoderName = choice(ENCODERS)  # the names in dedt_ray.registry
CriterionName = choice(CRITERIA)


class ConfigError(ValueError):
    """A config that cannot run. The CLI turns it into exit code 2."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class DataConfig(Section):
    """Where the images come from and how they are shaped."""

    source: Literal["digits", "image_folder", "cifar10", "parquet"] = "digits"
    path: str | None = None
    image_size: int = Field(16, ge=4, le=1024)
    mode: Literal["L", "RGB"] = "L"
    split: Literal["train", "test", "all"] = "train"
    image_column: str = "image"
    label_column: str | None = "label"
    limit: int | None = Field(None, ge=1)
    strict: bool = False

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.source != "digits" and not self.path:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        return self


class EmbedConfig(Section):
    """The surrogate encoder and how the embedding stage runs it."""

    encoder: EncoderName = "pixels"
    model: str | None = None
    dim: int = Field(64, ge=1)
    batch_size: int = Field(64, ge=1)
    actors: int = Field(1, ge=1)
    gpus_per_actor: float | None = Field(None, ge=0.0, le=8.0)  # None: 1 if the cluster has GPUs
    threads_per_actor: int | None = Field(None, ge=1)  # CPU encoders; None: CPUs / actors
    rows_per_file: int = Field(100_000, ge=1)

    @model_validator(mode="after")
    def _model_needed(self) -> EmbedConfig:
        if ENCODERS[self.encoder].needs_model and not self.model:
            raise ValueError(
                f"embed.model (a local path or hub-cache name) is required for "
                f"embed.encoder={self.encoder!r}"
            )
        return self


DEDUP_DEFAULT = 0.95  # select.dedup=true: the cosine-similarity threshold


class SelectConfig(Section):
    """Group-wise coreset selection (groups: classes, embedding clusters or none) and dedup."""

    enabled: bool = True
    criterion: CriterionName = "gaussian"
    keep_ratio: float = Field(0.5, gt=0.0, le=1.0)
    k: int = Field(5, ge=1)
    knn_index: Literal["flat", "ivf"] = "flat"  # faiss search for knn classes above 20k rows
    seed: int = 0
    # groupby shuffle: "sort" (no extra actors, ~3 copies of the embeddings at its peak),
    # "hash" (streams into aggregator actors, ~2x at its peak), "auto": hash from 1 GiB up
    shuffle: Literal["auto", "sort", "hash"] = "auto"
    # what selection runs within: labels, k-means clusters of the embeddings, or all rows;
    # None: labels when any row has one (label != -1), else clusters
    groups: Literal["labels", "clusters", "none"] | None = None
    clusters: int | None = Field(None, ge=1)  # spherical k-means k; None: sqrt(rows), capped
    # semantic dedup: false, true (threshold 0.95) or a cosine-similarity threshold in (0, 1]
    dedup: Literal[False] | float = False
    dedup_keep: Literal["centroid", "score"] = "centroid"  # which member of a set stays
    # subtract the mean embedding before the cosines of k-means and dedup (for all-positive
    # features such as pixels, where unrelated images are cosine-near)
    center: bool = False

    @field_validator("dedup", mode="before")
    @classmethod
    def _dedup_threshold(cls, value: Any) -> Any:
        if value is True:
            return DEDUP_DEFAULT
        if value is False or value is None:
            return False
        if isinstance(value, int | float) and 0.0 < value <= 1.0:
            return float(value)
        raise ValueError(
            "select.dedup must be false, true (threshold 0.95) or a cosine-similarity "
            f"threshold in (0, 1], got {value!r}"
        )


class ModelConfig(Section):
    """The diffusion model (diffusers UNet2DModel + DDPMScheduler)."""

    sample_size: int | None = Field(None, ge=4)  # None: data.image_size (or the latent size)
    block_out_channels: list[int] = [16, 32, 64]
    layers_per_block: int = Field(1, ge=1)
    attention_levels: list[bool] | None = None  # per block; None: attention in the last one
    attention_head_dim: int | None = Field(8, ge=1)  # None: one head per attention layer
    mid_attention: bool = True  # self-attention in the UNet's middle block
    norm_num_groups: int = Field(8, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    class_conditional: bool = True
    label_dropout: float = Field(0.1, ge=0.0, lt=1.0)  # for classifier-free guidance
    num_train_timesteps: int = Field(1000, ge=10)
    beta_schedule: Literal["linear", "cosine"] = "linear"
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    latent: bool = False
    vae: str | None = None  # diffusers AutoencoderKL folder for latent mode
    vae_batch_size: int = Field(64, ge=1)  # latents stage: images per VAE call

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if any(c <= 0 or c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"model.block_out_channels {self.block_out_channels} must be positive "
                f"multiples of model.norm_num_groups={self.norm_num_groups}"
            )
        if not self.block_out_channels:
            raise ValueError("model.block_out_channels needs at least one entry")
        levels = self.attention_levels
        if levels is not None and len(levels) != len(self.block_out_channels):
            raise ValueError("model.attention_levels needs one entry per block_out_channels")
        if self.latent and not self.vae:
            raise ValueError("model.vae (an AutoencoderKL folder) is required when model.latent")
        return self


class InfoBatchConfig(Section):
    """InfoBatch's soft pruning of each epoch (Qin et al., ICLR 2024; docs/train.md)."""

    enabled: bool = False
    ratio: float = Field(0.5, ge=0.0, lt=1.0)  # share of the low-loss samples dropped per epoch
    anneal: float = Field(0.875, gt=0.0, le=1.0)  # prune in the first `anneal` of the epochs


class TrainConfig(Section):
    """How a diffusion model is trained (Ray Train, DDP)."""

    steps: int = Field(1000, ge=1)  # optimizer steps (unless train.epochs is set)
    # the budget in passes over the training rows instead of steps: ceil(epochs x rows /
    # batch_size) steps without InfoBatch, fewer with it (a pruned epoch is shorter)
    epochs: float | None = Field(None, gt=0.0)
    infobatch: InfoBatchConfig = InfoBatchConfig()
    batch_size: int = Field(64, ge=1)  # global batch per optimizer step
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(100, ge=0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float | None = Field(1.0, gt=0.0)
    grad_accum: int = Field(1, ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # used on GPU only
    ema_decay: float = Field(0.995, ge=0.0, lt=1.0)
    # Min-SNR-gamma loss weights (Hang et al., ICCV 2023: gamma 5), None: uniform over t
    min_snr_gamma: float | None = Field(None, gt=0.0)
    hflip: bool = False  # random horizontal flips of the training images (pixel models)
    class_weighting: Literal["sampling", "loss"] = "sampling"
    num_workers: int = Field(1, ge=0)  # 0: in-process (tests)
    use_gpu: bool | None = None  # None: when the cluster has GPUs
    cpus_per_worker: float = Field(1.0, gt=0.0)
    threads_per_worker: int | None = Field(None, ge=1)  # None: node CPUs / workers on the node
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1)
    log_every: int = Field(100, ge=1)
    # quality along training (docs/train.md): every eval_every steps the EMA model is sampled
    # (eval_samples, DDIM eval_steps) and scored against the real images by a Ray actor
    eval_every: int | None = Field(None, ge=1)
    eval_samples: int = Field(200, ge=4)
    eval_steps: int = Field(20, ge=1)
    # "converged": stop when the metric has not improved by more than its noise for
    # `patience` evaluations (train.steps is then the ceiling); "steps": train.steps
    until: Literal["steps", "converged"] = "steps"
    patience: int = Field(3, ge=1)
    # metrics tracking of every training run: TensorBoard event files in <run>/tensorboard/,
    # MLflow runs in tracking_uri (None: sqlite in <run>/mlruns/); docs/tracking.md
    tracking: list[Literal["tensorboard", "mlflow"]] = []
    tracking_uri: str | None = None
    fail_at_step: int | None = Field(None, ge=1)  # testing: raise once at this step if ...
    fail_flag: str | None = None  # ... this file exists (it is removed first)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        per_step = max(1, self.num_workers) * self.grad_accum
        if self.batch_size % per_step:
            raise ValueError(
                f"train.batch_size={self.batch_size} must be a multiple of "
                f"max(1, train.num_workers) * train.grad_accum = {per_step}"
            )
        if self.infobatch.enabled and self.epochs is None:
            raise ValueError(
                "train.infobatch needs train.epochs: its saving is fewer steps per epoch"
            )
        if self.until == "converged" and self.eval_every is None:
            raise ValueError("train.until=converged needs train.eval_every (the curve it reads)")
        if (self.fail_at_step is None) != (self.fail_flag is None):
            raise ValueError("train.fail_at_step and train.fail_flag are set together")
        return self


class ReferenceConfig(Section):
    """The reference DM that DRO reweighting compares against (stage `reference`)."""

    pretrained: str | None = None  # diffusers UNet2DModel folder (or one with unet/); None: train
    # what a trained reference learns from: DoReMi's reference learns the full data with
    # uniform class weights ("subset": the select stage's rows)
    data: Literal["subset", "full"] = "full"
    steps: int | None = Field(None, ge=1)  # None: from reweight.budget (as many as the proxy)
    batch_size: int | None = Field(None, ge=1)  # None: train.batch_size


class ReweightConfig(Section):
    """Group DRO class weights (DoReMi) from a proxy DM trained against the reference."""

    enabled: bool = True
    eta: float = Field(1.0, gt=0.0)  # exponentiated-gradient step size
    smoothing: float = Field(1e-3, ge=0.0, lt=1.0)  # mix with uniform: (1 - c) a + c / K
    # reference + proxy training FLOPs as a share of the final model's (train.steps); sets
    # their steps unless reference.steps / reweight.steps are given
    budget: float = Field(0.08, gt=0.0, le=1.0)
    # model.* overrides of the small architecture reference and proxy share; None: half the
    # widths of model.block_out_channels
    proxy_model: dict[str, Any] | None = None
    # excess loss of a class before its first batch; None: the zero predictor's loss
    initial_excess: float | None = Field(None, ge=0.0)
    steps: int | None = Field(None, ge=1)  # proxy steps; None: from reweight.budget
    batch_size: int | None = Field(None, ge=1)  # None: train.batch_size


class ExtraSpace(Section):
    """A further feature space for the distances (`evaluate.extra_spaces`), from local weights.

    Its distances are named for it, `FD_<name>` and `KD_<name>_mean/std`, never FID/KID.
    """

    encoder: Literal["clip", "dinov2", "vit"]
    model: str  # a local folder or a Hugging Face hub-cache name; never downloaded
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # None: the encoder

    @property
    def label(self) -> str:
        return self.name or self.encoder


class EvaluateConfig(Section):
    """Sampling the trained model and measuring it against the real images (stage `evaluate`)."""

    samples_per_class: int = Field(100, ge=1)
    num_samples: int | None = Field(None, ge=1)  # unconditional; None: samples_per_class x classes
    num_inference_steps: int = Field(50, ge=1)
    scheduler: Literal["ddpm", "ddim"] = "ddim"
    guidance_scale: float = Field(1.0, ge=0.0)  # 1: no classifier-free guidance
    feature_space: Literal["auto", "inception", "classifier"] = "auto"
    inception_weights: str | None = "pt_inception-2015-12-05-6726825d.pth"  # path or hub-cache name
    classifier_epochs: int = Field(10, ge=1)
    classifier_max_images: int = Field(50_000, ge=10)
    max_real: int | None = Field(None, ge=2)  # real images measured (None: the whole source)
    manifold_samples: int = Field(10_000, ge=2)  # per side: k-NN metrics and KID use these
    nearest_k: int = Field(3, ge=1)  # precision/recall (Kynkaanniemi et al. 2019: k = 3)
    coverage_k: int = Field(5, ge=1)  # density/coverage (Naeem et al. 2020: k = 5)
    kid_subsets: int = Field(100, ge=1)  # KID: mean/std over this many random subsets
    kid_subset_size: int = Field(1000, ge=2)  # rows per side per subset (fewer if fewer samples)
    extra_spaces: list[ExtraSpace] = []  # further Frechet/kernel distances (FD_<name>)
    batch_size: int = Field(256, ge=1)  # images per sampling call (one share) / feature batch
    actors: int = Field(1, ge=1)
    gpus_per_actor: float | None = Field(None, ge=0.0, le=8.0)  # None: 1 if the cluster has GPUs
    threads_per_actor: int | None = Field(None, ge=1)  # on CPU; None: node CPUs / actors
    grid_columns: int = Field(10, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _check_spaces(self) -> EvaluateConfig:
        labels = [space.label for space in self.extra_spaces]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(
                f"evaluate.extra_spaces: names must be unique, {', '.join(repeated)} repeats "
                "(give each entry a distinct `name`)"
            )
        return self


class TDCConfig(Section):
    """Timestep divide-and-conquer (stage `tdc`): per-group pruned denoisers from `train`."""

    enabled: bool = False
    n_groups: int = Field(2, ge=1)
    rule: Literal["equal_snr", "quantile", "explicit"] = "quantile"
    boundaries: list[float] | None = None  # rule=explicit: n_groups - 1 cut points
    boundary_unit: Literal["timestep", "snr_db"] = "timestep"
    k: float = Field(0.5, gt=0.0, le=1.0)  # smallest group's relative FLOPs
    smallest: Literal["noisiest", "cleanest"] = "noisiest"
    proxy: Literal["optuna", "llm"] = "optuna"
    rounds: int = Field(8, ge=1)  # proxy rounds per group (memory bank rounds included)
    startup_rounds: int = Field(2, ge=0)  # random Optuna rounds before TPE (>= rounds: random)
    resume_search: bool = True  # continue the group's memory bank of an earlier run
    llm_base_url: str | None = None  # OpenAI-compatible endpoint (proxy=llm)
    llm_model: str | None = None
    llm_api_key_env: str | None = None  # environment variable holding the key
    taylor_images: int = Field(64, ge=1)  # images for Taylor importance
    taylor_timesteps: int = Field(16, ge=1)  # timesteps spread over the group, per image
    taylor_threshold: float = Field(0.0, ge=0.0, lt=1.0)  # Diff-Pruning's thr; 0: whole group
    score_steps: int = Field(20, ge=0)  # fine-tune steps when scoring a candidate
    score_images: int = Field(256, ge=1)  # images for a candidate's fine-tune
    score_heldout: int = Field(256, ge=1)  # held-out images for a candidate's score
    # the single model's budget (train.steps' FLOPs) is split: stage 1 (the train stage)
    # trains for this share of train.steps, the search and stage 2 share the rest
    stage1_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    finetune_steps: int | None = Field(None, ge=1)  # stage 2 steps per group; None: the rest
    finetune_lr: float | None = Field(None, gt=0.0)  # stage 2 peak lr; None: train.lr
    parallel_groups: int | None = Field(None, ge=1)  # stage-2 runs at once; None: what fits

    def stage1_steps(self, train_steps: int) -> int:
        """Stage 1's share of the single model's `train.steps` (at least 1)."""
        return max(1, round(train_steps * self.stage1_fraction))

    @model_validator(mode="after")
    def _check(self) -> TDCConfig:
        if self.rule == "explicit" and (
            self.boundaries is None or len(self.boundaries) != self.n_groups - 1
        ):
            raise ValueError("tdc.rule=explicit needs tdc.boundaries with n_groups - 1 entries")
        if self.proxy == "llm" and not (self.llm_base_url and self.llm_model):
            raise ValueError("tdc.proxy=llm needs tdc.llm_base_url and tdc.llm_model")
        return self


class TuneParam(Section):
    """One searched parameter (a dotted config key); see docs/tune.md."""

    type: Literal["float", "int", "categorical", "cuts"] = "float"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None  # categorical
    count_from: str | None = None  # cuts: the int parameter n; n - 1 sorted cut points
    scale: str | None = None  # cuts: multiply the (0, 1) cuts by this config key, as ints
    also: dict[str, Any] = {}  # fixed dotted overrides applied with this parameter

    @model_validator(mode="after")
    def _check(self) -> TuneParam:
        if self.type == "categorical" and not self.choices:
            raise ValueError("a categorical tune parameter needs choices")
        if self.type != "categorical" and (self.low is None or self.high is None):
            raise ValueError(f"a {self.type} tune parameter needs low and high")
        if self.type == "cuts" and not self.count_from:
            raise ValueError("a cuts tune parameter needs count_from (e.g. tdc.n_groups)")
        return self


class AshaConfig(Section):
    """Early stopping of trials on the reported training loss (ASHA)."""

    enabled: bool = True
    grace_period: int = Field(2, ge=1)  # reports before a trial can be stopped
    reduction_factor: float = Field(2.0, gt=1.0)


class TuneConfig(Section):
    """Ray Tune + Optuna sweeps (`dedt-ray tune`); see docs/tune.md."""

    space: dict[str, TuneParam] = {
        "select.keep_ratio": TuneParam(low=0.2, high=1.0),
        "select.criterion": TuneParam(
            type="categorical", choices=["gaussian", "knn", "moderate", "random"]
        ),
    }
    num_samples: int = Field(12, ge=1)
    metric: str = "quality"  # "quality": evaluate's main metric; or a key of its metrics
    mode: Literal["min", "max"] = "min"
    multi_objective: bool = False  # also minimise compute (train FLOPs): a Pareto front
    max_concurrent: int | None = Field(None, ge=1)  # None: from the cluster's CPUs/GPUs
    cpus_per_trial: float = Field(0.0, ge=0.0)  # the waiting trial function itself
    max_failures: int = Field(1, ge=-1)  # retries of a crashed trial (-1: unlimited)
    seed: int = 0
    asha: AshaConfig = AshaConfig()
    trial_overrides: list[str] = []  # dotted overrides of every trial (its budget)
    # trial budget by epochs: train.steps = max(min_steps, ceil(epochs * rows kept / batch)),
    # so compute follows the kept data (a real quality/compute trade-off); None: train.steps
    epochs: float | None = Field(None, gt=0)
    min_steps: int = Field(10, ge=1)


SETTING_NAME = r"^[A-Za-z0-9][A-Za-z0-9._+-]*$"


class StudySetting(Section):
    """One named override set of a study (`study.settings`; docs/study.md)."""

    name: str = Field(pattern=SETTING_NAME)
    overrides: dict[str, Any] = {}  # dotted config keys -> values, as on the command line
    max_compute: float | None = Field(None, gt=0.0)  # None: study.max_compute


class StudyBest(Section):
    """A second phase: the best static setting (by speed-up) again with `overrides`."""

    name: str = Field("best+dro", pattern=SETTING_NAME)
    overrides: dict[str, Any] = {"reweight.enabled": True}
    among: list[str] | None = None  # the settings to choose from; None: all but the baseline


class StudyConfig(Section):
    """`dedt-ray study`: settings x seeds, each a Ray Tune trial; see docs/study.md."""

    settings: list[StudySetting] = []
    # the full-data, unweighted reference every speed-up is measured against; when no setting
    # has this name it is added (select.enabled=false, reweight.enabled=false)
    baseline: str = Field("full", pattern=SETTING_NAME)
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    # every other setting trains up to this share of the baseline's compute (images seen)
    max_compute: float = Field(0.6, gt=0.0, le=10.0)
    tolerance: float = Field(0.05, ge=0.0)  # target = baseline final metric x (1 + tolerance)
    best: StudyBest | None = None
    max_concurrent: int | None = Field(None, ge=1)  # None: what the cluster holds (as tune)
    max_failures: int = Field(1, ge=-1)  # retries of a crashed trial
    bootstrap_draws: int = Field(2000, ge=10)
    level: float = Field(0.95, gt=0.0, lt=1.0)  # the intervals' coverage

    @model_validator(mode="after")
    def _check(self) -> StudyConfig:
        names = [s.name for s in self.settings] + ([self.best.name] if self.best else [])
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"study.settings: names must be unique, {', '.join(repeated)} repeats")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"study.seeds must be distinct, got {self.seeds}")
        known = {s.name for s in self.settings}
        unknown = sorted(set(self.best.among or []) - known) if self.best else []
        if unknown:
            raise ValueError(f"study.best.among: no setting named {', '.join(unknown)}")
        return self


class ReportConfig(Section):
    """The run's report.html."""

    baseline_run: str | None = None  # run directory of the full-data baseline, to compare compute


class Config(Section):
    """The whole pipeline."""

    seed: int = 0
    data: DataConfig = DataConfig()
    embed: EmbedConfig = EmbedConfig()
    select: SelectConfig = SelectConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    reference: ReferenceConfig = ReferenceConfig()
    reweight: ReweightConfig = ReweightConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tdc: TDCConfig = TDCConfig()
    tune: TuneConfig = TuneConfig()
    study: StudyConfig = StudyConfig()
    report: ReportConfig = ReportConfig()

    @model_validator(mode="after")
    def _hflip_pixels(self) -> Config:
        if self.train.hflip and self.model.latent:
            raise ValueError("train.hflip flips images; it cannot be used with model.latent")
        return self


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` and `1E5` as floats (YAML 1.2), not strings."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    """YAML as config files and override values are read (safe; `1e-3` is a float)."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader subclass)


def hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`a.b=1 c=[1,2]` -> nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override")
        node[parts[-1]] = read_yaml(raw) if raw != "" else ""
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(err: ValidationError, path: Path | None, overrides: list[str]) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<config>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            parent = _section_at(e["loc"][:-1])
            allowed = ", ".join(parent.model_fields) if parent else ""
            msg = f"unknown key (allowed: {allowed})"
        elif "input" in e and not isinstance(e["input"], dict):
            msg = f"{msg}, got {e['input']!r}"
        lines.append(f"  {loc}: {msg} {_origin(e['loc'], path, overrides)}")
    return "invalid config:\n" + "\n".join(lines)


def _origin(loc: tuple, path: Path | None, overrides: list[str]) -> str:
    """Where the value at `loc` came from: an override (echoed), the config file or the
    defaults."""
    dotted = ".".join(str(p) for p in loc)
    for item in reversed(overrides):
        key = item.partition("=")[0]
        if dotted == key or dotted.startswith(key + "."):
            return f"(from the override {item!r})"
    return f"(from {path})" if path else "(from the defaults)"


def _section_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (or the defaults), apply dotted overrides, validate. Raises ConfigError."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = read_yaml(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at top level")
    raw = _merge(raw, parse_overrides(overrides or []))
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, list(overrides or []))) from None


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> Config:
    """A config tree (`model_dump(mode="json")`) with dotted `key=value` overrides, validated;
    a ConfigError names each bad key and the override it came from."""
    try:
        return Config.model_validate(_merge(tree, parse_overrides(overrides)))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, None, overrides)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
