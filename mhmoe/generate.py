"""`mhmoe generate`: sample a continuation of a prompt from a trained run or an export folder, streamed to stdout.

    mhmoe generate RUN --prompt "..." [--max-new-tokens 100 --temperature 0.8 --top-k 50 --seed 0 --step N]

Sampling draws exactly as `Transformer.generate` does (greedy argmax at temperature 0, else top-k then a
multinomial draw from a seeded torch.Generator), one token at a time so each can be printed as it comes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch

from mhmoe.data.tokenizer import Tokenizer
from mhmoe.layers.attention import KVCache
from mhmoe.model import Transformer


def pick_next(logits: torch.Tensor, temperature: float, top_k: int | None,
              generator: torch.Generator | None) -> torch.Tensor:
    """Next token [B, 1] from last-position logits [B, V]: the same operations, in the same order (so the same
    generator draws), as one step of `Transformer.generate`."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@torch.no_grad()
def sample_tokens(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
                  top_k: int | None = 50, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  vocab_limit: int | None = None) -> Iterator[int]:
    """Yield max_new_tokens sampled ids one by one after `prompt_ids`.

    A `Transformer` (the float model and the integer model of an export alike) decodes with its KV cache; any
    other model is re-run on the whole sequence each step. `vocab_limit` (the tokenizer's size) masks logits of
    ids the tokenizer cannot decode, which exist only when model.vocab_size is larger; with equal sizes the
    tokens equal those of `Transformer.generate(..., generator=generator)`.
    """
    model.eval()
    cache = KVCache(model.cfg.n_layers) if isinstance(model, Transformer) else None
    seq = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    step_input = seq
    autocast = (torch.autocast(device_type=torch.device(device).type, dtype=dtype)
                if dtype != torch.float32 else nullcontext())
    for _ in range(max_new_tokens):
        with autocast:
            out = model(step_input, cache=cache) if cache is not None else model(seq)
        logits = out.logits[:, -1, :].float()  # [1, V]
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits[:, vocab_limit:] = float("-inf")
        nxt = pick_next(logits, temperature, top_k, generator)
        seq = torch.cat([seq, nxt], dim=1)
        step_input = nxt
        yield int(nxt)


class StreamDecoder:
    """Text of a growing token sequence, handed out as the newly printable suffix after each token.

    Byte-level BPE tokens can end inside a multi-byte character, which decodes to U+FFFD until the next token
    completes it; such a tail is held back, so what was printed never needs to change. `finish` returns the rest,
    so the pieces always concatenate to the decoded text of prompt + new tokens, less the prompt.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)
        self.skip = len(tokenizer.decode(self.ids))  # the prompt came from text, so it decodes completely
        self.printed = 0

    def text(self) -> str:
        """Everything decoded after the prompt so far."""
        return self.tokenizer.decode(self.ids)[self.skip:]

    def push(self, token: int) -> str:
        self.ids.append(token)
        stable = self.text().rstrip("\ufffd")
        piece = stable[self.printed:]
        self.printed = max(self.printed, len(stable))
        return piece

    def finish(self) -> str:
        rest = self.text()[self.printed:]
        self.printed += len(rest)
        return rest


def stream_generation(model: torch.nn.Module, tokenizer: Tokenizer, prompt: str, max_new_tokens: int,
                      temperature: float, top_k: int | None, seed: int, write: Callable[[str], None],
                      device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """Write the continuation of `prompt` piece by piece through `write`; returns the whole continuation."""
    prompt_ids = tokenizer.encode(prompt)
    generator = torch.Generator(device=torch.device(device)).manual_seed(seed)
    decoder = StreamDecoder(tokenizer, prompt_ids)
    for token in sample_tokens(model, prompt_ids, max_new_tokens, temperature, top_k, generator, device, dtype,
                               tokenizer.vocab_size):
        piece = decoder.push(token)
        if piece:
            write(piece)
    rest = decoder.finish()
    if rest:
        write(rest)
    return decoder.text()
