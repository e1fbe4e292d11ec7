"""E SwiGLU experts with stacked weights: a token dispatcher, then one of a registry of compute implementations.

sum_{i in Phi} G(x)_i * Expert_i(x) of eq. (1)/(3), computed for all (sub-)tokens at once in two seams (as
torchtitan's token dispatcher and transformers' experts registry):
  dispatch  `sort_assignments`: sort the S = N*K assignments by expert (stable, so ties keep token order), count
            them per expert and, with a capacity, mark the ones beyond it (`drop_over_capacity`, which expert
            parallelism shares). No host sync: everything stays on the device.
  compute   `EXPERT_IMPLEMENTATIONS[dispatch]`: run each expert on its contiguous group of rows, weight each row by
            its combine weight and add it into its (sub-)token's output row.

FFNConfig.dispatch, resolved at every call for the input's device by `resolve_dispatch` (so a model built on CPU
and moved to CUDA switches):
  "sorted"      `SortedExpertsFn` (layers/sorted_experts.py): gather, experts and combine fused per expert group,
                a hand-written backward, CPU threads over ranges of experts (layers/threads.py). One host sync (the
                group sizes, `.tolist()`) per call; eager under torch.compile (`eager_under_compile`).
  "grouped_mm"  torch's grouped GEMM (F.grouped_mm): the rows gathered in expert order, three grouped matmuls with
                end offsets = cumsum(counts) computed on the device, the combine through the inverse permutation
                (each token sums its K rows, in float32 for 16-bit activations; deterministic, no atomics). No host
                sync and no data-dependent shape in this layer, so torch.compile traces it with fullgraph=True.
                Capacity drops keep the dropped rows in their groups with combine weight 0 (static shapes; the
                dropped rows' FLOPs are spent and discarded). torch 2.13's grouped GEMM is made for bfloat16: its
                CUDA kernel is sync-free for bfloat16 on sm90/sm100 (H100/H200/B200), other dtypes take a
                per-group fallback that reads the offsets on the host, and torch.compile's shape function accepts
                bfloat16 only, so in other dtypes the grouped GEMMs run eagerly (one graph break). On CPU every
                dtype runs (float32, bfloat16, float16), as a loop over the groups.
  "scatter"     `scatter_swiglu` (layers/scatter_experts.py, ScatterMoE-style Triton kernels): grouped GEMMs that
                gather their input rows and scatter their output rows by index inside the kernel (no [S, Din]
                gathered copy, no inverse permutation), SwiGLU fused in the first GEMM's epilogue and its backward
                in the backward's; the combine in float32 (deterministic, no atomics). Static shapes, no host
                sync; torch.library custom ops, so torch.compile traces it with fullgraph=True and new routings
                reuse the graph. Capacity drops are not computed at all (their rows weigh 0). CUDA: the Triton
                kernels (float32, bfloat16, float16); CPU: the same decomposition in plain torch. Needs Triton
                (`import triton`); without it "scatter" raises one line naming the fix.
  "auto"        (default) scatter on CUDA in the 16-bit dtypes (bfloat16, autocast's dtype in training, and
                float16) when Triton imports; without Triton, grouped_mm on CUDA in bfloat16; sorted everywhere
                else. In float32 on CUDA auto takes sorted, whose expert matmuls are cuBLAS's: the scatter
                kernels built for sm_90 in float32 at torch's default matmul precision ("highest": IEEE
                products, no TF32) are FMA loops, not tensor-core MMAs, and spill tens of KB of registers
                (scripts/compile_scatter_kernels.py); no measurement says they beat cuBLAS, so until one does
                auto leaves them to dispatch="scatter", which still runs them. On CPU the sorted path
                with its threads is the measured best (benchmarks/RESULTS.md) and keeps the numbers of earlier
                runs bit for bit; on CUDA in float32/float16 torch's grouped GEMM would sync anyway (above). auto
                also keeps sorted where grouped_mm's layout rule fails: rows must have strides of a multiple of
                16 bytes, so Din = D/h and F must be multiples of 8 in bfloat16.
The rows seam (`Experts._run_sorted`: rows already gathered in expert order, as expert parallelism hands them
over) has no scatter form: `rows_dispatch` maps "scatter" and "auto" there to what auto picks without Triton.
Subclasses choose their implementation per dispatch explicitly in `implementations` (BitNet's BitExperts: every
dispatch through `gathered_experts`, i.e. gather, its own quantised `_run_sorted`, weighted index_add_ combine;
they resolve with `rows_dispatch`, so never to scatter).

Weights are stacked [E, ...]; paths that loop over experts under autograd split them with `unbind(0)` once per
forward: indexing W[e] inside the loop would make autograd build a full-size zero gradient per expert.

Shape legend: N (sub-)tokens, Din expert input width (D/h), F expert hidden, E experts, K top-k,
S = N*K assignments (S' after capacity drops).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mhmoe.layers import scatter_experts
from mhmoe.layers.compile_boundary import eager_under_compile
from mhmoe.layers.router import expert_counts
from mhmoe.layers.scatter_experts import scatter_swiglu
from mhmoe.layers.sorted_experts import acc_dtype, compute_dtype, sorted_experts_combine, sorted_experts_rows
from mhmoe.layers.threads import expert_workers

Implementation = Literal["sorted", "grouped_mm", "scatter"]  # what "auto" resolves to
RowsImplementation = Literal["sorted", "grouped_mm"]  # the rows seam's (`rows_dispatch`)
DISPATCHES = ("auto", "sorted", "grouped_mm", "scatter")
SCATTER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the Triton kernels take
# What "auto" sends to them: the tensor-core dtypes. float32 goes to cuBLAS (module docstring).
SCATTER_AUTO_DTYPES = (torch.bfloat16, torch.float16)
_grouped_mm = getattr(F, "grouped_mm", None)  # torch >= 2.8


def resolve_dispatch(dispatch: str, device: torch.device, in_dim: int, hidden_dim: int,
                     dtype: torch.dtype) -> Implementation:
    """The implementation FFNConfig.dispatch means for experts of width in_dim -> hidden_dim whose matmuls run in
    `dtype` on `device`: "sorted", "grouped_mm" and "scatter" as given; "auto" = scatter on CUDA in bfloat16 or
    float16 when Triton imports, else grouped_mm on CUDA in bfloat16 with 16-byte row strides (in_dim and
    hidden_dim multiples of 8), else sorted (float32 on CUDA included: cuBLAS's matmuls; module docstring). Reads
    no device: a CUDA device need not exist to ask."""
    if dispatch in ("sorted", "grouped_mm", "scatter"):
        return dispatch
    if dispatch != "auto":
        raise ValueError(f"FFNConfig.dispatch: {dispatch!r} is not one of {', '.join(map(repr, DISPATCHES))}")
    if device.type == "cuda" and scatter_experts.TRITON_AVAILABLE and dtype in SCATTER_AUTO_DTYPES:
        return "scatter"
    return _auto_without_scatter(device, in_dim, hidden_dim, dtype)


def _auto_without_scatter(device: torch.device, in_dim: int, hidden_dim: int,
                          dtype: torch.dtype) -> RowsImplementation:
    if device.type != "cuda" or _grouped_mm is None or dtype != torch.bfloat16:
        return "sorted"
    aligned = (in_dim * dtype.itemsize) % 16 == 0 and (hidden_dim * dtype.itemsize) % 16 == 0  # row strides
    return "grouped_mm" if aligned else "sorted"


def rows_dispatch(dispatch: str, device: torch.device, in_dim: int, hidden_dim: int,
                  dtype: torch.dtype) -> RowsImplementation:
    """`resolve_dispatch` for the rows seam (rows already gathered in expert order: `Experts._run_sorted`, expert
    parallelism, BitNet's experts), which has no scatter form: "scatter" and "auto" resolve there as auto does
    without Triton (grouped_mm on CUDA in bfloat16 with 16-byte rows, else sorted)."""
    resolved = resolve_dispatch(dispatch, device, in_dim, hidden_dim, dtype)
    return _auto_without_scatter(device, in_dim, hidden_dim, dtype) if resolved == "scatter" else resolved


@dataclass
class DispatchStats:
    tokens_per_expert: torch.Tensor  # [E] long, assignments routed to each expert (before dropping)
    dropped: torch.Tensor | int  # assignments dropped by the capacity limit: 0-d long on the device (or an int)


def expert_capacity(num_assignments: int, num_experts: int, capacity_factor: float, top_k: int = 1,
                    rule: str = "token_order") -> int:
    """Slots per expert when dropping, for N*K = num_assignments: "token_order" ceil(capacity_factor * N*K / E);
    "choice_order" K * ceil(capacity_factor * N / E) (GShard, the authors' `topkgating`; more slots when K does
    not divide into the rounding)."""
    if rule == "choice_order":
        return max(1, top_k * math.ceil(capacity_factor * (num_assignments // top_k) / num_experts))
    return max(1, math.ceil(capacity_factor * num_assignments / num_experts))


def assignment_order(indices: torch.Tensor, priority: str = "token") -> torch.Tensor:
    """[S] the assignment ids n*K + k of indices [N, K] grouped by expert; within an expert, in the order its
    slots are filled when dropping: "token" (token by token, a token's choices side by side) or "choice" (every
    token's first choice, then every second choice, ...: GShard's priority)."""
    if priority == "token":
        return torch.argsort(indices.reshape(-1), stable=True)  # [S]
    N, K = indices.shape
    ids = torch.arange(N * K, device=indices.device).view(N, K).t().reshape(-1)  # [S] ids in choice-major order
    return ids.index_select(0, torch.argsort(indices.t().reshape(-1), stable=True))  # [S]


def drop_over_capacity(expert_of_row: torch.Tensor, counts: torch.Tensor,
                       capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Capacity dropping of assignments sorted by expert (stable, so the earliest tokens keep their slots).

    expert_of_row: [S] expert of each sorted assignment, counts: [E] assignments per expert ->
    (keep [S] bool, kept counts [E], dropped: 0-d long), all on the device (no host sync).
    """
    starts = torch.cumsum(counts, 0) - counts  # [E] first sorted row of each expert
    pos = torch.arange(expert_of_row.numel(), device=counts.device) - starts[expert_of_row]  # [S] slot in group
    kept = counts.clamp(max=capacity)
    return pos < capacity, kept, counts.sum() - kept.sum()


@dataclass
class Assignments:
    """The dispatcher's output: the S = N*K assignments (ids n*K + k) in expert order."""

    order: torch.Tensor  # [S] assignment ids sorted by expert, stable
    counts: torch.Tensor  # [E] long, assignments per expert (before dropping)
    kept_counts: torch.Tensor  # [E] long, rows each expert keeps (= counts when dropless)
    keep: torch.Tensor  # [S] bool over `order`: within capacity (all True when dropless)
    dropped: torch.Tensor  # 0-d long
    dropless: bool
    top_k: int

    def compacted(self) -> torch.Tensor:
        """[S'] the kept assignment ids in expert order (boolean indexing: a host sync on CUDA)."""
        return self.order if self.dropless else self.order[self.keep]


def sort_assignments(indices: torch.Tensor, num_experts: int, capacity: int | None = None,
                     priority: str = "token") -> Assignments:
    """Token dispatcher: indices [N, K] -> `Assignments`; capacity = slots per expert, None = dropless; priority:
    which assignments keep the slots ("token" | "choice", `assignment_order`)."""
    flat = indices.reshape(-1)  # [S]
    # Dropless, the order within an expert changes nothing: the cheaper token order then.
    order = assignment_order(indices, priority if capacity is not None else "token")  # [S] grouped by expert
    counts = expert_counts(flat, num_experts)  # [E]
    if capacity is None:
        keep = torch.ones(flat.shape, dtype=torch.bool, device=flat.device)
        return Assignments(order, counts, counts, keep, torch.zeros((), dtype=torch.long, device=flat.device),
                           True, indices.shape[1])
    keep, kept, dropped = drop_over_capacity(flat.index_select(0, order), counts, capacity)
    return Assignments(order, counts, kept, keep, dropped, False, indices.shape[1])


# ----------------------------------------------------------------------------------------------------------
# Compute implementations: (experts module, x [N, Din], assignments, combine weights [N, K]) -> y [N, Din]

ExpertsImplementation = Callable[["Experts", torch.Tensor, "Assignments", torch.Tensor], torch.Tensor]


# Eager under torch.compile: its group sizes are data (one host sync), and a graph specialised on them would
# recompile for every new routing.
@eager_under_compile
def fused_sorted_experts(ex: "Experts", x: torch.Tensor, a: Assignments, weights: torch.Tensor) -> torch.Tensor:
    """dispatch="sorted": the fused `SortedExpertsFn` (combine mode), CPU threads per `ex.threading`."""
    order = a.compacted()  # [S']
    rows = order // a.top_k if a.top_k > 1 else order  # [S'] (sub-)token of each sorted assignment
    w_sorted = weights.reshape(-1).index_select(0, order)  # [S'] combine weight of each sorted assignment
    sizes = a.kept_counts.tolist()  # the one host sync of the layer
    workers = expert_workers(ex.threading, x.device, sizes)
    return sorted_experts_combine(x, w_sorted, ex.w1, ex.w3, ex.w2, rows, sizes, ex.recompute, workers)


def _grouped_swiglu(xs: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                    offs: torch.Tensor) -> torch.Tensor:
    h = F.silu(_grouped_mm(xs, w1, offs=offs)) * _grouped_mm(xs, w3, offs=offs)  # [S, F]
    return _grouped_mm(h, w2, offs=offs)


# torch.compile's shape function of _grouped_mm accepts bfloat16 only (torch 2.13): other dtypes run eagerly.
_eager_grouped_swiglu = eager_under_compile(_grouped_swiglu)


def grouped_swiglu(xs: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                   counts: torch.Tensor) -> torch.Tensor:
    """xs [S, Din] grouped by expert, counts [E] -> [S, Din] each row's expert output: three grouped GEMMs in the
    autocast dtype (else xs's), group end offsets from a cumsum on the device (no host sync)."""
    if _grouped_mm is None:
        raise RuntimeError("FFNConfig.dispatch: 'grouped_mm' needs torch.nn.functional.grouped_mm (torch >= 2.8); "
                           "use dispatch='sorted' or 'auto'")
    dt = compute_dtype(xs)
    with torch.autocast(xs.device.type, enabled=False):
        offs = torch.cumsum(counts, 0).to(torch.int32)  # [E] end offset of each group
        xs, w1, w3, w2 = (t.to(dt) for t in (xs, w1, w3, w2))
        run = _grouped_swiglu if dt == torch.bfloat16 else _eager_grouped_swiglu
        return run(xs, w1, w3, w2, offs)


def grouped_mm_experts(ex: "Experts", x: torch.Tensor, a: Assignments, weights: torch.Tensor) -> torch.Tensor:
    """dispatch="grouped_mm": no host sync, static shapes (the path auto takes on CUDA)."""
    N, K = weights.shape
    rows = a.order // K if K > 1 else a.order  # [S]
    ys = grouped_swiglu(x.index_select(0, rows), ex.w1, ex.w3, ex.w2, a.counts)  # [S, Din] in expert order
    dt = ys.dtype
    acc = acc_dtype(dt)
    # inverse[i] = sorted position of assignment i (a permutation: each row written once).
    inverse = torch.empty_like(a.order).scatter_(0, a.order, torch.arange(a.order.numel(), device=x.device))
    w = weights.to(acc)
    if not a.dropless:
        w = w * a.keep.index_select(0, inverse).view(N, K)  # dropped rows: computed, weighted 0
    # Token order, then each (sub-)token sums its K rows (elementwise: no matmul for the FLOP counter to count).
    y = (ys.index_select(0, inverse).view(N, K, ex.in_dim).to(acc) * w.unsqueeze(-1)).sum(dim=1)
    return y.to(dt)


def scatter_experts_impl(ex: "Experts", x: torch.Tensor, a: Assignments, weights: torch.Tensor) -> torch.Tensor:
    """dispatch="scatter": the permute-free fused experts (layers/scatter_experts.py); no host sync, static
    shapes, torch.library custom ops (fullgraph under torch.compile)."""
    return scatter_swiglu(x, weights, ex.w1, ex.w3, ex.w2, a.order, a.counts, a.kept_counts, a.dropless,
                          ex.recompute)


@eager_under_compile  # `_run_sorted` of subclasses may sync (group sizes on the host), as the fused path
def gathered_experts(ex: "Experts", x: torch.Tensor, a: Assignments, weights: torch.Tensor) -> torch.Tensor:
    """Gather the kept rows in expert order, `ex._run_sorted` on them, weighted index_add_ combine, all under
    autograd: for subclasses whose experts are not plain SwiGLUs (BitNet's BitExperts)."""
    N = x.shape[0]
    order = a.compacted()
    rows = order // a.top_k if a.top_k > 1 else order  # [S']
    w_sorted = weights.reshape(-1).index_select(0, order)  # [S']
    ys = ex._run_sorted(x.index_select(0, rows), a.kept_counts)  # [S', Din]
    # Weighted combine straight into [N, Din] (index_add_'s backward is a gather of dY).
    ys_w = ys * w_sorted.to(ys.dtype).unsqueeze(-1)
    return ys.new_zeros(N, ex.in_dim).index_add(0, rows, ys_w)  # [N, Din]


EXPERT_IMPLEMENTATIONS: dict[str, ExpertsImplementation] = {
    "sorted": fused_sorted_experts,
    "grouped_mm": grouped_mm_experts,
    "scatter": scatter_experts_impl,
}


class Experts(nn.Module):
    """E SwiGLU experts Din -> F -> Din, weights stacked as w1, w3: [E, Din, F] and w2: [E, F, Din].

    dispatch: "auto" | "sorted" | "grouped_mm" | "scatter" (module docstring), resolved per call by
        `resolve_dispatch`.
    recompute: keep no [S, F] activation for the backward (recompute x W1, x W3 there); sorted and scatter.
    threading: "auto" | "intra-op" | "inter-expert", how CPU threads share the expert loop; sorted only.
    implementations: resolved dispatch -> compute implementation; subclasses declare theirs.
    """

    implementations: ClassVar[Mapping[str, ExpertsImplementation]] = EXPERT_IMPLEMENTATIONS

    def __init__(self, num_experts: int, in_dim: int, hidden_dim: int, dispatch: str = "auto",
                 recompute: bool = False, threading: str = "auto") -> None:
        super().__init__()
        self.num_experts, self.in_dim, self.hidden_dim, self.dispatch = num_experts, in_dim, hidden_dim, dispatch
        self.recompute, self.threading = recompute, threading
        self.w1 = nn.Parameter(torch.empty(num_experts, in_dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, in_dim, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, in_dim))
        for w in (self.w1, self.w3, self.w2):
            nn.init.normal_(w, std=0.02)

    def resolved_dispatch(self, x: torch.Tensor) -> Implementation:
        """`resolve_dispatch` of this module's dispatch for input x (its device, its compute dtype)."""
        return resolve_dispatch(self.dispatch, x.device, self.in_dim, self.hidden_dim, compute_dtype(x))

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, capacity: int | None = None,
        priority: str = "token",
    ) -> tuple[torch.Tensor, DispatchStats]:
        """x: [N, Din], indices/weights: [N, K] -> y: [N, Din] = sum_k weights[:, k] * Expert_{indices[:, k]}(x),
        the assignments beyond `capacity` slots per expert left out (filled in `priority` order)."""
        a = sort_assignments(indices, self.num_experts, capacity, priority)
        y = self.implementations[self.resolved_dispatch(x)](self, x, a, weights)
        return y, DispatchStats(tokens_per_expert=a.counts, dropped=a.dropped)

    def _run_sorted(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Apply expert e to its contiguous rows of xs ([S', Din], grouped by expert, counts [E]) -> [S', Din],
        unweighted: the rows seam of expert parallelism and of `gathered_experts` (`rows_dispatch`)."""
        if rows_dispatch(self.dispatch, xs.device, self.in_dim, self.hidden_dim, compute_dtype(xs)) == "grouped_mm":
            return grouped_swiglu(xs, self.w1, self.w3, self.w2, counts)
        sizes = counts.tolist()  # the one host sync of the layer
        workers = expert_workers(self.threading, xs.device, sizes)
        return sorted_experts_rows(xs, self.w1, self.w3, self.w2, sizes, self.recompute, workers)
