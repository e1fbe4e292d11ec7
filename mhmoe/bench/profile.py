"""`mhmoe bench train --profile DIR`: a few training steps under torch.profiler, their time split into the parts of
the model, written as DIR/profile.md, DIR/profile.json and the Chrome trace DIR/trace.json.

What is counted: on CUDA the device time of every kernel (and memcpy/memset) the step launched, each charged to
the CPU-side event that launched it (the innermost op or label active on the launching thread); on CPU the self
CPU time of every event of the step's thread (its time less its children's). Each step is one `mhmoe.step` range
that ends with a device synchronize, so its kernels fall inside it. On CPU the parts sum to the steps' time (the
self times of a tree add up to its root's; within 1% for rounding). On CUDA they sum to the device's busy time,
and the step's wall time less that is a row of its own, `idle` (launch gaps, host work, syncs).

Which part an event belongs to (`PARTS`), in this order:
  1. backward: an event under `autograd::engine::evaluate_function: <Node>` takes the context of the forward op
     that created <Node> (same sequence number and forward thread), so a backward kernel is charged where its
     forward op ran;
  2. the innermost label of mhmoe.profiling around the (forward) op: attention, norms, router (ROUTER and
     ROUTER_AUX: gate matmul, softmax/top-k, aux losses and routing statistics), head/merge, dense FFN (the
     shared expert too), optimizer (clipping, AdamW's step and zero_grad; also torch's own `Optimizer.step#...`
     and `Optimizer.zero_grad#...` ranges);
  3. rules where no finer label exists:
     * inside EXPERTS (the routed experts: dispatch, compute, combine), by op: matmul ops (`GEMM_OPS`) and the
       SwiGLU activation are expert GEMMs; sort, gather, scatter and index ops (`PERMUTATION_OPS`) are MoE
       permutation; other elementwise ops (casts, products, sums) are expert GEMMs between the first and the last
       matmul of that experts call (the activation) and permutation before and after it (dispatch, combine).
       A custom autograd function there (the fused sorted experts) counts as expert GEMMs, its gathers and
       scatters excepted. On CUDA a kernel whose name matches `EXPERT_GEMM_KERNEL` (GEMM libraries, fused expert
       kernels) is an expert GEMM and one matching `PERMUTATION_KERNEL` is permutation, whatever launched it;
     * inside MODEL (one forward of the model) but outside every block: the embedding lookup is `other`,
       everything else (final projection, cross-entropy, the aux-loss sum) is `LM head + loss`;
     * inside BLOCK but outside its finer labels (the residual adds), and outside MODEL (metrics, the step's
       bookkeeping): `other`;
  4. compiled regions (under `Torch-Compiled Region`, `CompiledFunction[Backward]` or `## Call CompiledFxGraph`): dynamo
     drops the labels inside them (mhmoe.profiling), so their kernels are charged by name (`COMPILED_RULES`:
     attention, norms, loss, router, expert and permutation kernels); GEMMs and fused kernels that name no part
     stay in `other`, and profile.json says how much of the step that was (`by_source.unattributed`).
Every part's time is split into forward and backward (optimizer and other work that is neither counts in the
total only), and profile.json lists each part's largest ops or kernels (`top`).

Shape of the output: per profiled (variant, dtype), ms per step of each part and its share of the step.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from mhmoe.bench.device import synchronizer
from mhmoe.fileio import atomic_write_bytes, atomic_write_text
from mhmoe.profiling import (
    ATTENTION,
    BLOCK,
    DENSE_FFN,
    EXPERTS,
    HEAD_MERGE,
    LABELS,
    MODEL,
    NORM,
    OPTIMIZER,
    ROUTER,
    ROUTER_AUX,
    SHARED_EXPERT,
    STEP,
)

PARTS = ("attention", "norms", "router", "moe_permutation", "expert_gemm", "dense_ffn", "head_merge",
         "lm_head_loss", "optimizer", "other")
PART_TITLES = {
    "attention": "attention", "norms": "norms", "router": "router (gate, softmax/top-k, aux losses)",
    "moe_permutation": "MoE permutation (sort, gather/scatter, combine)", "expert_gemm": "expert GEMMs",
    "dense_ffn": "dense FFN", "head_merge": "head/merge", "lm_head_loss": "LM head + loss",
    "optimizer": "optimizer", "other": "other", "idle": "device idle",
}
MOE_PARTS = ("router", "moe_permutation", "expert_gemm")  # in every MoE variant's step, in no dense one's
LABEL_PART = {ATTENTION: "attention", NORM: "norms", DENSE_FFN: "dense_ffn", SHARED_EXPERT: "dense_ffn",
              HEAD_MERGE: "head_merge", ROUTER: "router", ROUTER_AUX: "router", OPTIMIZER: "optimizer",
              BLOCK: "other", STEP: "other"}
VARIANT_RANGE = "mhmoe.profile:"  # + the record key: one range around each variant's profiled steps
SUM_TOLERANCE = 0.01  # CPU: |sum of parts - steps' time| / steps' time; the self times add up exactly up to rounding
TRACE_LIMIT_BYTES = 12 * 2**20  # a larger trace.json is gzipped (trace.json.gz), so that it travels back

GEMM_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_grouped_mm", "grouped_mm",
                      "linalg_vecdot", "vecdot", "dot", "silu", "silu_", "silu_backward", "_scaled_mm",
                      "_scaled_grouped_mm"})
PERMUTATION_OPS = frozenset({"sort", "argsort", "index_select", "index_add", "index_add_", "index", "index_put",
                             "index_put_", "gather", "scatter", "scatter_", "scatter_add", "scatter_add_",
                             "scatter_reduce", "cumsum", "nonzero", "masked_select", "bincount", "repeat_interleave",
                             "sum", "take", "embedding_dense_backward", "topk"})
EXPERT_GEMM_KERNEL = re.compile(r"gemm|xmma|nvjet|cutlass|wgmma|cublas|matmul|grouped_mm|_mm_|expert", re.I)
PERMUTATION_KERNEL = re.compile(r"sort|scatter|gather|index|cumsum|radix", re.I)
COMPILED_RULES: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"flash|fmha|sdpa|attention|cudnn", re.I), "attention"),
    (re.compile(r"expert|grouped_mm", re.I), "expert_gemm"),
    (re.compile(r"log_softmax|nll_loss|cross_entropy", re.I), "lm_head_loss"),
    (re.compile(r"rsqrt|rms_norm", re.I), "norms"),
    (re.compile(r"topk|softmax|logsumexp", re.I), "router"),
    (re.compile(r"sort|scatter|gather|index|cumsum|radix", re.I), "moe_permutation"),
    (re.compile(r"adam|multi_tensor|foreach", re.I), "optimizer"),
)
# Ranges torch.compile's runtime opens around a compiled graph (their names start so; the backward's too).
COMPILED_PREFIXES = ("CompiledFunction", "## Call CompiledFxGraph", "Torch-Compiled Region")
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
AUTOGRAD_NODE = re.compile(r"Backward\d*$")
OPTIMIZER_PREFIXES = ("Optimizer.step#", "Optimizer.zero_grad#")


@dataclass
class Event:
    """One CPU-side profiler event, flattened: a tree per thread (parent), times in microseconds."""

    name: str
    thread: int
    start: float
    end: float
    parent: int | None = None  # index of the enclosing event on the same thread
    seq: int = -1  # autograd sequence number (forward ops, backward nodes)
    fwd_thread: int = 0  # for backward nodes: the thread of the forward op
    self_cpu: float = 0.0
    kernels: list[tuple[str, float]] = field(default_factory=list)  # device work it launched itself: (name, us)


@dataclass
class DeviceEvent:
    """Device work that no CPU event launched (as far as the profiler could link it)."""

    name: str
    start: float
    duration: float


def flatten(events: Iterable) -> tuple[list[Event], list[DeviceEvent]]:
    """torch.profiler's FunctionEvents -> (CPU events with their own kernels, device work linked to none)."""
    cpu, device = [], []
    index: dict[int, int] = {}
    cpu_ids = set()
    events = list(events)
    for e in events:
        if _is_cpu(e) and not getattr(e, "is_async", False):
            index[id(e)] = len(cpu)
            cpu_ids.add(e.id)
            cpu.append(Event(e.name, e.thread, e.time_range.start, e.time_range.end, None,
                             getattr(e, "sequence_nr", -1), getattr(e, "fwd_thread", 0) or 0,
                             float(e.self_cpu_time_total),
                             [(k.name, float(k.duration)) for k in getattr(e, "kernels", [])]))
    for e in events:
        if id(e) in index and e.cpu_parent is not None:
            cpu[index[id(e)]].parent = index.get(id(e.cpu_parent))
        elif not _is_cpu(e) and not getattr(e, "is_user_annotation", False) and not _is_range(e.name):
            linked = getattr(e, "linked_correlation_id", None)
            if linked is not None and linked not in cpu_ids:  # launched by nothing we saw: counted, unattributed
                device.append(DeviceEvent(e.name, e.time_range.start, e.time_range.end - e.time_range.start))
    return cpu, device


def _is_range(name: str) -> bool:
    """A range of ours (a label, a variant's range) as the device side of a trace may repeat it."""
    return name in LABELS or name.startswith(VARIANT_RANGE)


def _is_cpu(e) -> bool:  # noqa: ANN001
    return str(getattr(e, "device_type", "DeviceType.CPU")).endswith("CPU")


def _op(name: str) -> str:
    """'aten::index_select' -> 'index_select'."""
    return name.rsplit("::", 1)[-1]


def _norm(name: str) -> str:
    """'_grouped_mm' and 'GroupedMm' -> 'groupedmm': op and autograd-node names compared."""
    return name.replace("_", "").lower()


class Attribution:
    """Charges every event of a profile to a part (module docstring); one instance per profile."""

    def __init__(self, events: list[Event]) -> None:
        self.events = events
        self.children: dict[int, list[int]] = defaultdict(list)
        for i, e in enumerate(events):
            if e.parent is not None:
                self.children[e.parent].append(i)
        self._ctx: dict[int, tuple] = {}
        # Forward ops by (thread, sequence number), for the backward nodes they created. An op that creates no
        # node (no input requires grad, or a composite around the op that does) records the number the next node
        # will take, so one number can name several ops: `forward_op` picks among them by the node's name.
        self.forward: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in sorted(range(len(events)), key=lambda j: events[j].start):
            e = events[i]
            if e.seq >= 0 and not e.name.startswith(BACKWARD_PREFIX) and self._backward_node(i) is None:
                self.forward[(e.thread, e.seq)].append(i)
        self._gemm_span: dict[int, tuple[float, float] | None] = {}

    def forward_op(self, node: int) -> int | None:
        """The forward op that created backward node `node` (an `evaluate_function: XBackward0` event): among the
        ops with its sequence number, the last whose name is X (MulBackward0: aten::mul; SortedExpertsFnBackward:
        SortedExpertsFn), else the last of them (the op that took the number is the latest to record it)."""
        n = self.events[node]
        found = self.forward.get((n.fwd_thread, n.seq))
        if not found:
            return None
        want = _norm(AUTOGRAD_NODE.sub("", n.name[len(BACKWARD_PREFIX):]))
        named = [i for i in found if _norm(_op(self.events[i].name)) == want]
        return (named or found)[-1]

    def ancestors(self, i: int | None) -> Iterable[int]:
        while i is not None:
            yield i
            i = self.events[i].parent

    def _backward_node(self, i: int) -> int | None:
        return next((j for j in self.ancestors(i) if self.events[j].name.startswith(BACKWARD_PREFIX)), None)

    def context(self, i: int) -> tuple[str, str, str]:
        """(part, phase, source) of event i's own work, before any split by kernel name. phase: forward, backward
        or step; source: label, rule (op-name rules), compiled (inside a compiled region) or none."""
        if i not in self._ctx:
            self._ctx[i] = self._context(i)
        return self._ctx[i]

    def _context(self, i: int) -> tuple[str, str, str]:
        chain = list(self.ancestors(i))
        names = [self.events[j].name for j in chain]
        compiled = any(n.startswith(COMPILED_PREFIXES) for n in names)
        node = next((j for j in chain if self.events[j].name.startswith(BACKWARD_PREFIX)), None)
        if node is not None:
            fwd = self.forward_op(node)
            if fwd is None:  # AccumulateGrad and other nodes no forward op created
                return "other", "backward", "none"
            part, _, source = self.context(fwd)
            inner = chain[:chain.index(node)]
            if part in MOE_PARTS[1:] and source != "compiled":
                cls = self._expert_class(inner)  # the backward op's own kind first, else its forward op's
                part = cls or part
            return part, "backward", "compiled" if compiled else source
        if any(n.startswith(OPTIMIZER_PREFIXES) for n in names):
            return "optimizer", "step", "label"
        lab = next((j for j in chain if self.events[j].name in LABELS), None)
        if lab is None:
            return "other", "step", "none"
        name = self.events[lab].name
        phase = "step" if name in (OPTIMIZER, STEP) else "forward"
        if compiled and name in (MODEL, BLOCK, STEP):
            return "other", phase, "compiled"
        if name == EXPERTS:
            inner = chain[:chain.index(lab)]
            cls = self._expert_class(inner)
            if cls is None:
                span = self._span(lab)
                start = self.events[i].start
                cls = "expert_gemm" if span and span[0] < start < span[1] else "moe_permutation"
            return cls, "forward", "rule"
        if name == MODEL:
            if any(_op(n) in ("embedding", "embedding_renorm_") for n in names[:chain.index(lab)]):
                return "other", "forward", "rule"
            return "lm_head_loss", "forward", "rule"
        return LABEL_PART[name], phase, "label"

    def _expert_class(self, chain: list[int]) -> str | None:
        """expert_gemm or moe_permutation by the innermost op of `chain` (innermost first) that names one; None
        when none does. Autograd nodes (`MulBackward0`, `SortedExpertsFnBackward`) name nothing: a backward op
        they hold falls back to its forward op's kind."""
        for j in chain:
            name = self.events[j].name
            op = _op(name)
            if op in PERMUTATION_OPS:
                return "moe_permutation"
            if op in GEMM_OPS:
                return "expert_gemm"
            if "::" not in name and name not in LABELS and not AUTOGRAD_NODE.search(name):
                return "expert_gemm"  # a custom autograd function's forward: the fused experts
        return None

    def _span(self, lab: int) -> tuple[float, float] | None:
        """Start times of the first and last matmul op inside the experts call `lab`."""
        if lab not in self._gemm_span:
            starts, stack = [], [lab]
            while stack:
                j = stack.pop()
                stack.extend(self.children[j])
                if j != lab and _op(self.events[j].name) in GEMM_OPS - {"silu", "silu_", "silu_backward"}:
                    starts.append(self.events[j].start)
            self._gemm_span[lab] = (min(starts), max(starts)) if starts else None
        return self._gemm_span[lab]

    def kernel_part(self, part: str, source: str, kernel: str) -> tuple[str, str]:
        """The part a kernel of an event of (part, source) goes to: kernel-name rules in compiled regions and
        inside the experts; otherwise the event's."""
        if source == "compiled":
            for pattern, name in COMPILED_RULES:
                if pattern.search(kernel):
                    return name, "compiled-rule"
            return part, "compiled" if part == "other" else "label"
        if part in MOE_PARTS[1:]:
            if EXPERT_GEMM_KERNEL.search(kernel):
                return "expert_gemm", "rule"
            if PERMUTATION_KERNEL.search(kernel):
                return "moe_permutation", "rule"
        return part, source


def attribute(events: list[Event], device_events: list[DeviceEvent], on_device: bool) -> dict[str, dict]:
    """Per profiled record key (the `mhmoe.profile:<key>` ranges): the steps' time split into PARTS."""
    att = Attribution(events)
    out = {}
    for v, ev in enumerate(events):
        if not ev.name.startswith(VARIANT_RANGE):
            continue
        key = ev.name[len(VARIANT_RANGE):]
        steps = [j for j in att.children[v] if events[j].name == STEP]
        windows = [(events[j].start, events[j].end) for j in steps]
        wall = sum(b - a for a, b in windows)
        members = _members(att, steps, windows, on_device)
        parts = {p: {"us": 0.0, "forward_us": 0.0, "backward_us": 0.0} for p in PARTS}
        top: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        by_source: dict[str, float] = defaultdict(float)
        for i in members:
            e = events[i]
            part, phase, source = att.context(i)
            work = e.kernels if on_device else [(e.name, e.self_cpu)]
            for kname, us in work:
                by_name = on_device or source == "compiled"
                p, src = att.kernel_part(part, source, kname) if by_name else (part, source)
                parts[p]["us"] += us
                if phase in ("forward", "backward"):
                    parts[p][f"{phase}_us"] += us
                top[p][kname if on_device else e.name] += us
                by_source[_source_kind(src)] += us
        if on_device:
            for d in device_events:
                if any(a <= d.start <= b for a, b in windows):
                    parts["other"]["us"] += d.duration
                    top["other"][d.name] += d.duration
                    by_source["unattributed"] += d.duration
        n = max(1, len(steps))
        total = sum(p["us"] for p in parts.values())
        rec = {"steps": len(steps), "step_ms": wall / n / 1e3, "parts_ms": total / n / 1e3,
               "time": "device" if on_device else "cpu", "parts": {}, "by_source": {}}
        for p in PARTS:
            q = parts[p]
            rec["parts"][p] = {
                "ms": q["us"] / n / 1e3, "forward_ms": q["forward_us"] / n / 1e3,
                "backward_ms": q["backward_us"] / n / 1e3, "pct": 100 * q["us"] / wall if wall else 0.0,
                "top": [[name, us / n / 1e3] for name, us in sorted(top[p].items(), key=lambda t: -t[1])[:5]],
            }
        if on_device:
            idle = max(0.0, wall - total)
            rec["idle_ms"] = idle / n / 1e3
            rec["idle_pct"] = 100 * idle / wall if wall else 0.0
        rec["by_source"] = {k: by_source.get(k, 0.0) / n / 1e3 for k in ("label", "rule", "unattributed")}
        out[key] = rec
    return out


def _source_kind(src: str) -> str:
    if src == "label":
        return "label"
    if src in ("rule", "compiled-rule"):
        return "rule"
    return "unattributed"


def _members(att: Attribution, steps: list[int], windows: list[tuple[float, float]], on_device: bool) -> list[int]:
    """The events of the steps: on CPU the step ranges' subtrees (the step's thread; the self times add up to
    the steps' time), on CUDA every CPU event that starts inside a step on any thread (the backward runs on
    the autograd engine's device thread)."""
    if not on_device:
        found, stack = [], list(steps)
        while stack:
            j = stack.pop()
            found.append(j)
            stack.extend(att.children[j])
        return found
    return [i for i, e in enumerate(att.events) if any(a <= e.start <= b for a, b in windows)]


# ----------------------------------------------------------------------------------------------------------
# Running the profiler, writing the files


def profile_steps(steps: dict[str, Callable[[], object]], out_dir: str | os.PathLike, device: torch.device,
                  n_steps: int, log: Callable[[str], None], meta: dict | None = None) -> dict:
    """Profile `n_steps` calls of each step function (already warmed up) in one profiler session; write
    out_dir/trace.json (or trace.json.gz when larger than TRACE_LIMIT_BYTES), profile.json and profile.md;
    return profile.json's content."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    sync = synchronizer(device)
    if on_device:  # the first session of a process starts CUPTI: a throwaway one keeps that out of the numbers
        with profile(activities=activities):
            next(iter(steps.values()))()
            sync()
    with profile(activities=activities, record_shapes=False, with_stack=False, profile_memory=False) as prof:
        for key, fn in steps.items():
            with record_function(VARIANT_RANGE + key):
                for _ in range(n_steps):
                    with record_function(STEP):
                        fn()
                        if sync is not None:
                            sync()
    cpu, device_events = flatten(prof.events())
    records = attribute(cpu, device_events, on_device)
    trace = _export_trace(prof, out_dir)
    result = {"device": device.type, "time": "device" if on_device else "cpu", "steps_per_variant": n_steps,
              "parts": list(PARTS), "part_titles": PART_TITLES, "trace": trace.name,
              "trace_bytes": trace.stat().st_size, "sum_tolerance": SUM_TOLERANCE, **(meta or {}),
              "variants": records}
    atomic_write_text(out_dir / "profile.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(out_dir / "profile.md", format_profile(result))
    log(f"[profile] {len(records)} variant(s) x {n_steps} step(s): {out_dir / 'profile.md'}, {trace}")
    return result


def _export_trace(prof: profile, out_dir: Path) -> Path:
    """The Chrome trace as trace.json, gzipped to trace.json.gz past TRACE_LIMIT_BYTES; the other removed."""
    tmp = out_dir / ".trace.json.tmp"
    prof.export_chrome_trace(str(tmp))
    plain, packed = out_dir / "trace.json", out_dir / "trace.json.gz"
    if tmp.stat().st_size <= TRACE_LIMIT_BYTES:
        os.replace(tmp, plain)
        packed.unlink(missing_ok=True)
        return plain
    atomic_write_bytes(packed, gzip.compress(tmp.read_bytes(), compresslevel=6))
    tmp.unlink()
    plain.unlink(missing_ok=True)
    return packed


def format_profile(result: dict) -> str:
    """profile.md: one table of ms per step (% of the step) with a column per profiled record, then the
    forward/backward split and the largest ops or kernels of each part."""
    recs = result["variants"]
    keys = list(recs)
    unit = "device ms" if result["time"] == "device" else "CPU ms"
    lines = ["# Training-step profile", "",
             f"{result['steps_per_variant']} profiled step(s) per record on {result['device']}; {unit} per step, "
             "(% of the step). Rules: mhmoe/bench/profile.py.", "",
             "| part | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    rows = list(PARTS) + (["idle"] if result["time"] == "device" else [])
    for p in rows:
        cells = []
        for k in keys:
            r = recs[k]
            ms, pct = (r["idle_ms"], r["idle_pct"]) if p == "idle" else (r["parts"][p]["ms"], r["parts"][p]["pct"])
            cells.append(f"{ms:.2f} ({pct:.1f}%)")
        lines.append(f"| {PART_TITLES[p]} | " + " | ".join(cells) + " |")
    lines.append("| **step (wall)** | " + " | ".join(f"**{recs[k]['step_ms']:.2f}**" for k in keys) + " |")
    lines.append("| by label / rules / unattributed | " + " | ".join(
        "{label:.1f} / {rule:.1f} / {unattributed:.1f}".format(**recs[k]["by_source"]) for k in keys) + " |")
    for k in keys:
        lines += ["", f"## {k}", "", "| part | forward ms | backward ms | total ms | largest (ms) |",
                  "|---|---:|---:|---:|---|"]
        for p in PARTS:
            q = recs[k]["parts"][p]
            if q["ms"] <= 0:
                continue
            big = "; ".join(f"{name[:48]} {ms:.2f}" for name, ms in q["top"][:3])
            lines.append(f"| {PART_TITLES[p]} | {q['forward_ms']:.2f} | {q['backward_ms']:.2f} | {q['ms']:.2f} | "
                         f"{big} |")
    return "\n".join(lines) + "\n"
