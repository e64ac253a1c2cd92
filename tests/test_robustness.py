"""Robustness: bad inputs, extreme shapes, non-finite values, torch.compile / torch.export /
torch.library.opcheck of every op, CUDA graphs, and the absence of host syncs on the hot paths.

CPU tests (run everywhere):
  * every row of docs/errors.md (tests/error_cases.py) raises what the table says, and the file
    is current;
  * the values of index tensors (cu_seqlens, cache_seqlens, cache_batch_idx, cache_leftpad,
    block_table) are checked on the CPU, and a refused call leaves the caches untouched;
  * opcheck of flash_cute::fwd (padded, paged, options), ::bwd, ::bwd_into and ::decode;
  * flash_attn_with_kvcache under torch.compile(fullgraph=True) and torch.export on the CPU, and
    its CUDA route traced with FakeTensor CUDA tensors (strict and non-strict export: no graph
    break, the decode op with its in-place cache mutation in the graph);
  * a small transformer block (flash_attn_func, and the varlen function on packed sequences)
    trained under torch.compile(fullgraph=True) to the eager result;
  * NaN/Inf inputs, empty batches, tiny head dims, offset views and strided kvcache inputs;
  * the appends write exactly the slots they should (guard regions around the caches);
  * the bodies of the heavy GPU tests below, run at a small scale (their oracles and tricks).

GPU tests (@pytest.mark.cuda; the heavy ones also @pytest.mark.slow): tensors over 2^31
elements (forward, backward, varlen, kvcache contiguous and paged, the long-query route), seqlen
128k (forward, decode), batch * heads above 65,535, the grid limits' errors, head dims 8/4/1,
batch 0 and all-empty varlen, offset views, non-finite inputs, append guard regions, CUDA graphs
of forward + backward (padded and varlen), torch.compile / torch.export on the GPU, the index
checks of FLASH_CUTE_CHECK_INDICES, and torch.cuda.set_sync_debug_mode("error") around the hot
paths. Together they stay under ~60 GB of GPU memory and a minute of GPU time.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

import error_cases
import flash_cute
import flash_cute.flash_attn_interface as interface
from flash_cute import FlashAttnValueError
from flash_cute.reference import kvcache_attention, naive_attention
from helpers import (
    GRAD_ROUNDING_TERM,
    ROUNDING_TERM,
    assert_2x_rule,
    assert_close_to_rounding,
    assert_grads_2x_rule,
    assert_lse_matches,
    capture_cuda_graph,
    cu_seqlens_of,
    make_qkv,
    naive_grads,
    require_bwd_kernel,
    require_kernel,
)

ROOT = Path(__file__).resolve().parent.parent
BF16 = torch.bfloat16


def _i32(*values, device="cpu"):
    return torch.tensor(values, dtype=torch.int32, device=device)


def _randn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, device=device, dtype=torch.float32 if dtype == torch.float32 else dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _has_extension() -> bool:
    try:
        import flash_cute._C  # noqa: F401
    except ImportError:
        return False
    return True


# ============================================================================================
# 1. The error table (docs/errors.md)


@pytest.mark.parametrize("case", error_cases.CASES, ids=[c.id for c in error_cases.CASES])
def test_error_case(case):
    """Each bad input raises the documented type, which is also a RuntimeError."""
    exc = error_cases.run_case(case)
    assert isinstance(exc, case.exc), f"raised {type(exc).__name__}: {exc}"
    assert isinstance(exc, RuntimeError), f"{type(exc).__name__} is not a RuntimeError"
    assert str(exc), "empty message"


def test_errors_doc_is_current():
    """docs/errors.md is what tools/errors_doc.py writes: the messages quoted are the real ones."""
    current = (ROOT / "docs" / "errors.md").read_text()
    assert current == error_cases.render_markdown(), "docs/errors.md is stale: run python tools/errors_doc.py"


# ============================================================================================
# 2. Values of the index tensors


def _kvcache_inputs(device="cpu", dtype=torch.float32, batch=2, cache_rows=None, cache_len=16, pages=None, page_size=4,
                    nheads=4, nheads_k=2, d=16, seqlen_q=1, seqlen_new=1):
    """q, caches (contiguous (cache_rows, cache_len, ...) or paged (pages, page_size, ...)), new k, v."""
    if pages is None:
        shape = (cache_rows or batch, cache_len, nheads_k, d)
    else:
        shape = (pages, page_size, nheads_k, d)
    x = dict(q=_randn(batch, seqlen_q, nheads, d, dtype=dtype, device=device),
             k_cache=_randn(*shape, dtype=dtype, device=device), v_cache=_randn(*shape, dtype=dtype, device=device))
    if seqlen_new:
        x["k"] = _randn(batch, seqlen_new, nheads_k, d, dtype=dtype, device=device)
        x["v"] = _randn(batch, seqlen_new, nheads_k, d, dtype=dtype, device=device)
    return x


# (id, extra arguments of flash_attn_with_kvcache, regex of the message); caches of 2 rows x 16,
# or 6 pages of 4 rows ("paged"), one new row per batch row
BAD_KVCACHE_VALUES = [
    ("seqlens-past-end", dict(cache_seqlens=(3, 16)), r"cache_seqlens must be in \[0, 15\].*cache_seqlens\[1\] = 16"),
    ("seqlens-negative", dict(cache_seqlens=(-1, 2)), r"cache_seqlens\[0\] = -1"),
    ("batch-idx-past-end", dict(cache_seqlens=(3, 4), cache_batch_idx=(1, 2)), r"cache_batch_idx\[1\] = 2"),
    ("batch-idx-negative", dict(cache_seqlens=(3, 4), cache_batch_idx=(-1, 0)), r"cache_batch_idx\[0\] = -1"),
    ("leftpad-past-seqlens", dict(cache_seqlens=(3, 4), cache_leftpad=(4, 0)), r"cache_leftpad\[0\] = 4"),
    ("leftpad-negative", dict(cache_seqlens=(3, 4), cache_leftpad=(0, -1)), r"cache_leftpad\[1\] = -1"),
    ("paged-entry-past-end", dict(paged=True, cache_seqlens=(3, 4), block_table=((0, -1, -1), (3, 6, -1))),
     r"block_table\[1, 1\] = 6 is not a page"),
    ("paged-entry-negative", dict(paged=True, cache_seqlens=(3, 4), block_table=((-2, 1, 1), (3, 4, 5))),
     r"block_table\[0, 0\] = -2"),
]


def _call_kvcache(x, device, extra):
    extra = dict(extra)
    paged = extra.pop("paged", False)
    args = dict(x)
    for name, value in extra.items():
        args[name] = torch.tensor(value, dtype=torch.int32, device=device)
    assert paged == ("block_table" in args)
    return flash_cute.flash_attn_with_kvcache(**args, causal=True)


@pytest.mark.parametrize("extra,message", [c[1:] for c in BAD_KVCACHE_VALUES], ids=[c[0] for c in BAD_KVCACHE_VALUES])
@pytest.mark.parametrize("device,dtype", [pytest.param("cpu", torch.float32, id="cpu"),
                                          pytest.param("cuda", BF16, id="cuda-checked", marks=pytest.mark.cuda)])
def test_bad_kvcache_index_values_refused(device, dtype, extra, message, monkeypatch):
    """Out-of-range index values raise FlashAttnValueError before anything is written (the caches
    keep their bits): always on the CPU, on CUDA with CHECK_INDEX_VALUES (FLASH_CUTE_CHECK_INDICES=1)."""
    if device == "cuda":  # refused before any kernel runs: no kernel needed in the build
        monkeypatch.setattr(interface, "CHECK_INDEX_VALUES", True)
    x = _kvcache_inputs(device, dtype, pages=6 if extra.get("paged") else None)
    before = {n: x[n].clone() for n in ("k_cache", "v_cache")}
    with pytest.raises(FlashAttnValueError, match=message) as info:
        _call_kvcache(x, device, extra)
    assert isinstance(info.value, RuntimeError)
    for name, t in before.items():
        assert _same_bits(x[name], t), f"{name} was modified by a refused call"


def test_kvcache_index_values_at_their_limits_are_accepted():
    """The checks refuse what they should and no more: a cache filled to its last row, left
    padding equal to cache_seqlens (only the new key visible), the last cache row, and block
    table entries past a row's length holding anything (-1, a huge value) give the reference's
    result."""
    for extra in (dict(cache_seqlens=(15, 0)), dict(cache_seqlens=(3, 4), cache_leftpad=(3, 0)),
                  dict(cache_seqlens=(3, 4), cache_batch_idx=(1, 0)),
                  dict(paged=True, cache_seqlens=(3, 19), block_table=((5, -1, 2**31 - 1, -7, -1), (0, 1, 2, 3, 4)))):
        paged = extra.get("paged", False)
        x = _kvcache_inputs(cache_rows=2, pages=6 if paged else None)
        ref_in = {n: t.clone() for n, t in x.items()}
        kwargs = {n: torch.tensor(val, dtype=torch.int32) for n, val in extra.items() if n != "paged"}
        got = flash_cute.flash_attn_with_kvcache(**x, **kwargs, causal=True)
        want, _ = kvcache_attention(**ref_in, **kwargs, causal=True)  # reads only the entries in use
        assert_close_to_rounding(got, want, f"out with {extra}")
        assert _same_bits(x["k_cache"], ref_in["k_cache"]) and _same_bits(x["v_cache"], ref_in["v_cache"])


BAD_VARLEN_VALUES = [
    ("cu-q-decreasing", dict(cu_seqlens_q=(0, 5, 3, 10)), r"cu_seqlens_q\[2\] = 3"),
    ("cu-q-past-q", dict(cu_seqlens_q=(0, 5, 7, 11)), r"end at <= q\.shape\[0\] \(10\)"),
    ("cu-k-past-k", dict(cu_seqlens_k=(0, 5, 6, 13)), r"end at <= k\.shape\[0\] \(12\)"),
    ("cu-k-negative", dict(cu_seqlens_k=(-1, 5, 6, 12)), r"cu_seqlens_k\[0\] = -1"),
    ("paged-entry", dict(paged=True, block_table=((0, 1), (7, 3), (4, 5))), r"block_table\[1, 0\] = 7"),
    ("paged-too-long", dict(paged=True, cu_seqlens_k=(0, 4, 8, 17), block_table=((0, 1), (2, 3), (4, 5))),
     r"batch row 2 has 9 keys"),
]


@pytest.mark.parametrize("extra,message", [c[1:] for c in BAD_VARLEN_VALUES], ids=[c[0] for c in BAD_VARLEN_VALUES])
@pytest.mark.parametrize("device,dtype", [pytest.param("cpu", torch.float32, id="cpu"),
                                          pytest.param("cuda", BF16, id="cuda-checked", marks=pytest.mark.cuda)])
def test_bad_varlen_index_values_refused(device, dtype, extra, message, monkeypatch):
    if device == "cuda":
        monkeypatch.setattr(interface, "CHECK_INDEX_VALUES", True)
    extra = dict(extra)
    paged = extra.pop("paged", False)
    q = _randn(10, 4, 16, dtype=dtype, device=device)
    k = _randn(*((6, 4, 2, 16) if paged else (12, 2, 16)), dtype=dtype, device=device)
    args = dict(cu_seqlens_q=(0, 3, 3, 10), cu_seqlens_k=(0, 4, 6, 12) if paged else (0, 5, 6, 12))
    args.update(extra)
    args = {n: torch.tensor(val, dtype=torch.int32, device=device) for n, val in args.items()}
    with pytest.raises(FlashAttnValueError, match=message):
        flash_cute.flash_attn_varlen_func(q, k, k, max_seqlen_q=7, max_seqlen_k=6, **args)


def test_index_values_not_checked_while_tracing():
    """Inside a traced graph the values are not read (that would be a data-dependent graph
    break); outside, the same call is refused."""
    x = _kvcache_inputs(seqlen_new=0)
    seqlens = _i32(3, 17)
    with pytest.raises(FlashAttnValueError):
        flash_cute.flash_attn_with_kvcache(**x, cache_seqlens=seqlens)

    def f(q, k_cache, v_cache, cache_seqlens):
        return flash_cute.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    ok = compiled(x["q"], x["k_cache"], x["v_cache"], _i32(3, 16))  # a valid call compiles, no graph break
    assert ok.shape == x["q"].shape


# ============================================================================================
# 3. torch.library.opcheck of every op (the CPU / reference implementations; CUDA: test_*_gpu)


def test_opcheck_fwd_and_bwd_cpu():
    """flash_cute::fwd (padded, with options, dropout and S_dmask; paged varlen), flash_cute::bwd
    and flash_cute::bwd_into: schemas, fake tensors, autograd registration, AOT dispatch."""
    q, k, v = make_qkv(2, 9, 13, 4, 2, 16, torch.float32)
    fwd, bwd, bwd_into = (torch.ops.flash_cute.fwd.default, torch.ops.flash_cute.bwd.default,
                          torch.ops.flash_cute.bwd_into.default)
    options = (None, None, 0, 0, None, 3.0, 4, 1, torch.rand(2, 4), 0.2, torch.randint(0, 2**62, (2,)))
    torch.library.opcheck(fwd, (q, k, v, 0.25, True))
    torch.library.opcheck(fwd, (q, k, v, 0.25, False, False, *options, True))
    out, lse, _ = torch.ops.flash_cute.fwd(q, k, v, 0.25, True)
    dout = torch.randn_like(out)
    torch.library.opcheck(bwd, (dout, q, k, v, out, lse, 0.25, True, False))
    torch.library.opcheck(bwd, (dout, q, k, v, out, lse, 0.25, True, True, *options[:4], *options[5:]))
    grads = tuple(torch.empty_like(t) for t in (q, k, v))
    torch.library.opcheck(bwd_into, (dout, q, k, v, out, lse, 0.25, True, False, None, None, 0, 0, 0.0, -1, -1,
                                     None, 0.0, None, *grads))
    # Paged K/V (forward only): pages of 4 rows, a shuffled table.
    qv = torch.randn(10, 4, 16)
    pages = torch.randn(7, 4, 2, 16)
    table = torch.randperm(7)[:6].view(3, 2).to(torch.int32)
    torch.library.opcheck(fwd, (qv, pages, pages, 0.25, True, False, _i32(0, 3, 3, 10), _i32(0, 5, 6, 14), 7, 8, table))


DECODE_CASES = ["append", "no-append", "int-seqlens", "batch-idx-leftpad", "paged-append", "options"]


def _decode_args(case, device="cpu", dtype=torch.float32, d=16):
    """Arguments of flash_cute::decode for a case (batch 2, 8 query heads over 2 KV heads)."""
    paged = case == "paged-append"
    x = _kvcache_inputs(device, dtype, cache_rows=3, cache_len=40, pages=12 if paged else None, page_size=16,
                        nheads=8, nheads_k=2, d=d, seqlen_q=2, seqlen_new=0 if case == "no-append" else 2)
    seqlens = _i32(17, 30, device=device)
    table = torch.randperm(12, device=device)[:6].view(2, 3).to(torch.int32) if paged else None
    idx = _i32(2, 0, device=device) if case == "batch-idx-leftpad" else None
    pad = _i32(3, 0, device=device) if case == "batch-idx-leftpad" else None
    options = (2.0, 9, 0, torch.rand(2, 8, device=device)) if case == "options" else (0.0, -1, -1, None)
    seqlen_k, cache_seqlens = (19, None) if case == "int-seqlens" else (0, seqlens)
    return (x["q"], x["k_cache"], x["v_cache"], x.get("k"), x.get("v"), 0.25, case != "options", seqlen_k,
            0 if case == "no-append" else 2, cache_seqlens, idx, pad, table, 3, *options)


@pytest.mark.parametrize("case", DECODE_CASES)
def test_opcheck_decode_cpu(case):
    """flash_cute::decode (the split-KV op, declared to mutate k_cache and v_cache) on its
    reference implementation: schema and mutations, fake tensors, AOT dispatch."""
    torch.library.opcheck(torch.ops.flash_cute.decode.default, _decode_args(case))


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_op_cpu_matches_reference(case):
    """The op's reference path is flash_attn_with_kvcache's semantics: it equals
    reference.kvcache_attention, appending where that appends."""
    args = _decode_args(case)
    q, k_cache, v_cache, k, v, scale, causal, seqlen_k, seqlen_new, seqlens, idx, pad, table, _, softcap, left, right, \
        alibi = args
    ref_caches = (k_cache.clone(), v_cache.clone())
    out, lse = torch.ops.flash_cute.decode(*args)
    cached = seqlen_k if seqlens is None else seqlens
    if k is None and seqlen_new:
        cached = cached + seqlen_new
    want, want_lse = kvcache_attention(q, *ref_caches, k, v, cache_seqlens=cached, cache_batch_idx=idx,
                                       cache_leftpad=pad, block_table=table, softmax_scale=scale, causal=causal,
                                       softcap=softcap, window_size=(left, right), alibi_slopes=alibi)
    assert_close_to_rounding(out, want, "out")
    assert_close_to_rounding(lse, want_lse, "lse")
    assert _same_bits(k_cache, ref_caches[0]) and _same_bits(v_cache, ref_caches[1])


# ============================================================================================
# 4. torch.compile and torch.export of flash_attn_with_kvcache


class _DecodeStep(torch.nn.Module):
    """One decoding step: append k, v at cache_seqlens and attend (an inference module)."""

    def __init__(self, rotary=False, paged=False, **kwargs):
        super().__init__()
        self.rotary, self.paged, self.kwargs = rotary, paged, kwargs

    def forward(self, q, k_cache, v_cache, k, v, cache_seqlens, *extra):
        kwargs = dict(self.kwargs)
        extra = list(extra)
        if self.paged:
            kwargs["block_table"] = extra.pop(0)
        if self.rotary:
            kwargs["rotary_cos"], kwargs["rotary_sin"] = extra
        return flash_cute.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                                                  return_softmax_lse=True, **kwargs)


def _decode_step_inputs(device, dtype, paged, rotary, d=16, batch=2, seqlen_q=1, cache_len=48):
    if paged:
        pages = batch * (cache_len // 16) + 2
        x = _kvcache_inputs(device, dtype, batch=batch, pages=pages, page_size=16, nheads=8, nheads_k=2, d=d,
                            seqlen_q=seqlen_q)
        extra = [torch.randperm(pages, device=device)[: batch * (cache_len // 16)].view(batch, -1).to(torch.int32)]
    else:
        x = _kvcache_inputs(device, dtype, batch=batch, cache_len=cache_len, nheads=8, nheads_k=2, d=d,
                            seqlen_q=seqlen_q)
        extra = []
    if rotary:
        angles = torch.rand(cache_len + seqlen_q, 4, device=device, dtype=torch.float32) * 6.28
        extra += [angles.cos().to(dtype), angles.sin().to(dtype)]
    seqlens = torch.randint(0, cache_len - 3, (batch,), device=device, dtype=torch.int32)
    return [x["q"], x["k_cache"], x["v_cache"], x["k"], x["v"], seqlens, *extra]


def _clone_all(args):
    return [t.clone() if isinstance(t, torch.Tensor) else t for t in args]


def _assert_step_matches(got_args, got, want_args, want, exact):
    """Outputs and both caches (the in-place append) of a traced step against the eager step."""
    check = (lambda a, b, name: (_same_bits(a, b) or pytest.fail(f"{name} differs bitwise"))) if exact else \
        assert_close_to_rounding
    check(got[0], want[0], "out")
    check(got[1], want[1], "lse")
    check(got_args[1], want_args[1], "k_cache")
    check(got_args[2], want_args[2], "v_cache")


@pytest.mark.parametrize("paged,rotary", [(False, False), (True, True)], ids=["contiguous", "paged-rotary"])
def test_kvcache_torch_compile_cpu(paged, rotary):
    """torch.compile(fullgraph=True) of a decoding step (aot_eager: no C++ compiler needed) gives
    the eager outputs and appends, over three steps with growing cache_seqlens (one compile)."""
    module = _DecodeStep(rotary=rotary, paged=paged, causal=True)
    args = _decode_step_inputs("cpu", torch.float32, paged, rotary)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    got_args, want_args = _clone_all(args), _clone_all(args)
    for step in range(3):
        got, want = compiled(*got_args), module(*want_args)
        _assert_step_matches(got_args, got, want_args, want, exact=False)
        new_k, new_v = torch.randn_like(args[3]), torch.randn_like(args[4])
        for a in (got_args, want_args):
            a[5] += 1  # the next position
            a[3].copy_(new_k)
            a[4].copy_(new_v)


def test_kvcache_torch_export_cpu():
    """torch.export of the decoding step: the exported program appends into the caches it is
    given and returns the eager outputs."""
    module = _DecodeStep(causal=True)
    args = _decode_step_inputs("cpu", torch.float32, False, False)
    exported = torch.export.export(module, tuple(_clone_all(args)))
    got_args, want_args = _clone_all(args), _clone_all(args)
    got, want = exported.module()(*got_args), module(*want_args)
    _assert_step_matches(got_args, got, want_args, want, exact=False)


def _fake_cuda(args):
    """FakeTensor CUDA tensors shaped, strided and typed like the arguments (no data, no GPU)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda") for t in args]


def _traced_targets(exported) -> set:
    targets = set()
    for module in exported.graph_module.modules():
        graph = getattr(module, "graph", None)
        if graph is not None:
            targets |= {str(n.target) for n in graph.nodes if n.op == "call_function"}
    return targets


TRACE_CASES = {
    # id: (module kwargs, paged, rotary, seqlen_q, the flash_cute op expected in the graph)
    "decode": (dict(causal=True), False, False, 1, "flash_cute.decode.default"),
    "decode-paged-rotary": (dict(causal=True), True, True, 2, "flash_cute.decode.default"),
    "decode-options": (dict(causal=True, window_size=(8, 0), softcap=3.0), False, False, 1, "flash_cute.decode.default"),
    "long-query": (dict(causal=True), False, False, 40, "flash_cute.fwd.default"),
    "long-query-options": (dict(softcap=3.0, window_size=(16, 16)), False, False, 40, "flash_cute.fwd.default"),
}


@pytest.mark.skipif(torch.version.cuda is None, reason="tracing with FakeTensor CUDA tensors needs a CUDA build of torch (a CPU-only build cannot slice them); GPU hosts have one")
@pytest.mark.skipif(not _has_extension(), reason="the CUDA route asks the compiled module for its tile sizes")
@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict-dynamo"])
@pytest.mark.parametrize("case", sorted(TRACE_CASES))
def test_kvcache_cuda_route_traces(case, strict, monkeypatch):
    """The CUDA route of flash_attn_with_kvcache (the split-KV op, or the forward kernel for long
    queries) traces with FakeTensor CUDA inputs: torch.export with Dynamo (strict: what
    torch.compile(fullgraph=True) sees, so no graph break) and without; nothing reads a data
    pointer or an index value at trace time (FLASH_CUTE_CHECK_INDICES on), and the graph holds
    the op with its in-place append into the caches."""
    monkeypatch.setattr(interface, "CHECK_INDEX_VALUES", True)
    kwargs, paged, rotary, seqlen_q, op = TRACE_CASES[case]
    if op == "flash_cute.fwd.default" and "softcap" in kwargs:
        from test_options_kernels import _require

        _require(BF16, 128)  # the trace checks that the build has the kernels with options
    args = _decode_step_inputs("cpu", BF16, paged, rotary, d=128, seqlen_q=seqlen_q, cache_len=64)
    fake = _fake_cuda(args)
    exported = torch.export.export(_DecodeStep(rotary=rotary, paged=paged, **kwargs), tuple(fake), strict=strict)
    targets = _traced_targets(exported)
    assert op in targets, f"{op} not in the traced graph: {sorted(t for t in targets if 'flash' in t)}"
    if op == "flash_cute.decode.default":
        schema = torch.ops.flash_cute.decode.default._schema
        mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        assert mutated == ["k_cache", "v_cache"], mutated


@pytest.mark.skipif(torch.version.cuda is None, reason="tracing with FakeTensor CUDA tensors needs a CUDA build of torch (a CPU-only build cannot slice them); GPU hosts have one")
@pytest.mark.skipif(not _has_extension(), reason="needs the compiled module's tile sizes")
@pytest.mark.parametrize("fn", ["func", "varlen-paged", "qkvpacked"])
def test_attention_cuda_route_traces(fn):
    """flash_attn_func, the varlen function with a paged cache and the packed function trace
    with FakeTensor CUDA inputs under Dynamo (strict export) to the flash_cute ops."""

    class M(torch.nn.Module):
        def forward(self, *xs):
            if fn == "func":
                return flash_cute.flash_attn_func(*xs, causal=True, softcap=2.0, window_size=(7, 0))
            if fn == "qkvpacked":
                return flash_cute.flash_attn_qkvpacked_func(*xs, causal=True)
            q, pages, cu_q, cu_k, table = xs
            return flash_cute.flash_attn_varlen_func(q, pages, pages, cu_q, cu_k, 9, 9, causal=True, block_table=table)

    if fn == "func":
        args = list(make_qkv(2, 9, 13, 4, 2, 128, BF16))
    elif fn == "qkvpacked":
        args = [torch.randn(2, 9, 3, 4, 128).to(BF16)]
    else:
        args = [torch.randn(10, 4, 128).to(BF16), torch.randn(6, 64, 2, 128).to(BF16), _i32(0, 3, 3, 10),
                _i32(0, 5, 6, 14), _i32(0, 1, 2, 3, 4, 5).view(3, 2)]
    fake = _fake_cuda(args)
    exported = torch.export.export(M(), tuple(fake), strict=True)
    assert "flash_cute.fwd.default" in _traced_targets(exported)


# ============================================================================================
# 5. A small transformer block trained under torch.compile(fullgraph=True)


class _Block(torch.nn.Module):
    """Pre-norm transformer block with grouped-query attention through flash_cute: padded
    batches (flash_attn_func) or packed sequences (flash_attn_varlen_func, cu_seqlens).
    Parameters in float32; the attention runs in ``attn_dtype`` (bfloat16 on a GPU)."""

    def __init__(self, dim=64, heads=4, kv_heads=2, attn_dtype=torch.float32):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.attn_dtype = heads, kv_heads, dim // heads, attn_dtype
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.proj = torch.nn.Linear(heads * self.head_dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x, cu_seqlens=None, max_seqlen=0):
        h = self.qkv(self.norm1(x)).to(self.attn_dtype)
        q, k, v = h.split([self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], -1)
        q = q.unflatten(-1, (self.heads, self.head_dim))
        k, v = (t.unflatten(-1, (self.kv_heads, self.head_dim)) for t in (k, v))
        if cu_seqlens is None:
            a = flash_cute.flash_attn_func(q, k, v, causal=True)
        else:
            a = flash_cute.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
        x = x + self.proj(a.flatten(-2).to(x.dtype))
        return x + self.mlp(self.norm2(x))


def _train_compiled_vs_eager(device, attn_dtype, varlen, backend, rtol, steps=3, dim=64, heads=4, kv_heads=2):
    """Three SGD steps of the block eagerly and compiled (fullgraph): the losses and the final
    parameters agree within rtol (relative to each tensor's norm)."""
    torch.manual_seed(0)
    model = _Block(dim, heads, kv_heads, attn_dtype).to(device)
    twin = copy.deepcopy(model)
    if varlen:
        lengths = [5, 0, 17, 9]
        x = torch.randn(sum(lengths), dim, device=device)
        inputs = (x, cu_seqlens_of(lengths, device), max(lengths))
    else:
        inputs = (torch.randn(2, 19, dim, device=device),)
    torch._dynamo.reset()
    compiled = torch.compile(twin, fullgraph=True, backend=backend)
    losses = {}
    for name, m, params in (("eager", model, model.parameters()), ("compiled", compiled, twin.parameters())):
        opt = torch.optim.SGD(params, lr=0.05)
        losses[name] = []
        for _ in range(steps):
            opt.zero_grad()
            loss = m(*inputs).square().mean()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["compiled"]), torch.tensor(losses["eager"]), rtol=rtol, atol=rtol)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        rel = ((a - b).norm() / a.norm().clamp_min(1e-12)).item()
        assert rel <= rtol, f"{name}: compiled training drifted from eager by {rel:.2e} (relative norm)"


@pytest.mark.parametrize("varlen", [False, True], ids=["func", "varlen"])
def test_transformer_block_trains_compiled_cpu(varlen):
    """fullgraph (no graph break) through forward and backward, the eager losses and weights."""
    _train_compiled_vs_eager("cpu", torch.float32, varlen, "aot_eager", rtol=1e-5)


# ============================================================================================
# 6. Non-finite inputs


def _nonfinite_case(route, device, dtype, num_splits=0, d=32):
    """(run, inputs) of a route: run(inputs) -> (out, lse) with out shaped (batch, rows, heads, d)
    (varlen: sequence b is batch row b, 6 query rows and 37 keys each). 8 query heads over 2 KV
    heads, no mask: every row sees every key."""
    b, sq, sk, h, hk = 2, 6, 37, 8, 2
    q = _randn(b, sq, h, d, dtype=dtype, device=device)
    k = _randn(b, sk, hk, d, dtype=dtype, device=device)
    v = _randn(b, sk, hk, d, dtype=dtype, device=device)
    if route == "func":
        def run(x):
            out, lse, _ = flash_cute.flash_attn_func(*x, return_attn_probs=True)
            return out, lse
    elif route == "varlen":
        cu_q, cu_k = _i32(0, sq, 2 * sq, device=device), _i32(0, sk, 2 * sk, device=device)

        def run(x):
            out, lse, _ = flash_cute.flash_attn_varlen_func(x[0].flatten(0, 1), x[1].flatten(0, 1), x[2].flatten(0, 1),
                                                            cu_q, cu_k, sq, sk, return_attn_probs=True)
            return out.unflatten(0, (b, sq)), lse.unflatten(1, (b, sq)).transpose(0, 1)
    else:  # kvcache: q (1 query row) against a cache of sk rows
        q = q[:, :1].contiguous()

        def run(x):
            return flash_cute.flash_attn_with_kvcache(x[0], x[1], x[2], cache_seqlens=_i32(sk, sk, device=device),
                                                      num_splits=num_splits, return_softmax_lse=True)
    return run, [q, k, v]


@pytest.mark.parametrize("route", ["func", "varlen", "kvcache"])
def test_nonfinite_inputs_cpu(route):
    _check_nonfinite(route, "cpu", torch.float32)


def _check_nonfinite(route, device, dtype, num_splits=0, d=32):
    """docs/errors.md ("Inputs that are not errors"): NaN in q poisons that (row, head) only; NaN
    in k poisons the rows that see the key (every row here) of the heads of that KV head; Inf in
    v[j, c] makes channel c of those rows non-finite and leaves the other channels as they were.
    Everything else keeps the bits of the clean call."""
    run, x = _nonfinite_case(route, device, dtype, num_splits, d)
    clean_out, clean_lse = run(x)
    assert torch.isfinite(clean_out).all()
    group = x[0].shape[2] // x[1].shape[2]

    def poisoned(which, index, value):
        y = [t.clone() for t in x]
        y[which][index] = value
        return run(y)

    # NaN in q[0, row 0, head 3]
    out, lse = poisoned(0, (0, 0, 3, 5), math.nan)
    assert out[0, 0, 3].isnan().all(), "the (row, head) with a NaN in q must be NaN"
    keep = torch.ones(out.shape[:3], dtype=torch.bool, device=device)
    keep[0, 0, 3] = False
    assert _same_bits(out[keep], clean_out[keep]), "NaN in one q row changed other outputs"
    keep_lse = keep.transpose(1, 2)
    assert _same_bits(lse[keep_lse], clean_lse[keep_lse])
    # NaN in k[0, key 7, KV head 1]: heads group .. 2 * group - 1 of batch 0, every row
    out, _ = poisoned(1, (0, 7, 1, 2), math.nan)
    heads = slice(group, 2 * group)
    assert out[0, :, heads].isnan().all(), "rows that see a NaN key must be NaN"
    keep = torch.ones(out.shape[:3], dtype=torch.bool, device=device)
    keep[0, :, heads] = False
    assert _same_bits(out[keep], clean_out[keep]), "NaN in k changed outputs of other batch rows or KV heads"
    # +Inf in v[1, key 11, KV head 0, channel 4]: channel 4 of batch 1, heads 0 .. group - 1
    out, _ = poisoned(2, (1, 11, 0, 4), math.inf)
    assert not torch.isfinite(out[1, :, :group, 4]).any(), "channel 4 of the rows that see the Inf value must be non-finite"
    keep = torch.ones(out.shape, dtype=torch.bool, device=device)
    keep[1, :, :group, 4] = False
    assert _same_bits(out[keep], clean_out[keep]), "Inf in one v channel changed other outputs"


# ============================================================================================
# 7. Extremes: empty batches, small head dims, offset views, strided kvcache inputs


def _check_empty_batches(device, dtype, d=32):
    """batch 0, seqlen 0 on either side, varlen batches of no sequence or of empty sequences,
    kvcache batch 0 and rows with no cached key: outputs of the right shapes, 0 and lse +inf for
    rows that see no key, zero gradients."""
    h, hk = 4, 2

    def grads_of(fn, *xs):
        leaves = [t.detach().requires_grad_() for t in xs]
        out = fn(*leaves)
        return out, torch.autograd.grad(out, leaves, torch.randn_like(out))

    for b, sq, sk in ((0, 5, 7), (2, 0, 7), (2, 5, 0)):
        q, k, v = make_qkv(b, sq, sk, h, hk, d, dtype, device)
        out, lse, _ = flash_cute.flash_attn_func(q, k, v, return_attn_probs=True)
        assert out.shape == q.shape and lse.shape == (b, h, sq) and lse.dtype == torch.float32
        if out.numel():
            assert (out == 0).all() and torch.isposinf(lse).all(), "no key: output 0, lse +inf"
        out, grads = grads_of(lambda *t: flash_cute.flash_attn_func(*t, causal=True), q, k, v)
        for g, t in zip(grads, (q, k, v)):
            assert g.shape == t.shape and not g.any(), "empty attention must have zero gradients"
    # varlen: no sequence; only empty sequences; queries without keys; keys without queries
    for lens_q, lens_k in (([], []), ([0, 0, 0], [0, 0, 0]), ([3, 2], [0, 0]), ([0, 0], [4, 3])):
        q = _randn(sum(lens_q), h, d, dtype=dtype, device=device)
        k = _randn(sum(lens_k), hk, d, dtype=dtype, device=device)
        v = _randn(sum(lens_k), hk, d, dtype=dtype, device=device)
        cu_q, cu_k = cu_seqlens_of(lens_q, device), cu_seqlens_of(lens_k, device)
        mq, mk = max(lens_q, default=0), max(lens_k, default=0)
        out, lse, _ = flash_cute.flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, return_attn_probs=True)
        assert out.shape == q.shape and lse.shape == (h, q.shape[0])
        assert (out == 0).all() and torch.isposinf(lse).all()
        _, grads = grads_of(lambda *t: flash_cute.flash_attn_varlen_func(*t, cu_q, cu_k, mq, mk, causal=True), q, k, v)
        for g, t in zip(grads, (q, k, v)):
            assert g.shape == t.shape and not g.any()
    # packed, batch 0
    qkv = _randn(0, 5, 3, h, d, dtype=dtype, device=device).requires_grad_()
    out = flash_cute.flash_attn_qkvpacked_func(qkv, causal=True)
    assert out.shape == (0, 5, h, d)
    # kvcache: batch 0 (with an append), and rows with no cached key and no new key
    x = _kvcache_inputs(device, dtype, batch=0, cache_rows=3, nheads=h, nheads_k=hk, d=d)
    out, lse = flash_cute.flash_attn_with_kvcache(**x, cache_seqlens=_i32(device=device), return_softmax_lse=True)
    assert out.shape == (0, 1, h, d) and lse.shape == (0, h, 1)
    x = _kvcache_inputs(device, dtype, batch=2, nheads=h, nheads_k=hk, d=d, seqlen_new=0)
    out, lse = flash_cute.flash_attn_with_kvcache(**x, cache_seqlens=_i32(0, 0, device=device), return_softmax_lse=True)
    assert (out == 0).all() and torch.isposinf(lse).all()


def test_empty_batches_cpu():
    _check_empty_batches("cpu", torch.float32)


def test_small_head_dims_cpu():
    """Head dims 1, 4 and 8 on the reference path (the CUDA kernels: test_small_head_dims_gpu)."""
    for d in (1, 4, 8):
        q, k, v = make_qkv(2, 7, 11, 4, 2, d, torch.float32)
        out = flash_cute.flash_attn_func(q, k, v, causal=True)
        assert_2x_rule(out, q, k, v, causal=True)


def _offset_view(t: torch.Tensor) -> torch.Tensor:
    """t's values in a view whose data pointer is one element past the start of its buffer (not
    16-byte aligned; for int32 4 bytes off)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


def _last_dim_strided(t: torch.Tensor) -> torch.Tensor:
    """t's values with a last-dimension stride of 2."""
    return torch.stack([t, torch.full_like(t, math.nan)], dim=-1).flatten(-2)[..., ::2]


@pytest.mark.parametrize("layout", ["offset", "strided"])
def test_strided_kvcache_inputs(layout):
    """q, the caches, k and v as offset views or with a strided last dimension: the result of the
    contiguous inputs, and the new rows land in the caches that were given (CPU)."""
    make = _offset_view if layout == "offset" else _last_dim_strided
    x = _kvcache_inputs(cache_len=32, nheads=8, nheads_k=2, d=16, seqlen_q=2, seqlen_new=2)
    seqlens = _i32(5, 29)
    plain = {n: t.clone() for n, t in x.items()}
    odd = {n: make(t) for n, t in x.items()}
    want = flash_cute.flash_attn_with_kvcache(**plain, cache_seqlens=seqlens, causal=True)
    got = flash_cute.flash_attn_with_kvcache(**odd, cache_seqlens=seqlens, causal=True)
    assert torch.equal(got, want)
    assert torch.equal(odd["k_cache"], plain["k_cache"]) and torch.equal(odd["v_cache"], plain["v_cache"])


# ============================================================================================
# 8. The append writes only its slots (guard regions around the caches)

_SENTINEL = {2: 0x7FA5, 4: 0x7FC0A5A5}  # NaN bit patterns with a payload (bf16/fp16, fp32)


def _cache_in_guarded_buffer(shape, dtype, device, guard, values):
    """A cache of ``shape`` as a view into a buffer with ``guard`` sentinel elements on each side
    (guard a multiple of 8: 16-byte aligned; else not), holding ``values``. Returns (buf, cache)."""
    numel = math.prod(shape)
    buf = torch.empty(numel + 2 * guard, dtype=dtype, device=device)
    _bits(buf).fill_(_SENTINEL[buf.element_size()])
    cache = buf[guard: guard + numel].view(shape)
    cache.copy_(values)
    return buf, cache


GUARD_LAYOUTS = ["contiguous", "batch_idx", "leftpad", "paged16", "paged64", "long-query"]


def _check_append_guards(device, dtype, layout, aligned, d=32):
    batch, h, hk, cache_len, new = 3, 8, 2, 128, 3
    seqlen_q = 40 if layout == "long-query" else 2  # 160 packed rows: the forward kernel's route
    guard = 64 if aligned else 61
    paged = layout.startswith("paged")
    page = int(layout[5:]) if paged else 0
    if paged:
        pages = batch * cache_len // page + 3
        shape = (pages, page, hk, d)
        table = torch.randperm(pages, device=device)[: batch * cache_len // page].view(batch, -1).to(torch.int32)
    else:
        shape = (batch + 2 if layout == "batch_idx" else batch, cache_len, hk, d)
    seqlens = torch.tensor([0, 61, cache_len - new], dtype=torch.int32, device=device)
    bufs, caches = zip(*(_cache_in_guarded_buffer(shape, dtype, device, guard, _randn(*shape, dtype=dtype, device=device))
                         for _ in range(2)))
    before = [b.clone() for b in bufs]
    k, v = (_randn(batch, new, hk, d, dtype=dtype, device=device) for _ in range(2))
    kwargs = dict(cache_seqlens=seqlens, causal=True)
    rows = list(range(batch))
    if layout == "batch_idx":
        rows = [4, 0, 2]
        kwargs["cache_batch_idx"] = torch.tensor(rows, dtype=torch.int32, device=device)
    if layout == "leftpad":
        kwargs["cache_leftpad"] = torch.tensor([0, 13, 7], dtype=torch.int32, device=device)
    if paged:
        kwargs["block_table"] = table
    q = _randn(batch, seqlen_q, h, d, dtype=dtype, device=device)
    out = flash_cute.flash_attn_with_kvcache(q, caches[0], caches[1], k, v, **kwargs)
    assert torch.isfinite(out).all()
    numel = math.prod(shape)
    for name, buf, old, new_rows in (("k_cache", bufs[0], before[0], k), ("v_cache", bufs[1], before[1], v)):
        assert _same_bits(buf[:guard], old[:guard]), f"{name}: written before the cache"
        assert _same_bits(buf[guard + numel:], old[guard + numel:]), f"{name}: written after the cache"
        cache, old_cache = buf[guard: guard + numel].view(shape), old[guard: guard + numel].view(shape)
        target = torch.zeros(shape[:2], dtype=torch.bool, device=device)
        for b in range(batch):
            positions = torch.arange(int(seqlens[b]), int(seqlens[b]) + new, device=device)
            if paged:
                slot = (table[b].long()[positions // page], positions % page)
            else:
                slot = (torch.full_like(positions, rows[b]), positions)
            target[slot] = True
            assert _same_bits(cache[slot], new_rows[b]), f"{name}: batch row {b}'s new rows are not where they belong"
        assert _same_bits(cache[~target], old_cache[~target]), f"{name}: written outside the appended slots"


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("layout", GUARD_LAYOUTS)
def test_kvcache_append_guard_regions_cpu(layout, aligned):
    _check_append_guards("cpu", torch.float32, layout, aligned)


# ============================================================================================
# 9. The heavy GPU tests' bodies (run below on the GPU at full size, here at a small scale)


def _poison_next_alloc(nbytes: int, device) -> None:
    """NaN bytes in the block of the CUDA caching allocator that the next allocation of about
    nbytes receives, so that output elements a kernel leaves unwritten read as NaN."""
    if torch.device(device).type != "cuda":
        return
    block = torch.empty(nbytes, dtype=torch.uint8, device=device)
    block.fill_(0xFF)
    del block


def _check_many_query_rows(device, dtype, seqlen_q, nheads, d, seqlen_k, rows):
    """A q (and out, dout, dq) of 1 x seqlen_q x nheads x d, checked on ``rows``: the padded
    forward and its lse, the varlen forward (q split into two sequences with their own keys), and
    the backward with dout nonzero only on those rows, so that dk and dv are exactly those rows'
    contribution, dq of the rows is checkable, and dq must be exactly 0 everywhere else."""
    q = _randn(1, seqlen_q, nheads, d, dtype=dtype, device=device)
    k, v = (_randn(1, seqlen_k, nheads, d, dtype=dtype, device=device) for _ in range(2))
    rows = torch.tensor(sorted(set(rows)), device=device)
    _poison_next_alloc(q.nbytes, device)
    out, lse, _ = flash_cute.flash_attn_func(q, k, v, return_attn_probs=True)
    assert not out.isnan().any(), "output elements left unwritten (or NaN computed)"
    _, ref_lse = assert_2x_rule(out[:, rows], q[:, rows], k, v)
    assert_lse_matches(lse[:, :, rows], ref_lse)
    del out, lse
    half = seqlen_q // 2
    k2, v2 = (_randn(2 * seqlen_k, nheads, d, dtype=dtype, device=device) for _ in range(2))
    cu_q, cu_k = _i32(0, half, seqlen_q, device=device), _i32(0, seqlen_k, 2 * seqlen_k, device=device)
    _poison_next_alloc(q.nbytes, device)
    out = flash_cute.flash_attn_varlen_func(q[0], k2, v2, cu_q, cu_k, seqlen_q - half, seqlen_k)
    assert not out.isnan().any(), "varlen: output elements left unwritten (or NaN computed)"
    for seq, sel in ((0, rows[rows < half]), (1, rows[rows >= half])):
        keys = slice(seq * seqlen_k, (seq + 1) * seqlen_k)
        assert_2x_rule(out[sel][None], q[0, sel][None], k2[None, keys], v2[None, keys])
    del out, k2, v2
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = flash_cute.flash_attn_func(*leaves)
    dout = torch.zeros_like(out)
    dout[:, rows] = _randn(1, len(rows), nheads, d, dtype=dtype, device=device)
    dq, dk, dv = torch.autograd.grad(out, leaves, dout)
    del out, leaves
    assert_grads_2x_rule((dq[:, rows], dk, dv), q[:, rows], k, v, dout[:, rows])
    dq[:, rows] = 0
    assert not dq.any(), "dq must be exactly 0 on rows whose dout is 0"


def _check_many_keys(device, dtype, seqlen_q, seqlen_k, nheads, d):
    """k and v (and dk, dv) of 1 x seqlen_k x nheads x d (as many KV heads as query heads): the
    forward, lse and all three gradients against oracles computed one head at a time (a head's
    oracle needs only its own keys, which keeps the float32 copies small)."""
    q = _randn(1, seqlen_q, nheads, d, dtype=dtype, device=device)
    k, v = (_randn(1, seqlen_k, nheads, d, dtype=dtype, device=device) for _ in range(2))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse, _ = flash_cute.flash_attn_func(*leaves, return_attn_probs=True)
    dout = _randn(*out.shape, dtype=dtype, device=device)
    dq, dk, dv = torch.autograd.grad(out, leaves, dout)
    out = out.detach()
    names = ("out", "dq", "dk", "dv")
    err, err_pt, scale = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for h in range(nheads):
        sl = (slice(None), slice(None), slice(h, h + 1))
        qh, kh, vh, doh = q[sl], k[sl], v[sl], dout[sl]
        ref, ref_lse = naive_attention(qh, kh, vh, dtype=torch.float32)
        pt, _ = naive_attention(qh, kh, vh, dtype=dtype)
        assert_lse_matches(lse[:, h: h + 1], ref_lse)
        got = (out[sl], dq[sl], dk[sl], dv[sl])
        refs = (ref, *naive_grads(qh, kh, vh, doh, dtype=torch.float32))
        pts = (pt, *naive_grads(qh, kh, vh, doh, dtype=dtype))
        for name, g, r, p in zip(names, got, refs, pts):
            assert not g.isnan().any(), f"{name} has NaN (head {h})"
            err[name] = max(err[name], (g.float() - r).abs().max().item())
            err_pt[name] = max(err_pt[name], (p.float() - r).abs().max().item())
            scale[name] = max(scale[name], r.abs().max().item())
    for name in names:
        slack = ROUNDING_TERM if name == "out" else GRAD_ROUNDING_TERM * max(1.0, scale[name])
        assert err[name] <= 2 * err_pt[name] + slack, (
            f"{name}: max error {err[name]:.3e} exceeds 2 x PyTorch's error in {dtype} ({err_pt[name]:.3e}) + {slack:.1e}"
        )


def _assert_kvcache_2x(out, lse, q, small_k, small_v, k, v, seqlens, causal=True):
    """out and lse of a kvcache call against the reference on the small windows of the cache
    rows (float32 inputs: the oracle; the input dtype: PyTorch's error). Returns the windows the
    input-dtype reference appended into."""
    win_k, win_v = small_k.clone(), small_v.clone()
    ref, _ = kvcache_attention(q, win_k, win_v, k, v, cache_seqlens=seqlens, causal=causal)
    f32 = (lambda t: None if t is None else t.float())
    ref32, ref32_lse = kvcache_attention(f32(q), f32(small_k).clone(), f32(small_v).clone(), f32(k), f32(v),
                                         cache_seqlens=seqlens, causal=causal)
    assert not out.isnan().any(), "output has NaN (a poisoned cache slot was read, or an element left unwritten)"
    err = (out.float() - ref32).abs().max().item()
    err_pt = (ref.float() - ref32).abs().max().item()
    assert err <= 2 * err_pt + ROUNDING_TERM, f"max error {err:.3e} exceeds 2 x the reference's ({err_pt:.3e}) + {ROUNDING_TERM}"
    assert_lse_matches(lse, ref32_lse, rtol=2e-2, atol=2e-2)
    return win_k, win_v


def _check_kvcache_far_rows(device, dtype, layout, capacity_or_pages, nheads, nheads_k, d, visible, window):
    """Decoding against cache rows far into a large cache: contiguous (cache row 2 of 3, through
    cache_batch_idx) or paged (pages of 16 rows, a row's pages the last of the cache). Only a
    window of ``window`` positions per batch row is used; everything else holds NaN, so a stray
    read shows in the output and a stray write in the count of non-NaN values. Then the
    long-query route (40 query rows) on the same caches."""
    batch, new, page = 2, 1, 16
    if layout == "contiguous":
        shape = (3, capacity_or_pages, nheads_k, d)
        idx = [2, 0]
        route = dict(cache_batch_idx=torch.tensor(idx, dtype=torch.int32, device=device))

        def slots(b, pos):
            return torch.full_like(pos, idx[b]), pos
    else:
        pages = capacity_or_pages
        shape = (pages, page, nheads_k, d)
        per_row = window // page
        table = torch.tensor([[pages - 1 - (b * per_row + j) for j in range(per_row)] for b in range(batch)],
                             dtype=torch.int32, device=device)
        route = dict(block_table=table)

        def slots(b, pos):
            return table[b].long()[pos // page], pos % page
    k_cache = torch.full(shape, math.nan, dtype=dtype, device=device)
    v_cache = torch.full(shape, math.nan, dtype=dtype, device=device)
    for b, n in enumerate(visible):
        where = slots(b, torch.arange(n, device=device))
        k_cache[where] = _randn(n, nheads_k, d, dtype=dtype, device=device)
        v_cache[where] = _randn(n, nheads_k, d, dtype=dtype, device=device)

    def windows():
        return [torch.stack([c[slots(b, torch.arange(window, device=device))] for b in range(batch)])
                for c in (k_cache, v_cache)]

    small_k, small_v = windows()
    q = _randn(batch, 1, nheads, d, dtype=dtype, device=device)
    k, v = (_randn(batch, new, nheads_k, d, dtype=dtype, device=device) for _ in range(2))
    seqlens = torch.tensor(visible, dtype=torch.int32, device=device)
    out, lse = flash_cute.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=True,
                                                  return_softmax_lse=True, **route)
    win_k, win_v = _assert_kvcache_2x(out, lse, q, small_k, small_v, k, v, seqlens)
    after_k, after_v = windows()
    assert _same_bits(after_k, win_k) and _same_bits(after_v, win_v), "the append differs from the reference's"
    numbers = (sum(visible) + batch * new) * nheads_k * d
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        assert int((~c.isnan()).sum()) == numbers, f"{name}: values written outside the appended slots"
    # The long-query route (40 query rows x 4 heads per KV head: not the decoding tile) on the
    # same rows, no append.
    q2 = _randn(batch, 40, nheads, d, dtype=dtype, device=device)
    out, lse = flash_cute.flash_attn_with_kvcache(q2, k_cache, v_cache, cache_seqlens=seqlens + new, causal=True,
                                                  return_softmax_lse=True, **route)
    _assert_kvcache_2x(out, lse, q2, after_k, after_v, None, None, seqlens + new)


def _check_long_decode(device, dtype, layout, capacity, visible, nheads=32, nheads_k=8, d=128):
    """One decoding step (one new row) against long caches, for num_splits 0 (the heuristic), 1
    and 7: the 2x rule against the reference, and the appended rows in place."""
    batch = len(visible)
    if layout == "contiguous":
        shape, route = (batch, capacity, nheads_k, d), {}
    else:
        per_row = capacity // 16
        pages = batch * per_row + 8
        shape = (pages, 16, nheads_k, d)
        route = dict(block_table=torch.randperm(pages, device=device)[: batch * per_row].view(batch, per_row).to(torch.int32))
    k_cache, v_cache = (_randn(*shape, dtype=dtype, device=device) for _ in range(2))
    q = _randn(batch, 1, nheads, d, dtype=dtype, device=device)
    k, v = (_randn(batch, 1, nheads_k, d, dtype=dtype, device=device) for _ in range(2))
    seqlens = torch.tensor(visible, dtype=torch.int32, device=device)
    ref_caches = (k_cache.clone(), v_cache.clone())
    ref, _ = kvcache_attention(q, *ref_caches, k, v, cache_seqlens=seqlens, causal=True, **route)
    ref32, ref32_lse = kvcache_attention(q.float(), k_cache.float(), v_cache.float(), k.float(), v.float(),
                                         cache_seqlens=seqlens, causal=True, **route)
    bound = 2 * (ref.float() - ref32).abs().max().item() + ROUNDING_TERM
    for splits in (0, 1, 7):
        out, lse = flash_cute.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=True,
                                                      num_splits=splits, return_softmax_lse=True, **route)
        assert not out.isnan().any()
        err = (out.float() - ref32).abs().max().item()
        assert err <= bound, f"num_splits={splits}: max error {err:.3e} above 2 x the reference's + {ROUNDING_TERM} ({bound:.3e})"
        assert_lse_matches(lse, ref32_lse, rtol=2e-2, atol=2e-2)
        assert _same_bits(k_cache, ref_caches[0]) and _same_bits(v_cache, ref_caches[1]), "the append differs"


def _check_long_forward(device, dtype, seqlen, d, rows):
    """One long sequence (1 head): the non-causal forward on ``rows`` (rows are independent), the
    causal forward on a few rows (row i against keys 0 .. i), and the backward with dout on
    ``rows`` only (see _check_many_query_rows)."""
    q, k, v = (_randn(1, seqlen, 1, d, dtype=dtype, device=device) for _ in range(3))
    rows = torch.tensor(sorted(set(rows)), device=device)
    out, lse, _ = flash_cute.flash_attn_func(q, k, v, return_attn_probs=True)
    _, ref_lse = assert_2x_rule(out[:, rows], q[:, rows], k, v)
    assert_lse_matches(lse[:, :, rows], ref_lse)
    out = flash_cute.flash_attn_func(q, k, v, causal=True)
    err = err_pt = 0.0
    for i in [0, 1, seqlen // 3, seqlen - 2, seqlen - 1]:
        sub = (slice(None), slice(i, i + 1))
        ref, _ = naive_attention(q[sub], k[:, : i + 1], v[:, : i + 1], dtype=torch.float32)
        pt, _ = naive_attention(q[sub], k[:, : i + 1], v[:, : i + 1], dtype=dtype)
        err = max(err, (out[sub].float() - ref).abs().max().item())
        err_pt = max(err_pt, (pt.float() - ref).abs().max().item())
    assert err <= 2 * err_pt + ROUNDING_TERM, f"causal: max error {err:.3e} vs PyTorch's {err_pt:.3e}"
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = flash_cute.flash_attn_func(*leaves)
    dout = torch.zeros_like(out)
    dout[:, rows] = _randn(1, len(rows), 1, d, dtype=dtype, device=device)
    dq, dk, dv = torch.autograd.grad(out, leaves, dout)
    assert_grads_2x_rule((dq[:, rows], dk, dv), q[:, rows], k, v, dout[:, rows])
    dq[:, rows] = 0
    assert not dq.any(), "dq must be exactly 0 on rows whose dout is 0"


def test_heavy_test_bodies_at_small_scale_cpu():
    """The bodies of the 2^31-element and 128k tests, on the CPU reference at a small scale
    (bfloat16 inputs), so that their oracles and tricks are checked where they can run."""
    _check_many_query_rows("cpu", BF16, 300, 2, 16, 40, [0, 1, 149, 150, 151, 298, 299])
    _check_many_keys("cpu", BF16, 8, 500, 2, 16)
    _check_kvcache_far_rows("cpu", BF16, "contiguous", 64, 8, 2, 16, (40, 7), 48)
    _check_kvcache_far_rows("cpu", BF16, "paged", 10, 8, 2, 16, (40, 7), 48)
    _check_long_decode("cpu", BF16, "contiguous", 300, (299, 170), nheads=8, nheads_k=2, d=16)
    _check_long_decode("cpu", BF16, "paged", 320, (319, 170), nheads=8, nheads_k=2, d=16)
    _check_long_forward("cpu", BF16, 700, 16, [0, 5, 350, 699])


# ============================================================================================
# 10. GPU: extremes

GPU = pytest.mark.cuda


@pytest.fixture
def _release_gpu_memory():
    """Heavy tests hand their memory back to the driver when they end."""
    yield
    import gc

    gc.collect()
    torch.cuda.empty_cache()


@GPU
@pytest.mark.slow
def test_q_over_2g_elements(_release_gpu_memory):
    """q, out, dout and dq of 2^31 + 131072 elements (1 x 1,048,640 x 16 x 128 bf16, 4 GiB each):
    rows past element 2^31 are checked (64-bit offsets), forward, varlen forward and backward.
    ~30 GB of GPU memory."""
    require_kernel(BF16, 128, False)
    require_bwd_kernel(BF16, 128)
    seqlen_q = 2**20 + 64
    extra = torch.randint(0, seqlen_q, (32,)).tolist()
    rows = [0, 1, 2, 1000, 2**19 - 1, 2**19, 2**19 + 31, 2**19 + 32, 2**20 - 1] + list(range(2**20, seqlen_q)) + extra
    _check_many_query_rows("cuda", BF16, seqlen_q, 16, 128, 128, rows)


@GPU
@pytest.mark.slow
def test_kv_over_2g_elements(_release_gpu_memory):
    """k, v, dk and dv of 2^31 + 131072 elements (1 x 1,048,640 x 16 x 128 bf16), 8 query rows:
    forward, lse and gradients against per-head oracles. ~25 GB of GPU memory."""
    require_kernel(BF16, 128, False)
    require_bwd_kernel(BF16, 128)
    _check_many_keys("cuda", BF16, 8, 2**20 + 64, 16, 128)


@GPU
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_kvcache_over_2g_elements(layout, _release_gpu_memory):
    """Decoding (with an append) and the long-query route against cache rows that start past
    element 2^31: cache row 2 of a (3, 2^20, 8, 128) cache (6 GiB each), or the last pages of
    (131200, 16, 8, 128) paged caches (4 GiB each)."""
    require_kernel(BF16, 128, True)
    size = 2**20 if layout == "contiguous" else 131200
    _check_kvcache_far_rows("cuda", BF16, layout, size, 32, 8, 128, (1000, 7), 1024)


@GPU
def test_forward_128k(_release_gpu_memory):
    """seqlen 131072 (batch 1, 1 head, d 128): forward (rows checked), causal forward, backward."""
    require_kernel(BF16, 128, False)
    require_kernel(BF16, 128, True)
    require_bwd_kernel(BF16, 128)
    rows = [0, 1, 4095, 65536, 131070, 131071] + torch.randint(0, 131072, (250,)).tolist()
    _check_long_forward("cuda", BF16, 131072, 128, rows)


@GPU
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_decode_128k(layout, _release_gpu_memory):
    """A decoding step against 128k-row caches (rows of 131,071 and 70,000 cached keys plus one
    new), contiguous and in 16-row pages, for num_splits 0, 1 and 7."""
    require_kernel(BF16, 128, True)
    _check_long_decode("cuda", BF16, layout, 131072, (131071, 70000))


@GPU
def test_batch_times_heads_over_65535():
    """batch 1100 x 64 heads = 70,400 (batch, head) pairs: each is a separate grid dimension,
    so this is correct: forward and backward, varlen (1100 sequences, against the padded result)
    and decoding. Also a decoding call whose packed tiles x KV heads pass 65,535 (64 query rows x
    17,000 KV heads) takes the forward kernel's route and is correct."""
    require_bwd_kernel(BF16, 128, False)
    b, h, hk, sq, sk, d = 1100, 64, 8, 3, 5, 128
    q, k, v = make_qkv(b, sq, sk, h, hk, d, BF16, "cuda")
    dout = torch.randn(q.shape, device="cuda").to(BF16)
    from helpers import run_backward

    out, dq, dk, dv = run_backward(q, k, v, dout)
    assert_2x_rule(out, q, k, v)
    assert_grads_2x_rule((dq, dk, dv), q, k, v, dout)
    cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device="cuda")
    cu_k = torch.arange(0, (b + 1) * sk, sk, dtype=torch.int32, device="cuda")
    leaves = [t.flatten(0, 1).detach().requires_grad_() for t in (q, k, v)]
    out_v = flash_cute.flash_attn_varlen_func(*leaves, cu_q, cu_k, sq, sk)
    grads_v = torch.autograd.grad(out_v, leaves, dout.flatten(0, 1))
    assert_close_to_rounding(out_v.view(out.shape), out, "varlen out")
    for name, g, want in zip(("dq", "dk", "dv"), grads_v, (dq, dk, dv)):
        assert_close_to_rounding(g.view(want.shape), want, f"varlen {name}")
    # decoding, batch 1100
    x = _kvcache_inputs("cuda", BF16, batch=b, cache_len=40, nheads=h, nheads_k=hk, d=d)
    seqlens = torch.randint(0, 39, (b,), dtype=torch.int32, device="cuda")
    small_k, small_v = x["k_cache"].clone(), x["v_cache"].clone()
    out, lse = flash_cute.flash_attn_with_kvcache(**x, cache_seqlens=seqlens, causal=True, return_softmax_lse=True)
    _assert_kvcache_2x(out, lse, x["q"], small_k, small_v, x["k"], x["v"], seqlens)
    # 64 query rows x 17,000 KV heads (group 1): 4 tiles x 17,000 > 65,535 grid rows
    calls = []
    decode = interface._ops.decode_eager
    try:
        interface._ops.decode_eager = lambda *a, **kw: calls.append(1) or decode(*a, **kw)
        x = _kvcache_inputs("cuda", BF16, batch=1, cache_len=32, nheads=17000, nheads_k=17000, d=d, seqlen_q=64)
        seqlens = _i32(20, device="cuda")
        small_k, small_v = x["k_cache"].clone(), x["v_cache"].clone()
        out, lse = flash_cute.flash_attn_with_kvcache(**x, cache_seqlens=seqlens, causal=True, return_softmax_lse=True)
    finally:
        interface._ops.decode_eager = decode
    assert not calls, "the split-KV kernel ran with more than 65,535 grid rows"
    _assert_kvcache_2x(out, lse, x["q"], small_k, small_v, x["k"], x["v"], seqlens)


@GPU
def test_grid_limits_refused_gpu():
    """batch or nheads above 65,535 (one grid dimension each) are refused up front, with real
    CUDA tensors (tests/error_cases.py checks the messages)."""
    z = lambda *shape, dtype=BF16: torch.zeros(*shape, dtype=dtype, device="cuda")  # noqa: E731
    for shape, word in (((65536, 1, 1, 8), "batch"), ((1, 1, 65536, 8), "nheads")):
        with pytest.raises(FlashAttnValueError, match=rf"\b{word}\b"):
            flash_cute.flash_attn_func(z(*shape), z(*shape), z(*shape))
    cu = z(65537, dtype=torch.int32)
    with pytest.raises(FlashAttnValueError, match=r"\bbatch \(65536, from cu_seqlens_q\)"):
        flash_cute.flash_attn_varlen_func(z(4, 1, 8), z(4, 1, 8), z(4, 1, 8), cu, cu, 1, 1)
    with pytest.raises(FlashAttnValueError, match=r"\bbatch \(65536\)"):
        flash_cute.flash_attn_with_kvcache(z(65536, 1, 1, 8), z(65536, 4, 1, 8), z(65536, 4, 1, 8))


@GPU
@pytest.mark.parametrize("d", [8, 4, 1])
def test_small_head_dims_gpu(d):
    """Head dims 8 (the smallest the kernels take in place) and 4, 1 (zero-padded to 8): forward
    and backward (padded and varlen) by the 2x rule, and decoding with an append."""
    require_bwd_kernel(BF16, d, True)
    from helpers import assert_varlen_2x_rule, assert_varlen_grads_2x_rule, make_varlen_qkv, run_backward

    q, k, v = make_qkv(2, 77, 130, 4, 2, d, BF16, "cuda")
    dout = torch.randn(q.shape, device="cuda").to(BF16)
    out, *grads = run_backward(q, k, v, dout, causal=True)
    assert_2x_rule(out, q, k, v, causal=True)
    assert_grads_2x_rule(grads, q, k, v, dout, causal=True)
    q, k, v, cu_q, cu_k = make_varlen_qkv([30, 0, 47], [64, 5, 47], 4, 2, d, BF16, "cuda")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = flash_cute.flash_attn_varlen_func(*leaves, cu_q, cu_k, 47, 64, causal=True)
    dout = torch.randn(out.shape, device="cuda").to(BF16)
    assert_varlen_2x_rule(out.detach(), q, k, v, cu_q, cu_k, causal=True)
    assert_varlen_grads_2x_rule(torch.autograd.grad(out, leaves, dout), q, k, v, dout, cu_q, cu_k, causal=True)
    x = _kvcache_inputs("cuda", BF16, batch=2, cache_len=40, nheads=8, nheads_k=2, d=d, seqlen_q=2, seqlen_new=2)
    seqlens = _i32(0, 31, device="cuda")
    small_k, small_v = x["k_cache"].clone(), x["v_cache"].clone()
    out, lse = flash_cute.flash_attn_with_kvcache(**x, cache_seqlens=seqlens, causal=True, return_softmax_lse=True)
    win_k, win_v = _assert_kvcache_2x(out, lse, x["q"], small_k, small_v, x["k"], x["v"], seqlens)
    assert _same_bits(x["k_cache"], win_k) and _same_bits(x["v_cache"], win_v), "the append differs"


@GPU
def test_empty_batches_gpu():
    require_bwd_kernel(BF16, 128, True)
    _check_empty_batches("cuda", BF16, d=128)


@GPU
@pytest.mark.parametrize("route,num_splits", [("func", 0), ("varlen", 0), ("kvcache", 1), ("kvcache", 3)],
                         ids=["func", "varlen", "kvcache-1-split", "kvcache-3-splits"])
def test_nonfinite_inputs_gpu(route, num_splits):
    """NaN/Inf inputs on the CUDA kernels (the split-KV kernel with and without its combine
    pass): the documented results (see _check_nonfinite)."""
    require_kernel(BF16, 128, False)
    _check_nonfinite(route, "cuda", BF16, num_splits, d=128)


@GPU
@pytest.mark.parametrize("fn", ["func", "varlen", "kvcache"])
def test_misaligned_views_gpu(fn):
    """Inputs whose data pointers are not 16-byte aligned (offset views; int32 index tensors 4
    bytes off): the results of aligned copies, bit for bit (deterministic backward); kvcache
    appends into the unaligned caches that were given."""
    require_bwd_kernel(BF16, 128, True)
    if fn == "kvcache":
        x = _kvcache_inputs("cuda", BF16, batch=3, cache_len=300, nheads=16, nheads_k=4, d=128, seqlen_q=2, seqlen_new=2)
        seqlens = _i32(0, 100, 298, device="cuda")
        plain = {n: t.clone() for n, t in x.items()}
        odd = {n: _offset_view(t) for n, t in x.items()}
        assert odd["k_cache"].data_ptr() % 16 != 0
        want, want_lse = flash_cute.flash_attn_with_kvcache(**plain, cache_seqlens=seqlens, causal=True,
                                                            return_softmax_lse=True)
        got, got_lse = flash_cute.flash_attn_with_kvcache(**odd, cache_seqlens=_offset_view(seqlens), causal=True,
                                                          return_softmax_lse=True)
        assert_close_to_rounding(got, want, "out")
        assert_close_to_rounding(got_lse, want_lse, "lse")
        assert _same_bits(odd["k_cache"], plain["k_cache"]) and _same_bits(odd["v_cache"], plain["v_cache"])
        return
    if fn == "func":
        tensors = list(make_qkv(2, 113, 203, 4, 2, 128, BF16, "cuda"))
        extra = ()
    else:
        from helpers import make_varlen_qkv

        *tensors, cu_q, cu_k = make_varlen_qkv([30, 0, 113], [64, 5, 203], 4, 2, 128, BF16, "cuda")
        extra = (cu_q, cu_k, 113, 203)
    dout = torch.randn(tensors[0].shape, device="cuda").to(BF16)
    results = []
    for make in (lambda t: t.clone(), _offset_view):
        leaves = [make(t).requires_grad_() for t in tensors]
        args = [make(t) if isinstance(t, torch.Tensor) else t for t in extra]
        fwd = flash_cute.flash_attn_func if fn == "func" else flash_cute.flash_attn_varlen_func
        out = fwd(*leaves, *args, causal=True, deterministic=True)
        results.append((out.detach(), *torch.autograd.grad(out, leaves, make(dout))))
    assert results[1][0].data_ptr() % 16 == 0
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        assert _same_bits(a, b), f"{name}: an offset view gives another result than its aligned copy"


@GPU
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("layout", GUARD_LAYOUTS)
def test_kvcache_append_guard_regions(layout, aligned):
    """The append writes the new rows where they belong and nothing else: sentinel guard regions
    around both caches and every other slot keep their bits; aligned caches take the decoding
    kernel's fused append, unaligned ones the torch append; long queries the forward route."""
    require_kernel(BF16, 128, True)
    _check_append_guards("cuda", BF16, layout, aligned, d=128)


# ============================================================================================
# 11. GPU: the index checks, host syncs, CUDA graphs, opcheck, torch.compile / torch.export


@GPU
def test_index_checks_skipped_in_graph_capture(monkeypatch):
    """With CHECK_INDEX_VALUES on, a call captured in a CUDA graph does not check (a host read is
    not allowed while capturing) and the capture succeeds; outside it the check runs."""
    require_kernel(BF16, 128, True)
    monkeypatch.setattr(interface, "CHECK_INDEX_VALUES", True)
    x = _kvcache_inputs("cuda", BF16, batch=2, cache_len=256, nheads=8, nheads_k=2, d=128)
    seqlens = _i32(10, 200, device="cuda")
    graph, out = capture_cuda_graph(lambda: flash_cute.flash_attn_with_kvcache(**x, cache_seqlens=seqlens, causal=True))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    with pytest.raises(FlashAttnValueError, match=r"cache_seqlens"):
        flash_cute.flash_attn_with_kvcache(**x, cache_seqlens=_i32(10, 256, device="cuda"), causal=True)


def _hot_path(path):
    """A closure that makes one call of the path (inputs built once, on the GPU)."""
    dev = "cuda"
    if path == "func-fwd-bwd":
        leaves = [t.requires_grad_() for t in make_qkv(2, 300, 300, 8, 2, 128, BF16, dev)]
        dout = torch.randn(leaves[0].shape, device=dev).to(BF16)

        def call():
            out = flash_cute.flash_attn_func(*leaves, causal=True)
            torch.autograd.grad(out, leaves, dout)
    elif path == "varlen-fwd-bwd":
        from helpers import make_varlen_qkv

        *tensors, cu_q, cu_k = make_varlen_qkv([30, 0, 300], [64, 5, 300], 8, 2, 128, BF16, dev)
        leaves = [t.requires_grad_() for t in tensors]
        dout = torch.randn(leaves[0].shape, device=dev).to(BF16)

        def call():
            out = flash_cute.flash_attn_varlen_func(*leaves, cu_q, cu_k, 300, 300, causal=True)
            torch.autograd.grad(out, leaves, dout)
    elif path == "varlen-paged":
        q = torch.randn(330, 8, 128, device=dev).to(BF16)
        pages = torch.randn(16, 64, 2, 128, device=dev).to(BF16)
        table = torch.randperm(16, device=dev)[:15].view(3, 5).to(torch.int32)
        cu_q, cu_k = _i32(0, 30, 30, 330, device=dev), _i32(0, 64, 69, 369, device=dev)

        def call():
            flash_cute.flash_attn_varlen_func(q, pages, pages, cu_q, cu_k, 300, 320, causal=True, block_table=table)
    else:
        paged = "paged" in path
        long_query = "long-query" in path
        rotary = "rotary" in path
        append = "append" in path
        args = _decode_step_inputs(dev, BF16, paged, rotary, d=128, batch=4, seqlen_q=40 if long_query else 1,
                                   cache_len=256)
        q, k_cache, v_cache, k, v, seqlens, *extra = args
        kwargs = dict(causal=True)
        if paged:
            kwargs["block_table"] = extra.pop(0)
        if rotary:
            kwargs["rotary_cos"], kwargs["rotary_sin"] = extra

        def call():
            flash_cute.flash_attn_with_kvcache(q, k_cache, v_cache, k if append else None, v if append else None,
                                               cache_seqlens=seqlens, **kwargs)
    return call


HOT_PATHS = ["func-fwd-bwd", "varlen-fwd-bwd", "varlen-paged", "decode-append", "decode-paged-rotary-append",
             "kvcache-long-query", "kvcache-long-query-append"]


@GPU
@pytest.mark.parametrize("path", HOT_PATHS)
def test_hot_paths_do_not_sync(path, monkeypatch):
    """No host sync (torch.cuda.set_sync_debug_mode("error") raises on one) in a call of the
    forward + backward (padded, varlen), the paged varlen forward (pages of 64 rows), decoding
    with an append (contiguous; paged with rotary) and the long-query route of the kvcache."""
    require_bwd_kernel(BF16, 128, True)
    monkeypatch.setattr(interface, "CHECK_INDEX_VALUES", False)
    call = _hot_path(path)
    call()  # warm-up: lazy initialisation and the caches of the first call
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@GPU
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic"])
@pytest.mark.parametrize("fn", ["func", "varlen"])
def test_cuda_graph_forward_backward(fn, deterministic):
    """Forward and backward captured once in a CUDA graph and replayed on new input values (for
    varlen also new sequence boundaries, one longer than the max_seqlen hint): every replay
    equals an eager call on the same inputs (bit for bit when deterministic; up to the order of
    the float32 dQ additions otherwise)."""
    require_bwd_kernel(BF16, 128, True)
    if fn == "func":
        tensors = make_qkv(2, 300, 457, 8, 2, 128, BF16, "cuda")
        bounds = [None] * 3
    else:
        from helpers import make_varlen_qkv

        *tensors, cu_q, cu_k = make_varlen_qkv([100, 0, 250, 33], [130, 40, 257, 1], 8, 2, 128, BF16, "cuda")
        bounds = [([100, 0, 250, 33], [130, 40, 257, 1]), ([380, 1, 1, 1], [0, 428, 0, 0]), ([0, 0, 383, 0], [1, 1, 1, 425])]
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    dout = torch.randn(leaves[0].shape, device="cuda").to(BF16)

    def step():
        if fn == "func":
            out = flash_cute.flash_attn_func(*leaves, causal=True, deterministic=deterministic)
        else:
            out = flash_cute.flash_attn_varlen_func(*leaves, cu_q, cu_k, 300, 300, causal=True, deterministic=deterministic)
        return (out.detach(), *torch.autograd.grad(out, leaves, dout))

    graph, static = capture_cuda_graph(step, warmups=2)
    for replay in range(3):
        with torch.no_grad():
            for t in (*leaves, dout):
                t.copy_(torch.randn(t.shape, device="cuda").to(BF16))
            if bounds[replay] is not None:
                cu_q.copy_(cu_seqlens_of(bounds[replay][0], "cuda"))
                cu_k.copy_(cu_seqlens_of(bounds[replay][1], "cuda"))
        graph.replay()
        got = [t.clone() for t in static]
        want = step()
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            if deterministic or name == "out":
                assert _same_bits(a, b), f"replay {replay}: {name} differs from the eager call"
            else:
                assert_close_to_rounding(a, b, f"replay {replay}: {name}")


@GPU
@pytest.mark.parametrize("case", DECODE_CASES + ["unaligned-caches"])
def test_opcheck_decode_gpu(case):
    """opcheck of flash_cute::decode on the kernel, every argument form, and its result against
    the reference; "unaligned-caches": caches the kernel cannot write in place (the op appends
    into kernel-ready copies and copies them back, the path of traced callers)."""
    require_kernel(BF16, 128, True)
    args = list(_decode_args("append" if case == "unaligned-caches" else case, "cuda", BF16, d=128))
    if case == "unaligned-caches":
        args[1], args[2] = _offset_view(args[1]), _offset_view(args[2])
    torch.library.opcheck(torch.ops.flash_cute.decode.default, tuple(args))
    q, k_cache, v_cache, k, v, scale, causal, seqlen_k, seqlen_new, seqlens, idx, pad, table, _, softcap, left, right, \
        alibi = args
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    out, lse = torch.ops.flash_cute.decode(*args)
    cached = seqlen_k if seqlens is None else seqlens
    if k is None and seqlen_new:
        cached = cached + seqlen_new
    kw = dict(cache_seqlens=cached, cache_batch_idx=idx, cache_leftpad=pad, block_table=table, softmax_scale=scale,
              causal=causal, softcap=softcap, window_size=(left, right), alibi_slopes=alibi)
    ref, _ = kvcache_attention(q, ref_k, ref_v, k, v, **kw)
    f32 = (lambda t: None if t is None else t.float())
    ref32, ref32_lse = kvcache_attention(q.float(), k_cache.float(), v_cache.float(), f32(k), f32(v), **kw)
    err, err_pt = (out.float() - ref32).abs().max().item(), (ref.float() - ref32).abs().max().item()
    assert err <= 2 * err_pt + ROUNDING_TERM, f"max error {err:.3e} vs the reference's {err_pt:.3e}"
    assert_lse_matches(lse, ref32_lse, rtol=2e-2, atol=2e-2)
    assert _same_bits(k_cache, ref_k) and _same_bits(v_cache, ref_v), "the append differs from the reference's"


@GPU
def test_opcheck_fwd_bwd_gpu():
    """opcheck of flash_cute::fwd on a paged cache (pages of 64 rows, read in place) and of
    flash_cute::bwd_into on the kernels."""
    require_bwd_kernel(BF16, 128, True)
    q = torch.randn(330, 8, 128, device="cuda").to(BF16)
    pages = torch.randn(16, 64, 2, 128, device="cuda").to(BF16)
    table = torch.randperm(16, device="cuda")[:15].view(3, 5).to(torch.int32)
    cu_q, cu_k = _i32(0, 30, 30, 330, device="cuda"), _i32(0, 64, 69, 369, device="cuda")
    torch.library.opcheck(torch.ops.flash_cute.fwd.default, (q, pages, pages, 0.1, True, False, cu_q, cu_k, 300, 320, table))
    q, k, v = make_qkv(2, 113, 203, 8, 2, 128, BF16, "cuda")
    out, lse, _ = torch.ops.flash_cute.fwd(q, k, v, 0.1, True)
    dout = torch.randn_like(out)
    grads = tuple(torch.empty_like(t) for t in (q, k, v))
    torch.library.opcheck(torch.ops.flash_cute.bwd_into.default,
                          (dout, q, k, v, out, lse, 0.1, True, True, None, None, 0, 0, 0.0, -1, -1, None, 0.0, None, *grads))


# inductor compiles for tens of seconds on the host: slow
BACKENDS = [pytest.param("inductor", marks=pytest.mark.slow), "aot_eager"]


@GPU
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("paged,rotary", [(False, False), (True, True)], ids=["contiguous", "paged-rotary"])
def test_kvcache_torch_compile_gpu(paged, rotary, backend):
    """torch.compile(fullgraph=True) of a decoding step on the GPU (the split-KV op, declared to
    mutate the caches): three steps with growing cache_seqlens give the eager outputs and appends
    (bit for bit without rotary, where the graph is the op alone; rotary is compiled torch code)."""
    require_kernel(BF16, 128, True)
    module = _DecodeStep(rotary=rotary, paged=paged, causal=True)
    args = _decode_step_inputs("cuda", BF16, paged, rotary, d=128)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    got_args, want_args = _clone_all(args), _clone_all(args)
    for _ in range(3):
        got, want = compiled(*got_args), module(*want_args)
        if rotary:
            for a, b in ((got[0], want[0]), (got[1], want[1]), (got_args[1], want_args[1]), (got_args[2], want_args[2])):
                torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2, equal_nan=True)
        else:
            _assert_step_matches(got_args, got, want_args, want, exact=True)
        new_k, new_v = torch.randn_like(args[3]), torch.randn_like(args[4])
        for a in (got_args, want_args):
            a[5] += 1
            a[3].copy_(new_k)
            a[4].copy_(new_v)


@GPU
def test_kvcache_torch_export_gpu():
    """torch.export of the decoding step on the GPU: the exported program calls the split-KV op,
    appends into the caches it is given and returns the eager outputs bit for bit."""
    require_kernel(BF16, 128, True)
    module = _DecodeStep(causal=True)
    args = _decode_step_inputs("cuda", BF16, False, False, d=128)
    exported = torch.export.export(module, tuple(_clone_all(args)))
    assert "flash_cute.decode.default" in _traced_targets(exported)
    got_args, want_args = _clone_all(args), _clone_all(args)
    got, want = exported.module()(*got_args), module(*want_args)
    _assert_step_matches(got_args, got, want_args, want, exact=True)


@GPU
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("varlen", [False, True], ids=["func", "varlen"])
def test_transformer_block_trains_compiled_gpu(varlen, backend):
    """The block (float32 weights, bf16 attention on the CUDA kernels, head dim 128) under
    torch.compile(fullgraph=True): three SGD steps agree with eager training within 2e-2."""
    require_bwd_kernel(BF16, 128, True)
    try:
        _train_compiled_vs_eager("cuda", BF16, varlen, backend, rtol=2e-2, dim=256, heads=2, kv_heads=1)
    except Exception as exc:  # inductor needs a working C++/Triton toolchain on the host
        from test_api import _is_missing_compiler

        if _is_missing_compiler(exc):
            pytest.skip(f"torch.compile needs a C++ compiler: {exc}")
        raise
