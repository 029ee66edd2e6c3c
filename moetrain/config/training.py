"""optim.*, parallel.*, logging.*, trainer.* and the whole TrainConfig with its cross-section checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from moetrain.config.data import DataConfig
from moetrain.config.errors import _require
from moetrain.config.model import ModelConfig

HOST_ALLOCATORS = ("retain", "system")  # parallel.host_allocator (trainer/host_memory.py)
GRAD_REDUCE_DTYPES = ("fp32", "bf16")  # parallel.grad_reduce_dtype: DeepSpeed's communication_data_type


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    micro_batch_size: int = 8  # per rank
    grad_accum: int = 1

    def validate(self, prefix: str = "optim") -> None:
        _require(self.lr > 0, f"{prefix}.lr", self.lr, "must be > 0")
        _require(
            0 <= self.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]"
        )
        _require(self.warmup_steps >= 0, f"{prefix}.warmup_steps", self.warmup_steps, "must be >= 0")
        _require(self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, "must be >= 0")
        _require(len(self.betas) == 2, f"{prefix}.betas", self.betas, "must be two numbers")
        _require(self.grad_clip >= 0, f"{prefix}.grad_clip", self.grad_clip, "must be >= 0 (0 = off)")
        _require(
            self.micro_batch_size > 0, f"{prefix}.micro_batch_size", self.micro_batch_size, "must be > 0"
        )
        _require(self.grad_accum > 0, f"{prefix}.grad_accum", self.grad_accum, "must be > 0")


@dataclass
class ParallelConfig:
    ep_size: int = 1
    # 3 partitions the weights too (experts over their expert-data-parallel group), docs/EXPERT_PARALLEL.md
    zero_stage: int = 0
    # ZeRO 1-3: fp32 master weights and AdamW state in host memory, stepped there (DeepSpeed ZeRO-Offload)
    offload_optimizer: bool = False
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    activation_checkpointing: bool = False
    # torch.compile each transformer block (inductor; experts and token exchange stay eager). Needs a
    # C++ compiler and Python headers on CPU, triton on CUDA. See model/compile.py.
    compile: bool = False
    deepspeed_config: str | None = None  # a user JSON merged over the generated one
    shm_comm: bool = False  # DeepSpeed's CPU shared-memory collectives (JIT-compiles an op once)
    check_memory: bool = True  # stop at start when the training state cannot fit this machine
    # CPU training: retain = freed host memory stays in the process for reuse (no page faults per
    # step on large tensors; trainer/host_memory.py); system = malloc's defaults. No effect on CUDA.
    host_allocator: str = "retain"
    # dtype gradients are summed in across ranks (DeepSpeed's communication_data_type): fp32 keeps 23
    # mantissa bits in a sum over every data-parallel rank; bf16 halves the bytes on the wire.
    grad_reduce_dtype: str = "fp32"
    # DeepSpeed's zero_optimization.overlap_comm (ZeRO 1-3: reduce gradient buckets while the backward
    # goes on). null = DeepSpeed's own choice: on at ZeRO-3, off at 1 and 2. No CUDA streams on CPU.
    overlap_comm: bool | None = None
    # Expert parallelism: cut each MoE layer's token exchange into this many chunks, chunk i+1's
    # all-to-all in flight while chunk i's experts run (distributed/chunked_exchange.py). 1 = one
    # blocking exchange; on 2 CPU ranks sharing 2 cores chunks did not pay (docs/EXPERT_PARALLEL.md).
    a2a_chunks: int = 1

    def validate(self, prefix: str = "parallel") -> None:
        _require(self.ep_size >= 1, f"{prefix}.ep_size", self.ep_size, "must be >= 1")
        _require(
            self.zero_stage in (0, 1, 2, 3), f"{prefix}.zero_stage", self.zero_stage, "one of 0, 1, 2, 3"
        )
        _require(
            not self.offload_optimizer or self.zero_stage >= 1,
            f"{prefix}.offload_optimizer",
            self.offload_optimizer,
            "needs parallel.zero_stage=1, 2 or 3 (ZeRO-0 keeps no partition to offload)",
        )
        _require(
            not (self.compile and self.zero_stage == 3),
            f"{prefix}.compile",
            self.compile,
            "not supported with parallel.zero_stage=3 (ZeRO-3 gathers weights in module hooks); use 0, 1 or 2",
        )
        _require(
            self.dtype in ("auto", "fp32", "bf16"), f"{prefix}.dtype", self.dtype, "one of auto, fp32, bf16"
        )
        _require(
            self.host_allocator in HOST_ALLOCATORS,
            f"{prefix}.host_allocator",
            self.host_allocator,
            f"one of {', '.join(HOST_ALLOCATORS)}",
        )
        _require(
            self.overlap_comm is None or self.zero_stage >= 1,
            f"{prefix}.overlap_comm",
            self.overlap_comm,
            "needs parallel.zero_stage=1, 2 or 3 (ZeRO-0 reduces after the backward); or null",
        )
        _require(
            self.a2a_chunks >= 1, f"{prefix}.a2a_chunks", self.a2a_chunks, "must be >= 1 (1 = no chunks)"
        )
        _require(
            self.a2a_chunks == 1 or self.ep_size > 1,
            f"{prefix}.a2a_chunks",
            self.a2a_chunks,
            "chunks the expert all-to-all, which needs parallel.ep_size > 1; or 1",
        )
        _require(
            self.grad_reduce_dtype in GRAD_REDUCE_DTYPES,
            f"{prefix}.grad_reduce_dtype",
            self.grad_reduce_dtype,
            f"one of {', '.join(GRAD_REDUCE_DTYPES)}",
        )


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "moetrain"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)

    def validate(self, prefix: str = "logging.wandb") -> None:
        modes = ("offline", "online", "disabled")
        _require(self.mode in modes, f"{prefix}.mode", self.mode, f"one of {modes}")


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True
    heatmap_every: int = 100  # experts x layers heatmap to W&B
    collapse_threshold: float = 0.1  # warn when an expert gets < this share of its fair load...
    collapse_window: int = 20  # ...for this many consecutive logged steps

    def validate(self, prefix: str = "logging") -> None:
        self.wandb.validate(f"{prefix}.wandb")
        _require(
            0 <= self.collapse_threshold < 1,
            f"{prefix}.collapse_threshold",
            self.collapse_threshold,
            "in [0, 1)",
        )
        _require(self.collapse_window >= 1, f"{prefix}.collapse_window", self.collapse_window, "must be >= 1")


@dataclass
class TrainerConfig:
    max_steps: int = 100
    seed: int = 1234
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 50
    keep_last: int = 2
    resume: str | None = None  # null | auto | a checkpoint path
    stop_at: int | None = None
    stop_after_minutes: float | None = None
    sample_prompt: str = "To be, or not to be"
    sample_tokens: int = 40
    deterministic: bool = True
    # Preemption: these signals stop the run after the current step with a checkpoint (exit 0).
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    # A non-finite loss or gradient norm: skip that update (bounded) or stop with an error.
    on_nonfinite: str = "skip"
    max_skipped_steps: int = 3  # more skips than this within skip_window steps = diverged: stop
    skip_window: int = 100
    # Older checkpoints hold pickles; only the restricted unpickler reads them unless this is true
    # (for a checkpoint you made yourself: a pickle can run code). New checkpoints hold none.
    trust_checkpoint_code: bool = False
    async_checkpoint: bool = True  # a save blocks only while staging to host memory; files in background
    on_save_error: str = (
        "stop"  # stop (one line, latest intact) | continue (retry at the next checkpoint step)
    )
    max_failed_saves: int = 3  # continue: stop after this many failed saves in a row
    force_unlock: bool = False  # take the run-dir lock even if another process holds it

    def validate(self, prefix: str = "trainer") -> None:
        _require(self.max_steps > 0, f"{prefix}.max_steps", self.max_steps, "must be > 0")
        for name in ("log_every", "eval_every", "checkpoint_every"):
            v = getattr(self, name)
            _require(v >= 0, f"{prefix}.{name}", v, "must be >= 0 (0 = off)")
        _require(self.keep_last >= 1, f"{prefix}.keep_last", self.keep_last, "must be >= 1")
        if self.stop_at is not None:
            _require(
                0 < self.stop_at <= self.max_steps,
                f"{prefix}.stop_at",
                self.stop_at,
                f"must be in 1..max_steps={self.max_steps}",
            )
        if self.stop_after_minutes is not None:
            _require(
                self.stop_after_minutes > 0, f"{prefix}.stop_after_minutes", self.stop_after_minutes, "> 0"
            )
        import signal as _signal

        for name in self.stop_signals:
            _require(
                isinstance(name, str) and name.startswith("SIG") and hasattr(_signal, name),
                f"{prefix}.stop_signals",
                name,
                "signal names such as SIGTERM, SIGINT, SIGUSR1, SIGUSR2",
            )
        _require(
            self.on_nonfinite in ("skip", "stop"), f"{prefix}.on_nonfinite", self.on_nonfinite, "skip | stop"
        )
        _require(self.max_skipped_steps >= 0, f"{prefix}.max_skipped_steps", self.max_skipped_steps, ">= 0")
        _require(self.skip_window >= 1, f"{prefix}.skip_window", self.skip_window, ">= 1")
        _require(
            self.on_save_error in ("continue", "stop"),
            f"{prefix}.on_save_error",
            self.on_save_error,
            "continue | stop",
        )
        _require(self.max_failed_saves >= 1, f"{prefix}.max_failed_saves", self.max_failed_saves, ">= 1")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def validate_sections(self) -> TrainConfig:
        """Each section on its own; ``validate`` adds the checks across sections. (A pretrained model's
        shape replaces the model section in between: moetrain.pretrained.resolve_pretrained.)"""
        self.model.validate()
        self.data.validate()
        self.optim.validate()
        self.parallel.validate()
        self.logging.validate()
        self.trainer.validate()
        return self

    def validate(self) -> TrainConfig:
        self.validate_sections()
        check_expert_layout(self.model, self.parallel)
        _require(
            self.data.seq_len <= self.model.max_seq_len,
            "data.seq_len",
            self.data.seq_len,
            f"must be <= model.max_seq_len={self.model.max_seq_len}",
        )
        return self


def check_expert_layout(model: ModelConfig, parallel: ParallelConfig) -> None:
    """Each rank holds num_experts / ep_size experts: ep_size must divide them (training and plan)."""
    if parallel.ep_size > 1:
        _require(
            model.num_experts > 0 and model.num_experts % parallel.ep_size == 0,
            "parallel.ep_size",
            parallel.ep_size,
            f"must divide model.num_experts={model.num_experts}",
        )
