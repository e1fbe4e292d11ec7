"""`mhmoe generate`: sample a continuation of a prompt from a trained run or an export folder, streamed to stdout.

    mhmoe generate RUN --prompt "..." [--max-new-tokens 100 --temperature 0.8 --top-k 50 --seed 0 --step N]

Sampling draws exactly as `Transformer.generate` does (greedy argmax at temperature 0, else top-k then a
multinomial draw from a seeded torch.Generator), one token at a time so each can be printed as it comes.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch

from mhmoe.data import Tokenizer
from mhmoe.model import KVCache, Transformer
from mhmoe.errors import UserError


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


# ----------------------------------------------------------------------------------------------------------
# CLI


def _check_flags(args: argparse.Namespace) -> None:
    """Everything that can be judged before the model loads."""
    if not Path(args.run_dir).is_dir():
        raise UserError(f"RUN_DIR: {args.run_dir} is not a directory; pass the --out of a `mhmoe train` run "
                        "or a `mhmoe export` folder")
    if args.prompt == "":
        raise UserError("--prompt: empty; pass some text to continue (or --prompt '<|endoftext|>' to start a new "
                        "document)")
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens: must be >= 0, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature: must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 1:
        raise UserError(f"--top-k: must be >= 1 (1 = greedy), got {args.top_k}")


def _check_lengths(prompt_len: int, max_new_tokens: int, context: int) -> None:
    if prompt_len > context:
        raise UserError(f"--prompt: {prompt_len} tokens, longer than the model's context of {context} tokens "
                        "(model.max_seq_len); shorten the prompt")
    if prompt_len + max_new_tokens > context:
        raise UserError(f"--max-new-tokens: the prompt's {prompt_len} tokens + {max_new_tokens} new tokens exceed "
                        f"the model's context of {context} tokens (model.max_seq_len); use --max-new-tokens <= "
                        f"{context - prompt_len} or a shorter prompt")


def _cli(args: argparse.Namespace) -> int:
    from mhmoe.evaluate import load_run

    _check_flags(args)
    loaded = load_run(Path(args.run_dir), args.step, None, None, need_data=False)
    _check_lengths(len(loaded.tokenizer.encode(args.prompt)), args.max_new_tokens, loaded.cfg.model.max_seq_len)

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    write(args.prompt)
    stream_generation(loaded.model, loaded.tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                      args.top_k, args.seed, write, loaded.device, loaded.dtype)
    write("\n")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample text from a run (or a `mhmoe export` folder), streamed")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a `mhmoe train` run or a `mhmoe export` folder")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to sample (default 100)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (default 50)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: same seed, same text (default 0)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest good one)")
    p.set_defaults(func=_cli)
