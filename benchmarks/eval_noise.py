"""How much of a paired difference is the evaluation's own sampling noise?

Evaluates two runs (e.g. `smoe-s0` and `mhmoe-h3-s0` of a reproduction) on the same evaluation windows of each
domain and reports the mean per-token loss difference with its standard error over windows (windows treated as
independent draws). Compare that standard error with the seed-to-seed spread of the same difference: when it is
much smaller, more evaluation tokens would not narrow the seed-paired interval.

    python benchmarks/eval_noise.py RUN_A RUN_B [--max-tokens N]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch
import torch.nn.functional as F

from mhmoe.data.sampler import eval_windows
from mhmoe.training.rundir import load_run


@torch.no_grad()
def window_losses(loaded, name: str, max_tokens: int) -> list[float]:  # noqa: ANN001
    corpus = loaded.corpus(name, max_tokens)
    windows = eval_windows(corpus, loaded.cfg.seq_len, max_tokens)
    out = []
    for i in range(0, windows.shape[0], loaded.cfg.batch_size):
        w = windows[i: i + loaded.cfg.batch_size]
        logits = loaded.model(w[:, :-1]).logits.float()
        nll = F.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none").mean(dim=1)
        out += nll.tolist()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per domain (default: the run's cap)")
    p.add_argument("--data-root", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    a, b = (load_run(r, data_root=args.data_root) for r in (args.run_a, args.run_b))
    cap = a.cfg.data.max_eval_tokens if args.max_tokens is None else args.max_tokens
    print("| domain | windows | mean Δ loss (B - A), nats | s.e. over windows |")
    print("|---|---:|---:|---:|")
    means, ses = [], []
    for name in a.cfg.data.eval_domains:
        la, lb = window_losses(a, name, cap), window_losses(b, name, cap)
        d = [y - x for x, y in zip(la, lb)]
        se = statistics.stdev(d) / math.sqrt(len(d))
        means.append(statistics.fmean(d))
        ses.append(se)
        print(f"| {name} | {len(d)} | {means[-1]:+.4f} | {se:.4f} |")
    se_mean = math.sqrt(sum(s * s for s in ses)) / len(ses)  # the three domains are independent samples
    print(f"| mean of {len(ses)} | | {statistics.fmean(means):+.4f} | {se_mean:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
