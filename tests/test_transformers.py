"""flash_cute inside Hugging Face transformers (5.x): a tiny randomly initialised Llama-style model
(GQA) whose attention runs through flash_cute, registered in transformers' ``AttentionInterface``,
against the same model on PyTorch's ``sdpa``: logits and the gradients of every parameter, a left-
padded batch, packed sequences (padding-free training), greedy ``generate`` with the KV cache
(dynamic and static), and softcap + sliding windows (a Gemma2-style model, against ``eager``).

On CPU, flash_cute runs its float32 reference, so float32 models must match sdpa closely
(``assert_close_fp32``). On a GPU the models run in bfloat16 through the CUDA kernels and are
compared by the project's 2x rule (``assert_2x_rule_model``): the oracle is the same bfloat16
model with its attention computed in float32 (``sdpa_fp32``, ``eager_fp32``), so that only the
attention differs; flash_cute's error must be at most twice that of sdpa (or eager) in bfloat16,
plus a small term. (Against a whole float32 model, the bfloat16 rounding of the linear layers
would dominate and hide a wrong softmax scale.)

The registered name must not contain "flash": transformers 5 treats any implementation whose name
contains "flash" as a flash-attention kernel to load (``is_flash_attention_requested``) and fails
to find one called e.g. "flash_cute" on the Hub.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, eager_mask, flash_attention_mask, sdpa_mask  # noqa: E402
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager_attention  # noqa: E402

import flash_cute  # noqa: E402
from flash_cute.bert_padding import index_first_axis, pad_input, unpad_input  # noqa: E402

IMPL = "cute"  # the name flash_cute is registered under (see the module docstring: no "flash")


def flash_cute_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                         sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """transformers' attention-function signature. query, key, value: (batch, heads, seqlen,
    head_dim); returns (output (batch, seqlen_q, heads, head_dim), None). attention_mask is what
    ``cute_attention_mask`` made: None (no padding: flash_attn_func) or a (batch, seqlen_k) bool
    mask of the real tokens (varlen on the unpadded tokens)."""
    batch, _, q_len, _ = query.shape
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (batch, seqlen, heads, head_dim)
    opts = dict(
        dropout_p=dropout,
        softmax_scale=scaling,
        # bottom-right aligned, as transformers' flash integration expects: a query chunk after a
        # KV cache (q_len < k_len, e.g. one decoded token) sees the whole cache
        causal=module.is_causal if is_causal is None else is_causal,
        # transformers' window counts the token itself (sdpa: k > q - sliding_window)
        window_size=(-1, -1) if sliding_window is None else (sliding_window - 1, sliding_window - 1),
        softcap=0.0 if softcap is None else softcap,
    )
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if attention_mask is None and cu_q is None:
        position_ids = kwargs.get("position_ids")
        if batch == 1 and q_len > 1 and position_ids is not None and (position_ids.diff(dim=-1) < 0).any():
            # packed sequences (padding-free training): each restart of position_ids starts one
            starts = (position_ids.reshape(-1) == 0).nonzero().reshape(-1)
            cu_q = cu_k = torch.cat([starts, starts.new_tensor([q_len])]).to(torch.int32)
        else:
            return flash_cute.flash_attn_func(q, k, v, **opts), None
    if cu_q is not None:  # packed sequences: (1, total, heads, head_dim)
        max_q = int(kwargs.get("max_length_q") or cu_q.diff().max())
        max_k = int(kwargs.get("max_length_k") or cu_k.diff().max())
        out = flash_cute.flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, max_q, max_k, **opts)
        return out.unsqueeze(0), None
    kv_len = attention_mask.shape[1]
    k, v = k[:, :kv_len], v[:, :kv_len]  # a static cache has slots past the tokens written so far
    k, idx_k, cu_k, max_k, _ = unpad_input(k, attention_mask)
    v = index_first_axis(v.reshape(-1, *v.shape[2:]), idx_k)
    # the queries are the last q_len tokens (generation pads on the left)
    q, idx_q, cu_q, max_q, _ = unpad_input(q, attention_mask[:, -q_len:])
    out = flash_cute.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **opts)
    return pad_input(out, idx_q, batch, q_len), None


def cute_attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None,
                        device=None, **kwargs):
    """The mask transformers hands to ``flash_cute_attention``: its flash-attention mask (None when
    no token is padding, else the (batch, seqlen_k) padding mask), and with a static cache whose
    slots are not all written yet, a mask of the keys written so far (transformers' own flash
    path keeps the 2D mask for static caches in ``generate``; a name without "flash" does not)."""
    mask = flash_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                                attention_mask=attention_mask, **kwargs)
    written = int(q_offset) + q_length - kv_offset
    if mask is None and written < kv_length:
        mask = torch.ones(batch_size, written, dtype=torch.bool, device=device)
    return mask


CALLS = []  # (q_len, k_len, has_mask) of every flash_cute call, to check which paths a test took
OUTPUTS = {}  # implementation name -> the attention outputs of its calls, while a test records them


def _recorded(name, attention):
    def recorded_attention(module, query, key, value, attention_mask, **kwargs):
        if name == IMPL:
            CALLS.append((query.shape[2], key.shape[2], attention_mask is not None))
        out, weights = attention(module, query, key, value, attention_mask, **kwargs)
        if name in OUTPUTS:
            OUTPUTS[name].append(out.detach().float())
        return out, weights

    return recorded_attention


_recording_attention = _recorded(IMPL, flash_cute_attention)
AttentionInterface.register(IMPL, _recording_attention)
AttentionMaskInterface.register(IMPL, cute_attention_mask)


def _in_fp32(attention):
    """The oracle of the bfloat16 models: ``attention`` computed in float32, rounded once."""

    def fp32_attention(module, query, key, value, attention_mask, **kwargs):
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
        out, _ = attention(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
        return out.to(query.dtype), None

    return fp32_attention


# the baselines of the GPU tests; eager_fp32 is Gemma2's eager attention (it has softcap);
# sdpa_same is sdpa, recorded
AttentionInterface.register("sdpa_fp32", _recorded("sdpa_fp32", _in_fp32(sdpa_attention_forward)))
AttentionMaskInterface.register("sdpa_fp32", sdpa_mask)
AttentionInterface.register("sdpa_same", _recorded("sdpa_same", sdpa_attention_forward))
AttentionMaskInterface.register("sdpa_same", sdpa_mask)
AttentionInterface.register("eager_fp32", _in_fp32(gemma2_eager_attention))
AttentionMaskInterface.register("eager_fp32", eager_mask)

DEVICES = [
    pytest.param("cpu", id="cpu-fp32"),
    pytest.param("cuda", id="cuda-bf16", marks=pytest.mark.cuda),
]


def tiny_llama_config(**overrides):
    # head_dim 128: a size every flash_cute build holds (development builds often hold only it)
    kwargs = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=128, vocab_size=256, max_position_embeddings=256,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def make_model(config, device, dtype, impl, model_class=LlamaForCausalLM, seed=0):
    """A model with weights from ``seed`` (the same for every call with the same config)."""
    torch.manual_seed(seed)
    model = model_class(copy.deepcopy(config))  # set_attn_implementation writes into the config
    # random init leaves the weights small; scale the attention projections up so that the
    # softmax is far from uniform and a wrong mask or scale shows in the logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    model = model.to(device=device, dtype=dtype)
    model.set_attn_implementation(impl)
    assert model.config._attn_implementation == impl
    return model


def _require_cuda_kernels(device, head_dim=128):
    if device == "cuda":
        from helpers import require_bwd_kernel

        require_bwd_kernel(torch.bfloat16, head_dim, causal=True)
        require_bwd_kernel(torch.bfloat16, head_dim, causal=False)


def forward_backward(model, input_ids, attention_mask=None, labels=None, **kwargs):
    """Logits (float32) and {name: gradient (float32)} of the mean cross-entropy on ``labels``."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids if labels is None else labels,
                use_cache=False, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == len(list(model.parameters())), "some parameters got no gradient"
    return out.logits.detach().float(), grads


def assert_close_fp32(got, want, name, rtol=1e-4):
    """float32 against float32: max|got - want| <= rtol * max|want| (plus a tiny floor)."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rtol * scale + 1e-7, f"{name}: max difference {err:.3e} > {rtol} x max|want| ({scale:.3e})"


def assert_2x_rule_model(got, low, ref, name, rtol_term=2e-3):
    """bfloat16 model outputs: with ``ref`` the oracle (attention in float32) and ``low`` the
    baseline in bfloat16, max|got - ref| <= 2 max|low - ref| + rtol_term max|ref|."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - ref).abs().max().item()
    err_pt = (low - ref).abs().max().item()
    term = rtol_term * ref.abs().max().item()
    assert err <= 2 * err_pt + term, (
        f"{name}: max error {err:.3e} exceeds 2 x sdpa's bf16 error ({err_pt:.3e}) + {term:.3e}"
    )


def compare_models(device, config, inputs, mask_keep=None, model_class=LlamaForCausalLM, baseline="sdpa"):
    """Runs forward + backward of the model on ``baseline`` and on flash_cute and compares logits
    (where ``mask_keep`` is True) and every parameter's gradient: on the CPU in float32 against the
    baseline; on the GPU in bfloat16 by the 2x rule, against the baseline with attention in fp32,
    beside the baseline's own bfloat16 error."""
    cpu = device == "cpu"
    dtype = torch.float32 if cpu else torch.bfloat16
    ref_logits, ref_grads = forward_backward(
        make_model(config, device, dtype, baseline if cpu else baseline + "_fp32", model_class), **inputs)
    if not cpu:
        low_logits, low_grads = forward_backward(make_model(config, device, dtype, baseline, model_class), **inputs)
    model = make_model(config, device, dtype, IMPL, model_class)
    CALLS.clear()
    logits, grads = forward_backward(model, **inputs)
    assert CALLS, "the model never called flash_cute"

    def check(got, ref, low, what):
        if cpu:
            assert_close_fp32(got, ref, what)
        else:
            assert_2x_rule_model(got, low, ref, what)

    keep = slice(None) if mask_keep is None else mask_keep
    check(logits[keep], ref_logits[keep], None if cpu else low_logits[keep], "logits")
    for n in ref_grads:
        check(grads[n], ref_grads[n], None if cpu else low_grads[n], f"grad of {n}")
    return CALLS[:]


def left_padded_batch(device, lengths, seqlen, vocab=256):
    """input_ids (batch, seqlen) with tokens in 3..vocab-1, left-padded with pad id 0; the mask."""
    ids = torch.randint(3, vocab, (len(lengths), seqlen), device=device)
    mask = torch.zeros(len(lengths), seqlen, dtype=torch.long, device=device)
    for b, n in enumerate(lengths):
        mask[b, seqlen - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def test_registered():
    assert IMPL in AttentionInterface().valid_keys()
    assert AttentionInterface()[IMPL] is _recording_attention
    assert AttentionMaskInterface()[IMPL] is cute_attention_mask


@pytest.mark.parametrize("device", DEVICES)
def test_logits_and_grads_match_sdpa(device):
    """No padding: every layer calls flash_attn_func (causal) forward and backward."""
    _require_cuda_kernels(device)
    ids = torch.randint(3, 256, (2, 37), device=device)
    calls = compare_models(device, tiny_llama_config(), dict(input_ids=ids))
    assert calls == [(37, 37, False)] * 2


@pytest.mark.parametrize("device", DEVICES)
def test_left_padded_batch_matches_sdpa(device):
    """A left-padded batch: the padding mask routes every layer through unpad_input +
    flash_attn_varlen_func; logits compared on the real tokens, loss on the real tokens only."""
    _require_cuda_kernels(device)
    ids, mask = left_padded_batch(device, [29, 13, 1, 33], 33)
    labels = ids.masked_fill(mask == 0, -100)
    calls = compare_models(device, tiny_llama_config(), dict(input_ids=ids, attention_mask=mask, labels=labels),
                           mask_keep=mask.bool())
    assert calls == [(33, 33, True)] * 2


@pytest.mark.parametrize("device", DEVICES)
def test_packed_sequences_match_sdpa(device):
    """Padding-free training: three sequences packed into one row, position_ids restarting at
    0 for each; sdpa builds a block-diagonal causal mask from them, flash_cute runs varlen."""
    _require_cuda_kernels(device)
    lengths = [11, 20, 6]
    ids = torch.randint(3, 256, (1, sum(lengths)), device=device)
    position_ids = torch.cat([torch.arange(n, device=device) for n in lengths]).unsqueeze(0)
    labels = ids.clone()
    for start in torch.tensor(lengths).cumsum(0)[:-1].tolist():  # no target across a boundary
        labels[0, start] = -100
    compare_models(device, tiny_llama_config(), dict(input_ids=ids, position_ids=position_ids, labels=labels))
    # and the result is that of each sequence alone (not attending across boundaries)
    model = make_model(tiny_llama_config(), device, torch.float32 if device == "cpu" else torch.bfloat16, IMPL)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits[0].float()
        start = 0
        for n in lengths:
            alone = model(input_ids=ids[:, start:start + n], use_cache=False).logits[0].float()
            if device == "cpu":
                assert_close_fp32(packed[start:start + n], alone, f"sequence at {start}")
            else:
                torch.testing.assert_close(packed[start:start + n], alone, rtol=0, atol=0.05 * alone.abs().max().item())
            start += n


class ForceTokens(transformers.LogitsProcessor):
    """Makes generate pick the given tokens (batch, n) in turn (the raw logits are still returned)."""

    def __init__(self, tokens, prompt_len):
        self.tokens, self.prompt_len = tokens, prompt_len

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len
        forced = torch.full_like(scores, -float("inf"))
        return forced.scatter_(1, self.tokens[:, step:step + 1], 0.0)


def _generate(model, ids, mask, max_new_tokens=8, force=None, **kwargs):
    """Greedy generate (or the tokens ``force``); returns the sequences, the raw logits of each
    step (batch, new tokens, vocab) and the attention outputs of every call (batch, q_len, heads,
    head_dim). Not compiled (transformers compiles the decoding step of a static cache on CUDA
    by default), so that every implementation runs the same linear layers."""
    if force is not None:
        kwargs["logits_processor"] = transformers.LogitsProcessorList([ForceTokens(force, ids.shape[1])])
    impl = model.config._attn_implementation
    OUTPUTS[impl] = []
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, disable_compile=True, **kwargs)
    finally:
        outputs = OUTPUTS.pop(impl)
    return out.sequences, torch.stack(out.logits, dim=1).float(), outputs


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("device", DEVICES)
def test_generate_matches_sdpa(device, padded, cache):
    """Greedy generation with the KV cache: a prefill call, then one call per token with q_len 1
    and a growing k_len (bottom-right causal, or varlen with the padding mask)."""
    _require_cuda_kernels(device)
    config = tiny_llama_config()
    lengths = [12, 7, 12] if padded else [12, 12, 12]
    ids, mask = left_padded_batch(device, lengths, 12)
    kwargs = dict(cache_implementation="static") if cache == "static" else {}
    n_new = 8
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = make_model(config, device, dtype, IMPL)
    CALLS.clear()
    seq, step_logits, outputs = _generate(model, ids, mask, n_new, **kwargs)
    layers = config.num_hidden_layers
    assert len(CALLS) == n_new * layers, CALLS
    assert CALLS[0][0] == 12
    decode = CALLS[layers:]
    assert all(q == 1 and k > 1 for q, k, _ in decode), f"not a q_len 1 decode step with the cache: {decode}"
    if cache == "dynamic":
        assert [k for _, k, _ in decode[::layers]] == list(range(13, 12 + n_new))
    masks = [has_mask for _, _, has_mask in decode]
    if padded:
        assert all(masks), "a padded batch decoded without its padding mask"
    elif cache == "dynamic":
        assert not any(masks), "an unpadded batch with a dynamic cache should run flash_attn_func"
    else:  # the static cache's unwritten slots are masked until the last step fills it
        assert all(masks[:-layers]) and not any(masks[-layers:]), str(CALLS)

    if device == "cpu":
        ref_seq, ref_logits, _ = _generate(make_model(config, device, dtype, "sdpa"), ids, mask, n_new, **kwargs)
        assert torch.equal(seq, ref_seq), f"flash_cute generated {seq.tolist()}, sdpa {ref_seq.tolist()}"
        assert_close_fp32(step_logits, ref_logits, "logits of each generated step")
        return
    # bf16: greedy tokens may legitimately differ where two logits nearly tie, so the baselines
    # generate the tokens flash_cute chose (the same prefill and decode steps, the same cache);
    # the raw logits of each step are compared, and (more sensitive: the logits are bf16, whose
    # rounding hides small errors) the attention output of every call, prefill and decode
    new = seq[:, ids.shape[1]:]
    ref_seq, ref_logits, ref_outs = _generate(make_model(config, device, dtype, "sdpa_fp32"), ids, mask, n_new,
                                              force=new, **kwargs)
    low_seq, low_logits, low_outs = _generate(make_model(config, device, dtype, "sdpa_same"), ids, mask, n_new,
                                              force=new, **kwargs)
    assert torch.equal(ref_seq, seq) and torch.equal(low_seq, seq)
    assert_2x_rule_model(step_logits, low_logits, ref_logits, "logits of each generated step")
    assert len(outputs) == len(ref_outs) == len(low_outs) == n_new * layers
    for i, (got, low, ref) in enumerate(zip(outputs, low_outs, ref_outs)):
        real = mask.bool() if i < layers else slice(None)  # the prefill's padding rows hold no token
        assert_2x_rule_model(got[real], low[real], ref[real], f"attention output of call {i} (q_len {got.shape[1]})")


@pytest.mark.parametrize("device", DEVICES)
def test_softcap_and_sliding_window_match_eager(device):
    """A Gemma2-style model: attention logit softcapping and sliding-window layers alternating
    with global ones (sdpa takes no softcap, so the baseline is ``eager``)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    _require_cuda_kernels(device)
    config = Gemma2Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=128, vocab_size=256, max_position_embeddings=256,
                          sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=None,
                          layer_types=["sliding_attention", "full_attention"],
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
    ids = torch.randint(3, 256, (2, 29), device=device)
    calls = compare_models(device, config, dict(input_ids=ids), model_class=Gemma2ForCausalLM, baseline="eager")
    assert calls == [(29, 29, False)] * 2
