"""The public surface: the official flash_attn v2.8 signature, the module layout, and the
torch.library operator (schema, fake implementation, torch.compile)."""

from __future__ import annotations

import inspect

import pytest
import torch

import flash_cute
import flash_cute.flash_attn_interface
from helpers import make_qkv

_P = inspect.Parameter
_OPTIONS = [
    ("dropout_p", 0.0),
    ("softmax_scale", None),
    ("causal", False),
    ("window_size", (-1, -1)),
    ("softcap", 0.0),
    ("alibi_slopes", None),
    ("deterministic", False),
    ("return_attn_probs", False),
]
_VARLEN = [("cu_seqlens_q", _P.empty), ("cu_seqlens_k", _P.empty), ("max_seqlen_q", _P.empty), ("max_seqlen_k", _P.empty)]
# flash_attn.flash_attn_interface in flash_attn v2.8: (name, default) of each function's parameters.
OFFICIAL_SIGNATURES = {
    "flash_attn_func": [("q", _P.empty), ("k", _P.empty), ("v", _P.empty)] + _OPTIONS,
    "flash_attn_qkvpacked_func": [("qkv", _P.empty)] + _OPTIONS,
    "flash_attn_kvpacked_func": [("q", _P.empty), ("kv", _P.empty)] + _OPTIONS,
    "flash_attn_varlen_func": [("q", _P.empty), ("k", _P.empty), ("v", _P.empty)] + _VARLEN + _OPTIONS
    + [("block_table", None)],
    "flash_attn_varlen_qkvpacked_func": [("qkv", _P.empty), ("cu_seqlens", _P.empty), ("max_seqlen", _P.empty)]
    + _OPTIONS,
    "flash_attn_varlen_kvpacked_func": [("q", _P.empty), ("kv", _P.empty)] + _VARLEN + _OPTIONS,
    "flash_attn_with_kvcache": [
        ("q", _P.empty), ("k_cache", _P.empty), ("v_cache", _P.empty), ("k", None), ("v", None),
        ("rotary_cos", None), ("rotary_sin", None), ("cache_seqlens", None), ("cache_batch_idx", None),
        ("cache_leftpad", None), ("block_table", None), ("softmax_scale", None), ("causal", False),
        ("window_size", (-1, -1)), ("softcap", 0.0), ("rotary_interleaved", True), ("alibi_slopes", None),
        ("num_splits", 0), ("return_softmax_lse", False),
    ],
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_SIGNATURES))
def test_signature_is_official(name):
    fn = getattr(flash_cute, name)
    assert getattr(flash_cute.flash_attn_interface, name) is fn
    params = list(inspect.signature(fn).parameters.values())
    expected = OFFICIAL_SIGNATURES[name]
    assert [p.name for p in params] == [n for n, _ in expected]
    for p, (n, default) in zip(params, expected):
        assert p.kind is _P.POSITIONAL_OR_KEYWORD, f"{n} is {p.kind}"
        assert p.default == default and type(p.default) is type(default), f"{n}: default {p.default!r}"
    assert fn.__doc__ and "Return" in fn.__doc__


def test_module_layout():
    assert flash_cute.flash_attn_interface.flash_attn_func is flash_cute.flash_attn_func
    assert isinstance(flash_cute.__version__, str)
    assert all(part.isdigit() for part in flash_cute.__version__.split(".")[:2])
    for name in flash_cute.__all__:
        assert hasattr(flash_cute, name), name


def test_positional_arguments_follow_official_order():
    """Positional calls written against flash_attn mean the same thing here."""
    q, k, v = make_qkv(1, 9, 11, 2, 1, 16, torch.float32)
    by_position = flash_cute.flash_attn_func(q, k, v, 0.0, 0.5, True, (-1, -1), 0.0, None, False, True)
    by_name = flash_cute.flash_attn_func(q, k, v, softmax_scale=0.5, causal=True, return_attn_probs=True)
    assert len(by_position) == 3
    assert torch.equal(by_position[0], by_name[0]) and torch.equal(by_position[1], by_name[1])


@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_fwd(causal):
    """torch.library.opcheck: schema, autograd registration, fake tensor and AOT dispatch."""
    q, k, v = make_qkv(2, 16, 24, 4, 2, 16, torch.float32)
    torch.library.opcheck(torch.ops.flash_cute.fwd.default, (q, k, v, 0.25, causal))


def _is_missing_compiler(exc):
    """True when exc (or what it wraps) is inductor's "no C++ compiler" error."""
    from torch._inductor.exc import InvalidCxxCompiler

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, InvalidCxxCompiler):
            return True
        exc = getattr(exc, "inner_exception", None) or exc.__cause__
    return False


@pytest.mark.slow
def test_torch_compile_fullgraph():
    """flash_attn_func compiles without graph breaks and gives the eager result."""

    def f(q, k, v):
        return flash_cute.flash_attn_func(q, k, v, causal=True) * 2 + 1

    q, k, v = make_qkv(1, 12, 20, 2, 1, 20, torch.float32)  # head dim 20: the padding path too
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    try:
        got = compiled(q, k, v)
    except Exception as exc:
        if _is_missing_compiler(exc):
            pytest.skip(f"torch.compile needs a C++ compiler: {exc}")
        raise
    torch.testing.assert_close(got, f(q, k, v), rtol=1e-6, atol=1e-6)


def _assert_compiled_step_matches_eager(loss, inputs):
    """torch.compile(loss, fullgraph=True, backend="aot_eager") gives the eager loss and the
    gradients with respect to every input."""
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, loss):
        leaves = [t.clone().requires_grad_() for t in inputs]
        value = fn(*leaves)
        results.append((value, torch.autograd.grad(value, leaves)))
    (got, got_grads), (want, want_grads) = results
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("entry", ["varlen", "qkvpacked", "varlen_kvpacked"])
def test_torch_compile_fullgraph_training_step(entry):
    """The varlen and packed functions compile without graph breaks (aot_eager: no C++ compiler
    needed) and give the eager loss and gradients: the packed backward's in-place op included."""
    cu = torch.tensor([0, 5, 5, 14, 17], dtype=torch.int32)

    def make():
        if entry == "varlen":
            return [torch.randn(17, 4, 16), torch.randn(17, 2, 16), torch.randn(17, 2, 16)]
        if entry == "qkvpacked":
            return [torch.randn(2, 7, 3, 4, 16)]
        return [torch.randn(17, 4, 16), torch.randn(17, 2, 2, 16)]

    def loss(*xs):
        if entry == "varlen":
            out = flash_cute.flash_attn_varlen_func(*xs, cu, cu, 9, 9, causal=True)
        elif entry == "qkvpacked":
            out = flash_cute.flash_attn_qkvpacked_func(*xs, causal=True)
        else:
            out = flash_cute.flash_attn_varlen_kvpacked_func(*xs, cu, cu, 9, 9, causal=True)
        return (out * out).sum()

    inputs = make()
    _assert_compiled_step_matches_eager(loss, inputs)


@pytest.mark.parametrize("entry", ["func", "qkvpacked"])
def test_torch_compile_fullgraph_with_options(entry):
    """softcap, a local window and ALiBi slopes (a tensor input) travel through the compiled ops
    and their autograd (aot_eager), to the eager loss and gradients."""
    slopes = torch.rand(4)

    def loss(*xs):
        options = dict(causal=True, window_size=(3, 0), softcap=5.0, alibi_slopes=slopes)
        if entry == "func":
            out = flash_cute.flash_attn_func(*xs, **options)
        else:
            out = flash_cute.flash_attn_qkvpacked_func(*xs, **options)
        return (out * out).sum()

    inputs = list(make_qkv(2, 9, 9, 4, 2, 16, torch.float32)) if entry == "func" else [torch.randn(2, 9, 3, 4, 16)]
    _assert_compiled_step_matches_eager(loss, inputs)
