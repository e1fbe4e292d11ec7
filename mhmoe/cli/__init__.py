"""The `mhmoe` command line (argparse and printing only); `main` is the console script's entry point."""

from mhmoe.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
