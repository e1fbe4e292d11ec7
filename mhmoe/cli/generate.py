"""`mhmoe generate`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from mhmoe.errors import UserError
from mhmoe.generate import stream_generation
from mhmoe.training.rundir import load_run

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
