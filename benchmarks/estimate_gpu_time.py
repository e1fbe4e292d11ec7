"""How long `mhmoe reproduce --preset P --tables 1 --seeds 3` takes on one H200, estimated from the one GPU run on
record (2026-12-04, ../shared/notes/gpu-2026-12-04/), until the prepared check times it for real.

The record: eager bf16 training of the `gpu` preset (d=384, 12 layers, GPT-2's 50,304-token vocabulary, micro-batches
of 64 x 1024 tokens) at these tokens/s per variant (seed 0, alone on the GPU, median after step 10), and the
whole 15-run matrix (120 steps of 65,536 tokens each, evaluation of 1M tokens per domain at 2 milestones, seeds 1-2
two at a time) in 8.5 minutes.

Assumptions, stated so that the GPU check can refute them:
  - the same MFU as the record: tokens/s scale with the inverse of the forward matmul FLOPs per token
    (`mhmoe.complexity.model_flops_per_token`);
  - the same fixed cost per run as the record (start-up, data, evaluation, checkpoints): its 8.5 minutes minus
    its training time, spread over its 15 runs, with the matrix run the same way (seeds 1-2 two at a time: use
    `--workers 2`); no torch.compile (a preset of 15-second runs is faster eager);
  - not modelled: smaller steps than the record's (16,384 tokens against 65,536) may use the GPU less well.

    python benchmarks/estimate_gpu_time.py --preset gpu-9min
"""

from __future__ import annotations

import argparse
import sys

from mhmoe.complexity import model_flops_per_token
from mhmoe.training.presets import PAPER_VARIANTS, preset

# H200, torch 2.11 + CUDA 13.0, eager bf16, landed code at 80c266b (../shared/notes/gpu-2026-12-04/README.md).
RECORD_TOK_S = {"dense": 478e3, "smoe": 423e3, "fine-grained": 406e3, "mhmoe-h2": 380e3, "mhmoe-h3": 344e3}
RECORD_WALL_S = 8.5 * 60  # the 15-run matrix, all included
RECORD_TOKENS_PER_RUN = 120 * 65_536
RECORD_PRESET = "gpu"
SEEDS = 3


def estimate(name: str) -> dict:
    train_s = {}
    rate = {}
    record_train_s = 0.0
    for v in PAPER_VARIANTS:
        rec, new = preset(RECORD_PRESET, v), preset(name, v)
        scale = (model_flops_per_token(rec.model, seq_len=rec.seq_len)
                 / model_flops_per_token(new.model, seq_len=new.seq_len))
        rate[v] = RECORD_TOK_S[v] * scale
        train_s[v] = new.steps * new.tokens_per_step / rate[v]
        record_train_s += SEEDS * RECORD_TOKENS_PER_RUN / RECORD_TOK_S[v]
    fixed_per_run = (RECORD_WALL_S - record_train_s) / (SEEDS * len(PAPER_VARIANTS))
    total = SEEDS * sum(train_s.values()) + SEEDS * len(PAPER_VARIANTS) * fixed_per_run
    return {"preset": name, "tok_per_s": rate, "train_s": train_s, "fixed_s_per_run": fixed_per_run,
            "record_train_s": record_train_s, "total_s": total}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpu-9min")
    e = estimate(p.parse_args().preset)
    print(f"record: {RECORD_WALL_S:.0f} s for 15 runs, of which {e['record_train_s']:.0f} s training: "
          f"{e['fixed_s_per_run']:.1f} s fixed cost per run")
    for v in PAPER_VARIANTS:
        print(f"{v:<13} {e['tok_per_s'][v] / 1e3:6.0f}k tokens/s (estimated)  {e['train_s'][v]:5.1f} s per run")
    print(f"Table 1 x {SEEDS} seeds at preset {e['preset']}: about {e['total_s'] / 60:.1f} minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
