"""The paper's Tables 1-5: their rows (which model each row is), captions and published numbers.

Shared by the matrix (`mhmoe.reproduction.reproduce`), the paired verdicts (`mhmoe.reproduction.verdicts`) and the report (`mhmoe.reproduction.report`).
"""

from __future__ import annotations

from dataclasses import dataclass

DOMAINS = ("redpajama", "wikipedia", "c4")
DOMAIN_TITLES = {"redpajama": "RedPajama", "wikipedia": "Wiki", "c4": "C4"}


@dataclass(frozen=True)
class Row:
    label: str  # as printed in the paper
    variant: str  # mhmoe.training.presets variant name
    bitnet: bool = False


# The paper's rows (Tables 1-5) and its numbers: {label: {"50%": (RP, Wiki, C4), "100%": (...)}}.
TABLES: dict[int, tuple[str, list[Row]]] = {
    1: ("Validation perplexity; all models matched in parameters and computation.", [
        Row("Dense", "dense"), Row("SMoE", "smoe"), Row("Fine-grained SMoE", "fine-grained"),
        Row("MH-MoE (head=2)", "mhmoe-h2"), Row("MH-MoE (head=3)", "mhmoe-h3")]),
    2: ("All MoE models with a shared expert of the same size (hidden F).", [
        Row("SMoE", "smoe-shared"), Row("Fine-grained SMoE", "fine-grained-shared"),
        Row("MH-MoE (head=2)", "mhmoe-h2-shared"), Row("MH-MoE (head=3)", "mhmoe-h3-shared")]),
    3: ("All models quantised and trained with BitNet b1.58.", [
        Row("Dense", "dense", True), Row("SMoE", "smoe", True), Row("Fine-grained SMoE", "fine-grained", True),
        Row("MH-MoE (head=2)", "mhmoe-h2", True), Row("MH-MoE (head=3)", "mhmoe-h3", True)]),
    # Table 4 as the paper states it: the rows without head & merge have equal FLOPs, and so do the rows with
    # them (+2 D^2 each). MH-MoE's "with" row is the re-matched model without the layers, with them added back;
    # its 11.46 (not Table 1's 11.60) confirms that reading.
    4: ("With (+ head & merge, 2 D^2 more FLOPs) and without head & merge layers; rows without them have equal "
        "FLOPs, and so do rows with them.", [
        Row("SMoE", "smoe"), Row("SMoE + head & merge", "smoe-hm"),
        Row("Fine-grained SMoE", "fine-grained"), Row("Fine-grained SMoE + head & merge", "fine-grained-hm"),
        Row("MH-MoE (head=2) w/o head & merge", "mhmoe-h2-nohm"),
        Row("MH-MoE (head=2) + head & merge", "mhmoe-h2-nohm-hm")]),
    # Table 5: Table 1's MH-MoE h=2 with layers taken out and the experts left as they are (its full row equals
    # Table 1's h=2, and its no-layer row, 11.97, is worse than Table 4's re-matched 11.71).
    5: ("MH-MoE (head=2) of Table 1 with the head and/or merge layer removed, experts not re-sized.", [
        Row("w/o head, w/o merge", "mhmoe-h2-drophm"), Row("w/ head, w/o merge", "mhmoe-h2-dropmerge"),
        Row("w/o head, w/ merge", "mhmoe-h2-drophead"), Row("w/ head, w/ merge", "mhmoe-h2")]),
}

PAPER: dict[int, dict[str, dict[str, tuple[float, float, float]]]] = {
    1: {"Dense": {"50%": (13.01, 12.95, 17.41), "100%": (12.13, 11.58, 16.21)},
        "SMoE": {"50%": (11.87, 10.51, 15.63), "100%": (10.90, 9.68, 14.35)},
        "Fine-grained SMoE": {"50%": (11.68, 10.18, 15.21), "100%": (10.74, 9.38, 13.97)},
        "MH-MoE (head=2)": {"50%": (11.60, 10.11, 15.11), "100%": (10.70, 9.26, 13.80)},
        "MH-MoE (head=3)": {"50%": (11.45, 10.00, 14.90), "100%": (10.51, 9.18, 13.63)}},
    2: {"SMoE": {"50%": (11.76, 10.33, 15.19), "100%": (10.41, 9.44, 14.30)},
        "Fine-grained SMoE": {"50%": (11.51, 10.06, 15.01), "100%": (10.66, 9.15, 13.78)},
        "MH-MoE (head=2)": {"50%": (11.48, 9.91, 14.87), "100%": (10.36, 8.79, 13.66)},
        "MH-MoE (head=3)": {"50%": (11.26, 9.74, 14.82), "100%": (10.28, 8.72, 13.49)}},
    3: {"Dense": {"50%": (32.17, 27.56, 35.85), "100%": (30.04, 24.75, 33.55)},
        "SMoE": {"50%": (29.18, 24.70, 32.34), "100%": (26.78, 21.54, 29.73)},
        "Fine-grained SMoE": {"50%": (29.04, 24.51, 32.03), "100%": (26.68, 21.42, 29.50)},
        "MH-MoE (head=2)": {"50%": (28.84, 24.27, 31.86), "100%": (26.59, 21.11, 29.27)},
        "MH-MoE (head=3)": {"50%": (28.77, 24.13, 31.81), "100%": (26.47, 21.06, 29.14)}},
    # Tables 4 and 5 report a single column (the 50k-step models of Table 1 match their full rows).
    4: {"SMoE": {"50%": (11.87, 10.51, 15.63)}, "SMoE + head & merge": {"50%": (11.84, 10.48, 15.61)},
        "Fine-grained SMoE": {"50%": (11.68, 10.18, 15.21)},
        "Fine-grained SMoE + head & merge": {"50%": (11.67, 10.18, 15.19)},
        "MH-MoE (head=2) w/o head & merge": {"50%": (11.71, 10.16, 15.23)},
        "MH-MoE (head=2) + head & merge": {"50%": (11.46, 9.98, 14.89)}},
    5: {"w/o head, w/o merge": {"50%": (11.97, 10.40, 15.52)}, "w/ head, w/o merge": {"50%": (11.74, 10.18, 15.17)},
        "w/o head, w/ merge": {"50%": (11.84, 10.27, 15.36)}, "w/ head, w/ merge": {"50%": (11.60, 10.11, 15.11)}},
}


def run_id(row: Row, seed: int) -> str:
    """The run directory name of a row at seed index `seed`."""
    return f"{row.variant}{'-bitnet' if row.bitnet else ''}-s{seed}"
