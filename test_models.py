"""Tests of the model files: python -m pytest -q test_models.py (CPU, offline, a few seconds each)."""


# ---- Llama 2 / Llama 3 (llama2.py, llama3.py) ---------------------------------------------------
# Parameter counts of the real models, flash vs einsum, logits against transformers'
# LlamaForCausalLM on small random models, the KV cache, bf16, and no context^2 buffers.
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import llama2
import llama3
import train

_LLAMA_REAL_SIZES = [  # from the published checkpoints
    (llama2, "llama2-7b", 6_738_415_616),
    (llama2, "llama2-13b", 13_015_864_320),
    (llama2, "llama2-70b", 68_976_648_192),
    (llama3, "llama3-8b", 8_030_261_248),
    (llama3, "llama3.1-8b", 8_030_261_248),
    (llama3, "llama3.2-1b", 1_235_814_400),
    (llama3, "llama3.2-3b", 3_212_749_824),
]

# Small LlamaConfigs covering what differs between the real models. Sequences are longer than
# original_max_position_embeddings wherever the Llama 3.1 scaling is on.
_LLAMA_SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2)
_LLAMA_HF_CONFIGS = {
    # name: (our module, sequence length, LlamaConfig arguments besides _LLAMA_SMALL)
    "llama2-mha": (llama2, 24, dict(
        num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, max_position_embeddings=64,
        rope_parameters={"rope_theta": 10000.0})),
    "llama2-gqa": (llama2, 24, dict(
        num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=64,
        rope_parameters={"rope_theta": 20000.0})),
    "llama3-gqa": (llama3, 40, dict(
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64,
        rope_parameters={"rope_theta": 500000.0})),
    "llama3.1-scaled-mqa": (llama3, 160, dict(
        num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-5, max_position_embeddings=256,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 128})),
    # tied head, and the scaling given the pre-5.x way (rope_scaling + rope_theta, as old config.json)
    "llama3.2-scaled-tied": (llama3, 80, dict(
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=256,
        tie_word_embeddings=True, rope_theta=10000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
}


def _llama_randomize(model, seed):
    """Weights large enough that attention matters (std 0.02 leaves it nearly uniform); norms != 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)
    return model


def _llama_hf(name, seed=0):
    """A random LlamaForCausalLM of _LLAMA_HF_CONFIGS[name]: float32, eval, eager attention."""
    module, seq_len, kwargs = _LLAMA_HF_CONFIGS[name]
    config = LlamaConfig(**_LLAMA_SMALL, **kwargs, attn_implementation="eager")
    return _llama_randomize(LlamaForCausalLM(config), seed).eval(), module, seq_len


def _llama_from_hf(hf_model, module):
    """Our Transformer (llama2 or llama3 module) with the weights of a transformers LlamaForCausalLM."""
    c = hf_model.config
    rope = c.rope_parameters  # transformers 5.x: rope_theta and any rope_scaling live here
    fields = dict(vocab_size=c.vocab_size, context_length=c.max_position_embeddings,
                  d_model=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                  n_kv_heads=c.num_key_value_heads, d_ff=c.intermediate_size, norm_eps=c.rms_norm_eps,
                  rope_theta=rope["rope_theta"], tie_weights=c.tie_word_embeddings,
                  dtype=str(hf_model.dtype).removeprefix("torch."))
    if rope["rope_type"] == "llama3":
        fields.update(rope_factor=rope["factor"], rope_low_freq_factor=rope["low_freq_factor"],
                      rope_high_freq_factor=rope["high_freq_factor"],
                      rope_original_context=rope["original_max_position_embeddings"])
    else:
        assert rope["rope_type"] == "default", rope
    with torch.device("meta"):  # as a loader of the big models would: no memory until assign
        model = module.Transformer(module.Config(**fields))
    hf = hf_model.state_dict()
    state = {"token_embedding.weight": hf["model.embed_tokens.weight"],
             "final_norm.weight": hf["model.norm.weight"],
             "lm_head.weight": hf["lm_head.weight"]}
    names = {"attn_norm": "input_layernorm", "attn.wq": "self_attn.q_proj",
             "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
             "attn.wo": "self_attn.o_proj", "mlp_norm": "post_attention_layernorm",
             "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj"}
    for i in range(c.num_hidden_layers):
        for ours, theirs in names.items():
            state[f"blocks.{i}.{ours}.weight"] = hf[f"model.layers.{i}.{theirs}.weight"]
    model.load_state_dict(state, assign=True)
    if model.cfg.tie_weights:  # assign=True gives each name its own Parameter: tie them again
        model.lm_head.weight = model.token_embedding.weight
    return model.eval()


def _llama_ids(hf_model, batch, seq_len, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, hf_model.config.vocab_size, (batch, seq_len), generator=gen)


def _llama_set_flash(model, flash):
    for block in model.blocks:
        block.attn.flash = flash


def _llama_max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("module, preset, expected", _LLAMA_REAL_SIZES,
                         ids=[preset for _, preset, _ in _LLAMA_REAL_SIZES])
def test_llama_parameter_count(module, preset, expected):
    with torch.device("meta"):
        model = module.Transformer(module.Config(**module.PRESETS[preset]))
    assert module.count_parameters(model) == expected
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert not any(m.bias is not None for m in model.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("module", [llama2, llama3])
def test_llama_toy_preset(module):
    cfg = module.Config(**module.PRESETS["toy"])
    assert cfg.vocab_size == 50257 and cfg.dtype == "float32" and cfg.context_length == 256
    model = module.Transformer(cfg)
    assert model.lm_head.weight.dtype == torch.float32
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 50257)


@pytest.mark.parametrize("module, n_kv_heads", [(llama2, 4), (llama2, 2), (llama3, 4), (llama3, 1)])
def test_llama_flash_matches_einsum(module, n_kv_heads):
    torch.manual_seed(0)
    cfg = module.Config(**{**module.PRESETS["toy"], "vocab_size": 128, "n_kv_heads": n_kv_heads})
    model = _llama_randomize(module.Transformer(cfg), seed=0).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        reference = model(idx)
        _llama_set_flash(model, True)
        fused = model(idx)
    assert _llama_max_diff(reference, fused) < 1e-5


@pytest.mark.parametrize("name", list(_LLAMA_HF_CONFIGS))
def test_llama_logits_match_transformers(name):
    hf_model, module, seq_len = _llama_hf(name)
    model = _llama_from_hf(hf_model, module)
    idx = _llama_ids(hf_model, 2, seq_len)
    with torch.no_grad():
        expected = hf_model(idx).logits
        got = model(idx)
    diff = _llama_max_diff(got, expected)
    print(f"{name}: float32 max |logit difference| vs transformers {diff:.2e}"
          f" (logits up to {expected.abs().max().item():.1f})")
    assert diff < 1e-4
    if model.cfg.tie_weights:
        assert model.lm_head.weight is model.token_embedding.weight


@pytest.mark.parametrize("name", [n for n in _LLAMA_HF_CONFIGS if "scaled" in n])
def test_llama_rope_scaling_is_used(name):
    """The seed notebook computed the Llama 3.1 frequencies, then used the unscaled ones."""
    hf_model, module, seq_len = _llama_hf(name)
    model = _llama_from_hf(hf_model, module)
    hf_freqs = hf_model.model.rotary_emb.inv_freq
    unscaled = module.rope_frequencies(module.Config(**{**vars(model.cfg), "rope_factor": None}))
    assert torch.allclose(module.rope_frequencies(model.cfg), hf_freqs, rtol=1e-6, atol=0)
    kept = torch.isclose(hf_freqs, unscaled, rtol=1e-6, atol=0)
    scaled = torch.isclose(hf_freqs, unscaled / model.cfg.rope_factor, rtol=1e-6, atol=0)
    assert kept.any() and scaled.any() and (~kept & ~scaled).any()  # all three bands are exercised
    assert seq_len > model.cfg.rope_original_context
    # and the test above would catch a model that forgot the scaling
    model.cfg.rope_factor = None
    idx = _llama_ids(hf_model, 2, seq_len)
    with torch.no_grad():
        assert _llama_max_diff(model(idx), hf_model(idx).logits) > 1e-2


@pytest.mark.parametrize("name", ["llama2-mha", "llama3-gqa", "llama3.1-scaled-mqa"])
@pytest.mark.parametrize("flash", [False, True])
def test_llama_kv_cache_matches_full_sequence(name, flash):
    hf_model, module, seq_len = _llama_hf(name)
    model = _llama_from_hf(hf_model, module)
    _llama_set_flash(model, flash)
    idx = _llama_ids(hf_model, 2, seq_len)
    with torch.no_grad():
        full = model(idx)
        model.setup_cache(2, seq_len)
        pos, chunks = 0, [5, 1, 3, 1]  # a prompt, then single tokens and short chunks
        while pos < seq_len:
            step = chunks[0] if pos == 0 else chunks[1 + pos % 3]
            cached = model(idx[:, pos:pos + step], start_pos=pos)
            assert _llama_max_diff(cached, full[:, pos:pos + step]) < 1e-4, pos
            pos += step


@pytest.mark.parametrize("module, overrides", [
    (llama2, dict(n_kv_heads=4)),
    (llama3, dict(n_kv_heads=2)),
    (llama3, dict(n_kv_heads=1, rope_factor=8.0, rope_original_context=8)),
], ids=["llama2-mha", "llama3-gqa", "llama3-scaled-mqa"])
@pytest.mark.parametrize("batch", [1, 3])
def test_llama_generate_same_with_and_without_cache(module, overrides, batch):
    cfg = module.Config(**{**module.PRESETS["toy"], "vocab_size": 128, "context_length": 12,
                           **overrides})
    model = _llama_randomize(module.Transformer(cfg), seed=2).eval()
    idx = torch.randint(0, cfg.vocab_size, (batch, 5), generator=torch.Generator().manual_seed(3))
    n = 20  # 5 + 20 tokens: the window slides past the 12-token context
    with_cache = torch.stack(list(train.generate(model, idx, n, temperature=0.0, use_cache=True)), 1)
    without = torch.stack(list(train.generate(model, idx, n, temperature=0.0, use_cache=False)), 1)
    assert with_cache.shape == (batch, n)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("name", ["llama2-gqa", "llama3.1-scaled-mqa", "llama3.2-scaled-tied"])
def test_llama_bfloat16_close_to_transformers(name):
    hf_model, module, seq_len = _llama_hf(name)
    idx = _llama_ids(hf_model, 2, seq_len)
    with torch.no_grad():
        reference = hf_model(idx).logits  # float32
        inv_freq = hf_model.model.rotary_emb.inv_freq
        hf_model.to(torch.bfloat16)
        # from_pretrained(dtype=bfloat16) keeps this buffer in float32; .to() would round it
        hf_model.model.rotary_emb.inv_freq = inv_freq
        model = _llama_from_hf(hf_model, module)
        assert model.lm_head.weight.dtype == torch.bfloat16
        got, expected = model(idx), hf_model(idx).logits
    diff = _llama_max_diff(got, expected)
    print(f"{name}: bfloat16 max |logit difference| vs transformers in bfloat16 {diff:.3f}; "
          f"vs float32: ours {_llama_max_diff(got, reference):.3f}, "
          f"transformers {_llama_max_diff(expected, reference):.3f}"
          f" (logits up to {reference.abs().max().item():.1f})")
    assert diff < 0.1  # bf16 itself moves these logits by ~0.07 from float32; we match HF to 0.000


def test_llama_long_context_allocates_no_context_squared_mask():
    with torch.device("meta"):
        model = llama3.Transformer(llama3.Config(**llama3.PRESETS["llama3.1-8b"]))
    assert model.cfg.context_length == 131072
    assert all(b.numel() < 131072 ** 2 for b in model.buffers())
    # a real model with that context: a 131,072^2 mask would need 17 GB
    cfg = llama3.Config(**{**llama3.PRESETS["toy"], "vocab_size": 128, "context_length": 131072,
                           "rope_factor": 8.0})
    model = llama3.Transformer(cfg).eval()
    assert sum(b.numel() for b in model.buffers()) < 131072 * 64
    idx = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        full = model(idx)
        model.setup_cache(1, 16)
        assert _llama_max_diff(model(idx[:, :7], start_pos=0)[:, -1], full[:, 6]) < 1e-5
        assert _llama_max_diff(model(idx[:, 7:], start_pos=7)[:, -1], full[:, 7]) < 1e-5
