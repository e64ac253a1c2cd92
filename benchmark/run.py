#!/usr/bin/env python3
"""Attention throughput of flash_cute against the kernels it must match, on the FlashAttention
papers' grid: batch * seqlen = 16k tokens, model dim 2048 (nheads = 2048 / headdim), head dims
64/128/256, causal off/on, seqlen 512 .. 16k, bf16 and fp16; forward, backward and both.

Passes (--pass); FLOPs as in the papers: 4*b*h*s*s*d per forward (halved when causal), times
  fwd     1    the forward call
  bwd     2.5  the backward pass alone (5 matrix products against the forward's 2): the forward
               runs once, outside the timed region, on q, k, v that require grad; the timed call
               is torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
  fwdbwd  3.5  the forward and torch.autograd.grad in one timed call
Every implementation is timed the same way, with the same random dout.

Implementations (columns), all fed the same (batch, seqlen, nheads, headdim) tensors:
  flash_cute   flash_cute.flash_attn_func
  torch-flash  torch SDPA, flash backend: the official FlashAttention-2 kernels vendored in torch
  cudnn        torch SDPA, cuDNN backend (a Hopper-native kernel on H100)
  torch-mem    torch SDPA, memory-efficient backend (xFormers' CUTLASS kernels)
  flash_attn   the official flash_attn.flash_attn_func, when it imports
SDPA takes (batch, nheads, seqlen, headdim): it gets q.transpose(1, 2) views, made outside the
timed region. Its flash backend transposes them back to (batch, seqlen, nheads, headdim), the
layout the FA2 kernels read, so no input is copied; gradients flow back through the same
views. With fewer KV heads than query heads SDPA gets enable_gqa=True (a backend may refuse
it: its cells then print '-'). Each call's peak allocation is measured
(column alloc_x in the JSON/CSV) and a note is printed for an implementation that allocates
more than its results need (forward: output and log-sum-exp; backward: dq, dk, dv and a
float32 dQ accumulator), i.e. one that copies its inputs or uses a large workspace.

Every row also compares flash_cute's result with torch-flash's (or the first other anchor that
ran) on that very input: maxdiff, flagged with '!' above --tol. For fwd it is max |out - ref|;
for bwd (dq, dk, dv) and fwdbwd (out, dq, dk, dv) each tensor's max |x - ref| is divided by
max(1, max |ref|), since gradients grow with the attention's concentration (a key seen by one
query gets that query's whole dO) and one rounding step of a value near 4 is already 0.03 in bf16.

Three more sections follow the grid (their numbers also go to results.json):
  GQA backward  flash_cute's backward with each way of reducing dK/dV over the query heads of a
                KV head (--gqa-bwd in_kernel,expand: summed in the kernel, or nheads-sized
                buffers summed afterwards, the official package's way) beside the anchors, at
                --gqa-shape (default batch 4, seqlen 4k, 32 query heads over 8 KV heads, d 128),
                causal off and on. Runs by default when the grid has the bwd pass, except with
                --quick.
  memory        the peak memory of one forward + backward (torch.cuda.max_memory_allocated
                above what was allocated before; q, k, v and dout not counted) of each
                implementation, at the grid's d128 seqlen-4k shape and at the GQA shape (there
                with both flash_cute reductions). Runs when the grid has bwd or fwdbwd, --quick
                included (--no-memory skips it).
  varlen        flash_attn_varlen_func: 64 sequences of lengths drawn uniformly from 128 .. 4096
                (a fixed seed), packed as q, k, v of shape (total, 16 heads, d), cu_seqlens int32
                on the GPU; d 128 (or --hdim), the grid's dtypes, causal values and passes (same
                timing as the grid). TFLOP/s count the real lengths: 4*h*d per visible (query,
                key) pair, len*(len+1)/2 pairs per causal sequence. Columns: flash_cute, torch-flash
                (torch.ops.aten._flash_attention_forward/_backward with cum_seq: the FA2 varlen
                kernels vendored in torch) and flash_attn (official varlen); cuDNN has no varlen
                entry point here. Every implementation's result is compared with an fp32 oracle
                (per-sequence softmax(q k^T / sqrt(d)) v, autograd for the gradients), and
                flash_cute's error must stay within 2x the anchor's (flash_attn, else
                torch-flash) + 1e-4. Runs by default, --quick included (--no-varlen skips it;
                --varlen runs it alone).
  decode        flash_attn_with_kvcache, one query row against a KV cache: bf16, 32 query heads
                over 8 KV heads, d 128, (batch, cache length) = (1, 128k), (8, 32k), (32, 4k),
                (128, 2k); cache_seqlens = cache length - 1 and one new k/v row per call (appended
                in place, into the same slot at every repetition), no rotary. Layouts: contiguous
                (batch, cache, 8, 128) and paged with pages of 256 and 16 rows (a random
                permutation block table). Columns: flash_cute (all three layouts), torch-flash
                (SDPA flash backend on the contiguous cache's visible rows, enable_gqa; the
                attention alone, not the append) and flash_attn (contiguous, paged 256). Each
                line: time, GB/s = K/V bytes read (2 * batch * visible * 8 * 128 * 2) / time, as a
                fraction of the device's copy bandwidth (dst.copy_(src) on 1 GiB, measured once,
                2 x bytes / time), against torch-flash's, paged against the same implementation's
                contiguous, and max |out - fp32 oracle| on a few batch rows. flash_cute's lines
                check the bars: >= 85% of copy bandwidth, >= 1.0x torch-flash, paged >= 0.9x
                contiguous (ok / '!'; the exit status does not depend on them). Runs by default,
                --quick included (--no-decode skips it; --decode runs it alone).
  options       flash_attn_func's options, one variant per line: plain, causal, window (1024,
                1024), sliding (causal, window (1024, 0), Mistral's), softcap 30, alibi (ALiBi's
                geometric slopes, float32 (nheads,)), dropout 0.1, combined (causal, window
                (1024, 0), softcap 30 and alibi); bf16 d128 seqlen 4k (or --dtype, --hdim,
                --seqlen; batch and heads from --tokens, --model-dim: 4 x 16), fwd and bwd timed
                as in the grid. Columns: flash_cute's time, over its plain time (/plain) and, for
                the masked variants, per attended (query, key) pair counted from the mask (/area);
                fc/tf, fc/fa as in the grid (the anchor's time over flash_cute's). torch-flash is
                torch.ops.aten._flash_attention_forward/_backward called directly with the
                option's keywords (an option an op's schema lacks, e.g. softcap, prints '-').
                Bars per line: cost (/area when masked, else /plain) <= 1.10 (dropout 1.25), fc/tf
                and fc/fa >= 0.9 (PASS / FAIL; the exit status does not depend on them); err: max
                |flash_cute's output - fp32 oracle| on that input (dropout: the oracle applies the
                keep mask S_dmask >= 0 of a return_attn_probs=True call). Not run by default
                (--options runs it alone; with --varlen or --decode, after them).
The summary ends with one line per section.

Examples:
  python3 benchmark/run.py --quick                      # fwd and bwd, bf16, d 64/128/256, causal off/on, 2k and 16k
  python3 benchmark/run.py --out bench-out               # the whole grid (fwd, bwd, fwdbwd), JSON, CSV, plots
  python3 benchmark/run.py --hdim 128 --seqlen 4k,16k --only flash_cute,torch-flash
  python3 benchmark/run.py --pass bwd --quick --gqa-bwd in_kernel,expand
  python3 benchmark/run.py --pass fwd --no-varlen --no-decode  # the forward grid only (no extra section)
  python3 benchmark/run.py --dry-run --quick             # print the grid and exit (no GPU needed)
  python3 benchmark/run.py --varlen --dtype bf16         # the varlen section alone (d 128, causal off/on, all passes)
  python3 benchmark/run.py --decode                      # the decode section alone (flash_attn_with_kvcache)
  python3 benchmark/run.py --options                     # the options section alone (windows, softcap, ALiBi, dropout)

Exit status: 0; 1 when a flash_cute result exceeded --tol (in the varlen section: broke the 2x
rule; in the decode and options sections: max |out - fp32 oracle|) or flash_cute failed for a
reason other than a head dim left out of the build (in the grid, the varlen, decode, options or
GQA section, where each reduction is compared with the first; an option flash_cute refuses
counts);
2 when the CUDA context died mid-run (the rows measured so far are still printed and written).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import functools
import itertools
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
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

# --quick: 12 shapes per pass (fwd and bwd) x 4 implementations, about a minute on an H100. 2k
# and 16k are the two columns of the anchor table in shared/GPU.md.
QUICK_DTYPES = ("bf16",)
QUICK_SEQLENS = (2048, 16384)
QUICK_PASSES = ("fwd", "bwd")
FULL_PASSES = ("fwd", "bwd", "fwdbwd")

# The extra sections: GQA backward reductions and peak memory of forward + backward.
GQA_REDUCTIONS = ("in_kernel", "expand")  # values of flash_cute._ops.GQA_BWD_REDUCTION
DEFAULT_GQA_SHAPE = (4, 4096, 32, 8, 128)  # batch, seqlen, nheads, nheads_k, head dim
MEMORY_SEQLEN, MEMORY_HDIM = 4096, 128  # the MHA shape of the memory section (batch, heads from the grid)
# The varlen section: VARLEN_BATCH sequence lengths drawn uniformly from [min, max] by a CPU
# torch.Generator seeded VARLEN_SEED (the same lengths whatever --seed, which seeds the values).
VARLEN_BATCH, VARLEN_MIN_LEN, VARLEN_MAX_LEN, VARLEN_SEED = 64, 128, 4096, 0
VARLEN_NHEADS, VARLEN_HDIM = 16, 128  # head dim: --hdim when given
# The 2x rule of the varlen check (tests/helpers.py's): per compared tensor,
# err(flash_cute) <= 2 * err(anchor) + slack, errors against the fp32 oracle (gradients' divided
# by max(1, max |oracle|), so the slack is relative there, as GRAD_ROUNDING_TERM is).
VARLEN_RULE_SLACK = 1e-4
VARLEN_ANCHORS = ("flash_attn", "torch-flash")  # the 2x rule's anchor: the first that ran (no NaN)
# The decode section (flash_attn_with_kvcache): one query row, DECODE_HEADS query heads over
# DECODE_HEADS_K KV heads, (batch, cache length) per shape; cache_seqlens = cache length - 1 and
# one new k/v row, so every call reads the whole cache.
DECODE_SHAPES = ((1, 131072), (8, 32768), (32, 4096), (128, 2048))
DECODE_HEADS, DECODE_HEADS_K, DECODE_HDIM, DECODE_DTYPE = 32, 8, 128, "bf16"
DECODE_LAYOUTS = {"contiguous": None, "paged256": 256, "paged16": 16}  # layout -> page size (rows)
DECODE_IMPL_LAYOUTS = {"flash_cute": ("contiguous", "paged256", "paged16"), "torch-flash": ("contiguous",),
                       "flash_attn": ("contiguous", "paged256")}  # official: pages of a multiple of 256
DECODE_ORACLE_ROWS = 4  # batch rows the fp32 oracle covers (first, last, spread between)
DECODE_COPY_BYTES = 2**30  # the copy-bandwidth probe: dst.copy_(src) on this many bytes of bf16
# The issue's bars for flash_cute's rows: fraction of copy bandwidth, GB/s over torch-flash's,
# paged GB/s over the same shape's contiguous
DECODE_BAR_COPY, DECODE_BAR_TF, DECODE_BAR_PAGED = 0.85, 1.0, 0.9
# The options section: one shape (batch, heads from --tokens, --model-dim), each variant's
# flash_attn_func keywords (causal apart: Case's), fwd and bwd.
OPTIONS_DTYPE, OPTIONS_HDIM, OPTIONS_SEQLEN, OPTIONS_PASSES = "bf16", 128, 4096, ("fwd", "bwd")
OPTIONS_VARIANTS = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window": (1024, 1024)},
    "sliding": {"causal": True, "window": (1024, 0)},  # Mistral's sliding window
    "softcap": {"softcap": 30.0},
    "alibi": {"alibi": True},
    "dropout": {"dropout_p": 0.1},
    "combined": {"causal": True, "window": (1024, 0), "softcap": 30.0, "alibi": True},
}
# The issue's bars: an option's time over plain's (per attended pair when masked), dropout's;
# flash_cute's speed over the official kernels' with the same option
OPTIONS_BAR_COST, OPTIONS_BAR_DROPOUT, OPTIONS_BAR_OFFICIAL = 1.10, 1.25, 0.9

IMPL_NAMES = ("flash_cute", "torch-flash", "cudnn", "torch-mem", "flash_attn")
# The implementation flash_cute's output is compared with: the first of these that ran.
REFERENCE_ORDER = ("torch-flash", "flash_attn", "cudnn", "torch-mem")
# Ratio columns: flash_cute's TFLOP/s divided by the anchor's.
RATIO_ANCHORS = (("torch-flash", "fc/tf"), ("flash_attn", "fc/fa"))
DEFAULT_TOL = 2e-2


@dataclass(frozen=True)
class PassSpec:
    """One timed pass; its build function is PASS_BUILDERS[name]."""

    name: str
    flop_factor: float  # FLOPs relative to the forward pass
    grad_enabled: bool  # autograd on while the pass runs
    # What one call needs to allocate, in multiples of q's bytes: the forward its output (1x) and
    # log-sum-exp (a few %); the backward dq, dk, dv (3x) and a float32 dQ accumulator (2x);
    # fwdbwd both. A call that allocates over half of q's bytes more gets a note: it copies
    # inputs or uses a large workspace.
    alloc_need: float
    # The check divides each tensor's max |flash_cute - ref| by max(1, max |ref|) (gradients).
    relative_check: bool = False


PASSES = {
    "fwd": PassSpec("fwd", 1.0, grad_enabled=False, alloc_need=1.0),
    "bwd": PassSpec("bwd", 2.5, grad_enabled=True, alloc_need=5.0, relative_check=True),
    "fwdbwd": PassSpec("fwdbwd", 3.5, grad_enabled=True, alloc_need=6.0, relative_check=True),
}


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
    nheads_k: Optional[int] = None  # KV heads (GQA/MQA); None: nheads

    @property
    def kv_heads(self) -> int:
        return self.nheads if self.nheads_k is None else self.nheads_k

    @property
    def flops(self) -> float:
        fwd = 4.0 * self.batch * self.nheads * self.seqlen * self.seqlen * self.hdim
        if self.causal:
            fwd /= 2
        return fwd * PASSES[self.pass_name].flop_factor

    def shape(self, heads: int) -> tuple:
        """The shape of q (heads = nheads) or of k, v (heads = kv_heads)."""
        return (self.batch, self.seqlen, heads, self.hdim)

    @property
    def tensor_bytes(self) -> int:
        """Bytes of q."""
        return math.prod(self.shape(self.nheads)) * DTYPES[self.dtype].itemsize

    # A call's peak allocation (alloc_x) is in multiples of tensor_bytes: alloc_unit names them,
    # alloc_need is what the call's results need (more than alloc_need + 0.5 gets a note).
    alloc_unit = "the bytes of q"

    @property
    def alloc_need(self) -> float:
        return PASSES[self.pass_name].alloc_need

    @property
    def call_name(self) -> str:
        """The timed call, in notes."""
        return self.pass_name

    @property
    def group(self) -> tuple:
        """The summary groups rows by everything but the sequence length."""
        return (self.pass_name, self.dtype, self.hdim, self.causal, self.kv_heads)


@dataclass(frozen=True)
class VarlenCase(Case):
    """A row of the varlen section: `batch` sequences of lengths `seqlens` (the same for q and
    k), packed as (total, heads, d); `seqlen` is the longest."""

    seqlens: tuple = ()

    @property
    def total(self) -> int:
        return sum(self.seqlens)

    def shape(self, heads: int) -> tuple:
        return (self.total, heads, self.hdim)

    @property
    def flops(self) -> float:
        """4*h*d per visible (query, key) pair, over the real lengths: len*len per sequence, or
        len*(len+1)/2 when causal."""
        pairs = sum(n * (n + 1) // 2 if self.causal else n * n for n in self.seqlens)
        return 4.0 * self.nheads * self.hdim * pairs * PASSES[self.pass_name].flop_factor


@dataclass(frozen=True)
class DecodeCase(Case):
    """A shape of the decode section: q (batch, 1, nheads, d) against a cache of `seqlen` rows per
    batch row, all of them visible (cache_seqlens = seqlen - 1, plus the appended row). Its one
    pass is the forward ('fwd'); the layouts (contiguous, paged) are columns of its row."""

    @property
    def visible(self) -> int:
        return self.seqlen

    def shape(self, heads: int) -> tuple:
        """q (heads = nheads) or the new k, v rows (heads = kv_heads)."""
        return (self.batch, 1, heads, self.hdim)

    @property
    def kv_bytes(self) -> int:
        """The K and V bytes one call reads: 2 * batch * visible * kv_heads * d * itemsize."""
        return 2 * self.batch * self.visible * self.kv_heads * self.hdim * DTYPES[self.dtype].itemsize

    @property
    def tensor_bytes(self) -> int:
        """alloc_x's unit here: the K/V bytes read (q is a few KiB; a call that allocates a sizeable
        fraction of the cache copies it)."""
        return self.kv_bytes

    alloc_unit = "the K/V bytes it reads"

    @property
    def alloc_need(self) -> float:
        return 0.0  # the output and lse: a few KiB

    @property
    def call_name(self) -> str:
        return "decode"

    @property
    def flops(self) -> float:
        return 4.0 * self.batch * self.nheads * self.visible * self.hdim


@functools.lru_cache(maxsize=None)
def attended_pairs(seqlen_q: int, seqlen_k: int, causal: bool, window: tuple = (-1, -1)) -> int:
    """The (query, key) pairs a mask lets through, counted row by row, aligned to the bottom-right
    corner as in flash_attn: query i sees key j iff i + diag - left <= j <= i + diag + right (diag
    = seqlen_k - seqlen_q, -1 unbounded; causal: right = 0)."""
    left, right = window[0], 0 if causal else window[1]
    count = 0
    for i in range(seqlen_k - seqlen_q, seqlen_k):
        lo = max(0, i - left) if left >= 0 else 0
        hi = min(seqlen_k - 1, i + right) if right >= 0 else seqlen_k - 1
        count += max(0, hi - lo + 1)
    return count


@functools.lru_cache(maxsize=None)
def visited_tiles(seqlen_q: int, seqlen_k: int, causal: bool, window: tuple, block_m: int, block_n: int) -> int:
    """The (query block, key block) tiles of block_m x block_n that hold an attended pair (the mask
    of attended_pairs): those flash_cute's kernels visit, the forward by query block and the
    backward by key block; the rest they skip."""
    left, right = window[0], 0 if causal else window[1]
    diag = seqlen_k - seqlen_q
    count = 0
    for m0 in range(0, seqlen_q, block_m):
        first, last = m0, min(seqlen_q, m0 + block_m) - 1
        hi = seqlen_k if right < 0 else min(seqlen_k, last + diag + right + 1)  # keys < hi
        lo = 0 if left < 0 else max(0, first + diag - left)
        count += max(0, -(-hi // block_n) - lo // block_n)
    return count


def flash_cute_tile(pass_name: str, hdim: int) -> tuple[int, int]:
    """(block_m, block_n) of flash_cute's kernel for a pass (the forward's for fwd)."""
    from flash_cute import _ops

    tile = _ops._C().bwd_tile(hdim) if pass_name == "bwd" else _ops._C().fwd_tile(hdim, False)
    return tile[0], tile[1]


@dataclass(frozen=True)
class OptionsCase(Case):
    """A row of the options section: flash_attn_func on (batch, seqlen, nheads, d) inputs with one
    variant's options (OPTIONS_VARIANTS; causal is Case's)."""

    variant: str = "plain"
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: bool = False
    dropout_p: float = 0.0

    @property
    def pairs(self) -> int:
        """The attended (query, key) pairs per (batch, head)."""
        return attended_pairs(self.seqlen, self.seqlen, self.causal, self.window)

    @property
    def flops(self) -> float:
        """4*d per attended pair per head and batch row, times the pass's factor."""
        return 4.0 * self.batch * self.nheads * self.hdim * self.pairs * PASSES[self.pass_name].flop_factor

    @property
    def tiles(self) -> int:
        """The tiles flash_cute's kernel of this pass visits, per (batch, head)."""
        return visited_tiles(self.seqlen, self.seqlen, self.causal, self.window, *flash_cute_tile(self.pass_name, self.hdim))

    @property
    def cost_bar(self) -> float:
        return OPTIONS_BAR_DROPOUT if self.dropout_p else OPTIONS_BAR_COST

    def api_kwargs(self, alibi_slopes: Optional[torch.Tensor]) -> dict:
        """flash_attn_func's keywords for the variant, causal apart."""
        return {"dropout_p": self.dropout_p, "window_size": self.window, "softcap": self.softcap,
                "alibi_slopes": alibi_slopes if self.alibi else None}


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
# (q, k, v, cu_seqlens, max_seqlen, causal) -> the timed call, returning the output (total, nheads, d)
VarlenFactory = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, bool],
                         Callable[[], torch.Tensor]]
# DecodeInputs -> the timed call, returning the output (batch, 1, nheads, d)
DecodeFactory = Callable[["DecodeInputs"], Callable[[], torch.Tensor]]


@dataclass
class Impl:
    """One column. `fwd(q, k, v, causal)` is called outside the timed region and returns the
    zero-argument call that is timed; that call returns the output as (batch, seqlen, nheads, d),
    differentiably (the backward passes are built on it)."""

    name: str
    fwd: Optional[FwdFactory] = None
    sdpa_backend: object = None  # torch.nn.attention.SDPBackend for the SDPA columns
    unavailable: Optional[str] = None  # why it cannot run at all
    version: Optional[str] = None
    setting: Optional[Callable[[], contextlib.AbstractContextManager]] = None  # e.g. a GQA reduction
    varlen: Optional[VarlenFactory] = None  # its flash_attn_varlen_func equivalent (varlen section)
    kvcache: Optional[DecodeFactory] = None  # its flash_attn_with_kvcache equivalent (decode section)
    # (q, k, v, causal, **flash_attn_func keywords) -> the timed call (options section)
    options: Optional[Callable[..., Callable[[], torch.Tensor]]] = None

    def context(self):
        """Entered around the warm-up, check and timing of every call (not inside the timed
        call, so that its cost stays out of the timing)."""
        stack = contextlib.ExitStack()
        if self.setting is not None:
            stack.enter_context(self.setting())
        if self.sdpa_backend is not None:
            from torch.nn.attention import sdpa_kernel

            stack.enter_context(sdpa_kernel(self.sdpa_backend))
        return stack


def _sdpa_fwd(q, k, v, causal):
    # (batch, seqlen, nheads, d) -> (batch, nheads, seqlen, d) views: the strides change, the
    # memory does not. The output comes back as a (batch, nheads, seqlen, d) view of a
    # (batch, seqlen, nheads, d) buffer (flash backend; cuDNN allocates its output in q's
    # layout); transposing it back is again a view. Fewer KV heads than query heads: SDPA's
    # enable_gqa (torch >= 2.5), which a backend may refuse.
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    extra = {"enable_gqa": True} if q.shape[2] != k.shape[2] else {}
    return lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, **extra).transpose(1, 2)


def _flash_attn_api_fwd(module) -> FwdFactory:
    def factory(q, k, v, causal, **options):
        return lambda: module.flash_attn_func(q, k, v, causal=causal, **options)

    return factory


def _flash_attn_api_varlen(module) -> VarlenFactory:
    def factory(q, k, v, cu_seqlens, max_seqlen, causal):
        fn = module.flash_attn_varlen_func  # missing: an AttributeError, the column's error
        return lambda: fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=causal)

    return factory


def _flash_attn_api_kvcache(module) -> DecodeFactory:
    def factory(x: DecodeInputs):
        fn = module.flash_attn_with_kvcache  # missing: an AttributeError, the column's error
        return lambda: fn(x.q, x.k, x.v, k=x.k_new, v=x.v_new, cache_seqlens=x.cache_seqlens,
                          block_table=x.block_table)

    return factory


def _sdpa_kvcache(x: DecodeInputs, repeat_kv: bool = False):
    """SDPA on q (batch, nheads, 1, d) against the contiguous cache's first x.visible rows as
    (batch, nheads_k, visible, d) views, enable_gqa=True; the append is not part of it (the cache
    already holds the new row). repeat_kv: K/V heads repeated to nheads instead (copies made here,
    outside the timed region), for a backend that refuses enable_gqa."""
    if x.block_table is not None:
        raise ValueError("torch-flash reads a contiguous cache only")
    qt = x.q.transpose(1, 2)
    kt, vt = (t[:, :x.visible].transpose(1, 2) for t in (x.k, x.v))
    extra = {}
    if repeat_kv:
        kt, vt = (t.repeat_interleave(qt.shape[1] // t.shape[1], dim=1) for t in (kt, vt))
    elif qt.shape[1] != kt.shape[1]:
        extra["enable_gqa"] = True
    return lambda: F.scaled_dot_product_attention(qt, kt, vt, **extra).transpose(1, 2)


@functools.lru_cache(maxsize=None)
def aten_arguments(op: str) -> tuple:
    """The argument names of torch.ops.aten.<op> in this torch (its keywords vary by version)."""
    return tuple(a.name for a in getattr(torch.ops.aten, op).default._schema.arguments)


def aten_keywords(op: str, options: dict) -> dict:
    """The options that are set (not None), as keywords of torch.ops.aten.<op>; NotImplementedError
    naming those the op does not take in this torch."""
    given = {name: value for name, value in options.items() if value is not None}
    missing = [name for name in given if name not in aten_arguments(op)]
    if missing:
        raise NotImplementedError(f"aten.{op} takes no {', '.join(missing)} in torch {torch.__version__}")
    return given


class _AtenFlash(torch.autograd.Function):
    """torch's vendored FA2 kernels, called as SDPA's flash backend calls them:
    aten._flash_attention_forward/_backward on (batch, seqlen, nheads, d) inputs (cu_seqlens None)
    or, with cum_seq tensors, on varlen (total, nheads, d) ones. The backward gets the forward's
    logsumexp and its two RNG-state tensors (philox seed and offset in older torch, rng_state and
    unused in newer) as they came, so that dropout drops what the forward dropped. options: the
    ops' keywords (aten_keywords: one an op lacks raises when that op is called)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, dropout_p=0.0, options=None):
        options = options or {}
        out, lse, rng_a, rng_b, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, causal, False,
            **aten_keywords("_flash_attention_forward", options))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (cu_seqlens, max_seqlen, causal, dropout_p, options, rng_a, rng_b)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        cu_seqlens, max_seqlen, causal, dropout_p, options, rng_a, rng_b = ctx.args
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, causal, rng_a, rng_b,
            **aten_keywords("_flash_attention_backward", options))
        return dq, dk, dv, None, None, None, None, None


def _aten_flash_varlen(q, k, v, cu_seqlens, max_seqlen, causal):
    return lambda: _AtenFlash.apply(q, k, v, cu_seqlens, max_seqlen, causal, 0.0, None)


def _aten_flash(q, k, v, causal, dropout_p=0.0, window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
    """The options section's torch-flash: _AtenFlash on (batch, seqlen, nheads, d) inputs (seqlen_q
    = seqlen_k), flash_attn_func's options as the aten ops' keywords (an unbounded window side and
    softcap 0 are left out). An option the forward lacks raises here, outside the timed call; one
    the backward lacks (alibi_slopes in torch 2.13) when the backward runs."""
    options = {"window_size_left": window_size[0] if window_size[0] >= 0 else None,
               "window_size_right": window_size[1] if window_size[1] >= 0 else None,
               "softcap": softcap or None, "alibi_slopes": alibi_slopes}
    aten_keywords("_flash_attention_forward", options)
    return lambda: _AtenFlash.apply(q, k, v, None, q.shape[1], causal, dropout_p, options)


def load_flash_cute() -> Impl:
    try:
        import flash_cute
    except Exception as e:  # noqa: BLE001 - any import failure leaves the column empty
        return Impl("flash_cute", unavailable=f"import flash_cute failed: {short_error(e)}")
    impl = Impl("flash_cute", fwd=_flash_attn_api_fwd(flash_cute), version=flash_cute.__version__,
                varlen=_flash_attn_api_varlen(flash_cute), kvcache=_flash_attn_api_kvcache(flash_cute),
                options=_flash_attn_api_fwd(flash_cute))
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
    return Impl("flash_attn", fwd=_flash_attn_api_fwd(flash_attn), version=getattr(flash_attn, "__version__", "?"),
                varlen=_flash_attn_api_varlen(flash_attn), kvcache=_flash_attn_api_kvcache(flash_attn),
                options=_flash_attn_api_fwd(flash_attn))


def load_sdpa(name: str, backend_name: str) -> Impl:
    try:
        from torch.nn.attention import SDPBackend
    except ImportError as e:
        return Impl(name, unavailable=f"torch.nn.attention is missing ({e})")
    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        return Impl(name, unavailable=f"this torch has no SDPBackend.{backend_name}")
    return Impl(name, fwd=_sdpa_fwd, sdpa_backend=backend, version=torch.__version__)


@contextlib.contextmanager
def gqa_reduction(reduction: str):
    """Sets flash_cute._ops.GQA_BWD_REDUCTION for the duration (read when the backward runs)."""
    from flash_cute import _ops

    saved = _ops.GQA_BWD_REDUCTION
    _ops.GQA_BWD_REDUCTION = reduction
    try:
        yield
    finally:
        _ops.GQA_BWD_REDUCTION = saved


def reduction_variant(impl: Impl, reduction: str) -> Impl:
    """flash_cute's column with one GQA reduction of the backward pass, named after it."""
    return dataclasses.replace(impl, name=f"{impl.name}[{reduction}]", setting=lambda: gqa_reduction(reduction))


def load_impls(names) -> list[Impl]:
    loaders = {
        "flash_cute": load_flash_cute,
        "torch-flash": lambda: dataclasses.replace(load_sdpa("torch-flash", "FLASH_ATTENTION"),
                                                   varlen=_aten_flash_varlen, kvcache=_sdpa_kvcache,
                                                   options=_aten_flash),
        "cudnn": lambda: load_sdpa("cudnn", "CUDNN_ATTENTION"),
        "torch-mem": lambda: load_sdpa("torch-mem", "EFFICIENT_ATTENTION"),
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
    dout: Optional[torch.Tensor] = None  # the upstream gradient, for the passes with a backward


@dataclass
class DecodeInputs(Inputs):
    """The decode section's inputs: q (batch, 1, nheads, d); k, v the cache (contiguous (batch,
    cache, nheads_k, d), or pages (num_pages, page, nheads_k, d) with block_table); the new rows
    k_new, v_new (batch, 1, nheads_k, d) appended at cache_seqlens (int32); visible: the rows
    each batch row attends to (cache_seqlens + 1)."""

    k_new: Optional[torch.Tensor] = None
    v_new: Optional[torch.Tensor] = None
    cache_seqlens: Optional[torch.Tensor] = None
    visible: int = 0
    block_table: Optional[torch.Tensor] = None


def make_inputs(case: Case, seed: int, with_dout: Optional[bool] = None) -> Inputs:
    """Random normal q, k, v (never zeros), q (batch, seqlen, nheads, d) (varlen: (total, nheads,
    d)) and k, v with the case's KV heads, contiguous; and dout like q for the passes with a
    backward (or as with_dout says)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dtype = DTYPES[case.dtype]

    def randn(heads):
        return torch.randn(case.shape(heads), dtype=dtype, device="cuda", generator=gen)

    x = Inputs(randn(case.nheads), randn(case.kv_heads), randn(case.kv_heads))
    if PASSES[case.pass_name].grad_enabled if with_dout is None else with_dout:
        x.dout = randn(case.nheads)
    return x


def build_fwd(impl: Impl, x: Inputs, causal: bool) -> Runner:
    call = impl.fwd(x.q, x.k, x.v, causal)
    return lambda: (call(),)


def _leaves(x: Inputs) -> tuple:
    """q, k, v as fresh leaves that require grad and share the inputs' memory: every
    implementation gets its own autograd graph."""
    return tuple(t.detach().requires_grad_() for t in (x.q, x.k, x.v))


def build_bwd(impl: Impl, x: Inputs, causal: bool) -> Runner:
    """The forward runs here, once, outside the timed region; the timed call is the backward
    alone (retain_graph keeps the saved tensors for the next repetition)."""
    leaves = _leaves(x)
    out = impl.fwd(*leaves, causal)()
    return lambda: torch.autograd.grad(out, leaves, x.dout, retain_graph=True)


def build_fwdbwd(impl: Impl, x: Inputs, causal: bool) -> Runner:
    leaves = _leaves(x)
    call = impl.fwd(*leaves, causal)

    def run():
        out = call()
        return (out.detach(), *torch.autograd.grad(out, leaves, x.dout))

    return run


# Each pass: impl, inputs, causal -> the timed call, which returns the tensors to compare:
# (out,), (dq, dk, dv) or (out, dq, dk, dv) (their names: PASS_OUTPUTS).
PASS_BUILDERS: dict[str, Callable[[Impl, Inputs, bool], Runner]] = {
    "fwd": build_fwd,
    "bwd": build_bwd,
    "fwdbwd": build_fwdbwd,
}
PASS_OUTPUTS = {"fwd": ("out",), "bwd": ("dq", "dk", "dv"), "fwdbwd": ("out", "dq", "dk", "dv")}


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

    section = "grid"  # the CSV's label of the row's section

    def flagged(self, tol: float) -> bool:
        """Fails the correctness check (NaN included)."""
        return self.max_diff is not None and not self.max_diff <= tol

    def diff(self, impl: str) -> Optional[float]:
        """The implementation's difference from the row's reference (the CSV's max_diff_vs_ref)."""
        return self.max_diff if impl == "flash_cute" else None

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


def nan_max(xs) -> float:
    xs = list(xs)
    return math.nan if any(math.isnan(x) for x in xs) else max(xs)


@dataclass
class VarlenRow(Row):
    """A row of the varlen section. Every implementation is compared with the fp32 oracle (ref
    'fp32'): errors holds each one's max difference per compared tensor (PASS_OUTPUTS; gradients
    divided by max(1, max |oracle|)); max_diff is flash_cute's largest; anchor is the
    implementation whose errors bound flash_cute's (the 2x rule)."""

    errors: dict = field(default_factory=dict)
    anchor: Optional[str] = None
    section = "varlen"

    def diff(self, impl: str) -> Optional[float]:
        return nan_max(self.errors[impl]) if impl in self.errors else None

    def rule_ratio(self) -> Optional[float]:
        """flash_cute's error over the anchor's, the worst tensor."""
        if self.anchor is None or "flash_cute" not in self.errors:
            return None
        pairs = zip(self.errors["flash_cute"], self.errors[self.anchor])
        return nan_max(e / a if a > 0 else (0.0 if e == 0 else math.inf) for e, a in pairs)

    def flagged(self, tol: float = 0.0) -> bool:
        """Breaks the 2x rule in some tensor, or has NaN (tol: unused, the rule has its own)."""
        fc = self.errors.get("flash_cute")
        if fc is None:
            return False
        if self.anchor is None:
            return any(math.isnan(e) for e in fc)
        return any(not e <= 2 * a + VARLEN_RULE_SLACK for e, a in zip(fc, self.errors[self.anchor]))

    def to_dict(self) -> dict:
        return {**super().to_dict(), "section": self.section, "total_tokens": self.case.total,
                "outputs": PASS_OUTPUTS[self.case.pass_name], "errors_vs_fp32": self.errors,
                "rule_anchor": self.anchor, "rule_ratio": self.rule_ratio(),
                "rule_ok": None if self.anchor is None else not self.flagged()}


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


def max_diff(outs, refs, relative: bool = False) -> float:
    """max |a - b| over the tensor pairs; with ``relative``, each pair's divided by
    max(1, max |b|). NaN anywhere gives NaN."""
    worst = 0.0
    for a, b in zip(outs, refs):
        if a.shape != b.shape:
            raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
        diff = (a.float() - b.float()).abs().max().item()
        if relative:
            diff /= max(1.0, b.float().abs().max().item())
        worst = diff if math.isnan(diff) else max(worst, diff)
        if math.isnan(worst):
            break
    return worst


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
                row.max_diff = max_diff(outputs["flash_cute"], outputs[row.ref],
                                        relative=PASSES[case.pass_name].relative_check)
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
                    # Every implementation is timed from the same allocator state, without the
                    # cached blocks earlier work (an oracle's temporaries, say) left behind: with
                    # those, an H100 timed flash_cute's varlen backward at 17.4 ms against 16.2 ms
                    # in a fresh process (torch-flash: 15.7 and 15.6 ms).
                    torch.cuda.empty_cache()
                    m.ms = self.timer(run)
            except Exception as e:  # noqa: BLE001 - a failing column must not stop the others
                self.record_failure(impl, case, m, e, caught)
                return m, None
        m.tflops = case.flops / (m.ms * 1e-3) / 1e12 if m.ms > 0 else None
        for w in caught:
            self.note(f"{impl.name}: warning: {warning_text(w)}")
        if m.alloc_x is not None and m.alloc_x > case.alloc_need + 0.5:
            self.note(
                f"{impl.name}: one {case.call_name} call allocates {m.alloc_x:.2f}x {case.alloc_unit} (its "
                f"results need about {case.alloc_need:g}x): it copies inputs or uses a large workspace",
                key=(impl.name, case.call_name, "alloc"),
            )
        return m, outs

    def measure_memory(self, impl: Impl, case: Case, x: Inputs) -> Measurement:
        """A warm-up call, then one call whose peak allocation is measured; no timing."""
        m = Measurement(impl.name)
        if impl.unavailable:
            m.error = impl.unavailable
            return m
        spec = PASSES[case.pass_name]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with impl.context(), torch.set_grad_enabled(spec.grad_enabled):
                    run = PASS_BUILDERS[case.pass_name](impl, x, case.causal)
                    run()  # lazy loading, cuDNN plans and workspaces: not counted
                    _, m.alloc_x = call_with_peak_memory(run, case.tensor_bytes)
            except Exception as e:  # noqa: BLE001
                self.record_failure(impl, case, m, e, caught)
        return m

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
    head = f"{c.pass_name} {c.dtype} d{c.hdim} {'causal' if c.causal else 'non-causal'}"
    if isinstance(c, DecodeCase):
        return (f"decode {c.dtype} d{c.hdim} batch {c.batch} cache {fmt_seqlen(c.seqlen)} (q length 1, "
                f"heads {fmt_heads(c)})")
    if isinstance(c, OptionsCase):
        return (f"options {c.variant} {c.pass_name} {c.dtype} d{c.hdim} seqlen {fmt_seqlen(c.seqlen)} "
                f"(batch {c.batch}, heads {fmt_heads(c)})")
    if isinstance(c, VarlenCase):
        return (f"varlen {head} ({c.batch} sequences of {min(c.seqlens)}..{c.seqlen}, {c.total} tokens, "
                f"heads {fmt_heads(c)})")
    return f"{head} seqlen {fmt_seqlen(c.seqlen)} (batch {c.batch}, heads {fmt_heads(c)})"


def fmt_heads(c: Case) -> str:
    """'16', or '32/8' for 32 query heads over 8 KV heads."""
    return str(c.nheads) if c.kv_heads == c.nheads else f"{c.nheads}/{c.kv_heads}"


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


CASE_COLUMNS = [("pass", 6, "<"), ("dtype", 5, "<"), ("d", 3, ">"), ("causal", 6, "<")]


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
# Extra sections: the GQA reductions of the backward pass, and peak memory of forward + backward
# ----------------------------------------------------------------------------------------------


def gqa_case(args, pass_name: str, causal: bool) -> Case:
    batch, seqlen, nheads, nheads_k, hdim = args.gqa_shape
    return Case(pass_name, grid_dtypes(args)[0], hdim, causal, seqlen, batch, nheads, nheads_k)


def memory_cases(args) -> list[Case]:
    """fwdbwd at the grid's d128 seqlen-4k shape (MHA) and at the GQA shape; non-causal (the
    memory does not depend on the mask)."""
    dtype = grid_dtypes(args)[0]
    mha = Case("fwdbwd", dtype, MEMORY_HDIM, False, MEMORY_SEQLEN, batch=max(1, args.tokens // MEMORY_SEQLEN),
               nheads=max(1, args.model_dim // MEMORY_HDIM))
    return [mha, gqa_case(args, "fwdbwd", False)]


def gqa_variants(impls: list[Impl], reductions) -> list[Impl]:
    """flash_cute once per GQA reduction, then the anchors."""
    out = []
    for impl in impls:
        if impl.name == "flash_cute":
            out += [reduction_variant(impl, r) for r in reductions]
        else:
            out.append(impl)
    return out


def fmt_bytes_mib(n: float) -> str:
    mib = n / 2**20
    return f"{mib:.0f}" if mib >= 10 else f"{mib:.1f}"


def fmt_mib(m: Measurement, case: Case) -> str:
    return "-" if m.alloc_x is None else fmt_bytes_mib(m.alloc_x * case.tensor_bytes)


def run_gqa_section(bench: Bench, impls: list[Impl], args, log) -> list[dict]:
    """Times the backward pass of each variant at the GQA shape, causal off and on. Returns one
    record per (case, variant) for results.json; prints a table."""
    variants = gqa_variants(impls, args.gqa_bwd)
    names = [v.name for v in variants]
    table = Table([("causal", 6, "<"), ("implementation", max(14, *map(len, names)), "<"), ("ms", 8, ">"),
                   ("TFLOP/s", 7, ">"), ("alloc MiB", 9, ">"), ("vs first", 8, ">"), ("maxdiff", 9, "<")])
    first = names[0]
    log(f"GQA BACKWARD  {describe_case(gqa_case(args, 'bwd', False)).replace(' non-causal', '')}: "
        f"flash_cute's dK/dV reductions ({', '.join(args.gqa_bwd)}) beside the anchors; "
        f"alloc MiB: peak allocation of one backward call; vs first: time / {first}'s; "
        f"maxdiff: vs {first} (relative, as for bwd rows)")
    log(table.header())
    records = []
    for causal in grid_causals(args):
        case = gqa_case(args, "bwd", causal)
        x = make_inputs(case, bench.seed)
        results, outputs = {}, {}
        for impl in variants:
            results[impl.name], outs = bench.measure(impl, case, x)
            if outs is not None:
                outputs[impl.name] = outs
        for name in names:
            m = results[name]
            diff = None
            if name != first and name in outputs and first in outputs:
                diff = max_diff(outputs[name], outputs[first], relative=True)
            base = results[first].ms
            log(table.line(["yes" if causal else "no", name, fmt_num(m.ms, ".3f"), fmt_num(m.tflops, ".1f"),
                            fmt_mib(m, case), fmt_num(m.ms / base if m.ms and base else None, ".3f"),
                            "-" if diff is None else f"{diff:.1e}"]))
            records.append({**dataclasses.asdict(case), "impl": name, "max_diff_vs_first": diff,
                            **dataclasses.asdict(m)})
        del x, outputs
    log()
    return records


def run_memory_section(bench: Bench, impls: list[Impl], args, log) -> list[dict]:
    """Peak memory of one forward + backward of each implementation (and of each flash_cute GQA
    reduction at the GQA shape). Returns one record per (case, implementation)."""
    cases = memory_cases(args)
    log("MEMORY  peak allocation of one forward + backward (torch.cuda.max_memory_allocated above "
        "what was allocated before the call; q, k, v and dout not counted); x q: in multiples of q's bytes")
    records = []
    for case in cases:
        variants = gqa_variants(impls, GQA_REDUCTIONS) if case.kv_heads != case.nheads else impls
        x = make_inputs(case, bench.seed)
        width = max(14, *(len(v.name) for v in variants))
        table = Table([("implementation", width, "<"), ("peak MiB", 8, ">"), ("x q", 6, ">"),
                       ("vs torch-flash", 14, ">")])
        log(f"{case.dtype} d{case.hdim} seqlen {fmt_seqlen(case.seqlen)} batch {case.batch} heads {fmt_heads(case)} "
            f"(q: {fmt_bytes_mib(case.tensor_bytes)} MiB)")
        log(table.header())
        results = {v.name: bench.measure_memory(v, case, x) for v in variants}
        anchor = results.get("torch-flash")
        for name, m in results.items():
            ratio = m.alloc_x / anchor.alloc_x if m.alloc_x and anchor is not None and anchor.alloc_x else None
            cell = fmt_num(ratio, ".2f") if m.error is None else first_line(m.error, 60)
            log(table.line([name, fmt_mib(m, case), fmt_num(m.alloc_x, ".2f"), cell]))
            records.append({**dataclasses.asdict(case), "impl": name, "peak_bytes":
                            None if m.alloc_x is None else round(m.alloc_x * case.tensor_bytes),
                            **dataclasses.asdict(m)})
        del x
        log()
    return records


# ----------------------------------------------------------------------------------------------
# Extra section: variable-length batches (flash_attn_varlen_func)
# ----------------------------------------------------------------------------------------------

IMPL_ABBREV = {"flash_cute": "fc", "torch-flash": "tf", "cudnn": "cd", "torch-mem": "me", "flash_attn": "fa"}


def varlen_seqlens() -> tuple:
    gen = torch.Generator().manual_seed(VARLEN_SEED)
    return tuple(torch.randint(VARLEN_MIN_LEN, VARLEN_MAX_LEN + 1, (VARLEN_BATCH,), generator=gen).tolist())


def varlen_cases(args) -> list[VarlenCase]:
    """Ordered by (dtype, d, causal), then pass: the passes of a group share inputs and oracle."""
    seqlens = varlen_seqlens()
    return [
        VarlenCase(p, dt, d, c, max(seqlens), len(seqlens), VARLEN_NHEADS, seqlens=seqlens)
        for dt in grid_dtypes(args)
        for d in sorted(args.hdim or [VARLEN_HDIM])
        for c in grid_causals(args)
        for p in grid_passes(args)
    ]


def varlen_variant(impl: Impl, cu_seqlens: torch.Tensor, max_seqlen: int) -> Impl:
    """The implementation with its varlen call in place of its dense forward: the pass builders
    (build_fwd, build_bwd, build_fwdbwd) then time it as they time the grid."""
    return dataclasses.replace(impl, sdpa_backend=None,
                               fwd=lambda q, k, v, causal: impl.varlen(q, k, v, cu_seqlens, max_seqlen, causal))


@contextlib.contextmanager
def fp32_matmul():
    """float32 matmuls in full precision (no TF32) for the oracle."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def attention_fp32(q, k, v, causal: bool, window=(-1, -1), softcap: float = 0.0, alibi=None, keep=None,
                   dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v of one sequence, from the definition, in float32: q (seqlen_q,
    nheads, d), k, v (seqlen_k, nheads, d). flash_attn_func's options, masks aligned to the
    bottom-right corner (diag = seqlen_k - seqlen_q): causal (query i sees keys j <= i + diag),
    window (left, right): i + diag - left <= j <= i + diag + right (-1 unbounded), softcap: scores
    softcap * tanh(scores / softcap), then alibi ((nheads,) slopes): - slope * |i + diag - j|;
    keep ((nheads, seqlen_q, seqlen_k) bool): dropout's kept entries, the probabilities scaled by
    1 / (1 - dropout_p)."""
    q, k, v = (t.float().transpose(0, 1) for t in (q, k, v))  # (nheads, seqlen, d)
    s = q @ k.transpose(1, 2) * q.shape[-1] ** -0.5
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    left, right = window[0], 0 if causal else window[1]
    if alibi is not None or left >= 0 or right >= 0:
        i = torch.arange(s.shape[1], device=s.device).unsqueeze(1) + (s.shape[2] - s.shape[1])
        j = torch.arange(s.shape[2], device=s.device)
        if alibi is not None:
            s = s - alibi.float().view(-1, 1, 1) * (i - j).abs()
        if right >= 0:
            s = s.masked_fill(j > i + right, -math.inf)
        if left >= 0:
            s = s.masked_fill(j < i - left, -math.inf)
    p = s.softmax(-1)
    if keep is not None:
        p = p * keep / (1 - dropout_p)
    return (p @ v).transpose(0, 1)


def varlen_oracle(x: Inputs, seqlens, causal: bool) -> dict:
    """The fp32 oracle, one sequence at a time: 'out', and with x.dout 'dq', 'dk', 'dv' (by
    torch.autograd), each float32 of its input's shape."""
    sources = {"out": x.q} if x.dout is None else {"out": x.q, "dq": x.q, "dk": x.k, "dv": x.v}
    ref = {name: torch.empty(t.shape, dtype=torch.float32, device=t.device) for name, t in sources.items()}
    start = 0
    with fp32_matmul(), torch.set_grad_enabled(x.dout is not None):
        for n in seqlens:
            rows = slice(start, start + n)
            start += n
            leaves = [t[rows].float().requires_grad_(x.dout is not None) for t in (x.q, x.k, x.v)]
            out = attention_fp32(*leaves, causal)
            ref["out"][rows] = out.detach()
            if x.dout is not None:
                grads = torch.autograd.grad(out, leaves, x.dout[rows].float())
                ref["dq"][rows], ref["dk"][rows], ref["dv"][rows] = grads
    return ref


def varlen_table(names: list[str]) -> Table:
    cols = list(CASE_COLUMNS)
    for n in names:
        cols += [(f"{IMPL_ABBREV[n]} ms", 7, ">"), (f"{IMPL_ABBREV[n]} TF/s", 7, ">")]
    cols += [(label, 6, ">") for _, label in ratio_columns(names)]
    cols += [(f"{IMPL_ABBREV[n]} err", 8, ">") for n in names]
    cols += [("2x rule", 10, "<")] if "flash_cute" in names else []
    return Table(cols)


def format_varlen_row(table: Table, row: VarlenRow, names: list[str]) -> str:
    cells = case_cells(row.case)
    for n in names:
        m = row.results[n]
        cells += [fmt_num(m.ms, ".3f"), fmt_num(m.tflops, ".1f")]
    cells += [fmt_num(row.ratio("flash_cute", anchor), ".3f") for anchor, _ in ratio_columns(names)]
    cells += [fmt_num(row.diff(n), ".1e") for n in names]
    if "flash_cute" in names:
        ratio = row.rule_ratio()
        cells += ["-" if ratio is None else
                  f"{ratio:.2f} {IMPL_ABBREV[row.anchor]}" + (" !" if row.flagged() else "")]
    return table.line(cells)


def oracle_or_none(bench: Bench, section: str, where: str, compute):
    """The section's fp32 oracle, or None when computing it fails (e.g. out of memory): the
    timings still come, the rows print no errors, and a note says why."""
    try:
        return compute()
    except Exception as e:  # noqa: BLE001
        if not cuda_is_alive():
            raise FatalCudaError(f"the {section} oracle: {short_error(e)}") from e
        bench.note(f"{section}: the fp32 oracle failed at {where}: {short_error(e)}; no errors in its rows")
        return None


def run_varlen_section(bench: Bench, impls: list[Impl], cases: list[VarlenCase], log, rows: list) -> None:
    """Times each pass of each implementation's varlen call, and compares every result with the
    fp32 oracle; appends a VarlenRow per case to rows (as it goes: a fatal error keeps them)."""
    seqlens = cases[0].seqlens
    cu_seqlens = torch.tensor([0, *itertools.accumulate(seqlens)], dtype=torch.int32, device="cuda")
    variants = [varlen_variant(i, cu_seqlens, max(seqlens)) for i in impls if i.varlen is not None]
    names = [v.name for v in variants]
    table = varlen_table(names)
    log(f"VARLEN  {len(seqlens)} sequences, lengths uniform in [{VARLEN_MIN_LEN}, {VARLEN_MAX_LEN}] "
        f"(torch.Generator seed {VARLEN_SEED}): {sum(seqlens)} tokens, max {max(seqlens)}, min {min(seqlens)}; "
        f"heads {cases[0].nheads}; q, k, v (total, heads, d), cu_seqlens int32 (the same for q and k)")
    log(f"# lengths: {','.join(map(str, seqlens))}")
    left_out = [i.name for i in impls if i.varlen is None]
    if left_out:
        log(f"# {', '.join(left_out)}: no varlen entry point, left out of this section")
    log("# " + ", ".join(f"{IMPL_ABBREV[n]} = {n}" for n in names)
        + "; torch-flash: torch.ops.aten._flash_attention_forward/_backward with cum_seq")
    log("# TFLOP/s from the real lengths: 4*h*d per visible (query, key) pair per forward (causal: "
        "len*(len+1)/2 pairs per sequence), x2.5 bwd, x3.5 fwdbwd")
    log("# err: max |result - fp32 oracle| (per-sequence attention in float32, autograd for the gradients); bwd, "
        "fwdbwd: each tensor's divided by max(1, max |oracle|), the worst shown")
    log(f"# 2x rule: flash_cute's err / the anchor's (the first of {', '.join(VARLEN_ANCHORS)} that ran), worst "
        f"tensor; '!' where a tensor's err > 2 x the anchor's + {VARLEN_RULE_SLACK:g}")
    log(table.header())
    for _, group in itertools.groupby(cases, key=lambda c: (c.dtype, c.hdim, c.causal)):
        group = list(group)
        with_dout = any(PASSES[c.pass_name].grad_enabled for c in group)
        x = make_inputs(group[0], bench.seed, with_dout=with_dout)
        oracle = oracle_or_none(bench, "varlen", describe_case(group[0]), lambda: varlen_oracle(x, seqlens, group[0].causal))
        for case in group:
            row = VarlenRow(case, ref="fp32")
            relative = PASSES[case.pass_name].relative_check
            for impl in variants:
                row.results[impl.name], outs = bench.measure(impl, case, x)
                if outs is not None and oracle is not None:
                    refs = [oracle[name] for name in PASS_OUTPUTS[case.pass_name]]
                    row.errors[impl.name] = [max_diff([a], [b], relative) for a, b in zip(outs, refs)]
                del outs
            row.max_diff = row.diff("flash_cute")
            row.anchor = next((a for a in VARLEN_ANCHORS if a in row.errors
                               and not any(math.isnan(e) for e in row.errors[a])), None)
            rows.append(row)
            log(format_varlen_row(table, row, names))
        del x, oracle
        log()


def varlen_summary_lines(rows: list[VarlenRow]) -> list[str]:
    """flash_cute's TFLOP/s over each anchor's, the 2x rule's outcome, the failures."""
    if not rows:
        return []
    names = list(rows[0].results)
    out = []
    for anchor, _ in ratio_columns(names):
        rs = [x for x in (r.ratio("flash_cute", anchor) for r in rows) if x is not None]
        if rs:
            out.append(f"varlen: flash_cute / {anchor}: geomean {geomean(rs):.3f} over {len(rs)} rows, "
                       f"min {min(rs):.3f}, max {max(rs):.3f}")
    checked = [r for r in rows if r.rule_ratio() is not None]
    if checked:
        broken = [r for r in checked if r.flagged()]
        worst = nan_max(r.rule_ratio() for r in checked)
        out.append(f"varlen correctness: flash_cute's error vs fp32 up to {worst:.2f}x the anchor's over "
                   f"{len(checked)} rows; " + (f"{len(broken)} break the 2x rule (marked '!')" if broken
                                               else "the 2x rule holds in every row"))
    for name in names:
        failed = [r for r in rows if r.results[name].error]
        if failed:
            out.append(f"varlen: {name} failed in {len(failed)} of {len(rows)} rows: "
                       f"{first_line(failed[0].results[name].error, 120)}")
    return out


# ----------------------------------------------------------------------------------------------
# Extra section: decoding against a KV cache (flash_attn_with_kvcache)
# ----------------------------------------------------------------------------------------------


def decode_cases() -> list[DecodeCase]:
    return [DecodeCase("fwd", DECODE_DTYPE, DECODE_HDIM, False, cache_len, batch, DECODE_HEADS, DECODE_HEADS_K)
            for batch, cache_len in DECODE_SHAPES]


def decode_name(impl: str, layout: str) -> str:
    """The column of an implementation on a layout: 'flash_cute' (contiguous), 'flash_cute[paged16]'."""
    return impl if layout == "contiguous" else f"{impl}[{layout}]"


def decode_base(name: str) -> tuple:
    """'flash_cute[paged16]' -> ('flash_cute', 'paged16')."""
    impl, _, layout = name.partition("[")
    return impl, layout.rstrip("]") or "contiguous"


def decode_variant(impl: Impl, x: DecodeInputs, layout: str) -> Impl:
    """The implementation with its kvcache call on x in place of its dense forward: build_fwd then
    times it as it times the grid (x.q, x.k, x.v are ignored there: the call holds x)."""
    call = impl.kvcache
    return dataclasses.replace(impl, name=decode_name(impl.name, layout), fwd=lambda *_: call(x))


@dataclass
class DecodeRow(Row):
    """A shape of the decode section; results and errors per column (decode_name: implementation
    and layout). errors: max |out - fp32 oracle| over oracle_rows; max_diff: flash_cute's worst
    over its layouts. copy_gbps: the device copy bandwidth the %copy bar divides by."""

    errors: dict = field(default_factory=dict)
    oracle_rows: tuple = ()
    copy_gbps: Optional[float] = None
    tf_repeat_kv: bool = False  # torch-flash refused enable_gqa: K/V heads repeated outside the timing
    section = "decode"

    def diff(self, impl: str) -> Optional[float]:
        return self.errors.get(impl)

    def gbps(self, name: str) -> Optional[float]:
        m = self.results.get(name)
        return self.case.kv_bytes / (m.ms * 1e-3) / 1e9 if m is not None and m.ms else None

    def us(self, name: str) -> Optional[float]:
        m = self.results.get(name)
        return None if m is None or m.ms is None else m.ms * 1e3

    @staticmethod
    def _over(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return a / b if a is not None and b else None

    def copy_frac(self, name: str) -> Optional[float]:
        return self._over(self.gbps(name), self.copy_gbps)

    def vs_tf(self, name: str) -> Optional[float]:
        """GB/s over torch-flash's (contiguous: the same bytes, so also its time over this one's)."""
        return self._over(self.gbps(name), self.gbps("torch-flash"))

    def vs_contiguous(self, name: str) -> Optional[float]:
        """A paged column's GB/s over the same implementation's contiguous (None for contiguous)."""
        impl, layout = decode_base(name)
        return None if layout == "contiguous" else self._over(self.gbps(name), self.gbps(impl))

    def bars(self, name: str) -> dict:
        """The issue's bars for a flash_cute column: True (met), False or None (not measurable)."""
        def at_least(x, bar):
            return None if x is None else x >= bar

        return {"copy": at_least(self.copy_frac(name), DECODE_BAR_COPY),
                "tf": at_least(self.vs_tf(name), DECODE_BAR_TF),
                "paged": at_least(self.vs_contiguous(name), DECODE_BAR_PAGED)}

    def flash_cute_names(self) -> list[str]:
        return [n for n in self.results if decode_base(n)[0] == "flash_cute"]

    def to_dict(self) -> dict:
        names = list(self.results)
        return {**super().to_dict(), "section": self.section, "visible": self.case.visible,
                "kv_bytes": self.case.kv_bytes, "copy_gbps": self.copy_gbps, "oracle_rows": self.oracle_rows,
                "torch_flash_repeat_kv": self.tf_repeat_kv,
                "gbps": {n: self.gbps(n) for n in names}, "copy_frac": {n: self.copy_frac(n) for n in names},
                "vs_torch_flash": {n: self.vs_tf(n) for n in names},
                "paged_vs_contiguous": {n: self.vs_contiguous(n) for n in names},
                "errors_vs_fp32": self.errors, "bars": {n: self.bars(n) for n in self.flash_cute_names()}}


def measure_copy_bandwidth(bench: Bench) -> dict:
    """The device's copy bandwidth: dst.copy_(src) on DECODE_COPY_BYTES of bf16, timed by the
    section's timer; GB/s = 2 x bytes (read and written) / time."""
    src = torch.randn(DECODE_COPY_BYTES // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = bench.timer(lambda: (dst.copy_(src),))
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes": DECODE_COPY_BYTES, "ms": ms, "gbps": 2 * DECODE_COPY_BYTES / (ms * 1e-3) / 1e9}


def make_decode_inputs(case: DecodeCase, seed: int) -> DecodeInputs:
    """q and the new k, v rows (make_inputs, with the case's q-length-1 shapes), a random normal
    contiguous cache (batch, cache, nheads_k, d) that already holds the new rows at cache_seqlens
    (every call writes them there again), cache_seqlens = cache - 1 (int32)."""
    new = make_inputs(case, seed, with_dout=False)
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    shape = (case.batch, case.seqlen, case.kv_heads, case.hdim)
    k, v = (torch.randn(shape, dtype=DTYPES[case.dtype], device="cuda", generator=gen) for _ in range(2))
    pos = case.visible - 1
    k[:, pos:pos + 1], v[:, pos:pos + 1] = new.k, new.v
    seqlens = torch.full((case.batch,), pos, dtype=torch.int32, device=k.device)
    return DecodeInputs(new.q, k, v, k_new=new.k, v_new=new.v, cache_seqlens=seqlens, visible=case.visible)


def paged_inputs(x: DecodeInputs, page: int, seed: int) -> DecodeInputs:
    """x's cache copied into pages of `page` rows: num_pages = batch * cache / page, placed by a
    random permutation (a CPU generator seeded `seed`) that block_table (batch, cache / page) int32
    records; the same logical contents, so the same oracle."""
    batch, cache_len, heads_k, d = x.k.shape
    per_row = cache_len // page
    order = torch.randperm(batch * per_row, generator=torch.Generator().manual_seed(seed))
    table = order.view(batch, per_row).to(device=x.k.device, dtype=torch.int32)
    paged = []
    for t in (x.k, x.v):
        p = torch.empty((batch * per_row, page, heads_k, d), dtype=t.dtype, device=t.device)
        p[table.long()] = t.view(batch, per_row, page, heads_k, d)
        paged.append(p)
    return dataclasses.replace(x, k=paged[0], v=paged[1], block_table=table)


def decode_oracle_rows(batch: int) -> tuple:
    """Up to DECODE_ORACLE_ROWS batch rows: the first, the last and evenly spread between."""
    n = min(batch, DECODE_ORACLE_ROWS)
    return tuple(sorted({round(i * (batch - 1) / max(1, n - 1)) for i in range(n)}))


def decode_oracle(x: DecodeInputs, rows: tuple) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v in float32 for the given batch rows over their visible cache
    rows (x contiguous, holding the new rows), query head h on KV head h // (nheads / nheads_k):
    (len(rows), nheads, d). One row at a time (the 128k cache in float32 is 512 MiB per K/V): each
    KV head's query heads are attention_fp32's queries."""
    _, _, nheads, d = x.q.shape
    heads_k = x.k.shape[2]
    out = []
    with fp32_matmul():
        for r in rows:
            q = x.q[r, 0].view(heads_k, nheads // heads_k, d).transpose(0, 1)  # (group, heads_k, d)
            o = attention_fp32(q, x.k[r, :x.visible], x.v[r, :x.visible], causal=False)
            out.append(o.transpose(0, 1).reshape(nheads, d))
    return torch.stack(out)


def decode_table() -> Table:
    return Table([("batch", 5, ">"), ("cache", 5, ">"), ("layout", 10, "<"), ("implementation", 14, "<"),
                  ("us", 8, ">"), ("GB/s", 7, ">"), ("%copy", 5, ">"), ("vs tf", 5, ">"), ("/contig", 7, ">"),
                  ("err", 9, "<"), ("bars", 22, "<")])


def fmt_bars(bars: dict) -> str:
    return "  ".join(f"{k} {'-' if ok is None else 'ok' if ok else '!'}" for k, ok in bars.items())


def format_decode_lines(table: Table, row: DecodeRow, tol: float) -> list[str]:
    c = row.case
    out = []
    for name, m in row.results.items():
        impl, layout = decode_base(name)
        err = row.diff(name)
        frac = row.copy_frac(name)
        cells = [c.batch, fmt_seqlen(c.seqlen), layout, impl, fmt_num(row.us(name), ".1f"),
                 fmt_num(row.gbps(name), ".0f"), "-" if frac is None else f"{100 * frac:.0f}%",
                 fmt_num(row.vs_tf(name), ".2f"), fmt_num(row.vs_contiguous(name), ".2f"),
                 "-" if err is None else f"{err:.1e}" + (" !" if impl == "flash_cute" and not err <= tol else "")]
        if impl == "flash_cute":
            cells.append(fmt_bars(row.bars(name)) if m.ms is not None else first_line(m.error or "-", 60))
        elif m.ms is None:
            cells.append(first_line(m.error or "-", 60))
        out.append(table.line(cells))
    return out


def measure_decode_layout(bench: Bench, impls: list[Impl], case: DecodeCase, x: DecodeInputs, layout: str,
                          row: DecodeRow, oracle: Optional[torch.Tensor]) -> None:
    """Each implementation that reads this layout, timed by Bench.measure on x; its output's
    error against the oracle (rows row.oracle_rows) goes to row.errors."""
    for impl in impls:
        if layout not in DECODE_IMPL_LAYOUTS[impl.name]:
            continue
        variant = decode_variant(impl, x, layout)
        m, outs = bench.measure(variant, case, x)
        if impl.name == "torch-flash" and m.ms is None and cuda_is_alive():
            # the flash backend may refuse enable_gqa: K/V heads repeated before the timed call
            repeat = dataclasses.replace(impl, kvcache=lambda y: _sdpa_kvcache(y, repeat_kv=True))
            m2, outs = bench.measure(decode_variant(repeat, x, layout), case, x)
            if m2.ms is not None:
                bench.note(f"torch-flash: the flash backend refused enable_gqa ({m.error}); K/V heads "
                           f"repeat_interleave'd to {case.nheads} outside the timed region (it then reads "
                           f"{case.nheads // case.kv_heads}x the bytes that GB/s counts)", key="decode-repeat-kv")
                m, row.tf_repeat_kv = m2, True
        row.results[variant.name] = m
        if outs is not None and oracle is not None:
            row.errors[variant.name] = max_diff([outs[0][list(row.oracle_rows), 0]], [oracle])


def run_decode_section(bench: Bench, impls: list[Impl], cases: list[DecodeCase], args, log,
                       rows: list, copy: dict) -> None:
    """Measures the copy bandwidth (into copy), then per shape each implementation on each of its
    layouts (DECODE_IMPL_LAYOUTS) with Bench.measure, and compares each output with the fp32
    oracle; appends a DecodeRow per shape to rows as it goes. One shape's tensors at a time."""
    left_out = [i.name for i in impls if i.kvcache is None or i.name not in DECODE_IMPL_LAYOUTS]
    impls = [i for i in impls if i.name not in left_out]
    log(f"DECODE  flash_attn_with_kvcache: q (batch, 1, {DECODE_HEADS}, {DECODE_HDIM}) {DECODE_DTYPE} against "
        f"a cache of {DECODE_HEADS_K} KV heads; cache_seqlens = cache - 1 and one new k/v row per call, appended "
        "in place (the same slot at every repetition), so every call reads the whole cache; no rotary")
    log("# layouts: contiguous (batch, cache, heads_k, d); paged256, paged16: pages of 256 / 16 rows, "
        "num_pages = batch * cache / page, block_table a random permutation (int32)")
    if left_out:
        log(f"# {', '.join(left_out)}: no KV-cache entry point, left out of this section")
    log("# torch-flash: SDPA flash backend, q (batch, heads, 1, d) against the contiguous cache's visible rows as "
        "(batch, heads_k, L, d) views, enable_gqa=True; the attention alone (its cache holds the new row already)")
    copy.update(measure_copy_bandwidth(bench))
    log(f"# device copy bandwidth: dst.copy_(src) on {DECODE_COPY_BYTES / 2**30:g} GiB bf16: "
        f"{copy['ms'] * 1e3:.0f} us, {copy['gbps']:.0f} GB/s (2 x bytes / time)")
    log("# GB/s: K/V bytes read (2 * batch * visible * heads_k * d * 2) / time, 1e9 bytes; %copy: of the copy "
        "bandwidth; vs tf: over torch-flash's (contiguous, same shape); /contig: paged over the same "
        "implementation's contiguous")
    log(f"# err: max |out - fp32 oracle| on up to {DECODE_ORACLE_ROWS} batch rows (softmax(q k^T / sqrt(d)) v "
        f"in float32, query head h on KV head h // {DECODE_HEADS // DECODE_HEADS_K}); '!' (flash_cute) above "
        f"{args.tol:g}")
    log(f"# bars (flash_cute): copy >= {DECODE_BAR_COPY:.0%} of copy bandwidth, tf >= {DECODE_BAR_TF:g}x "
        f"torch-flash, paged >= {DECODE_BAR_PAGED:g}x contiguous (within {1 - DECODE_BAR_PAGED:.0%}); '!' missed")
    table = decode_table()
    log(table.header())
    for case in cases:
        row = DecodeRow(case, ref="fp32", copy_gbps=copy["gbps"], oracle_rows=decode_oracle_rows(case.batch))
        x = make_decode_inputs(case, bench.seed)
        oracle = oracle_or_none(bench, "decode", describe_case(case), lambda: decode_oracle(x, row.oracle_rows))
        for layout, page in DECODE_LAYOUTS.items():
            if any(layout in DECODE_IMPL_LAYOUTS[i.name] for i in impls):
                measure_decode_layout(bench, impls, case, x if page is None else paged_inputs(x, page, bench.seed),
                                      layout, row, oracle)
                torch.cuda.empty_cache()  # the paged copies are gone
        fc_errors = [row.errors[n] for n in row.flash_cute_names() if n in row.errors]
        row.max_diff = nan_max(fc_errors) if fc_errors else None
        rows.append(row)
        for line in format_decode_lines(table, row, args.tol):
            log(line)
        del x, oracle
        torch.cuda.empty_cache()
    log()


def decode_summary_lines(rows: list[DecodeRow], tol: float) -> list[str]:
    """Per flash_cute layout: GB/s, fraction of copy bandwidth, ratio to torch-flash, bars met;
    then the correctness and the failures."""
    if not rows:
        return []
    out = [f"decode: device copy bandwidth {rows[0].copy_gbps:.0f} GB/s"]
    names = list(dict.fromkeys(n for r in rows for n in r.results))
    for name in names:
        if decode_base(name)[0] != "flash_cute":
            continue
        timed = [r for r in rows if r.gbps(name) is not None]
        if not timed:
            continue
        fracs = [r.copy_frac(name) for r in timed]
        tf = [x for x in (r.vs_tf(name) for r in timed) if x is not None]
        met = sum(1 for r in timed if all(ok is not False for ok in r.bars(name).values()))
        line = (f"decode {decode_base(name)[1]}: flash_cute {min(r.gbps(name) for r in timed):.0f}.."
                f"{max(r.gbps(name) for r in timed):.0f} GB/s, {100 * min(fracs):.0f}..{100 * max(fracs):.0f}% "
                "of copy")
        if tf:
            line += f", vs torch-flash geomean {geomean(tf):.2f} (min {min(tf):.2f})"
        out.append(line + f"; bars met in {met} of {len(timed)} shapes")
    checked = [r for r in rows if r.max_diff is not None]
    if checked:
        worst = nan_max(r.max_diff for r in checked)
        flagged = [r for r in checked if r.flagged(tol)]
        out.append(f"decode correctness: max |flash_cute - fp32| = {worst:.2e} over {len(checked)} shapes; "
                   + (f"{len(flagged)} above {tol:g} (marked '!')" if flagged else f"none above {tol:g}"))
    if any(r.tf_repeat_kv for r in rows):
        out.append("decode: torch-flash ran with K/V heads repeated (its flash backend refused enable_gqa)")
    for name in names:
        failed = [r for r in rows if name in r.results and r.results[name].error]
        if failed:
            out.append(f"decode: {name} failed in {len(failed)} of {len(rows)} shapes: "
                       f"{first_line(failed[0].results[name].error, 120)}")
    return out


# ----------------------------------------------------------------------------------------------
# Extra section: flash_attn_func's options (causal, local windows, softcap, ALiBi, dropout)
# ----------------------------------------------------------------------------------------------


def options_cases(args) -> list[OptionsCase]:
    """Per (dtype, d, seqlen): each variant (OPTIONS_VARIANTS, plain first), each of its passes."""
    passes = [p for p in args.passes if p in OPTIONS_PASSES]
    return [
        OptionsCase(p, dt, d, opts.get("causal", False), s, max(1, args.tokens // s), max(1, args.model_dim // d),
                    variant=name, **{k: v for k, v in opts.items() if k != "causal"})
        for dt, d, s in itertools.product(args.dtype or [OPTIONS_DTYPE], sorted(args.hdim or [OPTIONS_HDIM]),
                                          sorted(args.seqlen or [OPTIONS_SEQLEN]))
        for name, opts in OPTIONS_VARIANTS.items()
        for p in passes
    ]


def describe_options(case: OptionsCase) -> str:
    """The variant's flash_attn_func keywords, e.g. 'causal, window_size=(1024, 0), softcap=30'."""
    parts = ["causal"] if case.causal else []
    parts += [f"window_size={case.window}"] if case.window != (-1, -1) else []
    parts += [f"softcap={case.softcap:g}"] if case.softcap else []
    parts += ["alibi_slopes"] if case.alibi else []
    parts += [f"dropout_p={case.dropout_p:g}"] if case.dropout_p else []
    return ", ".join(parts) or "none"


def alibi_slopes(nheads: int, device="cuda") -> torch.Tensor:
    """ALiBi's geometric slopes, float32 (nheads,): 2^(-8h/n), h = 1..n, for n = nheads a power of
    two; otherwise those of the largest power of two n below nheads, then the odd-numbered slopes
    of 2n heads."""
    n = 2 ** int(math.log2(nheads))
    slopes = [2 ** (-8 * h / n) for h in range(1, n + 1)] + [2 ** (-4 * (2 * h + 1) / n) for h in range(nheads - n)]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


def options_variant(impl: Impl, case: OptionsCase, slopes: torch.Tensor) -> Impl:
    """The implementation with the variant's options in its forward: the pass builders time it as
    they time the grid."""
    kwargs = case.api_kwargs(slopes)
    return dataclasses.replace(impl, sdpa_backend=None,
                               fwd=lambda q, k, v, causal: impl.options(q, k, v, causal, **kwargs))


def options_error(impl: Impl, case: OptionsCase, x: Inputs, slopes: torch.Tensor, out: torch.Tensor) -> float:
    """max |out - fp32 oracle| over the batch rows (one at a time). Dropout: out is replaced by that
    of a return_attn_probs=True call, whose S_dmask (batch, heads, seqlen rounded up to 128 twice)
    gives the oracle its keep mask (S_dmask >= 0)."""
    keep = None
    if case.dropout_p:
        with torch.no_grad():
            out, _, s_dmask = impl.options(x.q, x.k, x.v, case.causal, **case.api_kwargs(slopes),
                                           return_attn_probs=True)()
        if s_dmask.dim() != 4 or min(s_dmask.shape[-2:]) < case.seqlen:
            raise ValueError(f"S_dmask of shape {tuple(s_dmask.shape)}: no dropout keep mask to check against")
        keep = s_dmask[..., :case.seqlen, :case.seqlen] >= 0
    worst = 0.0
    with fp32_matmul():
        for b in range(case.batch):
            ref = attention_fp32(x.q[b], x.k[b], x.v[b], case.causal, case.window, case.softcap,
                                 slopes if case.alibi else None, None if keep is None else keep[b], case.dropout_p)
            worst = nan_max([worst, max_diff([out[b]], [ref])])
    return worst


@dataclass
class OptionsRow(Row):
    """A (variant, pass) of the options section. plain: the plain variant's row of the same pass and
    shape (None for the plain row itself), the base of the cost ratios; max_diff (fwd rows):
    flash_cute's max |out - fp32 oracle|."""

    plain: Optional[Row] = field(default=None, repr=False, compare=False)
    section = "options"

    def ms(self, impl: str = "flash_cute") -> Optional[float]:
        m = self.results.get(impl)
        return None if m is None else m.ms

    def vs_plain(self, per_pair: bool = False) -> Optional[float]:
        """flash_cute's time over its plain time; per_pair: each per attended pair (None where the
        variant attends as many pairs as plain)."""
        base = self.plain or self
        a, b = self.ms(), base.ms()
        if a is None or not b or (per_pair and self.case.pairs == base.case.pairs):
            return None
        return a / b * (base.case.pairs / self.case.pairs if per_pair else 1.0)

    def vs_plain_tiles(self) -> Optional[float]:
        """flash_cute's time per visited tile over plain's (masked variants): the cost of the mask and
        the skipping, without the tiles' granularity."""
        base = self.plain or self
        a, b = self.ms(), base.ms()
        if a is None or not b or self.case.pairs == base.case.pairs:
            return None
        return a / b * base.case.tiles / self.case.tiles

    def cost(self) -> Optional[float]:
        """What the cost bar bounds: /area for a masked variant, else /plain."""
        return self.vs_plain(per_pair=self.case.pairs != (self.plain or self).case.pairs)

    def bars(self) -> dict:
        """cost (not for plain, nor for causal: the plain causal kernel, the options' reference) and
        one per anchor that ran: True (met), False, None (not measured); all False where flash_cute
        has no time."""
        if "flash_cute" not in self.results:
            return {}
        cost = self.cost()
        bars = {} if self.plain is None or self.case.variant == "causal" else {
            "cost": None if cost is None else cost <= self.case.cost_bar}
        for anchor, _ in RATIO_ANCHORS:
            if anchor in self.results:
                r = self.ratio("flash_cute", anchor)
                bars[IMPL_ABBREV[anchor]] = None if r is None else r >= OPTIONS_BAR_OFFICIAL
        return bars if self.ms() is not None else dict.fromkeys(bars, False)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "section": self.section, "attended_pairs": self.case.pairs,
                "vs_plain": self.vs_plain(), "vs_plain_per_pair": self.vs_plain(per_pair=True),
                "vs_plain_per_tile": self.vs_plain_tiles(), "visited_tiles": self.case.tiles,
                "cost_bar": None if self.plain is None else self.case.cost_bar,
                "vs_anchor": {a: self.ratio("flash_cute", a) for a, _ in RATIO_ANCHORS if a in self.results},
                "bars": self.bars()}


def fmt_pass_fail(bars: dict) -> str:
    return " ".join(f"{k}:{'-' if ok is None else 'PASS' if ok else 'FAIL'}" for k, ok in bars.items()) or "-"


def options_table(names: list[str], passes: list[str]) -> Table:
    cols = [("variant", 8, "<")]
    for p in passes:
        cols += [(f"{p} ms", 7, ">"), ("/plain", 6, ">"), ("/area", 6, ">"), ("/tiles", 6, ">")]
        cols += [(label, 6, ">") for _, label in ratio_columns(names)]
        cols += [(f"{p} bars", 8 + 8 * len(ratio_columns(names)), "<")]
    return Table(cols + [("err", 9, "<")])


def format_options_line(table: Table, rows: dict, names: list[str], passes: list[str], tol: float) -> str:
    """One variant: rows maps each pass to its OptionsRow."""
    cells = [next(iter(rows.values())).case.variant]
    for p in passes:
        r = rows[p]
        cells += [fmt_num(r.ms(), ".3f"), fmt_num(r.vs_plain(), ".3f"), fmt_num(r.vs_plain(per_pair=True), ".3f"),
                  fmt_num(r.vs_plain_tiles(), ".3f")]
        cells += [fmt_num(r.ratio("flash_cute", a), ".3f") for a, _ in ratio_columns(names)]
        cells += [fmt_pass_fail(r.bars())]
    return table.line(cells + [fmt_diff(rows["fwd"], tol) if "fwd" in rows else "-"])


def run_options_section(bench: Bench, impls: list[Impl], cases: list[OptionsCase], args, log, rows: list) -> None:
    """Per shape, one set of inputs; per variant, each pass of each implementation timed by
    Bench.measure, flash_cute's forward output compared with the fp32 oracle; appends an OptionsRow
    per (variant, pass) to rows as it goes; prints a line per variant."""
    left_out = [i.name for i in impls if i.options is None]
    impls = [i for i in impls if i.options is not None]
    names = [i.name for i in impls]
    passes = list(dict.fromkeys(c.pass_name for c in cases))
    variants = {c.variant: c for c in cases}  # one case of each, for its options
    log("OPTIONS  flash_attn_func's options, one line per variant: "
        + "; ".join(f"{name}: {describe_options(c)}" for name, c in variants.items()))
    log("# alibi_slopes: ALiBi's geometric slopes 2^(-8h/heads), float32 (heads,); one set of inputs per shape")
    if left_out:
        log(f"# {', '.join(left_out)}: no entry point with these options, left out of this section")
    if "torch-flash" in names:
        keywords = {op: [a.name for a in getattr(torch.ops.aten, op).default._schema.arguments if a.kwarg_only]
                    for op in ("_flash_attention_forward", "_flash_attention_backward")}
        log("# torch-flash: torch.ops.aten._flash_attention_forward/_backward called directly on (batch, seqlen, "
            "heads, d), keywords " + "; ".join(f"{op[1:]}: {', '.join(k)}" for op, k in keywords.items())
            + "; an option an op lacks: '-'")
    log(f"# {', '.join(passes)} timed as in the grid; /plain: flash_cute's time over its plain time; /area: the same "
        "per attended (query, key) pair, counted from the mask (masked variants); /tiles: the same per tile of "
        "flash_cute's kernel it visits (the others are skipped); fc/tf, fc/fa: the anchor's time over flash_cute's "
        "(> 1: flash_cute faster)")
    log(f"# bars: cost (not for causal, the plain kernel): /area (masked variants) or /plain <= {OPTIONS_BAR_COST:.2f} (dropout "
        f"{OPTIONS_BAR_DROPOUT:.2f}); tf, fa: fc/tf, fc/fa >= {OPTIONS_BAR_OFFICIAL:g}; '-': not measured; FAIL "
        "everywhere when flash_cute failed")
    log(f"# err: max |flash_cute's output - fp32 oracle| on the same input (dropout: a return_attn_probs=True call, "
        f"the oracle keeping S_dmask >= 0 and scaling by 1 / (1 - p)); '!' above {args.tol:g}")
    table = options_table(names, passes)
    for (dtype, hdim, seqlen), block in itertools.groupby(cases, key=lambda c: (c.dtype, c.hdim, c.seqlen)):
        block = list(block)
        x = make_inputs(block[0], bench.seed, with_dout=any(PASSES[c.pass_name].grad_enabled for c in block))
        slopes = alibi_slopes(block[0].nheads)
        pairs = {c.variant: c.pairs for c in block}
        log(f"{dtype} d{hdim} seqlen {fmt_seqlen(seqlen)} batch {block[0].batch} heads {fmt_heads(block[0])}; attended "
            f"pairs per head: plain {pairs['plain']}, " + ", ".join(
                f"{name} {n / pairs['plain']:.3f}x" for name, n in pairs.items() if n != pairs["plain"]))
        log(table.header())
        plain: dict = {}
        for _, variant in itertools.groupby(block, key=lambda c: c.variant):
            done = {}
            for case in variant:
                row = OptionsRow(case, plain=plain.get(case.pass_name))
                fc_out = None
                for impl in impls:
                    row.results[impl.name], outs = bench.measure(options_variant(impl, case, slopes), case, x)
                    if impl.name == "flash_cute" and outs is not None and case.pass_name == "fwd":
                        fc_out = outs[0]
                    del outs
                if fc_out is not None:
                    fc = next(i for i in impls if i.name == "flash_cute")
                    row.ref = "fp32"
                    row.max_diff = oracle_or_none(bench, "options", describe_case(case),
                                                  lambda: options_error(fc, case, x, slopes, fc_out))
                    del fc_out
                    torch.cuda.empty_cache()
                plain.setdefault(case.pass_name, row)  # plain comes first
                done[case.pass_name] = row
                rows.append(row)
            log(format_options_line(table, done, names, passes, args.tol))
        del x
        log()


def options_summary_lines(rows: list[OptionsRow], tol: float) -> list[str]:
    """Per pass: the variants that meet every bar, those that miss one; the correctness; failures."""
    out = []
    for p in dict.fromkeys(r.case.pass_name for r in rows):
        sub = [r for r in rows if r.case.pass_name == p]
        missed = [f"{r.case.variant} ({', '.join(k for k, ok in r.bars().items() if ok is False)})"
                  for r in sub if False in r.bars().values()]
        out.append(f"options {p}: no bar missed by {len(sub) - len(missed)} of {len(sub)} variants"
                   + (f"; missed: {'; '.join(missed)}" if missed else ""))
    checked = [r for r in rows if r.max_diff is not None]
    if checked:
        flagged = [r.case.variant for r in checked if r.flagged(tol)]
        out.append(f"options correctness: max |flash_cute - fp32| = {nan_max(r.max_diff for r in checked):.2e} over "
                   f"{len(checked)} variants; "
                   + (f"above {tol:g}: {', '.join(flagged)}" if flagged else f"none above {tol:g}"))
    for name in dict.fromkeys(n for r in rows for n in r.results):
        failed = [r for r in rows if r.results[name].error]
        if failed:
            which = ("all" if len(failed) == len(rows) else
                     ", ".join(f"{r.case.variant} {r.case.pass_name}" for r in failed) + " of")
            out.append(f"options: {name} failed in {which} {len(rows)} rows: "
                       f"{first_line(failed[0].results[name].error, 120)}")
    return out


def extras_summary_lines(gqa: list[dict], memory: list[dict]) -> list[str]:
    """One line per extra section for the summary: the reductions' time ratio, and flash_cute's
    peak memory against torch-flash's."""
    out = []
    by_causal: dict = {}
    for r in gqa:
        by_causal.setdefault(r["causal"], {})[r["impl"]] = r
    for causal, rs in by_causal.items():
        timed = [(name, r["ms"]) for name, r in rs.items() if r["ms"] is not None]
        if timed:
            out.append(f"GQA backward ({'causal' if causal else 'non-causal'}): "
                       + ", ".join(f"{name} {ms:.3f} ms" for name, ms in timed))
    by_shape: dict = {}
    for r in memory:
        by_shape.setdefault((r["hdim"], r["seqlen"], r["batch"], r["nheads"], r["nheads_k"]), {})[r["impl"]] = r
    for (hdim, seqlen, batch, nheads, nheads_k), rs in by_shape.items():
        peaks = [(name, r["peak_bytes"]) for name, r in rs.items() if r["peak_bytes"] is not None]
        if peaks:
            heads = str(nheads) if nheads_k in (None, nheads) else f"{nheads}/{nheads_k}"
            out.append(f"fwd+bwd peak memory, d{hdim} seqlen {fmt_seqlen(seqlen)} batch {batch} heads {heads}: "
                       + ", ".join(f"{name} {fmt_bytes_mib(b)} MiB" for name, b in peaks))
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
    if "bwd_kernels" not in info["flash_cute_build"]:  # build_info() may list forward kernels only
        try:
            from flash_cute import _C

            info["flash_cute_build"]["bwd_kernels"] = _C.built_bwd_kernels()
        except Exception as e:  # noqa: BLE001 - an extension built before the backward pass
            info["flash_cute_build"]["bwd_kernels"] = f"unavailable: {short_error(e)}"
    return info


def header_lines(env: dict) -> list[str]:
    build = env.get("flash_cute_build")
    if isinstance(build, dict):
        fwd_kernels, bwd_kernels = build.get("fwd_kernels", []), build.get("bwd_kernels", [])
        shown = {k: v for k, v in build.items() if k not in ("fwd_kernels", "bwd_kernels")}
        build = ", ".join(f"{k}={v}" for k, v in shown.items()) + f", {len(fwd_kernels)} forward kernels, " + (
            f"{len(bwd_kernels)} backward kernels" if isinstance(bwd_kernels, list) else f"backward: {bwd_kernels}")
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


def write_json(path: Path, env: dict, rows: list[Row], args, extras: Optional[dict] = None) -> None:
    doc = {"environment": env, "options": vars(args), "rows": [r.to_dict() for r in rows], **(extras or {})}
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


CSV_FIELDS = ["pass", "dtype", "hdim", "causal", "seqlen", "batch", "nheads", "nheads_k", "flops",
              "impl", "ms", "tflops", "alloc_x", "skipped", "error", "max_diff_vs_ref", "ref", "section", "variant"]


def write_csv(path: Path, rows: list[Row]) -> None:
    """Long format: one line per (shape, implementation). section 'grid': max_diff_vs_ref is
    flash_cute's against ref; 'varlen' (seqlen: the longest sequence, batch: their number):
    every implementation's against the fp32 oracle; 'decode' (seqlen: the cache length, all of it
    visible; impl 'flash_cute' for the contiguous cache, 'flash_cute[paged256]' ...; flops: of the
    q-length-1 forward): every implementation's against the fp32 oracle; 'options' (variant: its
    name; flops: over the attended pairs): flash_cute's forward against the fp32 oracle."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in rows:
            c = r.case
            for name, m in r.results.items():
                diff = r.diff(name)
                w.writerow([c.pass_name, c.dtype, c.hdim, int(c.causal), c.seqlen, c.batch, c.nheads,
                            c.kv_heads, f"{c.flops:.6g}", name, m.ms, m.tflops, m.alloc_x, int(m.skipped), m.error,
                            diff, r.ref if diff is not None else None, r.section, getattr(c, "variant", None)])


IMPL_COLORS = {"flash_cute": "#d62728", "torch-flash": "#1f77b4", "cudnn": "#2ca02c", "torch-mem": "#9467bd",
               "flash_attn": "#ff7f0e"}


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
                      help="passes fwd,bwd, bf16, head dims 64/128/256, causal off/on, seqlen 2k and 16k, "
                           "no GQA section (about a minute on an H100)")
    grid.add_argument("--pass", dest="passes", metavar="PASS",
                      type=lambda t: parse_list(t, parse_choice(tuple(PASSES)), "pass"),
                      help=f"comma list of passes to time: {', '.join(PASSES)} "
                           f"(default {','.join(FULL_PASSES)}; {','.join(QUICK_PASSES)} with --quick)")
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
    extra = p.add_argument_group("extra sections")
    extra.add_argument("--gqa-bwd", metavar="REDUCTION,...", type=parse_reductions,
                       help=f"time flash_cute's backward at --gqa-shape with each GQA reduction of dK/dV, from "
                            f"{', '.join(GQA_REDUCTIONS)}, or none (default both when the grid has bwd, "
                            "none with --quick)")
    extra.add_argument("--gqa-shape", metavar="B,S,H,HK,D", type=parse_gqa_shape, default=DEFAULT_GQA_SHAPE,
                       help="batch, seqlen, query heads, KV heads, head dim of the GQA section and of the "
                            "memory section's GQA shape (default %s)" % ",".join(map(str, DEFAULT_GQA_SHAPE)))
    extra.add_argument("--no-memory", action="store_true",
                       help="skip the peak-memory section (forward + backward; run by default when the grid "
                            "has bwd or fwdbwd)")
    varlen = extra.add_mutually_exclusive_group()
    varlen.add_argument("--varlen", action="store_true",
                        help=f"run only the varlen section: {VARLEN_BATCH} sequences of {VARLEN_MIN_LEN} .. "
                             f"{VARLEN_MAX_LEN} tokens, {VARLEN_NHEADS} heads, d {VARLEN_HDIM} (or --hdim), the "
                             "dtypes, causal values and passes of the grid options (with --decode: those two "
                             "sections alone)")
    varlen.add_argument("--no-varlen", action="store_true", help="skip the varlen section (run by default)")
    decode = extra.add_mutually_exclusive_group()
    decode.add_argument("--decode", action="store_true",
                        help="run only the decode section (flash_attn_with_kvcache: bf16, q length 1, "
                             f"{DECODE_HEADS}/{DECODE_HEADS_K} heads, d {DECODE_HDIM}, (batch, cache) "
                             f"{', '.join(f'({b}, {fmt_seqlen(n)})' for b, n in DECODE_SHAPES)}; contiguous, "
                             "paged 256, paged 16); with --varlen: those two sections alone")
    decode.add_argument("--no-decode", action="store_true", help="skip the decode section (run by default)")
    extra.add_argument("--options", action="store_true",
                       help="run the options section (after --varlen, --decode if given; else alone): "
                            f"flash_attn_func with {', '.join(OPTIONS_VARIANTS)}, {OPTIONS_DTYPE} d{OPTIONS_HDIM} "
                            f"seqlen {fmt_seqlen(OPTIONS_SEQLEN)} (or --dtype, --hdim, --seqlen), fwd and bwd, "
                            "against torch's FA2 aten ops and flash_attn")
    p.add_argument("--only", metavar="IMPL,...", default=list(IMPL_NAMES),
                   type=lambda t: parse_list(t, parse_choice(IMPL_NAMES), "implementation"),
                   help=f"implementations to run, from {', '.join(IMPL_NAMES)} (default all)")
    p.add_argument("--timer", choices=("auto", "triton", "events"), default="auto",
                   help="triton.testing.do_bench (median) or CUDA events (median); auto: triton when it works")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up time per measurement (default 25)")
    p.add_argument("--rep-ms", type=float, default=200.0, help="timed repetition time per measurement (default 200)")
    p.add_argument("--tol", type=float, default=DEFAULT_TOL,
                   help=f"max |flash_cute - anchor| before a row is flagged '!' (bwd, fwdbwd: relative to "
                        f"max(1, max |anchor|)) (default {DEFAULT_TOL:g})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="also write DIR/results.json, DIR/results.csv, DIR/log.txt and DIR/<pass>_<dtype>.png")
    p.add_argument("--no-plot", action="store_true", help="with --out: skip the PNG plots")
    p.add_argument("--dry-run", action="store_true", help="print the grid and the sections' shapes and exit (needs no GPU)")
    return p.parse_args(argv)


def parse_reductions(text: str) -> list[str]:
    return [] if text.strip() == "none" else parse_list(text, parse_choice(GQA_REDUCTIONS), "reduction")


def parse_gqa_shape(text: str) -> tuple:
    parts = [t.strip() for t in text.split(",")]
    try:
        batch, seqlen, nheads, nheads_k, hdim = (parse_seqlen(t) if i == 1 else int(t) for i, t in enumerate(parts))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--gqa-shape wants B,S,H,HK,D, got {text!r} ({e})") from None
    if min(batch, nheads, nheads_k, hdim) <= 0 or nheads % nheads_k:
        raise argparse.ArgumentTypeError(f"--gqa-shape {text!r}: sizes must be positive, H a multiple of HK")
    return (batch, seqlen, nheads, nheads_k, hdim)


def grid_passes(args) -> list[str]:
    return args.passes or list(QUICK_PASSES if args.quick else FULL_PASSES)


def grid_dtypes(args) -> list[str]:
    return args.dtype or list(QUICK_DTYPES if args.quick else DTYPES)


def grid_causals(args) -> list[bool]:
    return sorted(args.causal or [False, True])


def sections_alone(args) -> bool:
    """--varlen, --decode or --options: those sections alone (no grid, GQA or memory section)."""
    return args.varlen or args.decode or args.options


def gqa_reductions(args) -> list[str]:
    """The GQA section's reductions ([]: no section); it needs flash_cute in --only."""
    if "flash_cute" not in args.only or sections_alone(args):
        return []
    if args.gqa_bwd is not None:
        return args.gqa_bwd
    return [] if args.quick or "bwd" not in grid_passes(args) else list(GQA_REDUCTIONS)


def memory_section_on(args) -> bool:
    return not args.no_memory and not sections_alone(args) and any(PASSES[p].grad_enabled for p in grid_passes(args))


def varlen_section_on(args) -> bool:
    return not args.no_varlen and (args.varlen or not sections_alone(args))


def decode_section_on(args) -> bool:
    return not args.no_decode and (args.decode or not sections_alone(args))


def grid_from_args(args) -> list[Case]:
    """The grid's cases ([] with --varlen or --decode: those sections alone)."""
    if sections_alone(args):
        return []
    hdims = sorted(args.hdim or PAPER_HDIMS)
    seqlens = sorted(args.seqlen or (QUICK_SEQLENS if args.quick else PAPER_SEQLENS))
    return build_grid(grid_passes(args), grid_dtypes(args), hdims, grid_causals(args), seqlens,
                      args.tokens, args.model_dim)


def print_dry_run(cases: list[Case], varlen: list[VarlenCase], decode: list[DecodeCase], options: list[OptionsCase],
                  args) -> None:
    table = Table(CASE_COLUMNS + [("seqlen", 6, ">"), ("batch", 5, ">"), ("heads", 5, ">"),
                                  ("GFLOP", 8, ">"), ("q MiB", 6, ">")])
    print(f"# command: {command_line()}")
    alone = [f"--{n}" for n in ("varlen", "decode", "options") if getattr(args, n)]
    print(f"# {len(cases)} shapes" + (f" ({' '.join(alone)}: the section(s) alone)" if alone else "")
          + f"; implementations: {', '.join(n for n in IMPL_NAMES if n in args.only)} "
          f"(whether each can run is found out when the benchmark runs)")
    if cases:
        print(table.header())
        for c in cases:
            print(table.line(case_cells(c) + [fmt_seqlen(c.seqlen), c.batch, c.nheads,
                                              f"{c.flops / 1e9:.0f}", f"{c.tensor_bytes / 2**20:.0f}"]))
        print(f"# {sum(c.flops for c in cases) / 1e12:.1f} TFLOP per implementation over all shapes")
    if args.gqa_bwd:
        print(f"# GQA backward: {describe_case(gqa_case(args, 'bwd', False)).replace(' non-causal', '')}, "
              f"causal {'/'.join('on' if c else 'off' for c in grid_causals(args))}; flash_cute with "
              f"{', '.join(args.gqa_bwd)}, and the other implementations")
    else:
        print("# GQA backward: not run (--gqa-bwd none, --quick, --varlen, --decode, --options, no bwd pass, or "
              "flash_cute not selected)")
    if memory_section_on(args):
        for c in memory_cases(args):
            print(f"# memory: forward + backward peak at {c.dtype} d{c.hdim} seqlen {fmt_seqlen(c.seqlen)} "
                  f"batch {c.batch} heads {fmt_heads(c)} (q: {c.tensor_bytes / 2**20:.0f} MiB)")
    else:
        print("# memory: not run (--no-memory, --varlen, --decode, --options, or no pass with a backward)")
    if varlen:
        seqlens = varlen[0].seqlens
        print(f"# varlen: {len(seqlens)} sequences of {min(seqlens)}..{max(seqlens)} tokens "
              f"(uniform in [{VARLEN_MIN_LEN}, {VARLEN_MAX_LEN}], seed {VARLEN_SEED}), {sum(seqlens)} tokens, "
              f"heads {varlen[0].nheads}; {len(varlen)} rows:")
        for c in varlen:
            print(f"#   {describe_case(c)}: {c.flops / 1e9:.0f} GFLOP, q {c.tensor_bytes / 2**20:.0f} MiB")
    else:
        print("# varlen: not run (--no-varlen, or --decode or --options alone)")
    if decode:
        layouts = ", ".join(f"{n} {'/'.join(l for l in DECODE_LAYOUTS if l in ls)}"
                            for n, ls in DECODE_IMPL_LAYOUTS.items() if n in args.only)
        print(f"# decode: flash_attn_with_kvcache, {decode[0].dtype} d{decode[0].hdim} heads {fmt_heads(decode[0])}, "
              f"q length 1, cache_seqlens = cache - 1, one new k/v row; {layouts}; a copy-bandwidth probe "
              f"({DECODE_COPY_BYTES / 2**30:g} GiB); {len(decode)} shapes:")
        for c in decode:
            print(f"#   batch {c.batch} cache {fmt_seqlen(c.seqlen)}: K/V read {c.kv_bytes / 2**20:.0f} MiB per call, "
                  f"oracle rows {','.join(map(str, decode_oracle_rows(c.batch)))}")
    else:
        print("# decode: not run (--no-decode, or --varlen or --options alone)")
    if options:
        print(f"# options: flash_attn_func, {', '.join(dict.fromkeys(c.pass_name for c in options))}; flash_cute and "
              f"the anchors with options (torch-flash: aten._flash_attention_forward/_backward); {len(options)} rows:")
        for c in options:
            if c.pass_name == options[0].pass_name:
                print(f"#   {c.dtype} d{c.hdim} seqlen {fmt_seqlen(c.seqlen)} batch {c.batch} heads {fmt_heads(c)} "
                      f"{c.variant}: {describe_options(c)}; {c.pairs / c.seqlen ** 2:.3f} of the pairs")
    else:
        print("# options: not run (--options runs it)")


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
    started = time.perf_counter()
    args = parse_args(argv)
    args.passes = grid_passes(args)
    args.gqa_bwd = gqa_reductions(args)
    cases = grid_from_args(args)
    varlen_cases_todo = varlen_cases(args) if varlen_section_on(args) else []
    decode_cases_todo = decode_cases() if decode_section_on(args) else []
    options_cases_todo = options_cases(args) if args.options else []
    validate(cases + varlen_cases_todo + decode_cases_todo + options_cases_todo)
    if not 1 <= args.gqa_shape[4] <= 256:
        raise SystemExit(f"--gqa-shape: head dim {args.gqa_shape[4]}: every implementation here takes 1 .. 256")
    if args.dry_run:
        print_dry_run(cases, varlen_cases_todo, decode_cases_todo, options_cases_todo, args)
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
    if cases:
        log(f"# {len(cases)} shapes; batch = {args.tokens} // seqlen, nheads = {args.model_dim} // d; "
            f"TFLOP/s from 4*b*h*s*s*d per forward (halved when causal), x2.5 for bwd, x3.5 for fwdbwd")
        log(f"# maxdiff = max |flash_cute - reference| on the same input ('!' above {args.tol:g}), for bwd and "
            f"fwdbwd per tensor divided by max(1, max |reference|); reference: the first of "
            f"{', '.join(REFERENCE_ORDER)} that ran")
    log()

    bench = Bench(impls, timer, args.seed, log)
    table = row_table(impl_names)
    rows: list[Row] = []
    # varlen, decode, options: VarlenRow, DecodeRow, OptionsRow objects; decode_copy: the copy-bandwidth probe
    extras: dict = {"gqa_bwd": [], "memory": [], "varlen": [], "decode": [], "decode_copy": {}, "options": []}
    status = 0
    try:
        if cases:
            log(table.header())
        for case in cases:
            if rows and rows[-1].case.group != case.group:
                log()
            rows.append(bench.run_case(case))
            log(format_row(table, rows[-1], impl_names, args.tol))
        if cases:
            log()
        if args.gqa_bwd:
            extras["gqa_bwd"] = run_gqa_section(bench, impls, args, log)
        if memory_section_on(args):
            extras["memory"] = run_memory_section(bench, impls, args, log)
        if varlen_cases_todo:
            run_varlen_section(bench, impls, varlen_cases_todo, log, extras["varlen"])
        if decode_cases_todo:
            run_decode_section(bench, impls, decode_cases_todo, args, log, extras["decode"], extras["decode_copy"])
        if options_cases_todo:
            run_options_section(bench, impls, options_cases_todo, args, log, extras["options"])
    except FatalCudaError as e:
        log(f"# FATAL: the CUDA context died ({e}); stopping after {len(rows)} shapes")
        status = 2
    except KeyboardInterrupt:
        log(f"# interrupted after {len(rows)} shapes")
        status = 130
    finally:
        if args.out:
            write_outputs(args, env, rows, impl_names, log, extras)
        if rows:
            log()
            for line in summary_lines(rows, impl_names, args.tol):
                log(line)
        for line in (extras_summary_lines(extras["gqa_bwd"], extras["memory"]) + varlen_summary_lines(extras["varlen"])
                     + decode_summary_lines(extras["decode"], args.tol)
                     + options_summary_lines(extras["options"], args.tol)):
            log(line)
        log(f"# wall time: {time.perf_counter() - started:.0f} s")
        log.close()
    if status == 0 and flash_cute_failed(rows + extras["varlen"] + extras["decode"] + extras["options"], args.tol,
                                         extras["gqa_bwd"]):
        status = 1
    return status


def flash_cute_failed(rows: list[Row], tol: float, gqa: list[dict] = ()) -> bool:
    """A flash_cute result above tol (varlen rows: breaking the 2x rule), or a flash_cute
    failure other than a kernel left out of the build, in the grid, the varlen, the decode (any
    layout: flash_cute[paged16] ...), the options or the GQA section."""
    for r in rows:
        if r.flagged(tol):
            return True
        for name, m in r.results.items():
            if name.partition("[")[0] == "flash_cute" and m.error and not m.skipped:
                return True
    for r in gqa:
        if r["impl"].startswith("flash_cute") and (
            (r["error"] and not r["skipped"]) or not (r["max_diff_vs_first"] is None or r["max_diff_vs_first"] <= tol)
        ):
            return True
    return False


def write_outputs(args, env: dict, rows: list[Row], impl_names: list[str], log: Log, extras: dict) -> None:
    varlen, decode, options = extras["varlen"], extras["decode"], extras["options"]  # *Row objects
    write_json(args.out / "results.json", env, rows, args,
               {**extras, "varlen": [r.to_dict() for r in varlen], "decode": [r.to_dict() for r in decode],
                "options": [r.to_dict() for r in options]})
    write_csv(args.out / "results.csv", rows + varlen + decode + options)
    written = ["results.json", "results.csv", "log.txt"]
    if rows and not args.no_plot:
        try:
            written += [p.name for p in write_plots(args.out, rows, impl_names, env.get("gpu"))]
        except Exception as e:  # noqa: BLE001 - no matplotlib, say so and keep the rest
            log(f"# plots skipped: {short_error(e)}")
    log(f"# wrote {', '.join(written)} to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
