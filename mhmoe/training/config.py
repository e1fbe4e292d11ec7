"""The training configuration: model, data, optimiser and run settings, as typed dataclasses validated at construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from mhmoe.configbase import Config
from mhmoe.data.corpora import DataConfig
from mhmoe.errors import ConfigError
from mhmoe.model import ModelConfig


@dataclass(frozen=True)
class OptimConfig(Config):
    """AdamW with decoupled weight decay and a warmup + decay schedule."""

    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "constant", "two_stage"] = "cosine"
    grad_clip: float = 1.0
    # BitNet b1.58 recipe (two_stage): the cosine until mid-training, then a drop to stage2_lr_ratio * lr and a
    # second cosine down to min_lr; wd_off_at > 0 sets the weight decay to 0 from that fraction of the steps on.
    stage2_lr_ratio: float = 0.33
    wd_off_at: float = 0.0

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"OptimConfig.lr: must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"OptimConfig.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("OptimConfig.warmup_steps/weight_decay/grad_clip: must be >= 0 (grad_clip 0 = off)")
        if self.schedule == "two_stage" and not self.min_lr_ratio <= self.stage2_lr_ratio <= 1:
            raise ConfigError(f"OptimConfig.stage2_lr_ratio: must be in [min_lr_ratio, 1], got {self.stage2_lr_ratio}")
        if not 0 <= self.wd_off_at <= 1:
            raise ConfigError(f"OptimConfig.wd_off_at: must be in [0, 1] (0 = never), got {self.wd_off_at}")


@dataclass(frozen=True)
class TrainConfig(Config):
    """Everything a run needs; saved as RUN_DIR/config.json.

    compile: how the training forward runs (decided by mhmoe.training.compile.resolve_compile for the device):
        "auto" (default) = "on" on CUDA, "off" on CPU (there the sorted experts stay eager and compiling costs
        about a minute per model shape for a few percent: benchmarks/RESULTS.md); "off" = eager; "on" =
        torch.compile (fullgraph when the step is sync-free); "cudagraphs" = torch.compile's "reduce-overhead"
        mode (CUDA graphs): one CUDA process and a sync-free, static-shaped step only. Configs that wrote
        true/false load as "on"/"off".
    """

    LEGACY: ClassVar[dict[str, dict[Any, Any]]] = {"compile": {False: "off", True: "on"}}

    preset: str = "custom"
    variant: str = "smoe"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 1000
    batch_size: int = 16  # sequences per micro-batch per process (the most; see micro_batches)
    seq_len: int = 256
    tokens_per_step: int = 4096  # global batch; accumulation = tokens_per_step / (batch_size * seq_len * world)
    seed: int = 1337
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    compile: Literal["auto", "off", "on", "cudagraphs"] = "auto"
    eval_every: int = 0  # steps between validation-loss points in evals.jsonl (0 = only at the end)
    eval_tokens: int = 16_384  # tokens per domain for those points
    ckpt_every: int = 100
    keep_checkpoints: int = 2  # newest ones kept, besides the 50% and 100% milestones
    threads: int = 0  # torch.set_num_threads (0 = torch's default)
    # Routing health (metrics only, no effect on training): an expert that received no token in the last
    # dead_expert_window steps counts as dead in metrics.jsonl's `dead_experts` (mhmoe.training.routing_health).
    dead_expert_window: int = 100

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "tokens_per_step", "ckpt_every", "dead_expert_window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name}: must be >= 1, got {getattr(self, name)}")
        if self.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"TrainConfig.seq_len: {self.seq_len} exceeds model.max_seq_len ({self.model.max_seq_len})"
            )
        if self.tokens_per_step % (self.batch_size * self.seq_len):
            raise ConfigError(
                f"TrainConfig.tokens_per_step: {self.tokens_per_step} must be a multiple of batch_size * seq_len "
                f"({self.batch_size * self.seq_len}); use --set tokens_per_step="
                f"{_multiple_near(self.tokens_per_step, self.batch_size * self.seq_len)}"
            )
        if self.eval_every < 0 or self.eval_tokens < 0 or self.threads < 0 or self.keep_checkpoints < 0:
            raise ConfigError("TrainConfig.eval_every/eval_tokens/threads/keep_checkpoints: must be >= 0")
        if self.compile == "cudagraphs" and self.device == "cpu":
            raise ConfigError("TrainConfig.compile: 'cudagraphs' needs device=cuda (CUDA graphs); use compile=on or "
                              "device=cuda")

    @property
    def milestones(self) -> tuple[int, int]:
        """Steps evaluated by `mhmoe reproduce`: 50% and 100% (the paper's 50k / 100k columns)."""
        return (max(1, self.steps // 2), self.steps)


def _multiple_near(value: int, unit: int) -> str:
    """The multiples of `unit` around `value`, as the fix to print: "768" or "768 (or 512)"."""
    down, up = value // unit * unit, -(-value // unit) * unit
    return f"{up}" + (f" (or {down})" if 0 < down != up else "")


def micro_batches(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(sequences per micro-batch on each process, micro-batches per step) that split the global batch of
    tokens_per_step over `world` processes.

    The per-process micro-batch is batch_size when the global batch holds a whole number of batch_size x world
    micro-batches, as on one process. Otherwise it is derived rather than refused: batch_size / world with the
    1-process accumulation, so that every micro-batch is the one a single process would draw (TrainSampler deals
    the batch_size rows of (step, micro) out to the ranks), else the largest divisor of the rows per process
    that fits in batch_size. Only a global batch that cannot be split evenly over the processes is an error.
    """
    rows = cfg.tokens_per_step // cfg.seq_len  # TrainConfig.validate: a multiple of batch_size
    if rows % world:
        fix = _multiple_near(cfg.tokens_per_step, math.lcm(cfg.batch_size * cfg.seq_len, cfg.seq_len * world))
        raise ConfigError(
            f"TrainConfig.tokens_per_step: {cfg.tokens_per_step} ({rows} sequences of seq_len {cfg.seq_len}) cannot "
            f"be split evenly over {world} processes; use --set tokens_per_step={fix}"
        )
    per_rank = rows // world
    if per_rank % cfg.batch_size == 0:
        return cfg.batch_size, per_rank // cfg.batch_size
    if cfg.batch_size % world == 0:
        return cfg.batch_size // world, rows // cfg.batch_size
    micro = max(d for d in range(1, cfg.batch_size + 1) if per_rank % d == 0)
    return micro, per_rank // micro
