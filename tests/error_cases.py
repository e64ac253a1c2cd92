"""The bad inputs of every public function, with the error each one raises: the source of
docs/errors.md (``python tools/errors_doc.py`` writes it; tests/test_robustness.py checks that the
file is what ``render_markdown()`` gives, so every message quoted there is the real one).

Every case runs on the CPU. Errors that only CUDA inputs can raise (the grid limits, a device
mismatch with a GPU tensor) are reached with FakeTensor CUDA tensors: the checks read shapes,
dtypes and devices only, and raise before anything would run on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import flash_cute

_FAKE = FakeTensorMode()


@dataclass(frozen=True)
class ErrorCase:
    id: str
    function: str  # the public function called
    input: str  # the bad input, in words (markdown)
    call: Callable[[], object]
    exc: type  # the type the call must raise (the test checks isinstance)


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


def _cuda(*shape, dtype=torch.bfloat16):
    """A FakeTensor on cuda:0 (no GPU needed: it has shape, dtype and device, no data)."""
    with _FAKE:
        return torch.empty(*shape, dtype=dtype, device="cuda")


def _qkv(dtype=torch.float16, batch=2, seqlen_q=8, seqlen_k=32, nheads=4, nheads_k=2, d=16):
    return (torch.zeros(batch, seqlen_q, nheads, d, dtype=dtype), torch.zeros(batch, seqlen_k, nheads_k, d, dtype=dtype),
            torch.zeros(batch, seqlen_k, nheads_k, d, dtype=dtype))


def _func(**changes):
    q, k, v = _qkv()
    args = {"q": q, "k": k, "v": v, **changes}
    return lambda: flash_cute.flash_attn_func(**args)


def _varlen(**changes):
    args = {"q": torch.zeros(10, 4, 16), "k": torch.zeros(12, 2, 16), "v": torch.zeros(12, 2, 16),
            "cu_seqlens_q": _i32(0, 3, 3, 10), "cu_seqlens_k": _i32(0, 5, 6, 12), "max_seqlen_q": 7, "max_seqlen_k": 6}
    args.update(changes)
    return lambda: flash_cute.flash_attn_varlen_func(**args)


def _pages():
    return torch.zeros(6, 4, 2, 16)


def _kvcache(**changes):
    args = {"q": torch.zeros(2, 1, 4, 16), "k_cache": torch.zeros(2, 16, 2, 16), "v_cache": torch.zeros(2, 16, 2, 16)}
    args.update(changes)
    return lambda: flash_cute.flash_attn_with_kvcache(**args)


def _new(rows=1):
    return {"k": torch.zeros(2, rows, 2, 16), "v": torch.zeros(2, rows, 2, 16)}


F, VL, KV = "flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"
T, V, R = flash_cute.FlashAttnTypeError, flash_cute.FlashAttnValueError, RuntimeError

CASES = [
    # ---- flash_attn_func (the packed and varlen functions run the same checks on q, k, v)
    ErrorCase("q-not-tensor", F, "q is not a tensor (a list)", _func(q=[[1.0]]), T),
    ErrorCase("q-int32", F, "q has an integer dtype", _func(**dict(zip("qkv", (t.int() for t in _qkv())))), T),
    ErrorCase("q-float64", F, "q is float64", _func(**dict(zip("qkv", _qkv(torch.float64)))), T),
    ErrorCase("k-dtype", F, "k's dtype differs from q's", _func(k=_qkv(torch.bfloat16)[1]), T),
    ErrorCase("q-ndim", F, "q has 3 dimensions", _func(q=torch.zeros(8, 4, 16, dtype=torch.float16)), V),
    ErrorCase("k-batch", F, "k's batch differs from q's", _func(k=_qkv(batch=1)[1]), V),
    ErrorCase("k-headdim", F, "k's head dim differs from q's", _func(k=_qkv(d=24)[1]), V),
    ErrorCase("v-shape", F, "v's shape differs from k's", _func(v=_qkv(seqlen_k=31)[2]), V),
    ErrorCase("headdim-0", F, "head dim 0", _func(**dict(zip("qkv", _qkv(d=0)))), V),
    ErrorCase("headdim-257", F, "head dim above 256", _func(**dict(zip("qkv", _qkv(d=257)))), V),
    ErrorCase("heads-ratio", F, "nheads not a multiple of nheads_k", _func(**dict(zip("qkv", _qkv(nheads=3)))), V),
    ErrorCase("dropout", F, "dropout_p outside [0, 1)", _func(dropout_p=1.0), V),
    ErrorCase("softcap", F, "softcap negative", _func(softcap=-1.0), V),
    ErrorCase("scale-nan", F, "softmax_scale not finite (NaN or infinite)", _func(softmax_scale=float("nan")), V),
    ErrorCase("scale-type", F, "softmax_scale not a number", _func(softmax_scale="0.1"), T),
    ErrorCase("alibi-dtype", F, "alibi_slopes not float32", _func(alibi_slopes=torch.ones(4, dtype=torch.float16)), T),
    ErrorCase("alibi-shape", F, "alibi_slopes of the wrong shape", _func(alibi_slopes=torch.ones(2)), V),
    ErrorCase("window", F, "window_size not a pair of ints", _func(window_size=5), V),
    ErrorCase("device-mismatch", F, "k on another device than q (here q on cuda:0, k on the CPU)",
              lambda: flash_cute.flash_attn_func(_cuda(2, 8, 4, 16), _qkv(torch.bfloat16)[1], _cuda(2, 32, 2, 16)), R),
    ErrorCase("device-unsupported", F, "q, k, v on a device that is neither CUDA nor the CPU (meta)",
              lambda: flash_cute.flash_attn_func(*(t.to("meta") for t in _qkv())), R),
    ErrorCase("grid-batch", F, "CUDA: batch above 65,535 (the grid's limit)",
              lambda: flash_cute.flash_attn_func(*(_cuda(65536, 1, 1, 8) for _ in range(3))), V),
    ErrorCase("grid-heads", F, "CUDA: nheads above 65,535",
              lambda: flash_cute.flash_attn_func(*(_cuda(1, 1, 65536, 8) for _ in range(3))), V),
    # ---- packed functions
    ErrorCase("qkv-shape", "flash_attn_qkvpacked_func", "qkv without the 3 at dim -3",
              lambda: flash_cute.flash_attn_qkvpacked_func(torch.zeros(2, 7, 2, 4, 16)), V),
    ErrorCase("kv-shape", "flash_attn_kvpacked_func", "kv without the 2 at dim -3",
              lambda: flash_cute.flash_attn_kvpacked_func(torch.zeros(2, 7, 4, 16), torch.zeros(2, 7, 3, 2, 16)), V),
    ErrorCase("varlen-qkv-shape", "flash_attn_varlen_qkvpacked_func", "qkv of 5 dimensions",
              lambda: flash_cute.flash_attn_varlen_qkvpacked_func(torch.zeros(10, 3, 4, 16, 1), _i32(0, 10), 10), V),
    # ---- flash_attn_varlen_func: types and shapes
    ErrorCase("cu-int64", VL, "cu_seqlens_q int64", _varlen(cu_seqlens_q=torch.tensor([0, 3, 3, 10])), T),
    ErrorCase("cu-list", VL, "cu_seqlens_k a list", _varlen(cu_seqlens_k=[0, 5, 6, 12]), T),
    ErrorCase("cu-2d", VL, "cu_seqlens_q of 2 dimensions", _varlen(cu_seqlens_q=torch.zeros(2, 2, dtype=torch.int32)), V),
    ErrorCase("cu-lengths", VL, "cu_seqlens_q and cu_seqlens_k of different lengths", _varlen(cu_seqlens_k=_i32(0, 12)), V),
    ErrorCase("max-seqlen", VL, "max_seqlen_q negative", _varlen(max_seqlen_q=-1), V),
    ErrorCase("varlen-q-4d", VL, "q of 4 dimensions", _varlen(q=torch.zeros(1, 10, 4, 16)), V),
    ErrorCase("cu-device", VL, "cu_seqlens_q on another device than q (here q on cuda:0, cu_seqlens_q on the CPU)",
              _varlen(q=_cuda(10, 4, 16), k=_cuda(12, 2, 16), v=_cuda(12, 2, 16), cu_seqlens_k=_cuda(4, dtype=torch.int32)), R),
    ErrorCase("varlen-grid-batch", VL, "CUDA: more than 65,535 sequences",
              _varlen(q=_cuda(10, 4, 16), k=_cuda(12, 2, 16), v=_cuda(12, 2, 16), cu_seqlens_q=_cuda(65537, dtype=torch.int32),
                      cu_seqlens_k=_cuda(65537, dtype=torch.int32)), V),
    ErrorCase("block-table-int64", VL, "block_table int64",
              _varlen(k=_pages(), v=_pages(), block_table=torch.zeros(3, 2, dtype=torch.int64)), T),
    ErrorCase("block-table-shape", VL, "block_table with another batch than cu_seqlens",
              _varlen(k=_pages(), v=_pages(), block_table=torch.zeros(2, 2, dtype=torch.int32)), V),
    # ---- flash_attn_varlen_func: values of the index tensors (see "Index values" above)
    ErrorCase("cu-decreasing", VL, "cu_seqlens_q decreasing", _varlen(cu_seqlens_q=_i32(0, 5, 3, 10)), V),
    ErrorCase("cu-past-q", VL, "cu_seqlens_q ending past q's rows", _varlen(cu_seqlens_q=_i32(0, 5, 7, 11)), V),
    ErrorCase("cu-k-past-k", VL, "cu_seqlens_k ending past k's rows", _varlen(cu_seqlens_k=_i32(0, 5, 6, 13)), V),
    ErrorCase("cu-negative", VL, "cu_seqlens_q starting below 0", _varlen(cu_seqlens_q=_i32(-2, 3, 3, 10)), V),
    ErrorCase("block-table-range", VL, "a block_table entry that a sequence uses is not a page of k",
              _varlen(k=_pages(), v=_pages(), block_table=_i32(0, 1, 7, 3, 4, 5).view(3, 2)), V),
    ErrorCase("block-table-short", VL, "a sequence with more keys than its block_table row holds",
              _varlen(k=_pages(), v=_pages(), cu_seqlens_k=_i32(0, 4, 8, 17), block_table=_i32(0, 1, 2, 3, 4, 5).view(3, 2)),
              V),
    # ---- flash_attn_with_kvcache: types and shapes
    ErrorCase("cache-dtype", KV, "k_cache's dtype differs from q's", _kvcache(k_cache=torch.zeros(2, 16, 2, 16).half()), T),
    ErrorCase("cache-shape", KV, "v_cache's shape differs from k_cache's", _kvcache(v_cache=torch.zeros(2, 15, 2, 16)), V),
    ErrorCase("cache-headdim", KV, "k_cache's head dim differs from q's",
              _kvcache(k_cache=torch.zeros(2, 16, 2, 8), v_cache=torch.zeros(2, 16, 2, 8)), V),
    ErrorCase("cache-heads", KV, "nheads not a multiple of k_cache's heads",
              _kvcache(k_cache=torch.zeros(2, 16, 3, 16), v_cache=torch.zeros(2, 16, 3, 16)), V),
    ErrorCase("k-without-v", KV, "k without v", _kvcache(k=torch.zeros(2, 1, 2, 16), cache_seqlens=3), V),
    ErrorCase("append-no-seqlens", KV, "k and v without cache_seqlens", _kvcache(**_new()), V),
    ErrorCase("new-k-shape", KV, "k with another number of heads than k_cache",
              _kvcache(k=torch.zeros(2, 1, 4, 16), v=torch.zeros(2, 1, 4, 16), cache_seqlens=3), V),
    ErrorCase("seqlens-float", KV, "cache_seqlens a float", _kvcache(cache_seqlens=3.0), T),
    ErrorCase("seqlens-int64", KV, "cache_seqlens an int64 tensor", _kvcache(cache_seqlens=torch.tensor([3, 4])), T),
    ErrorCase("seqlens-shape", KV, "cache_seqlens of the wrong length", _kvcache(cache_seqlens=_i32(3, 4, 5)), V),
    ErrorCase("seqlens-int-range", KV, "cache_seqlens (an int) plus the new rows beyond the cache",
              _kvcache(**_new(2), cache_seqlens=15), V),
    ErrorCase("batch-idx-int64", KV, "cache_batch_idx int64",
              _kvcache(cache_seqlens=_i32(3, 4), cache_batch_idx=torch.tensor([1, 0])), T),
    ErrorCase("paged-batch-idx", KV, "block_table together with cache_batch_idx",
              _kvcache(k_cache=_pages(), v_cache=_pages(), cache_seqlens=_i32(3, 4), block_table=_i32(0, 1, 2, 3).view(2, 2),
                       cache_batch_idx=_i32(0, 1)), V),
    ErrorCase("rotary-pair", KV, "rotary_cos without rotary_sin",
              _kvcache(**_new(), cache_seqlens=3, rotary_cos=torch.zeros(16, 4)), V),
    ErrorCase("rotary-no-k", KV, "rotary_cos and rotary_sin without k and v",
              _kvcache(cache_seqlens=3, rotary_cos=torch.zeros(16, 4), rotary_sin=torch.zeros(16, 4)), V),
    ErrorCase("rotary-dim", KV, "rotary_dim (2 * rotary_cos.shape[1]) above the head dim",
              _kvcache(**_new(), cache_seqlens=3, rotary_cos=torch.zeros(16, 9), rotary_sin=torch.zeros(16, 9)), V),
    ErrorCase("rotary-rows", KV, "rotary_cos with fewer rows than the cache",
              _kvcache(**_new(), cache_seqlens=3, rotary_cos=torch.zeros(8, 4), rotary_sin=torch.zeros(8, 4)), V),
    ErrorCase("num-splits", KV, "num_splits negative", _kvcache(num_splits=-1), V),
    ErrorCase("cache-device", KV, "k_cache on another device than q (here q on cuda:0, k_cache on the CPU)",
              _kvcache(q=_cuda(2, 1, 4, 16, dtype=torch.float32), v_cache=_cuda(2, 16, 2, 16, dtype=torch.float32)), R),
    ErrorCase("seqlens-device", KV, "cache_seqlens on another device than q (here the CPU, q on cuda:0)",
              _kvcache(q=_cuda(2, 1, 4, 16), k_cache=_cuda(2, 16, 2, 16), v_cache=_cuda(2, 16, 2, 16),
                       cache_seqlens=_i32(3, 4)), R),
    ErrorCase("kvcache-grid-batch", KV, "CUDA: batch above 65,535",
              _kvcache(q=_cuda(65536, 1, 1, 8), k_cache=_cuda(65536, 4, 1, 8), v_cache=_cuda(65536, 4, 1, 8)), V),
    # ---- flash_attn_with_kvcache: values of the index tensors (see "Index values" above)
    ErrorCase("seqlens-range", KV, "cache_seqlens[b] plus the new rows beyond the cache",
              _kvcache(**_new(), cache_seqlens=_i32(3, 16)), V),
    ErrorCase("seqlens-negative", KV, "cache_seqlens[b] negative", _kvcache(cache_seqlens=_i32(3, -1)), V),
    ErrorCase("batch-idx-range", KV, "cache_batch_idx[b] not a row of k_cache",
              _kvcache(**_new(), cache_seqlens=_i32(3, 4), cache_batch_idx=_i32(0, 2)), V),
    ErrorCase("leftpad-range", KV, "cache_leftpad[b] above cache_seqlens[b]",
              _kvcache(**_new(), cache_seqlens=_i32(3, 4), cache_leftpad=_i32(0, 9)), V),
    ErrorCase("kv-block-table-range", KV, "a block_table entry that a batch row uses is not a page of k_cache",
              _kvcache(**_new(), k_cache=_pages(), v_cache=_pages(), cache_seqlens=_i32(3, 4),
                       block_table=_i32(0, -1, -1, 3, 6, -1).view(2, 3)), V),
]


def run_case(case: ErrorCase) -> BaseException:
    """Calls the case and returns what it raised (AssertionError if it raised nothing)."""
    try:
        case.call()
    except Exception as exc:  # noqa: BLE001 - the exception is the result
        return exc
    raise AssertionError(f"{case.id}: {case.function} raised nothing")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


HEADER = """# Errors

<!-- Generated by `python tools/errors_doc.py` from tests/error_cases.py; tests/test_robustness.py
checks that this file is current. Edit those, not this file. -->

What each bad input raises, with the message it gives (the messages below are the real ones, for
the example inputs of tests/error_cases.py: shapes and values change with the input).

**Exception types.** The official package raises `RuntimeError` for every bad input. flash_cute
raises a precise type that also derives from `RuntimeError`, so `except RuntimeError` keeps
working:

| exception | derives from | for |
|---|---|---|
| `FlashAttnTypeError` | `TypeError`, `RuntimeError` | an argument of the wrong type or dtype |
| `FlashAttnValueError` | `ValueError`, `RuntimeError` | a wrong shape, size or value |
| `FlashAttnNotImplementedError` | `NotImplementedError` (a `RuntimeError`) | what this build or flash_cute does not do: softcap, ALiBi or dropout on fp16/bf16 CUDA inputs in a build made with `FLASH_CUTE_OPTION_KERNELS=OFF` (the message names the options and the build option), and the backward of paged K/V through the `flash_cute::fwd` op called directly |
| `RuntimeError` | | a tensor on another device than q, or on a device that is neither CUDA nor the CPU; a head dim or dtype whose kernel the build lacks (the message names the build option, `FLASH_CUTE_HEAD_DIMS` / `FLASH_CUTE_DTYPES`); in a build made with `FLASH_CUTE_SMALL_SMEM_TILES=OFF`, a kernel whose tile needs more shared memory than the GPU allows (sm_86, sm_89, sm_120: 99 KB per block; the message names the bytes the kernel needs, the GPU's limit and the option) |

All the classes are in `flash_cute` (`flash_cute.FlashAttnValueError`, ...). Every check runs
before anything is allocated or written: a refused `flash_attn_with_kvcache` call leaves the
caches unchanged.

**Index values.** The values inside the index tensors (`cu_seqlens_q`, `cu_seqlens_k`,
`block_table`, `cache_seqlens`, `cache_batch_idx`, `cache_leftpad`) say where the kernels read and
write. For CPU tensors they are always checked (the rows marked "values" below). For CUDA tensors,
reading them costs a host sync per call, which the decoding loop and the varlen path are written
to avoid, so they are checked only when the environment variable `FLASH_CUTE_CHECK_INDICES=1` is
set (or `flash_cute.flash_attn_interface.CHECK_INDEX_VALUES = True`): then with one host sync per
call, and never while a CUDA graph is captured or inside `torch.compile` / `torch.export` graphs.
(float32 CUDA tensors, which run the reference in torch ops, are always checked.)
Unchecked, the kernels hold the values to the tensors themselves, so nothing is read or written
outside the tensors a call was given (the official package does not check them, and reads or
writes wherever they point):

- varlen (`flash_attn_varlen_func` and the packed forms): a sequence whose `cu_seqlens_q` /
  `cu_seqlens_k` span leaves `q` / `k` (a negative start, a decreasing pair, an end past the
  tensor's rows), whose keys need more pages than its `block_table` row has, or whose table entry
  for a page it uses is not a page of `k` gets NaN in its output rows that lie in `q` (and NaN lse);
  the other sequences are computed as usual. The backward of such a call stays inside the tensors;
  the bad sequence's gradients are unspecified (every sequence's, when `cu_seqlens_q` decreases).
- `flash_attn_with_kvcache`: a batch row with `cache_seqlens` negative or, with the new rows, past
  the cache's capacity, a `cache_batch_idx` that is not a cache row, a `cache_leftpad` negative or
  past `cache_seqlens`, or a used `block_table` entry that is not a page gets NaN in its output
  and lse. Its new rows are not appended (with a bad page, those bound for good pages may be); the
  other rows are appended and computed as usual.

Entries of `block_table` that a sequence does not use (past its length) may hold anything (-1
included).

Errors that only CUDA inputs raise (the grid limits, device mismatches with a GPU tensor) are
produced here with FakeTensor CUDA tensors, which reach the same checks without a GPU.

| function | input | exception | message |
|---|---|---|---|
"""

RESULTS = """
## Inputs that are not errors

What flash_cute does with inputs that are valid but unusual; each row names the test that holds it
to that (tests/test_robustness.py unless another file is named).

| input | result | test |
|---|---|---|
| NaN in q | the output of that (row, head) is NaN; its lse is NaN or +inf (unspecified); every other output is unaffected | `test_nonfinite_inputs_cpu`, `test_nonfinite_inputs_gpu` |
| NaN in k | the outputs of the query rows (of the heads sharing that KV head) that see that key are NaN; other batch entries and other KV heads are unaffected | same |
| NaN or ±Inf in v | the outputs of the query rows that see that key are NaN or ±Inf; rows in the same tile that do not see the key may be NaN too (0 × Inf or 0 × NaN in P V, as in the official package); other batch entries and KV heads are unaffected | same |
| ±Inf in q or k | the scores it touches become ±Inf (or NaN): a row whose largest score is +Inf gets NaN, a key whose score is -Inf gets probability 0 (as a masked key); a row whose scores are all -Inf reads as a row that sees no key: output 0, lse +inf. The same arithmetic as the official package | (follows from the rows above) |
| the last dimension not contiguous (stride != 1) | copied to a contiguous tensor first (the official package does the same), same results | `test_validation.py::test_last_dim_strided_inputs_are_accepted`, `test_strided_kvcache_inputs` |
| a data pointer not 16-byte aligned (an offset view), strides not multiples of 8 elements | copied once to an aligned tensor; same results. A cache that the decoding kernel cannot write in place gets the new k/v appended by a small append kernel first (`src/append_kv.cu`) | `test_fwd_gpu.py::test_misaligned_base_address`, `test_misaligned_views_gpu`, `test_kvcache_append_guard_regions` |
| batch 0, seqlen_q 0, seqlen_k 0 | empty outputs of the right shapes; rows with no key give output 0 and lse +inf, gradients 0 | `test_empty_batches_cpu`, `test_empty_batches_gpu` |
| every sequence of a varlen batch empty | output 0 (or empty), lse +inf, gradients 0 | same |
| head dim 1 .. 256, not a multiple of 8 (e.g. 8, 4) | runs (head dims that are not multiples of 8 are zero-padded, as in the official package) | `test_small_head_dims_gpu` |
| tensors of more than 2^31 elements | 64-bit offsets: correct | `test_q_over_2g_elements`, `test_kv_over_2g_elements`, `test_kvcache_over_2g_elements` |
| seqlen 128k and more (forward, decoding) | correct (the kernels loop over key blocks; no length limit below 2^31 rows) | `test_forward_128k`, `test_decode_128k` |
| batch × nheads above 65,535 (each at most 65,535) | correct: batch and heads are separate grid dimensions | `test_batch_times_heads_over_65535` |
| `max_seqlen_q` / `max_seqlen_k` smaller than the longest sequence | correct, only slower (they size the grid; the kernels loop) | `test_varlen.py::test_varlen_max_seqlen_too_small_gpu` |
| float32 CUDA tensors | run the reference implementation on the GPU, with a one-time warning | `test_fwd_gpu.py::test_float32_runs_reference_with_warning` |
"""


def render_markdown() -> str:
    """docs/errors.md: the header, one row per case (its real exception and message), and the
    table of inputs that are not errors."""
    rows = []
    for case in CASES:
        exc = run_case(case)
        if not isinstance(exc, case.exc):
            raise AssertionError(f"{case.id}: raised {type(exc).__name__}: {exc}, expected {case.exc.__name__}")
        rows.append(f"| `{case.function}` | {_cell(case.input)} | `{type(exc).__name__}` | {_cell(str(exc))} |")
    return HEADER + "\n".join(rows) + "\n" + RESULTS
