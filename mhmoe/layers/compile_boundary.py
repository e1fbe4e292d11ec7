"""`eager_under_compile(fn)`: fn runs eagerly under torch.compile (a graph break at its call, nothing inside it
traced), as with `torch.compiler.disable`, without importing torch._dynamo when mhmoe is imported.

`torch.compiler.disable` imports torch._dynamo, about 1.3 s of CPU in every process that imports mhmoe, and most
never compile (evaluation, export, the CLI's reports, every eager training run on a CPU). Here the decision is taken
at each call instead:
  - outside torch.compile, `torch.compiler.is_compiling()` is False and fn is called as it is;
  - while dynamo traces a caller, it folds `is_compiling()` to True and reaches `torch._disable_dynamo(fn)`, whose
    wrapper lives in torch._compile, a module dynamo never traces: the call is a graph break, and the wrapper
    (importing torch._dynamo then, already loaded) runs fn under `torch._dynamo.disable`, i.e. eagerly with nothing
    inside it compiled. torch.optim's optimizers use the same wrapper for the same reason.
tests/unit/test_layering.py checks that `import mhmoe` loads no torch._dynamo; tests/unit/test_compile.py that the
compiled model graph-breaks at these calls without tracing into them or recompiling for new routings.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def eager_under_compile(fn: F) -> F:
    lazy = torch._disable_dynamo(fn)  # imports torch._dynamo at its first call, made only under torch.compile

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return lazy(*args, **kwargs)
        return fn(*args, **kwargs)

    return call  # type: ignore[return-value]
