"""The paper's reproduction: which runs each table needs, running them, and the report that reads them.

Read in this order:
    paper_tables    the paper's Tables 1-5 as data: rows (variant, steps), the paper's perplexities
    reproduce       the matrix: plan the runs of the chosen tables and seeds, train and evaluate them (resumable)
    verdicts        seed-paired differences with Student-t intervals, the claims, the sanity check
    routing_report  routing health per run and the MH-MoE v1 activation claim
    report          tables.md, results.json and plots/ of a finished matrix
    sensitivity     the same contrasts in records trained under different MoE settings, side by side
    parity_report   the FLOPs/parameter parity table of `mhmoe parity` (section 2.3)

Imports run one way: from the training stack (mhmoe.training, mhmoe.complexity) up into this package, and from
this package up into the CLI; nothing below imports it.
"""
