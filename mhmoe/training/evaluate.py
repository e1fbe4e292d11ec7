"""Validation perplexity = exp(mean token NLL) on fixed, deterministic windows of each evaluation domain.

Evaluation runs the model in eval mode: MoE layers never drop tokens there, so a token's loss does not depend on
what else is in the batch. A user's own file or folder (`mhmoe eval RUN --text PATH`, read by mhmoe.data.textfiles) is
one more domain, "text:<name>", with the same tokenizer, windows and result fields.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mhmoe.data.cache import TokenizedCorpus
from mhmoe.data.sampler import eval_windows
from mhmoe.data.textfiles import text_corpus, text_files
from mhmoe.training.rundir import load_run


@torch.no_grad()
def evaluate_corpus(
    model: torch.nn.Module, corpus: TokenizedCorpus, seq_len: int, batch_size: int = 16, max_tokens: int = 0,
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """NLL summed in float64 over every predicted token of the windows; returns loss, ppl and counts."""
    was_training = model.training
    model.eval()
    windows = eval_windows(corpus, seq_len, max_tokens)  # [W, seq_len + 1], W >= 1 (DataError otherwise)
    nll, count = 0.0, 0
    autocast = (torch.autocast(device_type=torch.device(device).type, dtype=dtype)
                if dtype != torch.float32 else nullcontext())
    for i in range(0, windows.shape[0], batch_size):
        w = windows[i : i + batch_size].to(device)
        with autocast:
            logits = model(w[:, :-1]).logits
        nll += F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum").double().item()
        count += w[:, 1:].numel()
    model.train(was_training)
    covered = windows.shape[0] * seq_len + 1
    docs = int(np.searchsorted(corpus.doc_offsets, covered, side="left"))
    loss = nll / count
    return {"loss": loss, "ppl": math.exp(loss), "tokens": count, "docs": max(1, min(docs, corpus.num_docs))}


def evaluate_run(run_dir: Path, step: int | None = None, domains: list[str] | None = None,
                 max_tokens: int | None = None, data_root: str | None = None,
                 cache_dir: str | None = None, text: str | Path | None = None) -> dict[str, Any]:
    """Perplexity of a run's checkpoint (latest good one, or `step`) on each evaluation domain.

    `text` (a file or folder, see mhmoe.data.textfiles) adds a "text:<name>" domain evaluated with the run's tokenizer
    and windows; then the built-in domains are evaluated only when `domains` is given. Its token cap is
    `max_tokens` (None = all of it, not the run's cap: the user asked for this text).
    """
    if text is not None:
        text_files(text)  # a missing path or empty folder fails before the model loads
    builtin = text is None or domains is not None
    loaded = load_run(Path(run_dir), step, data_root, cache_dir, need_data=builtin)
    cfg = loaded.cfg
    limit = cfg.data.max_eval_tokens if max_tokens is None else max_tokens
    results = {}
    for name in (list(domains or cfg.data.eval_domains) if builtin else []):
        corpus = loaded.corpus(name, limit)
        results[name] = evaluate_corpus(loaded.model, corpus, cfg.seq_len, cfg.batch_size, limit,
                                        loaded.device, loaded.dtype)
    if text is not None:
        cap = max_tokens or 0
        corpus = text_corpus(text, loaded.tokenizer, cfg.seq_len, cap)
        results[corpus.name] = evaluate_corpus(loaded.model, corpus, cfg.seq_len, cfg.batch_size, cap,
                                               loaded.device, loaded.dtype)
    return {"run": str(run_dir), "step": loaded.step, "tokens_seen": loaded.step * cfg.tokens_per_step,
            "variant": cfg.variant, "preset": cfg.preset, "domains": results}
