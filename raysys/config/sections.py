"""The typed config sections, one per stage, and `PipelineConfig`, which holds them all.

Every section forbids unknown keys, so a typo in a YAML file is a `ValueError` that names the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from raysys.config.governance import DPConfig, GovernanceConfig
from raysys.config.monitoring import MonitorConfig
from raysys.config.quality import QualityConfig
from raysys.config.serving import CanaryConfig, ServeConfig
from raysys.config.sizing import SizingConfig
from raysys.config.strict import Strict
from raysys.config.tracking import TrackingConfig


class DataConfig(Strict):
    """Where the data lives and, for the synthetic generator, what it looks like."""

    root: str = Field("runs/data", description="Dataset directory (schema.json + train/validation/test Parquet).")
    source: Literal["synthetic", "parquet"] = Field(
        "synthetic", description="'synthetic' generates data into `root` when it is missing; 'parquet' reads yours."
    )
    num_train_rows: int = Field(20_000, ge=100, description="Rows in the training split (synthetic).")
    num_val_rows: int = Field(4_000, ge=50, description="Rows in the validation split (synthetic).")
    num_test_rows: int = Field(4_000, ge=50, description="Rows in the test split (synthetic).")
    num_numeric: int = Field(8, ge=2, description="Numeric features (synthetic).")
    num_categorical: int = Field(3, ge=1, description="Categorical features (synthetic).")
    num_categories: int = Field(5, ge=2, description="Categories per categorical feature (synthetic).")
    num_classes: int = Field(4, ge=2, description="Label classes (synthetic).")
    num_shards: int = Field(4, ge=1, description="Parquet files per split (synthetic).")
    label_noise: float = Field(0.03, ge=0.0, lt=0.5, description="Fraction of labels resampled at random.")
    correlated_pairs: int = Field(
        0, ge=0, description="Synthetic: pairs of numeric features drawn jointly normal with `pair_correlation` "
        "(the last 2*k numeric features: x[n-2k] with x[n-2k+1], ...); a DriftSpec can flip their correlation "
        "with the marginals unchanged. 0: every numeric feature independent (the rule and rows of older seeds).")
    pair_correlation: float = Field(0.6, gt=-1, lt=1, description="Correlation of each `correlated_pairs` pair.")
    nuisance_features: int = Field(
        0, ge=0, description="Synthetic: the last k numeric features before the correlated pairs do not enter the "
        "label rule (a shift of one moves the inputs, not the accuracy).")
    seed: int = Field(0, description="Seed of the generator: same seed, same rule and same rows.")


# FT-Transformer sizes (raysys.models.ft_transformer.FT_PRESETS; config imports no torch, a test keeps them equal)
FT_SIZES = ("tiny", "small", "base", "large")
FT_ARCH_FIELDS = ("d_model", "num_blocks", "num_heads", "ffn_mult")


class ModelConfig(Strict):
    """A teacher or student architecture.

    family "mlp": `raysys.models.mlp.TabularMLP` (categorical embeddings + an MLP of `hidden_dims`);
    family "ft_transformer": `raysys.models.ft_transformer.FTTransformer`, the named `size` (a preset in
    FT_PRESETS) with any of d_model / num_blocks / num_heads / ffn_mult overriding it. `dropout` applies
    to both. The ft_transformer settings are an error on an mlp (a forgotten `family:` would otherwise
    train the wrong model); an ft_transformer ignores the mlp settings (hidden_dims, embed_dim, activation).
    """

    family: Literal["mlp", "ft_transformer"] = Field(
        "mlp", description="Model family: 'mlp' (TabularMLP) or 'ft_transformer' (FT-Transformer, the teacher that "
        "tensor and pipeline parallelism split by attention heads and blocks).")
    size: Literal["tiny", "small", "base", "large"] | None = Field(
        None, description="ft_transformer: preset size (tiny ~10k .. large ~300M parameters; default tiny).")
    d_model: int | None = Field(None, ge=1, description="ft_transformer: token width (overrides the size preset).")
    num_blocks: int | None = Field(None, ge=1, description="ft_transformer: transformer blocks (overrides the preset).")
    num_heads: int | None = Field(
        None, ge=1, description="ft_transformer: attention heads; must divide d_model (overrides the preset).")
    ffn_mult: float | None = Field(
        None, gt=0, description="ft_transformer: MLP hidden width / d_model (overrides the preset).")
    hidden_dims: list[int] = Field([256, 256, 128], description="mlp: widths of the hidden layers.")
    embed_dim: int = Field(8, ge=1, description="mlp: embedding width of each categorical feature.")
    activation: Literal["gelu", "gelu_tanh", "relu", "silu"] = Field(
        "relu", description="mlp: activation after each hidden layer. relu is the cheapest per call on CPU "
        "(~0.8 us vs ~7.4 us for torch's exact gelu at batch 1, one thread); a stored model spec without this "
        "key means gelu, what earlier versions used.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout (mlp: after each hidden layer; "
                           "ft_transformer: attention, residual and MLP dropout).")

    @field_validator("hidden_dims")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(d < 1 for d in v):
            raise ValueError("hidden_dims must be a non-empty list of positive widths, e.g. [256, 128]")
        return v

    @model_validator(mode="after")
    def _family_fields(self) -> ModelConfig:
        if self.family == "mlp":
            wrong = [f for f in ("size", *FT_ARCH_FIELDS) if getattr(self, f) is not None]
            if wrong:
                raise ValueError(f"{', '.join(wrong)}: only apply to family 'ft_transformer'; set "
                                 f"family: ft_transformer, or remove {', '.join(wrong)}")
        else:
            # mlp settings are ignored here, silently: load_config merges YAML over a preset's full dump, so
            # every config carries them (a preset's own ft_transformer teacher leaves its ft fields None
            # where it can, so that `family: mlp` in a YAML file over it stays valid)
            d, h = self.d_model, self.num_heads
            if d is not None and h is not None and d % h:
                raise ValueError(f"num_heads: {h} does not divide d_model {d}; choose num_heads among "
                                 f"{[n for n in range(1, min(d, 64) + 1) if d % n == 0]}")
        return self


class ParallelConfig(Strict):
    """Degrees of data (dp), tensor (tp) and pipeline (pp) parallelism; dp * tp * pp = train.num_workers.

    A degree left out is inferred: dp = num_workers / (tp * pp)."""

    dp: int | None = Field(None, ge=1, description="Data-parallel degree (default: num_workers / (tp * pp)).")
    tp: int | None = Field(None, ge=1, description="Tensor-parallel degree (default 1).")
    pp: int | None = Field(None, ge=1, description="Pipeline stages (default 1).")


class TrainConfig(Strict):
    """Teacher training with Ray Train (TorchTrainer)."""

    strategy: Literal["ddp", "zero1", "zero2", "zero3", "pipeline", "tensor"] = Field(
        "ddp", description="Parallel strategy (raysys.parallel): ddp; zero1 (AdamW state partitioned over DDP "
        "ranks, see zero1_partition); zero2/zero3 (FSDP2, sharded DCP checkpoints); tensor (tensor parallel, "
        "FSDP2 zero3 over any dp dimension); pipeline (stages by parameter count, DDP over any dp dimension). With "
        "train.parallel, the flavour of the dp dimension.")
    parallel: ParallelConfig | None = Field(
        None, description="Parallel degrees {dp, tp, pp}; default: dp = num_workers (or tp/pp = num_workers for "
        "strategy tensor/pipeline).")
    zero1_partition: Literal["even", "whole_params"] = Field(
        "even", description="How zero1 splits AdamW state: 'even' slices of the flattened parameters (1/N per "
        "rank), or torch's ZeroRedundancyOptimizer assigning whole parameters (uneven when one matrix dominates).")
    num_microbatches: int | None = Field(
        None, ge=1, description="Pipeline microbatches per batch (default: train.parallel.pp, the fewest 1F1B takes); "
        "the per-replica batch must split into them evenly.")
    pipeline_schedule: Literal["1f1b", "gpipe"] = Field("1f1b", description="Pipeline schedule.")
    cache_shard_mb: float = Field(
        512, ge=0, description="Keep each worker's data shard in memory after the first epoch when it takes at "
        "most this many MiB (later epochs shuffle it in memory instead of re-reading it through Ray Data); 0 "
        "streams every epoch.")
    max_worker_memory_gb: float | None = Field(
        None, gt=0, description="Per-worker budget for params + grads + AdamW state (GPU memory with use_gpu); a "
        "configuration whose estimate exceeds it is refused before training, naming one that fits.")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one torch process each).")
    cpus_per_worker: float = Field(1.0, gt=0, description="Logical CPUs each worker reserves.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Other Ray resources each worker reserves beside its CPUs, e.g. "
        "{'memory': 4e9} or a custom node resource {'trainer_node': 1} that places the ranks on labelled nodes.")
    use_gpu: bool = Field(
        False, description="One GPU per worker (Ray Train's use_gpu): each rank's model, batches and optimizer state "
        "on its CUDA device, collectives on NCCL (CPU-side ones on gloo). The cluster must have GPUs: training is "
        "refused before any worker starts when it has none.")
    accelerator_type: str | None = Field(
        None, description="With use_gpu: the GPU type the workers need (Ray's accelerator_type, e.g. 'A100', "
        "'H100', 'L4'); None: any.")
    mixed_precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="bf16 compute (autocast for ddp/zero1/tensor/pipeline; FSDP2's MixedPrecisionPolicy with "
        "bf16 params and fp32 gradient reduction for zero2/zero3) or fp32. 'auto': bf16 on GPU, fp32 on CPU. DP-SGD "
        "always runs in fp32.")
    threads_per_worker: int = Field(1, ge=1, description="torch intra-op threads per worker.")
    worker_niceness: int | None = Field(
        0, ge=-20, le=19, description="Nice value the training workers set on all their threads. Ray starts worker "
        "processes at nice 15 (RAY_worker_niceness), so on a busy machine they lose the CPU to everything else; 0 "
        "runs them like a plain torchrun process (lowering needs CAP_SYS_NICE, else Ray's value stays, with a "
        "warning). None leaves Ray's value.")
    num_epochs: int = Field(8, ge=1, description="Passes over the training split.")
    batch_size: int = Field(256, ge=1, description="Global batch size, split evenly across workers.")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate (the peak of the schedule).")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="Learning rate per optimizer step: 'cosine' (linear warm-up, then a half cosine to 0 at "
        "the last step, ceil(train rows / batch_size) x num_epochs steps) or 'constant' (lr throughout). Set from "
        "the global step, so a resumed run continues on the same curve.")
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="cosine: fraction of all steps spent warming up.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW (decoupled) weight decay, applied to >= 2-D "
                                "non-embedding weights only (not biases, norms, embeddings, feature tokenizer).")
    max_failures: int = Field(2, ge=-1, description="Worker-group restarts Ray Train allows (-1: unlimited).")
    timeout_s: int = Field(120, ge=10, description="Process-group timeout so a dead rank fails fast.")
    report_poll_interval_s: float = Field(
        0.2, gt=0, le=60, description="How often Ray Train's controller collects the workers' reports "
        "(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S; Ray's default is 2 s). A worker's ray.train.report waits until "
        "the controller has taken its previous one, so epochs shorter than this wait for it every epoch. "
        "An explicit RAY_TRAIN_HEALTH_CHECK_INTERVAL_S in the driver's environment wins.")
    seed: int = Field(0, description="Seed of model init and shuffling.")
    dp: DPConfig | None = Field(None, description="Train the teacher with DP-SGD (Opacus); None: off.")

    @field_validator("resources_per_worker")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        if "CPU" in v:
            raise ValueError("train.resources_per_worker: set the CPUs with train.cpus_per_worker, not a 'CPU' key")
        bad = {k: a for k, a in v.items() if a < 0}
        if bad:
            raise ValueError(f"train.resources_per_worker: amounts must be >= 0, got {bad}")
        return v

    @model_validator(mode="after")
    def _degrees(self) -> TrainConfig:
        if self.dp is not None and self.strategy != "ddp":  # the rule of raysys.trust.dp.check_strategy
            raise ValueError(f"train.dp: DP-SGD needs each row's own gradient, so it supports single-process and "
                             f"data-parallel training only (train.strategy: ddp), not {self.strategy!r}, which "
                             "shards or splits the parameters or the batch; set train.strategy: ddp or remove dp")
        if self.accelerator_type is not None and not self.use_gpu:
            raise ValueError(f"train.accelerator_type: {self.accelerator_type!r} asks for a GPU type, but "
                             "train.use_gpu is false; set train.use_gpu: true (raysys train --gpu) or remove it")
        p, n = self.parallel, self.num_workers
        if self.dp is not None and p is not None and ((p.tp or 1) > 1 or (p.pp or 1) > 1):
            raise ValueError("train.dp: DP-SGD runs on plain data parallel only, but train.parallel asks for "
                             f"tp={p.tp or 1}, pp={p.pp or 1}; remove train.parallel or dp")
        if p is not None and (p.dp, p.tp, p.pp) != (None, None, None):
            # the same rule as raysys.parallel.ParallelDims (config imports no torch)
            tp, pp = p.tp or 1, p.pp or 1
            dp = p.dp if p.dp is not None else n // (tp * pp)
            if dp * tp * pp != n:
                raise ValueError(
                    f"train.parallel: dp={dp} x tp={tp} x pp={pp} = {dp * tp * pp} but train.num_workers is {n}; "
                    f"set the degrees so that dp * tp * pp == {n}, or leave train.parallel out")
        return self


class SliceConfig(Strict):
    """Which slices of the test split the evaluation reports (worst slice flagged on the model card)."""

    categorical: list[str] | None = Field(
        None, description="Categorical features whose values each form a slice (None: every categorical feature)."
    )
    numeric_bins: dict[str, list[float]] = Field(
        default_factory=dict,
        description="Numeric feature -> raw-value bin edges, e.g. {x0: [-1, 0, 1]} gives 4 slices.",
    )
    num_quantile_bins: int = Field(
        0, ge=0, description="Quantile bins for each numeric feature not in numeric_bins (0: none)."
    )
    min_rows: int = Field(30, ge=1, description="Slices with fewer rows are reported but never flagged worst.")


class EvaluationConfig(Strict):
    """Offline evaluation of the distilled student (raysys.evaluate)."""

    slices: SliceConfig = Field(default_factory=SliceConfig, description="Per-slice metrics.")
    num_calibration_bins: int = Field(15, ge=2, description="Equal-width confidence bins for ECE.")
    latency_batch_size: int = Field(64, ge=1, description="Batch size of the per-batch latency figures.")
    latency_repeats: int = Field(200, ge=5, description="Timed calls per latency figure (after warm-up).")


class DistillConfig(Strict):
    """Knowledge distillation of a student from the teacher, swept with Ray Tune.

    `search: grid` sweeps `temperatures` x `alphas` for the fixed `student`; `search: optuna` (or
    `random`, the baseline) samples `num_samples` trials over temperature (log), alpha, lr (log), student
    width and depth. The chosen student is the smallest whose validation accuracy is within
    `accuracy_gap` of the teacher's (the most accurate one when none is).
    """

    student: ModelConfig = Field(
        default_factory=lambda: ModelConfig(hidden_dims=[64, 32], embed_dim=4), description="Student architecture."
    )
    search: Literal["grid", "optuna", "random"] = Field(
        "optuna", description="grid: temperatures x alphas; optuna: OptunaSearch (TPE); random: random search."
    )
    temperatures: list[float] = Field([2.0, 4.0], description="Softmax temperatures T to sweep (grid).")
    alphas: list[float] = Field([0.5, 0.9], description="Soft-loss weights alpha to sweep (grid).")
    num_samples: int = Field(16, ge=1, description="Trials of an optuna/random search.")
    temperature_range: tuple[float, float] = Field((1.0, 20.0), description="Log-uniform range of T (search).")
    alpha_range: tuple[float, float] = Field((0.1, 0.9), description="Uniform range of alpha (search).")
    lr_range: tuple[float, float] = Field((1e-3, 3e-2), description="Log-uniform range of the lr (search).")
    student_widths: list[int] = Field([16, 32, 64, 128], description="Hidden widths to search.")
    student_depths: list[int] = Field([1, 2], description="Numbers of hidden layers to search.")
    num_epochs: int = Field(15, ge=1, description="Epochs per trial (the full budget ASHA may stop early).")
    batch_size: int = Field(256, ge=1, description="Student batch size.")
    lr: float = Field(3e-3, gt=0, description="Student AdamW learning rate (grid).")
    scheduler: Literal["fifo", "asha"] = Field("asha", description="Tune trial scheduler.")
    grace_period: int = Field(1, ge=1, description="ASHA: the first rung, epochs every trial runs before a stop.")
    reduction_factor: int = Field(3, ge=2, description="ASHA: 1/reduction_factor of trials go on at each rung.")
    asha_variant: Literal["promotion", "stopping"] = Field(
        "promotion", description="ASHA: 'promotion' pauses each trial at a rung and resumes only those in the top "
        "1/reduction_factor of the trials recorded there (Li et al. 2020; raysys.distill.asha); 'stopping' is Tune's "
        "ASHAScheduler, which lets a trial go on unless worse than the top of the results already there (the first "
        "trials at a rung always go on: in small sweeps several run the full budget)."
    )
    gpus_per_trial: float = Field(
        0.0, ge=0, le=1, description="The GPU share each Tune trial (and each Ray Data actor scoring the soft "
        "targets) reserves, e.g. 0.25: four share one GPU; > 0 runs them on their CUDA device. 0 (the default): CPU, "
        "where small students train about as fast. Refused before the sweep on a cluster without GPUs.")
    max_trial_failures: int = Field(
        2, ge=0, description="Times Tune retries a failed trial (a lost node, a killed process); a retried trial "
        "goes on from its latest checkpoint. A trial whose loss diverges fails the same way again."
    )
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Trials running at once (None: the cluster's CPUs, one CPU per trial; on a one-node "
        "local cluster at most the host's cores)."
    )
    accuracy_gap: float = Field(
        0.01, ge=0, lt=1, description="Selection rule: smallest student within this val-accuracy gap of the teacher."
    )
    hint_weight: float = Field(
        0.0, ge=0, description="Weight of the FitNets hint loss on the last hidden features (same family; 0: off)."
    )
    soft_target_actors: int = Field(2, ge=1, description="Ray Data actors computing the teacher's soft targets.")
    transfer_multiplier: float = Field(
        0.0, ge=0, description="Unlabeled transfer rows made from the training split by MUNGE (raysys.distill.transfer), "
        "per training row, scored by the teacher; they feed only the soft KD term (0: off)."
    )
    quantize: bool = Field(True, description="Also register a dynamic-int8 variant of the chosen student.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="Student evaluation.")
    seed: int = Field(0, description="Seed of student init, shuffling and the search.")
    dp: DPConfig | None = Field(None, description="Train the students with DP-SGD (Opacus); None: off.")

    @field_validator("temperatures")
    @classmethod
    def _temps(cls, v: list[float]) -> list[float]:
        if not v or any(t <= 0 for t in v):
            raise ValueError("temperatures must be a non-empty list of positive numbers, e.g. [2.0, 4.0]")
        return v

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 <= a <= 1.0 for a in v):
            raise ValueError("alphas must be a non-empty list of numbers in [0, 1], e.g. [0.5, 0.9]")
        return v

    @field_validator("temperature_range", "lr_range")
    @classmethod
    def _log_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError("must be (low, high) with 0 < low <= high, e.g. [1.0, 20.0]")
        return v

    @field_validator("alpha_range")
    @classmethod
    def _alpha_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] <= v[1] <= 1:
            raise ValueError("must be (low, high) with 0 <= low <= high <= 1, e.g. [0.1, 0.9]")
        return v

    @field_validator("student_widths", "student_depths")
    @classmethod
    def _positive_ints(cls, v: list[int]) -> list[int]:
        if not v or any(x < 1 for x in v):
            raise ValueError("must be a non-empty list of positive integers, e.g. [16, 32, 64]")
        return v

    @model_validator(mode="after")
    def _private(self) -> DistillConfig:
        # DP-SGD bounds each training row's influence through its own clipped gradient; these add gradient that
        # comes from other training rows (MUNGE rows are made of them) or from parameters Opacus does not clip
        if self.dp is not None and self.transfer_multiplier > 0:
            raise ValueError("distill.dp: MUNGE transfer rows are made from the training rows, so DP-SGD's guarantee "
                             "would not cover them; set distill.transfer_multiplier: 0 or remove distill.dp")
        if self.dp is not None and self.hint_weight > 0:
            raise ValueError("distill.dp: the hint loss trains a regressor outside DP-SGD's per-row clipping; set "
                             "distill.hint_weight: 0 or remove distill.dp")
        return self

    @property
    def uses_teacher_logits(self) -> bool:
        """Whether some trial's loss reads the teacher's logits (alpha > 0 somewhere in the search)."""
        return any(a > 0 for a in self.alphas) if self.search == "grid" else self.alpha_range[1] > 0


class PipelineConfig(Strict):
    """The whole loop: data -> teacher -> distillation -> registry -> serve -> monitor."""

    preset: str = Field("custom", description="Name of the preset this config started from.")
    run_dir: str = Field("runs", description="Ray Train/Tune results and checkpoints go under here.")
    registry_uri: str = Field("runs/registry", description="Registry root: a local path or a pyarrow.fs URI.")
    model_name: str = Field("raysys-student", description="Registry name of the served student.")
    data: DataConfig = Field(default_factory=DataConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig,
                                   description="Data quality checks before training: what warns, what refuses.")
    teacher: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    canary: CanaryConfig = Field(default_factory=CanaryConfig, description="The canary gate of rollouts.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    governance: GovernanceConfig = Field(default_factory=GovernanceConfig,
                                         description="Trust checks on the model cards, their promotion bounds, uses.")
    sizing: SizingConfig = Field(default_factory=SizingConfig,
                                 description="Batch sizes and epochs that follow a small table's size.")

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        self._check_private()
        if self.train.batch_size < self.train.num_workers:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must be at least train.num_workers "
                f"({self.train.num_workers}): each worker needs a non-empty share of the batch"
            )
        return self

    def _check_private(self) -> None:
        """What DP-SGD (train.dp, distill.dp) cannot cover is refused, naming the field and the fix."""
        for where, dp, model in (("train.dp", self.train.dp, self.teacher), ("distill.dp", self.distill.dp,
                                                                             self.distill.student)):
            if dp is not None and model.family != "mlp":  # Opacus has no per-row gradient for its tokenizer
                raise ValueError(f"{where}: DP-SGD supports the mlp family only, not {model.family!r}; set "
                                 f"{'teacher' if where == 'train.dp' else 'distill.student'}.family: mlp or remove "
                                 f"{where}")
        if self.distill.dp is not None and self.train.dp is None and self.distill.uses_teacher_logits:
            # one training row moves the teacher, and through it every row's soft target: per-row clipping of the
            # student's gradient then bounds nothing
            raise ValueError("distill.dp: the students learn from the teacher's logits on the training rows "
                             "(alpha > 0), so their guarantee needs a teacher trained with DP-SGD too: set train.dp, "
                             "or no distillation (distill.alphas: [0.0] with search: grid, alpha_range: [0.0, 0.0] "
                             "otherwise)")

    def with_root(self, root: str | Path) -> PipelineConfig:
        """The same config with data, runs and registry under `root` (tests and demos use a temp dir)."""
        root = Path(root)
        cfg = self.model_copy(deep=True)
        cfg.run_dir = str(root / "runs")
        cfg.registry_uri = str(root / "registry")
        if cfg.data.source == "synthetic":
            cfg.data.root = str(root / "data")
        return cfg
