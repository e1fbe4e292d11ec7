"""Training windows as a pure function of (seed, step), and the fixed evaluation windows.

Shape legend: B batch, T sequence length.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch

from mhmoe.data.cache import TokenizedCorpus
from mhmoe.errors import DataError

# --------------------------------------------------------------------------------------------------------------------
# Samplers


def _as_int(value: Any, label: str, lo: int) -> int:
    # operator.index accepts Python and NumPy integers but not floats or bools-as-strings.
    try:
        v = operator.index(value)
    except TypeError:
        v = None
    if v is None or isinstance(value, bool) or v < lo:
        raise DataError(f"{label}: {value!r} must be an integer >= {lo}")
    return v


class TrainSampler:
    """Random contiguous windows of seq_len+1 tokens, a pure function of (seed, step): resuming only needs the step.

    Window starts for (step, micro) come from a PCG64 stream seeded with (seed, step, micro), drawn for the global
    batch of batch_size * world_size rows; rank r keeps rows [r*batch_size, (r+1)*batch_size). So every rank agrees
    on the global batch and 2 ranks x B rows equal 1 rank x 2B rows exactly.
    """

    def __init__(
        self,
        corpus: TokenizedCorpus,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        seq_len, batch_size, world_size = (
            _as_int(v, f"TrainSampler.{k}", 1)
            for k, v in (("seq_len", seq_len), ("batch_size", batch_size), ("world_size", world_size))
        )
        seed = _as_int(seed, "TrainSampler.seed", 0)
        rank = _as_int(rank, "TrainSampler.rank", 0)
        if rank >= world_size:
            raise DataError(f"TrainSampler.rank: {rank} must be in [0, world_size={world_size})")
        if corpus.num_tokens < seq_len + 1:
            raise DataError(
                f"corpus {corpus.name!r} has {corpus.num_tokens} tokens, fewer than seq_len+1 = {seq_len + 1}; "
                "use a shorter seq_len or more data (raise max_train_bytes)"
            )
        self.corpus = corpus
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._num_starts = corpus.num_tokens - seq_len  # starts 0 .. N-seq_len-1 keep the window inside the corpus

    def starts(self, step: int, micro: int = 0) -> np.ndarray:
        """Start offsets of this rank's windows for (step, micro), int64 [batch_size]."""
        step = _as_int(step, "TrainSampler.batch step", 0)
        micro = _as_int(micro, "TrainSampler.batch micro", 0)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, step, micro])))
        everyone = rng.integers(0, self._num_starts, size=self.batch_size * self.world_size, dtype=np.int64)
        return everyone[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 [batch_size, seq_len], y[:, t] = x[:, t+1] (the next token); `micro` indexes
        gradient-accumulation micro-batches of the same step."""
        tokens = self.corpus.tokens
        n = self.seq_len + 1
        # Contiguous slices read few memmap pages, unlike a fancy-index gather over the whole window grid.
        rows = np.stack([np.asarray(tokens[s : s + n]) for s in self.starts(step, micro).tolist()])
        win = torch.from_numpy(rows.astype(np.int64))
        return win[:, :-1].contiguous(), win[:, 1:].contiguous()


def eval_windows(corpus: TokenizedCorpus, seq_len: int, max_tokens: int = 0) -> torch.Tensor:
    """Fixed evaluation windows, int64 [W, seq_len+1]: window i is tokens[i*seq_len : i*seq_len+seq_len+1].

    Each window predicts its last seq_len tokens, so targets never overlap and tile the corpus from token 1;
    the ragged tail is dropped, and at most `max_tokens` tokens are predicted when max_tokens > 0.
    """
    seq_len = _as_int(seq_len, "eval_windows.seq_len", 1)
    max_tokens = _as_int(max_tokens, "eval_windows.max_tokens", 0)
    count = (corpus.num_tokens - 1) // seq_len
    if max_tokens > 0:
        count = min(count, max_tokens // seq_len)
    if count <= 0:
        raise DataError(
            f"corpus {corpus.name!r}: no full evaluation window of seq_len {seq_len} "
            f"({corpus.num_tokens} tokens, max_tokens={max_tokens}); use a shorter seq_len or a larger max_eval_tokens"
        )
    flat = np.asarray(corpus.tokens[: count * seq_len + 1]).astype(np.int64)
    idx = np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(flat[idx])
