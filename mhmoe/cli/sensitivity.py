"""`mhmoe sensitivity`: Table 1's contrasts, seed-paired, side by side in records trained under different MoE
settings (computation in mhmoe.reproduction.sensitivity)."""

from __future__ import annotations

import argparse
import json

from mhmoe.errors import UserError
from mhmoe.fileio import atomic_write_text
from mhmoe.reproduction.sensitivity import Column, Source, render, sensitivity

COLUMN_HELP = ("LABEL SOURCE [SOURCE ...]: one column, its label and the records it reads (a `mhmoe reproduce` "
               "output directory or its results.json); each Table 1 model is taken from the last SOURCE that has "
               "it, and DIR:MODEL=VARIANT,... takes only those models from DIR, the record's VARIANT standing for "
               "Table 1's MODEL (e.g. DIR:mhmoe-h3=mhmoe-h3-rawgates). The first column is the one the others are "
               "compared with. Repeat for every column.")


def _cli(args: argparse.Namespace) -> int:
    if not args.column or len(args.column) < 2:
        raise UserError("--column: give at least two columns (LABEL SOURCE [SOURCE ...]), the first the reference")
    columns = []
    for spec in args.column:
        if len(spec) < 2:
            raise UserError(f"--column: {spec[0]!r} names no record; give LABEL SOURCE [SOURCE ...]")
        columns.append(Column(spec[0], [Source.parse(s) for s in spec[1:]]))
    result = sensitivity(columns, args.milestone)
    text = render(result)
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(result, indent=2) + "\n")
    print(text, end="")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sensitivity", help="Table 1's contrasts, seed-paired, in records trained under different "
                                           "MoE settings, and how far each moved")
    p.add_argument("--column", nargs="+", action="append", metavar="LABEL_OR_SOURCE", help=COLUMN_HELP)
    p.add_argument("--milestone", choices=("50%", "100%"), default="100%", help="the evaluation compared (100%%)")
    p.add_argument("--json-out", metavar="FILE", help="also write the table's numbers as JSON (atomically)")
    p.set_defaults(func=_cli)
