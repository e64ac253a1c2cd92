#!/usr/bin/env python3
"""Attention throughput of flash_cute against the kernels it must match, on the FlashAttention
papers' grid: batch * seqlen = 16k tokens, model dim 2048 (nheads = 2048 / headdim), head dims
64/128/256, causal off/on, seqlen 512 .. 16k, bf16 and fp16.

Implementations (columns), all fed the same (batch, seqlen, nheads, headdim) tensors:
  flash_cute   flash_cute.flash_attn_func
  torch-flash  torch SDPA, flash backend: the official FlashAttention-2 kernels vendored in torch
  cudnn        torch SDPA, cuDNN backend (a Hopper-native kernel on H100)
  flash_attn   the official flash_attn.flash_attn_func, when it imports
SDPA takes (batch, nheads, seqlen, headdim): it gets q.transpose(1, 2) views, made outside the
timed region. Its flash backend transposes them back to (batch, seqlen, nheads, headdim), the
layout the FA2 kernels read, so no input is copied. Each call's peak allocation is measured
(column alloc_x in the JSON/CSV) and a note is printed for an implementation that allocates
more than its output and log-sum-exp, i.e. one that copies its inputs.

Every row also compares flash_cute's output with torch-flash's (or the first other anchor that
ran) on that very input: maxdiff, flagged with '!' above --tol.

Examples:
  python3 benchmark/run.py --quick                      # bf16, d 64/128/256, causal off/on, 2k and 16k
  python3 benchmark/run.py --out bench-out               # the whole grid, plus JSON, CSV and plots
  python3 benchmark/run.py --hdim 128 --seqlen 4k,16k --only flash_cute,torch-flash
  python3 benchmark/run.py --dry-run --quick             # print the grid and exit (no GPU needed)

Exit status: 0; 1 when a flash_cute result exceeded --tol or flash_cute failed for a reason
other than a head dim left out of the build; 2 when the CUDA context died mid-run (the rows
measured so far are still printed and written).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PAPER_HDIMS = (64, 128, 256)
PAPER_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
PAPER_TOKENS = 16384  # batch * seqlen
PAPER_MODEL_DIM = 2048  # nheads * headdim

# --quick: about 12 shapes x 4 implementations, well under a minute on an H100. 2k and 16k are
# the two columns of the anchor table in shared/GPU.md.
QUICK_DTYPES = ("bf16",)
QUICK_SEQLENS = (2048, 16384)

IMPL_NAMES = ("flash_cute", "torch-flash", "cudnn", "flash_attn")
# The implementation flash_cute's output is compared with: the first of these that ran.
REFERENCE_ORDER = ("torch-flash", "flash_attn", "cudnn")
# Ratio columns: flash_cute's TFLOP/s divided by the anchor's.
RATIO_ANCHORS = (("torch-flash", "fc/tf"), ("flash_attn", "fc/fa"))
DEFAULT_TOL = 2e-2


@dataclass(frozen=True)
class PassSpec:
    """One timed pass. Only the forward pass exists so far; the backward pass will add
    'bwd' (flop_factor 2.5: 5 matrix products against the forward's 2) and 'fwd_bwd' (3.5),
    each with its own build function in PASS_BUILDERS."""

    name: str
    flop_factor: float  # FLOPs relative to the forward pass
    grad_enabled: bool  # autograd on while the pass runs
    # A call that allocates more than this many times q's bytes gets a note: it copies inputs or
    # uses a large workspace. The forward allocates its output (1x) and log-sum-exp (a few %).
    alloc_limit: float


PASSES = {"fwd": PassSpec("fwd", 1.0, grad_enabled=False, alloc_limit=1.5)}


@dataclass(frozen=True)
class Case:
    """One shape of one pass: a line of the table."""

    pass_name: str
    dtype: str
    hdim: int
    causal: bool
    seqlen: int
    batch: int
    nheads: int

    @property
    def flops(self) -> float:
        fwd = 4.0 * self.batch * self.nheads * self.seqlen * self.seqlen * self.hdim
        if self.causal:
            fwd /= 2
        return fwd * PASSES[self.pass_name].flop_factor

    @property
    def tensor_bytes(self) -> int:
        """Bytes of one of q, k, v."""
        return self.batch * self.seqlen * self.nheads * self.hdim * DTYPES[self.dtype].itemsize

    @property
    def group(self) -> tuple:
        """The summary groups rows by everything but the sequence length."""
        return (self.pass_name, self.dtype, self.hdim, self.causal)


def build_grid(passes, dtypes, hdims, causals, seqlens, tokens: int, model_dim: int) -> list[Case]:
    return [
        Case(p, dt, d, c, s, batch=max(1, tokens // s), nheads=max(1, model_dim // d))
        for p in passes
        for dt in dtypes
        for d in hdims
        for c in causals
        for s in seqlens
    ]


# ----------------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------------

Runner = Callable[[], tuple]  # a zero-argument call that launches the work, returns its outputs
FwdFactory = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], Callable[[], torch.Tensor]]


@dataclass
class Impl:
    """One column. `fwd(q, k, v, causal)` is called outside the timed region and returns the
    zero-argument call that is timed; that call returns the output as (batch, seqlen, nheads, d)."""

    name: str
    fwd: Optional[FwdFactory] = None
    sdpa_backend: object = None  # torch.nn.attention.SDPBackend for the SDPA columns
    unavailable: Optional[str] = None  # why it cannot run at all
    version: Optional[str] = None

    def context(self):
        """Entered around the warm-up, check and timing of every call (not inside the timed
        call, so that its cost stays out of the timing)."""
        if self.sdpa_backend is None:
            return contextlib.nullcontext()
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel(self.sdpa_backend)


def _sdpa_fwd(q, k, v, causal):
    # (batch, seqlen, nheads, d) -> (batch, nheads, seqlen, d) views: the strides change, the
    # memory does not. The output comes back as a (batch, nheads, seqlen, d) view of a
    # (batch, seqlen, nheads, d) buffer (flash backend; cuDNN allocates its output in q's
    # layout); transposing it back is again a view.
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    return lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)


def _flash_attn_api_fwd(module) -> FwdFactory:
    def factory(q, k, v, causal):
        return lambda: module.flash_attn_func(q, k, v, causal=causal)

    return factory


def load_flash_cute() -> Impl:
    try:
        import flash_cute
    except Exception as e:  # noqa: BLE001 - any import failure leaves the column empty
        return Impl("flash_cute", unavailable=f"import flash_cute failed: {short_error(e)}")
    impl = Impl("flash_cute", fwd=_flash_attn_api_fwd(flash_cute), version=flash_cute.__version__)
    try:
        flash_cute.build_info()
    except Exception as e:  # noqa: BLE001
        impl.unavailable = f"the compiled extension is missing: {short_error(e)}"
    return impl


def load_flash_attn() -> Impl:
    try:
        import flash_attn
    except Exception as e:  # noqa: BLE001 - not installed, or built against another torch
        return Impl("flash_attn", unavailable=f"not importable ({short_error(e)})")
    return Impl("flash_attn", fwd=_flash_attn_api_fwd(flash_attn), version=getattr(flash_attn, "__version__", "?"))


def load_sdpa(name: str, backend_name: str) -> Impl:
    try:
        from torch.nn.attention import SDPBackend
    except ImportError as e:
        return Impl(name, unavailable=f"torch.nn.attention is missing ({e})")
    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        return Impl(name, unavailable=f"this torch has no SDPBackend.{backend_name}")
    return Impl(name, fwd=_sdpa_fwd, sdpa_backend=backend, version=torch.__version__)


def load_impls(names) -> list[Impl]:
    loaders = {
        "flash_cute": load_flash_cute,
        "torch-flash": lambda: load_sdpa("torch-flash", "FLASH_ATTENTION"),
        "cudnn": lambda: load_sdpa("cudnn", "CUDNN_ATTENTION"),
        "flash_attn": load_flash_attn,
    }
    return [loaders[n]() for n in IMPL_NAMES if n in names]


# ----------------------------------------------------------------------------------------------
# Passes: what is timed, and what the correctness check compares
# ----------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def make_inputs(case: Case, seed: int) -> Inputs:
    """Random normal q, k, v (never zeros), (batch, seqlen, nheads, d), contiguous."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (case.batch, case.seqlen, case.nheads, case.hdim)
    q, k, v = (torch.randn(shape, dtype=DTYPES[case.dtype], device="cuda", generator=gen) for _ in range(3))
    return Inputs(q, k, v)


def build_fwd(impl: Impl, x: Inputs, causal: bool) -> Runner:
    call = impl.fwd(x.q, x.k, x.v, causal)
    return lambda: (call(),)


# Each pass: impl, inputs, causal -> the timed call, which returns the tensors to compare.
# The backward pass will add e.g. 'bwd': run the forward with requires_grad inputs once outside
# the timed region, time torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), and return
# (dq, dk, dv).
PASS_BUILDERS: dict[str, Callable[[Impl, Inputs, bool], Runner]] = {"fwd": build_fwd}


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def time_with_triton(run: Runner, warmup_ms: float, rep_ms: float) -> float:
    import triton.testing

    return float(triton.testing.do_bench(run, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def time_with_events(run: Runner, warmup_ms: float, rep_ms: float) -> float:
    """Median of CUDA-event timings of single calls, after warm-up (the same scheme as triton's
    do_bench, without its L2 flush: the inputs are larger than L2 anyway)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        run()
    end.record()
    end.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        run()
    n = min(1000, max(10, int(rep_ms / estimate_ms)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in events:
        s.record()
        run()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def choose_timer(kind: str, warmup_ms: float, rep_ms: float):
    """Returns (description, timer(run) -> median milliseconds)."""
    if kind in ("auto", "triton"):
        try:
            time_with_triton(lambda: torch.ones(1024, device="cuda").add_(1), 1, 5)  # probe
            return ("triton.testing.do_bench, median", lambda run: time_with_triton(run, warmup_ms, rep_ms))
        except Exception as e:  # noqa: BLE001
            if kind == "triton":
                raise SystemExit(f"--timer triton: triton.testing.do_bench does not work here: {short_error(e)}")
            reason = short_error(e)
        return (
            f"CUDA events, median (triton unusable: {reason})",
            lambda run: time_with_events(run, warmup_ms, rep_ms),
        )
    return ("CUDA events, median", lambda run: time_with_events(run, warmup_ms, rep_ms))


def call_with_peak_memory(run: Runner, ref_bytes: int):
    """One call; returns its outputs and the peak memory it allocated, in multiples of ref_bytes."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    outs = run()
    torch.cuda.synchronize()
    return outs, (torch.cuda.max_memory_allocated() - before) / ref_bytes


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    impl: str
    ms: Optional[float] = None
    tflops: Optional[float] = None
    alloc_x: Optional[float] = None  # peak bytes allocated by one call / bytes of q
    error: Optional[str] = None  # why there is no number
    skipped: bool = False  # an expected gap: a head dim left out of a flash_cute development build


@dataclass
class Row:
    case: Case
    results: dict = field(default_factory=dict)  # impl name -> Measurement
    max_diff: Optional[float] = None  # max |flash_cute - ref| over the compared outputs
    ref: Optional[str] = None

    def tflops(self, impl: str) -> Optional[float]:
        m = self.results.get(impl)
        return m.tflops if m is not None else None

    def ratio(self, impl: str, anchor: str) -> Optional[float]:
        a, b = self.tflops(impl), self.tflops(anchor)
        return a / b if a is not None and b else None

    def flagged(self, tol: float) -> bool:
        """Fails the correctness check (NaN included)."""
        return self.max_diff is not None and not self.max_diff <= tol

    def to_dict(self) -> dict:
        case = dataclasses.asdict(self.case)
        return {
            "pass": case.pop("pass_name"),
            **case,
            "flops": self.case.flops,
            "max_diff": self.max_diff,
            "ref": self.ref,
            "results": {name: dataclasses.asdict(m) for name, m in self.results.items()},
        }


class FatalCudaError(RuntimeError):
    """The CUDA context is unusable (e.g. after an illegal memory access): nothing more can run."""


def first_line(text, limit: int = 200) -> str:
    lines = str(text).strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def short_error(e: BaseException, limit: int = 240) -> str:
    first = first_line(e, limit)
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def warning_text(w) -> str:
    """A caught warning's first line, without torch's '(Triggered internally at ...)'."""
    return re.sub(r"\s*\(Triggered internally at .*$", "", first_line(w.message, 1000))[:200]


def refusal_reasons(caught) -> list[str]:
    """SDPA's "No available kernel" error comes after warnings that say why each backend was not
    used: 'X kernel not used because:' headers, 'X has been runtime disabled' for the backends
    turned off by sdpa_kernel, and the real reasons. Returns the real reasons."""
    reasons = []
    for w in caught:
        text = warning_text(w)
        if text and not text.endswith("because:") and "disabled" not in text and text not in reasons:
            reasons.append(text)
    return reasons


def cuda_is_alive() -> bool:
    try:
        torch.cuda.synchronize()
        return True
    except Exception:  # noqa: BLE001
        return False


def max_abs_diff(outs, refs) -> float:
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(outs, refs))


def is_not_built(e: BaseException) -> bool:
    """flash_cute raises this for a head dim or dtype left out of a development build."""
    return "FLASH_CUTE_HEAD_DIMS" in str(e)


def build_options(message: str) -> str:
    """'FLASH_CUTE_HEAD_DIMS=64,128, FLASH_CUTE_DTYPES=...' out of flash_cute's message."""
    found = re.findall(r"FLASH_CUTE_[A-Z_]+=[^\s;]+", message)
    return ", ".join(dict.fromkeys(found)) or "see FLASH_CUTE_HEAD_DIMS"


class Bench:
    def __init__(self, impls: list[Impl], timer, seed: int, log: Callable[[str], None]):
        self.impls = impls
        self.timer = timer
        self.seed = seed
        self.log = log
        self._noted: set = set()

    def note(self, msg: str, key=None) -> None:
        """Prints a message the first time it (or its key) comes up."""
        key = msg if key is None else key
        if key not in self._noted:
            self._noted.add(key)
            self.log(f"# {msg}")

    def run_case(self, case: Case) -> Row:
        row = Row(case)
        x = make_inputs(case, self.seed)
        outputs = {}
        for impl in self.impls:
            row.results[impl.name], outs = self.measure(impl, case, x)
            if outs is not None:
                outputs[impl.name] = outs
        row.ref = next((r for r in REFERENCE_ORDER if r in outputs), None)
        if "flash_cute" in outputs and row.ref is not None:
            try:
                row.max_diff = max_abs_diff(outputs["flash_cute"], outputs[row.ref])
            except Exception as e:  # noqa: BLE001 - e.g. out of memory for the float copies
                self.note(f"check failed at {describe_case(case)}: {short_error(e)}")
                row.ref = None
        return row

    def measure(self, impl: Impl, case: Case, x: Inputs):
        """Warm-up call, one call whose output is kept for the check, then the timing."""
        m = Measurement(impl.name)
        if impl.unavailable:  # flash_cute without its extension (a failure): the anchors still run
            m.error = impl.unavailable
            self.note(f"{impl.name}: cannot run: {impl.unavailable}")
            return m, None
        spec = PASSES[case.pass_name]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with impl.context(), torch.set_grad_enabled(spec.grad_enabled):
                    run = PASS_BUILDERS[case.pass_name](impl, x, case.causal)
                    run()  # first call: lazy loading, cuDNN plan building
                    outs, m.alloc_x = call_with_peak_memory(run, case.tensor_bytes)
                    m.ms = self.timer(run)
            except Exception as e:  # noqa: BLE001 - a failing column must not stop the others
                self.record_failure(impl, case, m, e, caught)
                return m, None
        m.tflops = case.flops / (m.ms * 1e-3) / 1e12 if m.ms > 0 else None
        for w in caught:
            self.note(f"{impl.name}: warning: {warning_text(w)}")
        if m.alloc_x is not None and m.alloc_x > spec.alloc_limit:
            self.note(
                f"{impl.name}: one call allocates {m.alloc_x:.2f}x the bytes of q (its output is 1x): "
                "it copies inputs or uses a large workspace"
            )
        return m, outs

    def record_failure(self, impl: Impl, case: Case, m: Measurement, e: Exception, caught) -> None:
        m.ms = m.alloc_x = None
        if isinstance(e, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        if not cuda_is_alive():
            raise FatalCudaError(f"{impl.name} at {describe_case(case)}: {short_error(e)}") from e
        m.error = short_error(e)
        reasons = refusal_reasons(caught)
        if reasons:
            m.error += f" ({'; '.join(reasons[:2])})"
        m.skipped = impl.name == "flash_cute" and is_not_built(e)
        if m.skipped:  # once per dtype and head dim
            self.note(f"{impl.name}: no kernel for {case.dtype} d{case.hdim} in this build "
                      f"({build_options(str(e))}): its rows print '-'", key=(impl.name, case.dtype, case.hdim))
        else:  # once per distinct error; the first shape it happened at
            self.note(f"{impl.name}: failed at {describe_case(case)}: {m.error}", key=(impl.name, m.error))


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------


def fmt_seqlen(s: int) -> str:
    return f"{s // 1024}k" if s >= 1024 and s % 1024 == 0 else str(s)


def fmt_num(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def fmt_diff(row: Row, tol: float) -> str:
    if row.max_diff is None:
        return "-"
    return f"{row.max_diff:.1e}" + (" !" if row.flagged(tol) else "")


def describe_case(c: Case) -> str:
    return (f"{c.pass_name} {c.dtype} d{c.hdim} {'causal' if c.causal else 'non-causal'} "
            f"seqlen {fmt_seqlen(c.seqlen)} (batch {c.batch}, heads {c.nheads})")


def has_check(impl_names: list[str]) -> bool:
    """Whether flash_cute and something to compare it with are both in the run."""
    return "flash_cute" in impl_names and any(r in impl_names for r in REFERENCE_ORDER)


def ratio_columns(impl_names: list[str]) -> list[tuple[str, str]]:
    if "flash_cute" not in impl_names:
        return []
    return [(anchor, label) for anchor, label in RATIO_ANCHORS if anchor in impl_names]


class Table:
    """Fixed-width columns, so that rows can be printed as soon as they are measured."""

    def __init__(self, columns: list[tuple[str, int, str]]):
        self.columns = columns  # (title, width, '<' or '>')

    def line(self, cells) -> str:
        return "  ".join(format(str(c), f"{a}{w}") for c, (_, w, a) in zip(cells, self.columns)).rstrip()

    def header(self) -> str:
        head = self.line([t for t, _, _ in self.columns])
        return head + "\n" + "-" * len(head)


CASE_COLUMNS = [("pass", 4, "<"), ("dtype", 5, "<"), ("d", 3, ">"), ("causal", 6, "<")]


def impl_width(name: str) -> int:
    return max(len(name), 7)


def row_table(impl_names: list[str]) -> Table:
    cols = CASE_COLUMNS + [("seqlen", 6, ">"), ("batch", 5, ">"), ("heads", 5, ">")]
    cols += [(n, impl_width(n), ">") for n in impl_names]
    cols += [(label, 6, ">") for _, label in ratio_columns(impl_names)]
    cols += [("maxdiff", 9, "<")] if has_check(impl_names) else []
    return Table(cols)


def case_cells(c: Case) -> list:
    return [c.pass_name, c.dtype, c.hdim, "yes" if c.causal else "no"]


def format_row(table: Table, row: Row, impl_names: list[str], tol: float) -> str:
    c = row.case
    cells = case_cells(c) + [fmt_seqlen(c.seqlen), c.batch, c.nheads]
    cells += [fmt_num(row.tflops(n), ".1f") for n in impl_names]
    cells += [fmt_num(row.ratio("flash_cute", anchor), ".3f") for anchor, _ in ratio_columns(impl_names)]
    cells += [fmt_diff(row, tol)] if has_check(impl_names) else []
    return table.line(cells)


def worst_diff(rows: list[Row]) -> Optional[Row]:
    """The row with the largest difference, NaN first."""
    checked = [r for r in rows if r.max_diff is not None]
    return max(checked, key=lambda r: (math.isnan(r.max_diff), r.max_diff)) if checked else None


def geomean(xs: list[float]) -> Optional[float]:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summary_lines(rows: list[Row], impl_names: list[str], tol: float) -> list[str]:
    """One line per (pass, dtype, d, causal): TFLOP/s at the longest seqlen measured, the ratios'
    geometric mean over all seqlens, the largest difference; then the overall figures."""
    ratios = ratio_columns(impl_names)
    cols = CASE_COLUMNS + [("seqlen", 6, ">")] + [(n, impl_width(n), ">") for n in impl_names]
    for _, label in ratios:
        cols += [(label, 6, ">"), ("min..max", 11, "<")]
    cols += [("maxdiff", 9, "<")] if has_check(impl_names) else []
    table = Table(cols)
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.case.group, []).append(r)

    out = [
        "SUMMARY  TFLOP/s at the longest seqlen of each group; ratios: flash_cute / anchor, "
        "geometric mean over the group's seqlens",
        table.header(),
    ]
    for group_rows in groups.values():
        last = max(group_rows, key=lambda r: r.case.seqlen)
        cells = case_cells(last.case) + [fmt_seqlen(last.case.seqlen)]
        cells += [fmt_num(last.tflops(n), ".1f") for n in impl_names]
        for anchor, _ in ratios:
            rs = [x for x in (r.ratio("flash_cute", anchor) for r in group_rows) if x is not None]
            cells += [fmt_num(geomean(rs), ".3f"), f"{min(rs):.2f}..{max(rs):.2f}" if rs else "-"]
        if has_check(impl_names):
            worst = worst_diff(group_rows)
            cells += [fmt_diff(worst, tol) if worst else "-"]
        out.append(table.line(cells))
    out.append("")
    out += overall_lines(rows, impl_names, tol)
    return out


def overall_lines(rows: list[Row], impl_names: list[str], tol: float) -> list[str]:
    out = []
    for anchor, label in ratio_columns(impl_names):
        pairs = [(r.ratio("flash_cute", anchor), r) for r in rows]
        pairs = [(x, r) for x, r in pairs if x is not None]
        if not pairs:
            out.append(f"flash_cute / {anchor}: no shape where both ran")
            continue
        lo, hi = min(pairs, key=lambda p: p[0]), max(pairs, key=lambda p: p[0])
        out.append(
            f"flash_cute / {anchor}: geomean {geomean([x for x, _ in pairs]):.3f} over {len(pairs)} shapes; "
            f"min {lo[0]:.3f} ({describe_case(lo[1].case)}), max {hi[0]:.3f} ({describe_case(hi[1].case)})"
        )
    checked = [r for r in rows if r.max_diff is not None]
    if checked:
        flagged = [r for r in checked if r.flagged(tol)]
        worst = worst_diff(checked)
        refs = " / ".join(sorted({r.ref for r in checked}))
        out.append(
            f"correctness: max |flash_cute - {refs}| = {worst.max_diff:.2e} over {len(checked)} shapes; "
            + (f"{len(flagged)} above {tol:g} (marked '!')" if flagged else f"none above {tol:g}")
        )
    elif has_check(impl_names):
        out.append("correctness: nothing compared (flash_cute or every anchor failed)")
    for name in impl_names:
        missing = [r for r in rows if r.tflops(name) is None]
        if missing:
            failed = sum(1 for r in missing if not r.results[name].skipped)
            out.append(f"{name}: no number for {len(missing)} of {len(rows)} shapes"
                       + (f" ({failed} failed)" if failed else " (skipped)"))
    return out


# ----------------------------------------------------------------------------------------------
# Environment and output files
# ----------------------------------------------------------------------------------------------


def command_line() -> str:
    prefix = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} " if os.environ.get("PYTHONPATH") else ""
    return prefix + "python3 " + shlex.join(sys.argv)


def run_quietly(cmd: list[str]) -> Optional[str]:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True)
        return res.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def environment(impls: list[Impl], timer_desc: Optional[str]) -> dict:
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command_line(),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "git": run_quietly(["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always", "--dirty"]),
        "timer": timer_desc,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = props.name
        env["gpu_sms"] = props.multi_processor_count
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        smi = run_quietly(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        env["driver"] = smi.splitlines()[0] if smi else None
        env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        env["triton"] = None
    env.update(flash_cute_info())
    for impl in impls:
        if impl.name == "flash_attn":
            env["flash_attn"] = impl.version or "-"
    return env


def flash_cute_info() -> dict:
    try:
        import flash_cute
    except Exception as e:  # noqa: BLE001
        return {"flash_cute": f"not importable: {short_error(e)}"}
    info = {"flash_cute": flash_cute.__version__, "flash_cute_path": str(Path(flash_cute.__file__).parent)}
    try:
        info["flash_cute_build"] = flash_cute.build_info()
    except Exception as e:  # noqa: BLE001
        info["flash_cute_build"] = f"unavailable: {short_error(e)}"
    return info


def header_lines(env: dict) -> list[str]:
    build = env.get("flash_cute_build")
    if isinstance(build, dict):
        kernels = build.get("fwd_kernels", [])
        shown = {k: v for k, v in build.items() if k != "fwd_kernels"}
        build = ", ".join(f"{k}={v}" for k, v in shown.items()) + f", {len(kernels)} forward kernels"
    gpu = env.get("gpu")
    gpu_line = (f"{gpu}, {env['gpu_sms']} SMs, sm_{env['gpu_capability'].replace('.', '')}, "
                f"{env['gpu_memory_gib']} GiB" if gpu else "none visible")
    return [
        f"# date:       {env['date']}",
        f"# command:    {env['command']}",
        f"# GPU:        {gpu_line}",
        f"# driver:     {env.get('driver')}   CUDA (torch): {env['torch_cuda']}   cuDNN: {env.get('cudnn')}",
        f"# torch:      {env['torch']}   triton: {env['triton']}   python: {env['python']}",
        f"# flash_cute: {env['flash_cute']} ({env.get('flash_cute_path', '?')})   git: {env['git']}",
        f"# build:      {build}",
        f"# flash_attn: {env.get('flash_attn', 'not selected')}",
        f"# timer:      {env['timer']}",
    ]


def write_json(path: Path, env: dict, rows: list[Row], args) -> None:
    doc = {"environment": env, "options": vars(args), "rows": [r.to_dict() for r in rows]}
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


CSV_FIELDS = ["pass", "dtype", "hdim", "causal", "seqlen", "batch", "nheads", "flops",
              "impl", "ms", "tflops", "alloc_x", "skipped", "error", "max_diff_vs_ref", "ref"]


def write_csv(path: Path, rows: list[Row]) -> None:
    """Long format: one line per (shape, implementation)."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in rows:
            c = r.case
            for name, m in r.results.items():
                diff = r.max_diff if name == "flash_cute" else None
                w.writerow([c.pass_name, c.dtype, c.hdim, int(c.causal), c.seqlen, c.batch, c.nheads,
                            f"{c.flops:.6g}", name, m.ms, m.tflops, m.alloc_x, int(m.skipped), m.error,
                            diff, r.ref if diff is not None else None])


IMPL_COLORS = {"flash_cute": "#d62728", "torch-flash": "#1f77b4", "cudnn": "#2ca02c", "flash_attn": "#ff7f0e"}


def write_plots(out_dir: Path, rows: list[Row], impl_names: list[str], gpu: Optional[str]) -> list[Path]:
    """One PNG per (pass, dtype), in the FlashAttention papers' style: a panel per
    (head dim x causal), bars grouped by seqlen, one bar per implementation, TFLOP/s on y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for pass_name, dtype in sorted({(r.case.pass_name, r.case.dtype) for r in rows}):
        sub = [r for r in rows if (r.case.pass_name, r.case.dtype) == (pass_name, dtype)]
        hdims = sorted({r.case.hdim for r in sub})
        causals = sorted({r.case.causal for r in sub})
        fig, axes = plt.subplots(len(causals), len(hdims), figsize=(4.6 * len(hdims), 3.4 * len(causals)),
                                 squeeze=False)
        for i, causal in enumerate(causals):
            for j, hdim in enumerate(hdims):
                panel = sorted((r for r in sub if r.case.hdim == hdim and r.case.causal == causal),
                               key=lambda r: r.case.seqlen)
                draw_panel(axes[i][j], panel, impl_names)
                axes[i][j].set_title(f"head dim {hdim}, {'causal' if causal else 'non-causal'}", fontsize=9)
                if j == 0:
                    axes[i][j].set_ylabel("TFLOP/s", fontsize=8)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, 0.995))
        fig.suptitle(f"Attention {pass_name}, {dtype}" + (f", {gpu}" if gpu else ""), fontsize=10, y=1.03)
        fig.tight_layout(rect=(0, 0, 1, 0.95))  # the top strip holds the legend
        path = out_dir / f"{pass_name}_{dtype}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def draw_panel(ax, panel: list[Row], impl_names: list[str]) -> None:
    width = 0.8 / len(impl_names)
    for k, name in enumerate(impl_names):
        xs = [i + (k - (len(impl_names) - 1) / 2) * width for i in range(len(panel))]
        ys = [r.tflops(name) for r in panel]
        bars = ax.bar(xs, [y or 0 for y in ys], width, label=name, color=IMPL_COLORS.get(name))
        for bar, y in zip(bars, ys):
            if y is not None:
                ax.annotate(f"{y:.0f}", (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom",
                            fontsize=5.5, rotation=90, xytext=(0, 1), textcoords="offset points")
    ax.set_xticks(range(len(panel)))
    ax.set_xticklabels([fmt_seqlen(r.case.seqlen) for r in panel], fontsize=8)
    ax.set_xlabel("sequence length", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)  # room for the labels
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_list(text: str, convert, what: str) -> list:
    try:
        values = [convert(t.strip()) for t in text.split(",") if t.strip()]
    except (ValueError, KeyError) as e:
        raise argparse.ArgumentTypeError(f"bad {what} list {text!r}: {e}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"empty {what} list")
    return list(dict.fromkeys(values))  # keep order, drop repeats


def parse_seqlen(t: str) -> int:
    t = t.lower()
    n = int(t[:-1]) * 1024 if t.endswith("k") else int(t)
    if n <= 0:
        raise ValueError(f"seqlen must be positive, got {t}")
    return n


def parse_bool(t: str) -> bool:
    table = {"1": True, "yes": True, "on": True, "true": True,
             "0": False, "no": False, "off": False, "false": False}
    if t.lower() not in table:
        raise ValueError(f"{t!r} is not one of off, on (or no/yes, 0/1, false/true)")
    return table[t.lower()]


def parse_choice(choices):
    def convert(t: str):
        if t not in choices:
            raise ValueError(f"{t!r} is not one of {', '.join(choices)}")
        return t

    return convert


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    grid = p.add_argument_group("grid (each option replaces that axis of the full or --quick grid)")
    grid.add_argument("--quick", action="store_true",
                      help="bf16, head dims 64/128/256, causal off/on, seqlen 2k and 16k (< 1 min on an H100)")
    grid.add_argument("--pass", dest="passes", metavar="PASS", default=["fwd"],
                      type=lambda t: parse_list(t, parse_choice(tuple(PASSES)), "pass"),
                      help=f"comma list of passes to time: {', '.join(PASSES)} (default fwd)")
    grid.add_argument("--dtype", type=lambda t: parse_list(t, parse_choice(tuple(DTYPES)), "dtype"),
                      help="comma list of bf16, fp16 (default both; bf16 with --quick)")
    grid.add_argument("--hdim", type=lambda t: parse_list(t, int, "head dim"),
                      help="comma list of head dims (default 64,128,256)")
    grid.add_argument("--seqlen", type=lambda t: parse_list(t, parse_seqlen, "seqlen"),
                      help="comma list of sequence lengths, 'k' = 1024 (default 512,1k,2k,4k,8k,16k; 2k,16k with --quick)")
    grid.add_argument("--causal", type=lambda t: parse_list(t, parse_bool, "causal"),
                      help="comma list of off/on (also no/yes, 0/1; default off,on)")
    grid.add_argument("--tokens", type=int, default=PAPER_TOKENS,
                      help=f"batch * seqlen; batch = max(1, tokens // seqlen) (default {PAPER_TOKENS})")
    grid.add_argument("--model-dim", type=int, default=PAPER_MODEL_DIM,
                      help=f"nheads * head dim; nheads = model-dim // head dim (default {PAPER_MODEL_DIM})")
    p.add_argument("--only", metavar="IMPL,...", default=list(IMPL_NAMES),
                   type=lambda t: parse_list(t, parse_choice(IMPL_NAMES), "implementation"),
                   help=f"implementations to run, from {', '.join(IMPL_NAMES)} (default all)")
    p.add_argument("--timer", choices=("auto", "triton", "events"), default="auto",
                   help="triton.testing.do_bench (median) or CUDA events (median); auto: triton when it works")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up time per measurement (default 25)")
    p.add_argument("--rep-ms", type=float, default=200.0, help="timed repetition time per measurement (default 200)")
    p.add_argument("--tol", type=float, default=DEFAULT_TOL,
                   help=f"max |flash_cute - anchor| before a row is flagged '!' (default {DEFAULT_TOL:g})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="also write DIR/results.json, DIR/results.csv, DIR/log.txt and DIR/<pass>_<dtype>.png")
    p.add_argument("--no-plot", action="store_true", help="with --out: skip the PNG plots")
    p.add_argument("--dry-run", action="store_true", help="print the grid and exit (needs no GPU)")
    return p.parse_args(argv)


def grid_from_args(args) -> list[Case]:
    dtypes = args.dtype or (list(QUICK_DTYPES) if args.quick else list(DTYPES))
    hdims = sorted(args.hdim or PAPER_HDIMS)
    causals = sorted(args.causal or [False, True])
    seqlens = sorted(args.seqlen or (QUICK_SEQLENS if args.quick else PAPER_SEQLENS))
    return build_grid(args.passes, dtypes, hdims, causals, seqlens, args.tokens, args.model_dim)


def print_dry_run(cases: list[Case], args) -> None:
    table = Table(CASE_COLUMNS + [("seqlen", 6, ">"), ("batch", 5, ">"), ("heads", 5, ">"),
                                  ("GFLOP", 8, ">"), ("q MiB", 6, ">")])
    print(f"# command: {command_line()}")
    print(f"# {len(cases)} shapes; implementations: {', '.join(n for n in IMPL_NAMES if n in args.only)} "
          f"(whether each can run is found out when the benchmark runs)")
    print(table.header())
    for c in cases:
        print(table.line(case_cells(c) + [fmt_seqlen(c.seqlen), c.batch, c.nheads,
                                          f"{c.flops / 1e9:.0f}", f"{c.tensor_bytes / 2**20:.0f}"]))
    print(f"# {sum(c.flops for c in cases) / 1e12:.1f} TFLOP per implementation over all shapes")


class Log:
    """Prints, and with --out appends each line to DIR/log.txt as it goes."""

    def __init__(self, path: Optional[Path]):
        self.file = path.open("w") if path else None

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def validate(cases: list[Case]) -> None:
    for c in cases:
        if not 1 <= c.hdim <= 256:
            raise SystemExit(f"head dim {c.hdim}: every implementation here takes 1 .. 256")
    if not cases:
        raise SystemExit("the grid is empty")


def main(argv=None) -> int:
    args = parse_args(argv)
    cases = grid_from_args(args)
    validate(cases)
    if args.dry_run:
        print_dry_run(cases, args)
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: only --help and --dry-run work here")

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "log.txt" if args.out else None)
    loaded = load_impls(args.only)
    timer_desc, timer = choose_timer(args.timer, args.warmup_ms, args.rep_ms)
    env = environment(loaded, timer_desc)
    for line in header_lines(env):
        log(line)
    # An anchor that cannot run at all (flash_attn not installed) loses its column; flash_cute
    # keeps its column either way, so that a missing extension shows.
    impls = [i for i in loaded if i.name == "flash_cute" or not i.unavailable]
    for i in loaded:
        if i not in impls:
            log(f"# {i.name}: column left out ({i.unavailable})")
    impl_names = [i.name for i in impls]
    log(f"# {len(cases)} shapes; batch = {args.tokens} // seqlen, nheads = {args.model_dim} // d; "
        f"TFLOP/s from 4*b*h*s*s*d per forward (halved when causal)")
    log(f"# maxdiff = max |flash_cute - reference| on the same input ('!' above {args.tol:g}); "
        f"reference: the first of {', '.join(REFERENCE_ORDER)} that ran")
    log()

    bench = Bench(impls, timer, args.seed, log)
    table = row_table(impl_names)
    rows: list[Row] = []
    status = 0
    log(table.header())
    try:
        for case in cases:
            if rows and rows[-1].case.group != case.group:
                log()
            rows.append(bench.run_case(case))
            log(format_row(table, rows[-1], impl_names, args.tol))
    except FatalCudaError as e:
        log(f"# FATAL: the CUDA context died ({e}); stopping after {len(rows)} shapes")
        status = 2
    except KeyboardInterrupt:
        log(f"# interrupted after {len(rows)} shapes")
        status = 130
    finally:
        if args.out:
            write_outputs(args, env, rows, impl_names, log)
        if rows:
            log()
            for line in summary_lines(rows, impl_names, args.tol):
                log(line)
        log.close()
    if status == 0 and flash_cute_failed(rows, args.tol):
        status = 1
    return status


def flash_cute_failed(rows: list[Row], tol: float) -> bool:
    for r in rows:
        m = r.results.get("flash_cute")
        if r.flagged(tol) or (m is not None and m.error and not m.skipped):
            return True
    return False


def write_outputs(args, env: dict, rows: list[Row], impl_names: list[str], log: Log) -> None:
    write_json(args.out / "results.json", env, rows, args)
    write_csv(args.out / "results.csv", rows)
    written = ["results.json", "results.csv", "log.txt"]
    if rows and not args.no_plot:
        try:
            written += [p.name for p in write_plots(args.out, rows, impl_names, env.get("gpu"))]
        except Exception as e:  # noqa: BLE001 - no matplotlib, say so and keep the rest
            log(f"# plots skipped: {short_error(e)}")
    log(f"# wrote {', '.join(written)} to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
