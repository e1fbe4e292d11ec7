"""Layer benchmark: the paper's five FFN layers at d=768, 4096 tokens, CPU fp32 and bf16, fwd and fwd+bwd, with
our three dispatches (sorted, grouped_mm, the naive W[e] loop) and transformers' Mixtral block, as ratios to SMoE
measured in the same run. All of it is `mhmoe bench layers` (mhmoe/bench/__init__.py documents the method):

    python benchmarks/layers.py [--threads 1] [--rounds 6] [--target-ci 0.03] [--max-seconds 300]
                                [--dtypes float32,bfloat16] [--json] ...

--dtypes defaults to float32, plus bfloat16 on CPUs with native bf16 (AVX512-BF16, AMX, Arm BF16).
"""

import sys

from mhmoe.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "layers", "--impls", "sorted,grouped_mm,naive", *sys.argv[1:]]))
