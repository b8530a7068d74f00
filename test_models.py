"""The tests: python -m pytest -q test_models.py  (offline, on the CPU).

The sections follow the files under test in the order a reader meets them:

  1. the model files gpt2.py, llama2.py, llama3.py: parameter counts, shapes, causality, the KV cache,
     and the fast paths beside the readable one (flash attention, last_only, torch.compile);
  2. common.py: the key=value command line, the GPT-2 tokenizer, checkpoint files;
  3. sample.py: generation and sampling, every end token, chat with the KV cache kept, load_model;
  4. load_hf.py: GPT-2 and Llama weights from Hugging Face folders, and our checkpoints exported to them;
  5. data/prepare.py: the token cache (a memmap) and the training windows; data/instructions.py: the
     Alpaca prompt, the masked loss, the split;
  6. train.py: training runs, starting from pretrained weights or a checkpoint, instruction finetuning and
     LoRA, resuming, DDP and FSDP;
  7. end to end: the scripts in subprocesses, as a user runs them.
  8. on a GPU: the CUDA paths of the above (skipped, with the reason, where there is no GPU).

It imports the three model files, common, sample, load_hf, train, data.prepare and data.instructions, and transformers
for its GPT2LMHeadModel, LlamaForCausalLM and tokenizers to compare against. Nothing is downloaded:
HF_HUB_OFFLINE is set before huggingface_hub is imported, the Hugging Face models and tokenizers are
built here from small configs with random weights and saved with save_pretrained, and the GPT-2
tokenizer is read from data/gpt2.tiktoken.

Bad input has one table a script (sections 3, 4 and 6; the command line's own in section 2): each row
a mistake and the one-line message it must give, in process or run as a user runs the script.
"""
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is first imported: it reads this once

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import common  # noqa: E402
import gpt2  # noqa: E402
import llama2  # noqa: E402
import llama3  # noqa: E402
import load_hf  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from common import UserError  # noqa: E402
from data import instructions, prepare  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def run_script(*args, cwd=HERE, env=None):
    """Run train.py or sample.py in a fresh interpreter, as a user would."""
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def offline_env(tmp_path):
    """Environment for a subprocess: offline, with an empty Hugging Face cache."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}


def tiny_gpt2(**overrides):
    torch.manual_seed(0)
    return gpt2.Transformer(gpt2.Config(**{**gpt2.PRESETS["tiny"], **overrides})).eval()


@pytest.fixture
def one_thread():
    """One torch thread for the test. On a busy 2-core machine a second thread makes 124M decoding
    several times slower, and small models gain nothing from threads waiting on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_story(tmp_path):
    """A small training text, so the tests need no download."""
    path = tmp_path / "story.txt"
    sentences = ["The painter sat by the window and looked at the sea.",
                 "Every effort moves you closer to the picture you want to paint.",
                 "She laughed, and the light changed on the water."]
    path.write_text(" ".join(sentences[i % 3] for i in range(120)), encoding="utf-8")
    return str(path)


@pytest.fixture
def story(tmp_path):
    return write_story(tmp_path)


def write(path, content=None):
    """Write content (text or bytes) into the file path, or make the folder path if content is None;
    returns the path as text."""
    if content is None:
        path.mkdir(parents=True)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


# Bad input: each script has one table, a row for each mistake, (id, how, given, message):
#   how "call": given(tmp_path) calls the script's code in this process, which must raise a UserError
#     whose message is one line and matches the regex message;
#   how "run": given(tmp_path) is a command line: python script with it must exit with status 2 and
#     print one line on stderr, "script: " and a message that matches, and no traceback;
#   how "run-hub": the same for a hub id, after the one line "fetching ... from the Hugging Face hub ...".
# given may first write files into the test's tmp_path; {tmp} in message stands for tmp_path.

def bad_input_table(rows):
    """The parametrize of a bad-input table: one test for each row, named by its id."""
    return pytest.mark.parametrize("how, given, message", [row[1:] for row in rows],
                                   ids=[row[0] for row in rows])


def says_what_to_do(script, how, given, message, tmp_path):
    """Check one row of a bad-input table (see above)."""
    message = message.replace("{tmp}", re.escape(str(tmp_path)))
    if how == "call":
        with pytest.raises(UserError, match=message) as e:
            given(tmp_path)
        assert "\n" not in str(e.value)
    else:
        result = run_script(script, *given(tmp_path), env=offline_env(tmp_path))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        if how == "run-hub":  # first it says what it is doing
            assert re.fullmatch(r"fetching \S+ from the Hugging Face hub \.\.\.", lines.pop(0)), result.stderr
        assert len(lines) == 1 and lines[0].startswith(f"{script}: "), result.stderr
        assert re.search(message, lines[0].removeprefix(f"{script}: ")), lines[0]


# ===== 1. The model files: gpt2.py, llama2.py, llama3.py ===============================================
# What each architecture computes, on its own: parameter counts of the published sizes, shapes,
# causality, flash attention against the einsum reference, the KV cache, and the fast paths.


# ---- GPT-2 (gpt2.py): parameter counts, shapes, init, causality, flash, KV cache

@pytest.mark.parametrize("preset, expected", [
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080),
    ("gpt2-xl", 1_557_611_200), ("verdict", 162_419_712)])
def test_gpt2_parameter_counts_match_transformers(preset, expected):
    with torch.device("meta"):
        model = gpt2.Transformer(gpt2.Config(**gpt2.PRESETS[preset]))
    assert gpt2.count_parameters(model) == expected


def test_gpt2_output_shape_and_tied_head():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.token_embedding.weight
    logits = model(torch.randint(0, 50257, (3, 17)))
    assert logits.shape == (3, 17, 50257)
    assert not tiny_gpt2(tie_weights=False).lm_head.weight is tiny_gpt2().token_embedding.weight


def test_gpt2_init_scales_residual_projections():
    model = gpt2.Transformer(gpt2.Config(n_layers=8, d_model=256, n_heads=4, vocab_size=1000))
    assert abs(model.blocks[0].mlp.up.weight.std().item() - 0.02) < 1e-3
    assert abs(model.blocks[0].attn.wo.weight.std().item() - 0.02 / 4) < 1e-3  # 1/sqrt(2 * 8)
    assert model.blocks[0].mlp.up.bias.abs().max() == 0


def test_gpt2_is_causal():
    model = tiny_gpt2()
    idx = torch.randint(0, 50257, (1, 20))
    changed = idx.clone()
    changed[0, 10:] = 7
    with torch.no_grad():
        assert torch.equal(model(idx)[:, :10], model(changed)[:, :10])


def test_gpt2_flash_matches_einsum():
    einsum, flash = tiny_gpt2(), tiny_gpt2(flash=True)
    flash.load_state_dict(einsum.state_dict())
    idx = torch.randint(0, 50257, (2, 64))
    with torch.no_grad():
        assert (einsum(idx) - flash(idx)).abs().max() < 1e-5
        for model in (einsum, flash):  # the cached path goes through the explicit mask
            model.setup_cache(2, 64)
            model(idx[:, :40], start_pos=0, use_cache=True)
        assert (einsum(idx[:, 40:], start_pos=40, use_cache=True)
                - flash(idx[:, 40:], start_pos=40, use_cache=True)).abs().max() < 1e-5


def test_cached_logits_equal_full_sequence_logits():
    model = tiny_gpt2()
    idx = torch.randint(0, 50257, (3, 30))
    with torch.no_grad():
        full = model(idx)
        model.setup_cache(3, 30)
        steps = [model(idx[:, :12], start_pos=0, use_cache=True)]  # prefill, then one token at a time
        steps += [model(idx[:, i:i + 1], start_pos=i, use_cache=True) for i in range(12, 30)]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4


# ---- Llama 2 / Llama 3 (llama2.py, llama3.py)
# Parameter counts of the real models, the toy preset, flash vs einsum, the KV cache against the
# full sequence, and no context^2 buffers. The small LlamaConfigs here are also the ones load_hf.py
# is checked with (section 4): the models are built from them by transformers and read by load_hf.py.

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


def _llama_saved(name, folder, seed=0):
    """A random LlamaForCausalLM of _LLAMA_HF_CONFIGS[name], saved with save_pretrained into folder and
    read back by load_hf.py: (theirs, ours, our module, sequence length)."""
    hf_model, module, seq_len = _llama_hf(name, seed)
    hf_model.save_pretrained(folder)
    model, ckpt = load_hf.load(str(folder))
    assert ckpt["model_name"] == module.__name__  # the file load_hf.py picks from config.json
    return hf_model, model.eval(), module, seq_len


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


# small enough for fast tests; the toy presets train on The Verdict and are larger
_LLAMA_TEST = dict(vocab_size=128, context_length=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                   d_ff=192, weight_dtype="float32")


@pytest.mark.parametrize("module", [llama2, llama3])
def test_llama_toy_preset(module):
    cfg = module.Config(**module.PRESETS["toy"])
    assert cfg.vocab_size == 50257 and cfg.weight_dtype == "float32" and cfg.context_length == 256
    model = module.Transformer(cfg)
    assert model.lm_head.weight.dtype == torch.float32
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 50257)


@pytest.mark.parametrize("module, n_kv_heads", [(llama2, 4), (llama2, 2), (llama3, 4), (llama3, 1)])
def test_llama_flash_matches_einsum(module, n_kv_heads):
    torch.manual_seed(0)
    cfg = module.Config(**{**_LLAMA_TEST, "n_kv_heads": n_kv_heads})
    model = _llama_randomize(module.Transformer(cfg), seed=0).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        reference = model(idx)
        _llama_set_flash(model, True)
        fused = model(idx)
    assert _llama_max_diff(reference, fused) < 1e-5


@pytest.mark.parametrize("name", ["llama2-mha", "llama3-gqa", "llama3.1-scaled-mqa"])
@pytest.mark.parametrize("flash", [False, True])
def test_llama_kv_cache_matches_full_sequence(name, flash, tmp_path):
    hf_model, model, _, seq_len = _llama_saved(name, tmp_path)
    _llama_set_flash(model, flash)
    idx = _llama_ids(hf_model, 2, seq_len)
    with torch.no_grad():
        full = model(idx)
        model.setup_cache(2, seq_len)
        pos, chunks = 0, [5, 1, 3, 1]  # a prompt, then single tokens and short chunks
        while pos < seq_len:
            step = chunks[0] if pos == 0 else chunks[1 + pos % 3]
            cached = model(idx[:, pos:pos + step], start_pos=pos, use_cache=True)
            assert _llama_max_diff(cached, full[:, pos:pos + step]) < 1e-4, pos
            pos += step


def test_llama_long_context_allocates_no_context_squared_mask():
    with torch.device("meta"):
        model = llama3.Transformer(llama3.Config(**llama3.PRESETS["llama3.1-8b"]))
    assert model.cfg.context_length == 131072
    assert all(b.numel() < 131072 ** 2 for b in model.buffers())
    # a real model with that context: a 131,072^2 mask would need 17 GB
    cfg = llama3.Config(**{**_LLAMA_TEST, "context_length": 131072,
                           "rope_factor": 8.0})
    model = llama3.Transformer(cfg).eval()
    assert sum(b.numel() for b in model.buffers()) < 131072 * 64
    idx = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        full = model(idx)
        model.setup_cache(1, 16)
        assert _llama_max_diff(model(idx[:, :7], start_pos=0, use_cache=True)[:, -1], full[:, 6]) < 1e-5
        assert _llama_max_diff(model(idx[:, 7:], start_pos=7, use_cache=True)[:, -1], full[:, 7]) < 1e-5


# ---- fast paths: the KV cache, flash attention, last_only, torch.compile
# What bench.py measures must compute what the readable path computes: the KV cache (with a cache
# reused across calls), flash attention, logits of the last position only, and torch.compile as
# sample.py compile=true sets it up; for all three models, batches of 1 and 3, past the context.

_FAST_SMALL = dict(vocab_size=96, context_length=16, d_model=32, n_layers=2, n_heads=4)
_FAST_LLAMA = dict(_FAST_SMALL, d_ff=64, weight_dtype="float32")
_FAST_MODELS = {  # name: (module, Config overrides)
    "gpt2": (gpt2, _FAST_SMALL),
    "llama2": (llama2, dict(_FAST_LLAMA, n_kv_heads=4)),
    "llama3-gqa": (llama3, dict(_FAST_LLAMA, n_kv_heads=2)),
    "llama3.1-scaled-mqa": (llama3, dict(_FAST_LLAMA, n_kv_heads=1, rope_factor=8.0,
                                         rope_original_context=8)),
}


def _fast_model(name, flash=False):
    """A small random model; weights large enough that attention is far from uniform."""
    module, overrides = _FAST_MODELS[name]
    torch.manual_seed(0)
    model = module.Transformer(module.Config(**overrides, flash=flash)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm.weight" in pname else 0.2 * noise)
    return model


def _fast_ids(batch, length, seed=2):
    return torch.randint(0, _FAST_SMALL["vocab_size"], (batch, length),
                         generator=torch.Generator().manual_seed(seed))


def _fast_greedy(model, idx, n, use_cache=True):
    return torch.stack(list(sample.generate(model, idx, n, use_cache=use_cache)), dim=1)


@pytest.mark.parametrize("name", list(_FAST_MODELS))
@pytest.mark.parametrize("flash", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.usefixtures("one_thread")
def test_fast_cached_last_only_logits_match_full_sequence(name, flash, batch):
    reference = _fast_model(name)  # einsum attention, whole sequence, every position
    model = _fast_model(name, flash)
    idx = _fast_ids(batch, 16)
    with torch.no_grad():
        full = reference(idx)
        last = model(idx, last_only=True)
        assert last.shape == (batch, 1, full.shape[-1])
        assert (last[:, 0] - full[:, -1]).abs().max() < 1e-5
        model.setup_cache(batch, 16)
        steps = [model(idx[:, :5], start_pos=0, use_cache=True, last_only=True)]  # prefill, then token by token
        steps += [model(idx[:, i:i + 1], start_pos=i, use_cache=True, last_only=True) for i in range(5, 16)]
    assert (torch.cat(steps, dim=1) - full[:, 4:]).abs().max() < 1e-4


@pytest.mark.parametrize("name", list(_FAST_MODELS))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.usefixtures("one_thread")
def test_fast_greedy_ids_identical_past_the_context(name, batch):
    idx = _fast_ids(batch, 6)  # 6 + 30 tokens: the 16-token window slides 20 times
    expected = _fast_greedy(_fast_model(name), idx, 30, use_cache=False)  # the readable path
    for flash in (False, True):
        model = _fast_model(name, flash)
        assert torch.equal(_fast_greedy(model, idx, 30), expected), flash
        assert torch.equal(_fast_greedy(model, idx, 30, use_cache=False), expected), flash


@pytest.mark.parametrize("name", ["gpt2", "llama3-gqa"])
@pytest.mark.usefixtures("one_thread")
def test_fast_reused_cache_reads_nothing_stale(name):
    model = _fast_model(name)
    a, b = _fast_ids(3, 6, seed=3), _fast_ids(3, 6, seed=4)
    _fast_greedy(model, a, 8)  # fills a cache of 3 x 14 positions...
    cache = model.blocks[0].attn.cache
    assert torch.equal(_fast_greedy(model, b, 8), _fast_greedy(_fast_model(name), b, 8))
    assert model.blocks[0].attn.cache is cache  # ...which the second prompt reused
    assert torch.equal(_fast_greedy(model, b[:1], 8), _fast_greedy(_fast_model(name), b[:1], 8))
    assert model.blocks[0].attn.cache.k.shape[0] == 1  # another batch size: a new cache


# llama2.py's attention and forward are llama3.py's line for line; compiling costs seconds a model
@pytest.mark.parametrize("name", ["gpt2", "llama3.1-scaled-mqa"])
@pytest.mark.usefixtures("one_thread")
def test_fast_compiled_decoding_matches_eager(name):
    import torch._inductor.config
    with torch._inductor.config.patch(freezing=False):  # restored after: compile_for_decoding sets it
        _check_compiled_decoding(name, "cpu")
    assert torch._inductor.config.freezing is False


def _check_compiled_decoding(name, device):
    """sample.compile_for_decoding's model on device: its greedy ids past the context equal the readable
    path's, and its cached prefill and step logits the full sequence's."""
    model = _fast_model(name).to(device)
    idx = _fast_ids(3, 6).to(device)
    expected = _fast_greedy(model, idx, 14, use_cache=False)  # 6 + 14 tokens: past the context
    compiled = sample.compile_for_decoding(_fast_model(name).to(device))
    assert torch.equal(_fast_greedy(compiled, idx, 14), expected)
    with torch.no_grad():
        full = model(idx)
        compiled.setup_cache(3, 16)  # the size generate used: a new size would compile again
        prefill = compiled(idx[:, :5], start_pos=0, use_cache=True, last_only=True)
        step = compiled(idx[:, 5:], start_pos=5, use_cache=True, last_only=True)
    assert (prefill[:, 0] - full[:, 4]).abs().max() < 1e-4
    assert (step[:, 0] - full[:, 5]).abs().max() < 1e-4


@pytest.mark.parametrize("name, tied", [("gpt2", True), ("llama3-gqa", False)])
@pytest.mark.usefixtures("one_thread")
def test_fast_decoding_layout_changes_memory_not_results(name, tied):
    """sample.lay_out_for_decoding stores the output head (d_model, vocab) in memory: the same tensors to
    nn.Linear, the same logits and ids, no second copy, a tied head still tied."""
    model = _fast_model(name)
    assert model.cfg.tie_weights == tied
    idx = _fast_ids(3, 10)
    with torch.no_grad():
        expected_logits, expected_ids = model(idx), _fast_greedy(model, idx[:, :4], 20)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    relaid = sample.lay_out_for_decoding(model)
    vocab, d_model = relaid.cfg.vocab_size, relaid.cfg.d_model
    assert relaid.lm_head.weight.shape == (vocab, d_model) and relaid.lm_head.weight.stride() == (1, vocab)
    assert all(m.weight.is_contiguous() for m in relaid.blocks.modules() if isinstance(m, torch.nn.Linear))
    assert all(torch.equal(v, relaid.state_dict()[k]) for k, v in state.items())
    assert (relaid.lm_head.weight is relaid.token_embedding.weight) == tied
    storages = {p.untyped_storage().data_ptr() for p in relaid.parameters()}
    assert len(storages) == len(list(relaid.parameters()))  # one storage a tensor: nothing kept twice
    with torch.no_grad():
        assert (relaid(idx) - expected_logits).abs().max() < 1e-5
        assert torch.equal(_fast_greedy(relaid, idx[:, :4], 20), expected_ids)


# ===== 2. common.py: the command line, the tokenizer, checkpoint files =================================
# What every script shares: key=value parsing into the fields' types and its one-line errors,
# --help, GPT-2's tokenizer offline, and checkpoint files written atomically.


# ---- command line

def parsed(*argv, usage="train.py"):
    model_name, pairs, _ = common.parse_args(list(argv), usage)
    cfg, model_cfg = train.TrainConfig(), gpt2.Config()
    common.apply_overrides(pairs, [cfg, model_cfg], usage)
    return model_name, cfg, model_cfg


def test_overrides_are_parsed_into_the_field_types():
    name, cfg, model_cfg = parsed("--model", "gpt2", "lr=1", "--epochs=3", "flash=False", "stride=None",
                                  "prompt=a=b c", "n_layers=4", "dropout=0")
    assert name == "gpt2"
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.epochs == 3 and cfg.stride is None and cfg.prompt == "a=b c"
    assert model_cfg.flash is False and model_cfg.n_layers == 4 and model_cfg.dropout == 0.0
    assert parsed("flash=true")[2].flash is True and parsed("stride=16")[1].stride == 16


# The command line's bad input, as every script parses it: the table of train.py's, sample.py's and
# load_hf.py's own mistakes is in their sections.
@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt5"], "unknown model 'gpt5': choose one of gpt2"),
    (["--model"], "--model needs a name"),
    (["lrr=0.1"], "did you mean 'lr'"),
    (["colour=red"], "valid keys are .*batch_size.*n_layers"),  # all of them, in order
    (["epochs=abc"], "epochs=abc: expected a whole number"),
    (["lr=fast"], "lr=fast: expected a number"),
    (["flash=maybe"], "expected true or false"),
    (["epochs"], "'epochs' is not key=value"),
])
def test_bad_overrides_name_the_problem(argv, message):
    with pytest.raises(UserError, match=message) as e:
        parsed(*argv)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("module", [gpt2, llama2, llama3])
def test_every_preset_passes_the_model_checks(module):
    """check_model_config refuses only what cannot be built: never a preset."""
    for preset in module.PRESETS:
        common.check_model_config(module.Config(**module.PRESETS[preset]))


def test_help_lists_every_key_with_type_and_default(capsys):
    train.main(["--help"])
    out = capsys.readouterr().out
    for line in ("lr               float        0.0004        learning rate (the peak, with warmup_steps or decay_lr)",
                 "n_layers         int          12            transformer blocks",
                 "stride           int | None   None          step between training windows; None = seq_len",
                 "config           str          'verdict'     model preset",  # the default preset by name
                 "  --model gpt2 (default): presets verdict (default), gpt2, gpt2-medium, gpt2-large, gpt2-xl,",
                 "  --model llama3: presets toy (default), llama3-8b,"):
        assert " ".join(line.split()) in "\n".join(" ".join(printed.split()) for printed in out.splitlines())
    # a continuation comment under a field is part of its meaning, in its column; no line is wider than 118
    column = next(line.index("learning rate") for line in out.splitlines() if line.startswith("  lr "))
    assert "or pretrained\n" + " " * column + "weights: gpt2 ... gpt2-xl, a Hugging Face folder" in out
    assert max(len(line) for line in out.splitlines()) <= 118
    sample.main(["--help"])  # sample.py's keys get their meanings the same way
    assert "temperature      float        0.8           0 = greedy" in capsys.readouterr().out


# ---- tokenizer

def test_tokenizer_matches_gpt2_ids_offline():
    tok = common.load_tokenizer("gpt2")
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
    ids = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 286, 617,
           34680, 27271, 13]
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text
    assert tok.vocab_size == 50257 and tok.eot_id == 50256


# ---- checkpoint files

def test_checkpoint_round_trip(tmp_path):
    model = tiny_gpt2(n_layers=1)
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint({"model": model.state_dict(), "model_name": "gpt2",
                           "model_config": model.cfg.__dict__, "tokenizer": "gpt2"}, path)
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the temporary file was renamed away
    loaded, ckpt = sample.load_model(str(tmp_path), "cpu")
    idx = torch.randint(0, 50257, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(idx), loaded.eval()(idx))
    assert loaded.lm_head.weight is loaded.token_embedding.weight  # still tied


# ===== 3. sample.py: generation, sampling, load_model ==================================================
# generate with and without the KV cache (past the context too), each row of a batch stopping at
# any end token, top_k and top_p, seeds; chat through a chat template, the KV cache kept between
# turns; then sample.py's bad input, load_model's included.


# ---- generation

@pytest.mark.parametrize("batch", [1, 3])
def test_generation_with_and_without_cache_agree(batch):
    model = tiny_gpt2()  # context 64: 20 + 80 tokens go well past it
    idx = torch.randint(0, 50257, (batch, 20))
    with_cache = torch.stack(list(sample.generate(model, idx, 80, use_cache=True)), dim=1)
    without = torch.stack(list(sample.generate(model, idx, 80, use_cache=False)), dim=1)
    assert with_cache.shape == (batch, 80)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("module, overrides", [
    (llama2, dict(n_kv_heads=4)),
    (llama3, dict(n_kv_heads=2)),
    (llama3, dict(n_kv_heads=1, rope_factor=8.0, rope_original_context=8)),
], ids=["llama2-mha", "llama3-gqa", "llama3-scaled-mqa"])
@pytest.mark.parametrize("batch", [1, 3])
def test_llama_generate_same_with_and_without_cache(module, overrides, batch):
    cfg = module.Config(**{**_LLAMA_TEST, "context_length": 12,
                           **overrides})
    model = _llama_randomize(module.Transformer(cfg), seed=2).eval()
    idx = torch.randint(0, cfg.vocab_size, (batch, 5), generator=torch.Generator().manual_seed(3))
    n = 20  # 5 + 20 tokens: the window slides past the 12-token context
    with_cache = torch.stack(list(sample.generate(model, idx, n, temperature=0.0, use_cache=True)), 1)
    without = torch.stack(list(sample.generate(model, idx, n, temperature=0.0, use_cache=False)), 1)
    assert with_cache.shape == (batch, n)
    assert torch.equal(with_cache, without)


class ScriptedModel(torch.nn.Module):
    """Stands in for a model: row r emits token r + 1 until step eot_at[r], then the end token eot_id
    (one for all rows, or a list: row r's)."""

    def __init__(self, eot_at, eot_id=9):
        super().__init__()
        self.cfg = gpt2.Config(vocab_size=10, context_length=32)
        self.eot_at, self.weight = eot_at, torch.nn.Parameter(torch.zeros(1))
        self.eot_id = eot_id if isinstance(eot_id, list) else [eot_id] * len(eot_at)

    def setup_cache(self, batch_size, max_len):
        pass

    def forward(self, idx, start_pos=0, use_cache=False, last_only=False):
        logits = torch.zeros(idx.shape[0], idx.shape[1], 10)
        for r, step in enumerate(self.eot_at):
            new = idx.shape[1] + start_pos - 1  # tokens generated so far (prompt: 1 token)
            logits[r, -1, self.eot_id[r] if new >= step else r + 1] = 1.0
        return logits


def _scripted(eot_at, eot_id, end_ids, steps=8):
    model, prompt = ScriptedModel(eot_at, eot_id), torch.zeros(len(eot_at), 1, dtype=torch.long)
    return torch.stack(list(sample.generate(model, prompt, steps, end_ids=end_ids)), 1).tolist()


@pytest.mark.parametrize("end", [7, 8, 9])
def test_batched_generation_stops_each_row_at_any_end_token(end):
    out = _scripted([2, 5, 100], end, end_ids=(7, 8, 9))  # as generation_config.json lists them
    assert out[0] == [1, 1, end, end, end, end, end, end]  # row 0 ended, and stays ended
    assert out[1] == [2, 2, 2, 2, 2, end, end, end]
    assert out[2] == [3] * 8
    done = _scripted([2, 3], end, end_ids=(7, 8, 9), steps=50)
    assert len(done[0]) == 4  # stops as soon as every row has ended


def test_rows_ending_at_different_end_tokens_and_an_unlisted_one():
    out = _scripted([1, 3, 2], [8, 7, 9], end_ids=(7, 8))  # row 2 emits 9, which is not listed
    assert out[0] == [1, 8, 8, 8, 8, 8, 8, 8] and out[1] == [2, 2, 2, 7, 7, 7, 7, 7]  # each repeats its own
    assert out[2] == [3, 3, 9, 9, 9, 9, 9, 9]  # generated on to max_new_tokens: 9 is an ordinary token here
    assert len(_scripted([1, 3], [8, 7], end_ids=(7, 8), steps=50)[0]) == 4
    assert sample.until_end([3, 9, 7, 8, 2], (7, 8)) == [3, 9] and sample.until_end([1, 2], (7,)) == [1, 2]


def test_end_tokens_come_from_generation_config_and_the_tokenizer(tmp_path, story):
    """The tokenizer's eos alone without generation_config.json; with it, its list (or one id) and the
    tokenizer's; load_hf.py's copy of the tokenizer keeps the file."""
    folder = tmp_path / "hf-llama"
    _llama_tokenizer(folder, open(story).read())  # eos </s>: id 2
    assert common.load_tokenizer(str(folder)).end_ids == (2,)
    for eos, expected in ((None, (2,)), (7, (7, 2)), ([5, 2, 6], (5, 2, 6)), ([5, 7, 6], (5, 7, 6, 2))):
        write(folder / "generation_config.json", json.dumps({"bos_token_id": 1, "eos_token_id": eos}))
        tokenizer = common.load_tokenizer(str(folder))
        assert tokenizer.end_ids == expected
    assert _scripted([3], 7, tokenizer.end_ids, steps=20) == [[1, 1, 1, 7]]  # the second listed one ends it
    assert tokenizer.save(str(tmp_path / "out")) == "tokenizer"
    copy = common.load_tokenizer(str(tmp_path / "out" / "tokenizer"))
    assert copy.end_ids == (5, 7, 6, 2)
    assert common.load_tokenizer("gpt2").end_ids == (50256,)


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.manual_seed(0)
    picks = {int(sample.sample_next(logits, 1.0, 2, 1.0)) for _ in range(200)}
    assert picks == {0, 1}
    picks = {int(sample.sample_next(logits, 1.0, None, 0.7)) for _ in range(200)}
    assert picks == {0, 1}  # 0.5 alone is under 0.7; 0.5 + 0.3 covers it
    picks = {int(sample.sample_next(logits, 1.0, None, 0.4)) for _ in range(50)}
    assert picks == {0}
    assert int(sample.sample_next(logits, 0.0, None, 1.0)) == 0  # greedy


def test_same_seed_same_sample():
    model = tiny_gpt2()
    idx = torch.randint(0, 50257, (2, 5))

    def draw(seed):
        torch.manual_seed(seed)
        return torch.stack(list(sample.generate(model, idx, 20, temperature=1.0, top_k=50)), dim=1)

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


# ---- chat
# Instruct folders built here: a random LlamaForCausalLM, a small tokenizer trained on the story with a
# chat template of Llama 3's kind (header and end tokens special, in chat_template.jinja) or Llama 2's
# ([INST] ... [/INST], in tokenizer_config.json), and a generation_config.json listing the end tokens.
# Replies are compared with transformers' apply_chat_template + generate, token for token.

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # Llama 3's pre-tokenizer: "\n\n" stays a piece of its own
_CHAT_TEMPLATES = {
    "llama3": "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
              "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
    "llama2": "{% if messages[0]['role'] == 'system' %}{% set system = '<<SYS>>\n' + messages[0]['content'] + "
              "'\n<</SYS>>\n\n' %}{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
              "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + (system if "
              "loop.first else '') + m['content'] | trim + ' [/INST]' }}{% else %}{{ ' ' + m['content'] | trim"
              " + ' ' + eos_token }}{% endif %}{% endfor %}",
}
_CHAT = ["Hello there, painter", "Why the sea?", "She laughed at the light", "Every effort, you said"]


def _chat_tokenizer(folder, text, style):
    """A tokenizer with the chat template of style, saved into folder: for llama3 a byte-level BPE with
    Llama 3's pre-tokenizer and special tokens (<|eot_id|> its eos), for llama2 _llama_tokenizer's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    if style == "llama2":
        hf = _llama_tokenizer(folder, text + "\n[INST] <<SYS>>\n<</SYS>>\n\n [/INST]" * 20)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eom_id|>", "<|eot_id|>"]
        tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    hf.chat_template = _CHAT_TEMPLATES[style]
    hf.save_pretrained(folder, save_jinja_files=style == "llama3")  # Llama 2's in tokenizer_config.json
    return hf


def _instruct_folder(folder, text, style="llama3", context=256, template=True):
    """A random instruct model of style in folder, as a Hugging Face folder: (the model, its tokenizer).
    generation_config.json lists Llama 3's three end tokens, or Llama 2's one (an int)."""
    from transformers import GenerationConfig
    tokenizer = _chat_tokenizer(folder, text, style)
    ends = (tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])
            if style == "llama3" else tokenizer.eos_token_id)
    kwargs = {**_LLAMA_HF_CONFIGS["llama3-gqa" if style == "llama3" else "llama2-gqa"][2],
              "max_position_embeddings": context}
    config = LlamaConfig(**{**_LLAMA_SMALL, "vocab_size": len(tokenizer)}, **kwargs, attn_implementation="eager",
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = _llama_randomize(LlamaForCausalLM(config), seed=6).eval()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=ends)
    model.save_pretrained(folder)
    if not template:  # a base model's folder
        os.remove(folder / "chat_template.jinja")
    return model, tokenizer


def _hf_reply(model, tokenizer, messages, max_new_tokens):
    """transformers' greedy reply to messages: (the conversation's ids, the reply's, its end token included)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens)
    return ids, out[0, len(ids):].tolist()


def _hf_text(tokenizer, reply):
    """A reply as text: up to its end token, special tokens skipped."""
    ends = tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>", "</s>"])
    return tokenizer.decode(sample.until_end(reply, ends), skip_special_tokens=True)


def _messages(system, turns, message):
    """The conversation of (message, reply) turns, then message, as the template takes it."""
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": role, "content": text} for turn in turns for role, text in zip(("user", "assistant"), turn)] + [
        {"role": "user", "content": message}]


@pytest.mark.parametrize("style", ["llama3", "llama2"])
def test_chat_second_turn_computes_only_the_new_tokens(tmp_path, story, style, capsys):
    """Each turn gives transformers' reply; the second is computed from the first's cache on its new
    tokens alone, and equals a fresh run of the whole conversation."""
    theirs, hf_tokenizer = _instruct_folder(tmp_path / "instruct", open(story).read(), style)
    model, ckpt = sample.load_model(str(tmp_path / "instruct"), "cpu")
    calls = []  # (ids, start_pos) of each call of the model
    model.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args[0][0].tolist(), kwargs["start_pos"])),
                                    with_kwargs=True)
    cfg = sample.SampleConfig(chat=True, temperature=0, max_new_tokens=10, system="Answer briefly.")
    chat = sample.Chat(model.eval(), common.load_tokenizer(ckpt["tokenizer"]), cfg)
    first = chat.answer(_CHAT[0])
    ids1, theirs1 = _hf_reply(theirs, hf_tokenizer, _messages(cfg.system, [], _CHAT[0]), 10)
    assert first == theirs1 and calls[0] == (ids1, 0)
    calls.clear()
    second = chat.answer(_CHAT[1])
    history = [(_CHAT[0], _hf_text(hf_tokenizer, theirs1))]
    ids2, theirs2 = _hf_reply(theirs, hf_tokenizer, _messages(cfg.system, history, _CHAT[1]), 10)
    assert second == theirs2
    cached = ids1 + first[:-1]  # what the first turn left in the cache: its last token was never fed
    keep = next(i for i, (a, b) in enumerate(zip(ids2 + [-1], cached + [-2])) if a != b)
    assert keep >= len(ids1)  # nothing of the first turn is computed again
    assert calls[0] == (ids2[keep:], keep)  # the new turn's tokens alone, then one token a step
    assert [len(ids) for ids, _ in calls[1:]] == [1] * (len(second) - 1)

    fresh = sample.Chat(model, chat.tokenizer, cfg)
    fresh.turns = [list(turn) for turn in chat.turns[:1]]
    calls.clear()
    assert fresh.answer(_CHAT[1]) == second and calls[0] == (ids2, 0)  # all of it computed: the same reply
    replies = [_hf_text(hf_tokenizer, r) for r in (theirs1, theirs2, theirs2)]
    assert capsys.readouterr().out == "".join(r + "\n" for r in replies)


def test_chat_drops_the_oldest_turns_when_the_context_is_full(tmp_path, story, capsys):
    folder = tmp_path / "instruct"
    theirs, hf_tokenizer = _instruct_folder(folder, open(story).read(), context=96)
    model, ckpt = sample.load_model(str(folder), "cpu")
    cfg = sample.SampleConfig(chat=True, temperature=0, max_new_tokens=8, system="Answer briefly.")
    chat = sample.Chat(model.eval(), common.load_tokenizer(ckpt["tokenizer"]), cfg)
    for message in _CHAT:
        reply = chat.answer(message)
        ids, expected = _hf_reply(theirs, hf_tokenizer, _messages(cfg.system, chat.turns[:-1], message), 8)
        assert reply == expected and len(ids) + 8 <= 96  # the system message stays, the turns kept fit
    assert "sample.py: note: the conversation outgrew the context length 96" in capsys.readouterr().err
    assert len(chat.turns) < len(_CHAT) and chat.turns[-1][0] == _CHAT[-1]


# ---- bad input (the table's columns: see bad_input_table at the top)

def _one_layer_checkpoint(tmp, **extra):
    """An untrained 1-layer tiny GPT-2, saved as train.py saves weights (and extra): the folder."""
    model = tiny_gpt2(n_layers=1)
    common.save_checkpoint({"model": model.state_dict(), "model_name": "gpt2", "model_config": model.cfg.__dict__,
                            "tokenizer": "gpt2", **extra}, str(tmp / "ckpt.pt"))
    return str(tmp)


_NO_SYSTEM = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"


def _instruct(tmp, template=True, ends=None):
    """An instruct folder of section ---- chat: template False, without its chat template; a str, with
    that template; ends, with generation_config.json holding it (bytes: the file; else its eos_token_id)."""
    _instruct_folder(tmp / "instruct", open(write_story(tmp)).read(), template=template is not False)
    if isinstance(template, str):
        write(tmp / "instruct" / "chat_template.jinja", template)
    if ends is not None:
        write(tmp / "instruct" / "generation_config.json",
              ends if isinstance(ends, bytes) else json.dumps({"eos_token_id": ends}))
    return str(tmp / "instruct")


def _corrupt_checkpoint(tmp):
    write(tmp / "ckpt.pt", b"not a checkpoint at all")
    return str(tmp)


# what sample.py and train.py say for a hub id while offline, with nothing in the cache: a folder is
# passed to them as init_from=, to load_hf.py as its source
_OFFLINE_GPT2 = "^" + re.escape("cannot reach the Hugging Face hub for 'gpt2' (offline?): download it "
                                "elsewhere and pass the folder, init_from=path/to/folder") + "$"
_OFFLINE_GPT2_LOAD_HF = _OFFLINE_GPT2.replace("init_from=path/to/folder", "python load_hf.py path/to/folder")

# the Hugging Face folders come from the helpers of section 4
_SAMPLE_BAD_INPUT = [
    ("no-checkpoint", "call", lambda tmp: sample.load_model(str(tmp), "cpu"), "no checkpoint at {tmp}"),
    ("corrupt-checkpoint", "call", lambda tmp: sample.load_model(_corrupt_checkpoint(tmp), "cpu"),
     "{tmp}/ckpt.pt is not a checkpoint this project can load"),
    ("vocab-smaller-than-tokenizer", "call",
     lambda tmp: sample.main([f"init_from={_hf_save(tmp / 'vocab', **_HF_SMALL, vocab_size=1000)[1]}"]),
     "the model knows 1000 tokens, fewer than the gpt2 tokenizer's 50257"),
    ("llama-without-tokenizer", "call", lambda tmp: sample.main([f"init_from={_llama_without_tokenizer(tmp)}"]),
     "{tmp}/tied has no tokenizer.json: copy the model's tokenizer files"),
    ("run-no-checkpoint", "run", lambda tmp: ["init_from=/no/such/dir"], "no checkpoint at"),
    ("run-top_k", "run", lambda tmp: ["top_k=0", f"init_from={_one_layer_checkpoint(tmp)}"], "top_k=0"),
    ("run-temperature", "run", lambda tmp: ["temperature=-1", f"init_from={_one_layer_checkpoint(tmp)}"],
     "negative"),
    ("run-top_p", "run", lambda tmp: ["top_p=1.5", f"init_from={_one_layer_checkpoint(tmp)}"], r"top_p=1\.5"),
    ("run-offline-hub", "run-hub", lambda tmp: ["init_from=gpt2"], _OFFLINE_GPT2),
    # checked before the model is loaded: init_from names nothing, and that is not what is said
    ("run-top_k-before-loading", "run", lambda tmp: ["top_k=0", "init_from=/no/such/dir"], "^top_k=0 must be at least 1"),
    ("top_k-above-vocab", "call", lambda tmp: sample.main(["top_k=60000", f"init_from={_one_layer_checkpoint(tmp)}"]),
     "top_k=60000 must be between 1 and the vocabulary size 50257"),
    ("temperature-nan", "call", lambda tmp: sample.main(["temperature=nan", "init_from=/no/such/dir"]),
     "^temperature=nan is negative or not a number"),
    ("top_p-0", "call", lambda tmp: sample.main(["top_p=0", "init_from=/no/such/dir"]), r"^top_p=0\.0 must be in \(0, 1\]"),
    ("max_new_tokens-0", "call", lambda tmp: sample.main(["max_new_tokens=0", "init_from=/no/such/dir"]),
     "^max_new_tokens=0 must be at least 1"),
    ("num_samples-0", "call", lambda tmp: sample.main(["num_samples=0", "init_from=/no/such/dir"]),
     "^num_samples=0 must be at least 1"),
    ("dtype-before-loading", "call", lambda tmp: sample.main(["dtype=float8", "init_from=/no/such/dir"]),
     "^dtype=float8 is not supported"),
    # chat=true (instruct folders: see ---- chat above)
    ("run-chat-without-template", "run",
     lambda tmp: ["chat=true", "prompt=Hi", f"init_from={_one_layer_checkpoint(tmp)}"],
     r"^\S+ has no chat template \(its tokenizer: gpt2\): chat=true needs an instruct model, whose tokenizer "
     r"has one .*; pass such a model as init_from=, or leave chat= out"),
    ("chat-base-llama", "call", lambda tmp: sample.main(["chat=true", f"init_from={_instruct(tmp, template=False)}"]),
     "^{tmp}/instruct has no chat template \\(its tokenizer: {tmp}/instruct\\)"),
    ("chat-num_samples", "call", lambda tmp: sample.main(["chat=true", "num_samples=2", "init_from=/no/such/dir"]),
     "^chat=true gives one reply at a time, not num_samples=2: leave num_samples at 1$"),
    ("system-without-chat", "call", lambda tmp: sample.main(["system=Be brief.", "init_from=/no/such/dir"]),
     "^system= is the system message of a chat: add chat=true"),
    ("input-without-chat", "call", lambda tmp: sample.main(["input=tree", "init_from=/no/such/dir"]),
     "^input= is what a chat message works on: add chat=true, or put it into prompt=$"),
    ("system-in-alpaca-format", "call",
     lambda tmp: sample.main(["chat=true", "prompt=Hi", "system=Be brief.",
                              f"init_from={_one_layer_checkpoint(tmp, prompt_format='alpaca')}"]),
     "^{tmp} was finetuned in the Alpaca prompt format, which has no system message: leave system= out$"),
    ("chat-message-too-long", "call",
     lambda tmp: sample.main(["chat=true", f"prompt={'sea ' * 300}", f"init_from={_instruct(tmp)}"]),
     r"^the message makes a conversation of \d+ tokens, more than the context length 256: send a shorter one$"),
    ("chat-template-refuses-system", "call",
     lambda tmp: sample.main(["chat=true", "prompt=Hi", "system=Be brief.",
                              f"init_from={_instruct(tmp, template=_NO_SYSTEM)}"]),
     r"^the chat template of {tmp}/instruct cannot format this conversation \(TemplateError: System role not "
     r"supported\): leave system= out if the model takes none"),
    ("generation-config-not-json", "call", lambda tmp: sample.main([f"init_from={_instruct(tmp, ends=b'{not json')}"]),
     r"^cannot read the end tokens in {tmp}/instruct/generation_config.json \(JSONDecodeError\): copy the "
     r"model's generation_config.json again, or delete it"),
    ("generation-config-names", "call", lambda tmp: sample.main([f"init_from={_instruct(tmp, ends='</s>')}"]),
     r"^cannot read the end tokens in {tmp}/instruct/generation_config.json \(ValueError\)"),
]


@bad_input_table(_SAMPLE_BAD_INPUT)
def test_sample_bad_input_says_what_to_do(tmp_path, how, given, message):
    says_what_to_do("sample.py", how, given, message, tmp_path)


def test_an_empty_prompt_does_not_print_the_end_token(tmp_path, capsys):
    """An empty prompt starts from <|endoftext|>, as a new text, which is not part of what is printed."""
    for n in (1, 2):
        sample.main(["prompt=", f"init_from={_one_layer_checkpoint(tmp_path)}", "max_new_tokens=5",
                     f"num_samples={n}", "device=cpu"])
        assert "<|endoftext|>" not in capsys.readouterr().out
    text = sample.complete(tiny_gpt2(), common.load_tokenizer("gpt2"), "", 5)
    assert "<|endoftext|>" not in text  # before: a crash, on a prompt of no tokens


# ===== 4. load_hf.py: GPT-2 and Llama from Hugging Face ================================================
# Hugging Face folders read into our models: the same logits and greedy tokens as transformers, the
# real models' configs, older file layouts, shards, bfloat16; our checkpoints exported the other way;
# and what load_hf.py refuses.


# ---- GPT-2
# transformers' own GPT2LMHeadModel, built from a config and saved with save_pretrained, stands in for
# the published checkpoints: same files, same names, random weights. Nothing here touches the network.

_HF_SMALL = dict(n_positions=128, n_embd=64, n_layer=2, n_head=4)  # GPT-2's vocabulary, tiny otherwise


def _hf_model(seed=0, **config):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**config)).eval()


def _hf_save(folder, **config):
    model = _hf_model(**config)
    model.save_pretrained(folder)
    return model, str(folder)


def _hf_assert_same(ours, theirs, vocab_size, prompt_len=12, new_tokens=30):
    """Logits within 1e-4 on a batch of 2, and the same greedy tokens as HF's generate(do_sample=False)."""
    torch.manual_seed(1)
    idx = torch.randint(0, vocab_size, (2, prompt_len))
    ours.eval()
    with torch.no_grad():
        diff = (ours(idx) - theirs(idx).logits).abs().max().item()
    assert diff < 1e-4, diff
    theirs.generation_config.eos_token_id = None  # generate exactly new_tokens, as ours does without eot_id
    expected = theirs.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False,
                               max_new_tokens=new_tokens, pad_token_id=0)[:, prompt_len:]
    got = torch.stack(list(sample.generate(ours, idx, new_tokens)), dim=1)
    assert torch.equal(got, expected)
    return diff


@pytest.fixture(scope="module")
def _hf_124m(tmp_path_factory):
    """GPT-2 124M's real config (GPT2Config's defaults), random weights, saved once for the module."""
    return _hf_save(tmp_path_factory.mktemp("hf-gpt2"))


@pytest.mark.parametrize("config", [_HF_SMALL, dict(_HF_SMALL, vocab_size=1000, tie_word_embeddings=False)],
                         ids=["tied", "untied-vocab1000"])
def test_hf_small_gpt2_matches_transformers(tmp_path, config):
    theirs, folder = _hf_save(tmp_path, **config)
    ours, ckpt = load_hf.load(folder)
    assert ckpt["model_name"] == "gpt2" and ckpt["model_config"]["context_length"] == 128
    assert (ours.lm_head.weight is ours.token_embedding.weight) == config.get("tie_word_embeddings", True)
    assert gpt2.count_parameters(ours) == theirs.num_parameters()
    _hf_assert_same(ours, theirs, theirs.config.vocab_size)


def test_hf_124m_matches_transformers(_hf_124m, one_thread):
    theirs, folder = _hf_124m
    ours, _ = load_hf.load(folder)
    assert gpt2.count_parameters(ours) == theirs.num_parameters() == 124_439_808
    assert ours.lm_head.weight is ours.token_embedding.weight
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    attn = ours.blocks[0].attn  # no copies: wq, wk and wv are views of c_attn's memory-mapped weight
    assert attn.wq.weight.data_ptr() + 768 * 4 == attn.wk.weight.data_ptr()
    _hf_assert_same(ours, theirs, 50257)


@pytest.mark.parametrize("size, d, layers, heads, expected", [
    ("gpt2", 768, 12, 12, 124_439_808), ("gpt2-medium", 1024, 24, 16, 354_823_168),
    ("gpt2-large", 1280, 36, 20, 774_030_080), ("gpt2-xl", 1600, 48, 25, 1_557_611_200)])
def test_hf_parameter_counts_of_all_sizes(size, d, layers, heads, expected):
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_embd=d, n_layer=layers, n_head=heads)
    _, _, cfg = load_hf.gpt2_config(config.to_dict(), size)
    with torch.device("meta"):  # shapes only
        theirs, ours = GPT2LMHeadModel(config), gpt2.Transformer(cfg)
    assert gpt2.count_parameters(ours) == theirs.num_parameters() == expected


def test_hf_older_layouts_shards_and_dtype(tmp_path):
    """Files as the hub's older checkpoints hold them (GPT2Model's names, causal-mask buffers), as
    pytorch_model.bin, in shards, and in bfloat16."""
    from safetensors.torch import save_file
    theirs, folder = _hf_save(tmp_path / "new", **_HF_SMALL)
    state = {k.removeprefix("transformer."): v for k, v in theirs.state_dict().items() if k != "lm_head.weight"}
    state |= {f"h.{i}.attn.bias": torch.ones(1, 1, 128, 128).tril() for i in range(2)}
    for name, save in [("model.safetensors", save_file), ("pytorch_model.bin", torch.save)]:
        old = tmp_path / name
        old.mkdir()
        (old / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
        save(state, str(old / name))
        _hf_assert_same(load_hf.load(str(old))[0], theirs, 50257, new_tokens=5)
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="2MB")
    assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 1
    _hf_assert_same(load_hf.load(str(tmp_path / "sharded"))[0], theirs, 50257, new_tokens=5)

    theirs.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert next(load_hf.load(str(tmp_path / "bf16"))[0].parameters()).dtype == torch.float32
    kept, _ = load_hf.load(str(tmp_path / "bf16"), dtype=None)
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    assert torch.equal(kept.blocks[1].attn.wk.weight,
                       theirs.transformer.h[1].attn.c_attn.weight[:, 64:128].t())  # Conv1D, fused qkv


# ---- Llama
# Logits and greedy tokens of each small LlamaConfig of section 1 against LlamaForCausalLM, RoPE
# scaling, bfloat16, the real models' config.json files, older layouts, shards.

@pytest.mark.parametrize("name", list(_LLAMA_HF_CONFIGS))
def test_llama_from_hf_matches_transformers(name, tmp_path):
    """Logits within 1e-4 (float32, a batch of 2), then the same 20 greedy tokens as HF's generate."""
    hf_model, model, module, seq_len = _llama_saved(name, tmp_path)
    idx = _llama_ids(hf_model, 2, seq_len)
    with torch.no_grad():
        expected = hf_model(idx).logits
        got = model(idx)
    diff = _llama_max_diff(got, expected)
    print(f"{name}: float32 max |logit difference| vs transformers {diff:.2e}"
          f" (logits up to {expected.abs().max().item():.1f})")
    assert diff < 1e-4
    assert (model.lm_head.weight is model.token_embedding.weight) == model.cfg.tie_weights
    assert module.count_parameters(model) == hf_model.num_parameters()

    hf_model.generation_config.eos_token_id = None  # exactly 20 tokens, as ours without eot_id
    theirs = hf_model.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False,
                               max_new_tokens=20, pad_token_id=0)[:, seq_len:]
    ours = torch.stack(list(sample.generate(model, idx, 20)), dim=1)  # greedy, with the KV cache
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", [n for n in _LLAMA_HF_CONFIGS if "scaled" in n])
def test_llama_rope_scaling_is_used(name, tmp_path):
    """The seed notebook computed the Llama 3.1 frequencies, then used the unscaled ones."""
    hf_model, model, module, seq_len = _llama_saved(name, tmp_path)
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


@pytest.mark.parametrize("name", ["llama2-gqa", "llama3.1-scaled-mqa", "llama3.2-scaled-tied"])
def test_llama_bfloat16_close_to_transformers(name, tmp_path):
    """Saved in bfloat16, as the published Llama 3 checkpoints are: load_hf.py keeps it with dtype=None."""
    hf_model, module, seq_len = _llama_hf(name)
    idx = _llama_ids(hf_model, 2, seq_len)
    with torch.no_grad():
        reference = hf_model(idx).logits  # float32
        inv_freq = hf_model.model.rotary_emb.inv_freq
        hf_model.to(torch.bfloat16)
        # from_pretrained(dtype=bfloat16) keeps this buffer in float32; .to() would round it
        hf_model.model.rotary_emb.inv_freq = inv_freq
        hf_model.save_pretrained(tmp_path)
        model, ckpt = load_hf.load(str(tmp_path), dtype=None)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert ckpt["model_config"]["weight_dtype"] == "bfloat16"  # so that a converted checkpoint rebuilds it so
        assert load_hf.load(str(tmp_path))[1]["model_config"]["weight_dtype"] == "float32"  # load's default
        got, expected = model.eval()(idx), hf_model(idx).logits
    diff = _llama_max_diff(got, expected)
    print(f"{name}: bfloat16 max |logit difference| vs transformers in bfloat16 {diff:.2e}; "
          f"vs float32: ours {_llama_max_diff(got, reference):.3f}, "
          f"transformers {_llama_max_diff(expected, reference):.3f}"
          f" (logits up to {reference.abs().max().item():.1f})")
    assert diff < 0.1  # bf16 itself moves these logits by ~0.07 from float32; we match HF to 0.000


_LLAMA_REAL_CONFIGS = {  # config.json of the published checkpoints (their transformers 4.x layout)
    "llama2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32,
        num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-05, rope_scaling=None,
        tie_word_embeddings=False, torch_dtype="float16", vocab_size=32000),
    "llama2-70b": dict(
        hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_hidden_layers=80,
        num_key_value_heads=8, max_position_embeddings=4096, rms_norm_eps=1e-05, rope_scaling=None,
        tie_word_embeddings=False, torch_dtype="float16", vocab_size=32000),
    "llama3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_hidden_layers=32,
        num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-05, rope_scaling=None,
        rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16", vocab_size=128256),
    "llama3.1-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_hidden_layers=32,
        num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-05,
        rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192, rope_type="llama3"),
        rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16", vocab_size=128256),
    "llama3.2-1b": dict(
        head_dim=64, hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_hidden_layers=16,
        num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-05,
        rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192, rope_type="llama3"),
        rope_theta=500000.0, tie_word_embeddings=True, torch_dtype="bfloat16", vocab_size=128256),
}


@pytest.mark.parametrize("preset", list(_LLAMA_REAL_CONFIGS))
def test_llama_real_configs_give_our_presets(preset):
    """The published config.json files pick the right file and give its preset (old layout: rope_theta
    and rope_scaling beside each other, torch_dtype); in transformers 5's layout too."""
    hf = dict(_LLAMA_REAL_CONFIGS[preset], model_type="llama", hidden_act="silu", attention_bias=False)
    module = llama2 if preset.startswith("llama2") else llama3
    expected = module.Config(**{**module.PRESETS[preset], "weight_dtype": hf["torch_dtype"]})
    assert load_hf.llama_config(hf, preset) == (module.__name__, preset, expected)
    new_layout = LlamaConfig(**{k: v for k, v in hf.items() if k != "torch_dtype"}, dtype=hf["torch_dtype"])
    assert load_hf.llama_config(new_layout.to_dict(), preset) == (module.__name__, preset, expected)


def _llama_folder(folder, config=None, drop=None, reshape=None, name="llama2-gqa"):
    """A small random Llama checkpoint, with config.json changed (a None value removes the key), or a
    tensor dropped or reshaped. Returns the folder and the LlamaForCausalLM it holds."""
    from safetensors.torch import save_file
    hf_model, _, _ = _llama_hf(name)
    hf_model.save_pretrained(folder)
    if config:
        hf = json.loads((folder / "config.json").read_text())
        hf = {k: v for k, v in {**hf, **config}.items() if v is not None}
        (folder / "config.json").write_text(json.dumps(hf))
    if drop or reshape:
        state = {k: v.clone() for k, v in hf_model.state_dict().items() if k != drop}
        if reshape:
            state[reshape] = state[reshape][:, :-1].contiguous()
        save_file(state, str(folder / "model.safetensors"))
    return str(folder), hf_model


def test_llama_older_config_layout_and_shards(tmp_path):
    new, theirs = _llama_folder(tmp_path / "new", name="llama3.2-scaled-tied")
    rope = theirs.config.rope_parameters
    old, _ = _llama_folder(tmp_path / "old", name="llama3.2-scaled-tied", config=dict(  # transformers 4.x
        rope_parameters=None, dtype=None, head_dim=None, torch_dtype="float32", rope_theta=rope["rope_theta"],
        rope_scaling={"type" if k == "rope_type" else k: v for k, v in rope.items() if k != "rope_theta"}))
    assert load_hf.load(old)[1] == {**load_hf.load(new)[1], "tokenizer": old, "source": old}

    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors"))
    assert len(shards) > 1 and os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    sharded, ckpt = load_hf.load(str(tmp_path / "sharded"))
    assert ckpt["model_name"] == "llama3" and sharded.lm_head.weight is sharded.token_embedding.weight
    idx = _llama_ids(theirs, 2, 80)
    with torch.no_grad():
        assert _llama_max_diff(sharded(idx), theirs(idx).logits) < 1e-4
    os.remove(tmp_path / "sharded" / shards[1])
    with pytest.raises(UserError, match=f"lacks {shards[1]}, a shard its model.safetensors.index.json lists"):
        load_hf.load(str(tmp_path / "sharded"))


# ---- export: load_hf.py to=hf
# Checkpoints of this project, built here with random weights and saved as train.py saves them, written
# out as Hugging Face folders: transformers' AutoModelForCausalLM and AutoTokenizer read them back to our
# logits and ids, load_hf.py to our tensors bit for bit, and sample.py to the same text.

_EXPORT_CASES = {
    # name: (our module, Config, tokenizer: GPT-2's, or a small one trained here as a Llama's folder,
    # sequence length; longer than rope_original_context where the Llama 3.1 scaling is on)
    "gpt2-book": (gpt2, dict(gpt2.PRESETS["tiny"], qkv_bias=False, tie_weights=False, dropout=0.1), "gpt2", 24),
    "gpt2-tied": (gpt2, gpt2.PRESETS["tiny"], "gpt2", 24),
    "llama2-gqa": (llama2, dict(_LLAMA_TEST, n_heads=8, n_kv_heads=2, rope_theta=20000.0), "trained", 24),
    "llama3-gqa-gpt2-tokenizer": (llama3, dict(_LLAMA_TEST, n_kv_heads=2), "gpt2", 24),  # train.py --model llama3
    "llama3.1-scaled-tied": (llama3, dict(_LLAMA_TEST, n_kv_heads=1, rope_factor=8.0, rope_original_context=32,
                                          tie_weights=True, norm_eps=1e-6), "trained", 48),
}


_EXPORT_CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


def _export_checkpoint(tmp, name):
    """A checkpoint of _EXPORT_CASES[name] with random weights in out_dir tmp/run, as train.py writes it
    (a Llama's tokenizer folder beside ckpt.pt): (out_dir, the model, its tokenizer)."""
    module, config, tokenizer_kind, _ = _EXPORT_CASES[name]
    out = tmp / "run"
    if tokenizer_kind == "gpt2":
        os.makedirs(out)
        tokenizer, recorded = common.Tokenizer(), "gpt2"
    else:  # with a chat template and a list of end tokens, as an instruct model's folder has them
        hf = _llama_tokenizer(out / "tokenizer", open(write_story(tmp)).read())
        hf.chat_template = _EXPORT_CHAT_TEMPLATE
        hf.save_pretrained(out / "tokenizer")
        write(out / "tokenizer" / "generation_config.json", json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
        tokenizer, recorded = common.load_tokenizer(str(out / "tokenizer")), "tokenizer"
    cfg = module.Config(**{**config, "vocab_size": tokenizer.vocab_size})
    torch.manual_seed(0)
    model = _llama_randomize(module.Transformer(cfg), seed=3).eval()
    common.save_checkpoint({"model_name": module.__name__, "model_config": dataclasses.asdict(cfg),
                            "train_config": {}, "tokenizer": recorded, "step": 1, "model": model.state_dict()},
                           str(out / "ckpt.pt"))
    return out, model, tokenizer


@pytest.mark.parametrize("name", list(_EXPORT_CASES))
def test_export_gives_transformers_our_logits_ids_and_text(name, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    module, _, _, seq_len = _EXPORT_CASES[name]
    out, model, tokenizer = _export_checkpoint(tmp_path, name)
    folder = str(tmp_path / "hf")
    load_hf.main([str(out), "to=hf", f"out_dir={folder}"])
    files = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert f"written to {folder}: {', '.join(sorted(os.listdir(folder)))}" in capsys.readouterr().out
    assert files <= set(os.listdir(folder))  # and chat_template.jinja, where the tokenizer has a template
    theirs = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    assert type(theirs).__name__ == ("GPT2LMHeadModel" if module is gpt2 else "LlamaForCausalLM")
    assert theirs.num_parameters() == module.count_parameters(model) + (6 * 64 if name == "gpt2-book" else 0)
    idx = torch.randint(0, model.cfg.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(idx) - theirs(idx).logits).abs().max().item()
    assert diff < 1e-4, diff  # measured: 1.9e-6 for GPT-2, 1.6e-6 for Llama 2, 0 for Llama 3
    text = "The painter looked at the sea; every effort moves you."
    exported = AutoTokenizer.from_pretrained(folder)
    assert exported(text)["input_ids"] == tokenizer.encode(text)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    if isinstance(tokenizer, common.Tokenizer):
        assert generation["eos_token_id"] == generation["bos_token_id"] == 50256
    else:  # the folder's own, copied
        assert generation["eos_token_id"] == [2, 0] and exported.chat_template == _EXPORT_CHAT_TEMPLATE

    back, ckpt = load_hf.load(folder, dtype=None)  # bit for bit: every tensor, and the config
    ours, read = model.state_dict(), back.state_dict()
    assert ckpt["model_name"] == module.__name__ and set(ours) <= set(read)
    for key, tensor in read.items():  # a GPT-2 without qkv bias comes back with zero biases: the same network
        assert torch.equal(tensor, ours.get(key, torch.zeros_like(tensor))), key
    assert ckpt["model_config"] == {**dataclasses.asdict(model.cfg), **({"qkv_bias": True} if module is gpt2 else {})}
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())  # transformers 5's layout and 4.x's
    older = {key: value for key, value in hf.items() if key not in ("rope_parameters", "dtype")}
    read_config = load_hf.gpt2_config if module is gpt2 else load_hf.llama_config
    assert read_config(older, folder) == read_config(hf, folder) and "torch_dtype" in older

    args = ["prompt=The painter", "temperature=0", "max_new_tokens=12", "top_k=None"]
    capsys.readouterr()
    sample.main([f"init_from={out}", *args])
    on_checkpoint = capsys.readouterr().out
    sample.main([f"init_from={folder}", *args])
    assert capsys.readouterr().out == on_checkpoint and on_checkpoint.startswith("The painter")


def test_export_gpt2_tokenizer_gives_tiktoken_ids(tmp_path):
    """GPT-2's tokenizer, built from data/gpt2.tiktoken as Hugging Face files: AutoTokenizer gives
    tiktoken's ids, and decodes them back, on The Verdict (when data/ holds it) and on tricky text."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    load_hf.hf_tokenizer("gpt2", 1024).save_pretrained(tmp_path)
    theirs, ours = AutoTokenizer.from_pretrained(str(tmp_path)), common.Tokenizer()
    assert theirs.bos_token_id == theirs.eos_token_id == 50256 and len(theirs) == 50257
    plain = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))  # as other libraries read the file
    texts = [open(write_story(tmp_path)).read(), "  two spaces,\ttabs\n\n\nand lines \r\n ",
             "naïve café, 日本語, 🤖🤖",
             "It's 12345678 o'clock: WE'LL've <|endoftext|>The next text", "<|endoftext|>", " ", "'s'S  \u00a0x"]
    verdict = os.path.join(HERE, "data", "the-verdict.txt")
    texts += [open(verdict, encoding="utf-8").read()] if os.path.isfile(verdict) else []
    for text in texts:
        ids = ours.encode(text)
        assert theirs(text)["input_ids"] == plain.encode(text).ids == ids, text[:40]
        assert theirs.decode(ids) == plain.decode(ids, skip_special_tokens=False) == text


# ---- bad input (the table's columns: see bad_input_table at the top)

def _hf_broken(folder, config=None, drop=None, reshape=None):
    """A copy of a small checkpoint, with config.json changed, or a tensor dropped or reshaped."""
    from safetensors.torch import save_file
    os.makedirs(folder)
    theirs = _hf_model(**_HF_SMALL)
    (folder / "config.json").write_text(json.dumps({**theirs.config.to_dict(), **(config or {})}))
    state = {k: v.clone() for k, v in theirs.state_dict().items() if k not in ("lm_head.weight", drop)}
    if reshape:
        state[reshape] = state[reshape][:, :-1].contiguous()
    save_file(state, str(folder / "model.safetensors"))
    return str(folder)


def _gpt2_load(tmp, **changes):
    """load_hf.load of a small GPT-2 folder, changed as _hf_broken changes it."""
    return load_hf.load(_hf_broken(tmp / "gpt2", **changes))


def _gpt2_files(tmp, weights=None, config=None):
    """A small GPT-2 folder without its model.safetensors, or with the bytes weights in its place; and
    with the text config as its config.json."""
    folder = _hf_broken(tmp / "drop", drop="transformer.h.1.ln_2.bias")
    os.remove(tmp / "drop" / "model.safetensors")
    if weights is not None:
        write(tmp / "drop" / "model.safetensors", weights)
    if config is not None:
        write(tmp / "drop" / "config.json", config)
    return folder


def _load_from_empty_offline_hub(tmp, repo_id):
    import huggingface_hub.constants
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp / "hf-cache"))
        load_hf.load(repo_id)


def _llama_load(tmp, **changes):
    """load_hf.load of a small Llama folder, changed as _llama_folder changes it."""
    return load_hf.load(_llama_folder(tmp / "llama", **changes)[0])


def _llama_without_tokenizer(tmp):
    """A small Llama folder that loads, with a tied head, but holds no tokenizer files."""
    folder, _ = _llama_folder(tmp / "tied", config=dict(tie_word_embeddings=True), drop="lm_head.weight")
    assert load_hf.load(folder)[1]["model_config"]["tie_weights"]  # a tied head is not stored
    return folder


def _convert_without_tokenizer(tmp):
    """load_hf.py's main on a Llama folder without a tokenizer: it says so before it writes anything."""
    try:
        load_hf.main([_llama_without_tokenizer(tmp), f"out_dir={tmp / 'out'}"])
    finally:
        assert not os.path.exists(tmp / "out")


def _export_with(tmp, **config):
    """The out_dir of a small GPT-2 checkpoint, with its model_config changed as given."""
    out, _, _ = _export_checkpoint(tmp, "gpt2-tied")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    common.save_checkpoint({**ckpt, "model_config": {**ckpt["model_config"], **config}}, str(out / "ckpt.pt"))
    return str(out)


def _export_without_tokenizer(tmp):
    """load_hf.py to=hf on a Llama checkpoint whose tokenizer folder is gone: it says so before it writes."""
    out, _, _ = _export_checkpoint(tmp, "llama2-gqa")
    shutil.rmtree(out / "tokenizer")
    try:
        load_hf.main([str(out), "to=hf", f"out_dir={tmp / 'hf'}"])
    finally:
        assert not os.path.exists(tmp / "hf")


_SAFETENSORS_CUT_SHORT = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"

_LOAD_HF_BAD_INPUT = [
    # where the weights should be
    ("nowhere", "call", lambda tmp: load_hf.load(str(tmp / "nowhere")), "no checkpoint at"),
    ("empty-folder", "call", lambda tmp: load_hf.load(write(tmp / "empty")),
     "no checkpoint at .*expected ckpt.pt"),
    ("no-weights", "call", lambda tmp: load_hf.load(_gpt2_files(tmp)),
     "no model.safetensors or pytorch_model.bin"),
    ("unreadable-weights", "call", lambda tmp: load_hf.load(_gpt2_files(tmp, weights=_SAFETENSORS_CUT_SHORT)),
     "cannot read .*model.safetensors"),
    ("unreadable-config", "call",
     lambda tmp: load_hf.load(_gpt2_files(tmp, weights=_SAFETENSORS_CUT_SHORT, config="{'model_type': gpt2")),
     "cannot read .*config.json"),
    ("offline-hub", "call",
     lambda tmp: _load_from_empty_offline_hub(tmp, "llm-from-scratch-tests/no-such-gpt2"),
     "cannot reach the Hugging Face hub for 'llm-from-scratch-tests/no-such-gpt2' \\(offline\\?\\): "
     "download it elsewhere and pass the folder"),
    # GPT-2 folders that are not GPT-2's architecture, or whose weights do not fit config.json
    ("gpt2-bert", "call", lambda tmp: _gpt2_load(tmp, config={"model_type": "bert"}), "holds a 'bert' model"),
    ("gpt2-relu", "call", lambda tmp: _gpt2_load(tmp, config={"activation_function": "relu"}),
     "activation_function=relu"),
    ("gpt2-n_inner", "call", lambda tmp: _gpt2_load(tmp, config={"n_inner": 100}), "n_inner=100"),
    ("gpt2-shape", "call", lambda tmp: _gpt2_load(tmp, reshape="transformer.h.1.attn.c_attn.weight"),
     r"h.1.attn.c_attn.weight has shape \(64, 191\) .*\(64, 192\)"),  # both shapes
    ("gpt2-missing-tensor", "call", lambda tmp: _gpt2_load(tmp, drop="transformer.h.1.ln_2.bias"),
     "has no tensor h.1.ln_2.bias"),
    # Llama folders: config.json changes llama2.py and llama3.py do not implement, then the weights
    ("llama-mistral", "call", lambda tmp: _llama_load(tmp, config=dict(model_type="mistral")),
     "holds a 'mistral' model .*load_hf.py reads gpt2, llama"),
    ("llama-attention_bias", "call", lambda tmp: _llama_load(tmp, config=dict(attention_bias=True)),
     "sets attention_bias=True, which llama2.py and llama3.py do not implement"),
    ("llama-mlp_bias", "call", lambda tmp: _llama_load(tmp, config=dict(mlp_bias=True)), "sets mlp_bias=True"),
    ("llama-gelu", "call", lambda tmp: _llama_load(tmp, config=dict(hidden_act="gelu")),
     "sets hidden_act=gelu"),
    ("llama-head_dim", "call", lambda tmp: _llama_load(tmp, config=dict(head_dim=16)), "sets head_dim=16"),
    ("llama-yarn", "call", lambda tmp: _llama_load(tmp, config=dict(
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})), "rope_type=yarn"),
    ("llama-linear-rope", "call", lambda tmp: _llama_load(tmp, config=dict(
        rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0})), "rope_type=linear"),
    ("llama-kv-heads", "call", lambda tmp: _llama_load(tmp, config=dict(num_key_value_heads=3)),
     "num_attention_heads=8 must divide hidden_size=64 and be a multiple of num_key_value_heads=3"),
    ("llama3-scaling-without-factor", "call", lambda tmp: _llama_load(tmp, config=dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})), "llama3 RoPE scaling lacks factor"),
    ("llama-shape", "call", lambda tmp: _llama_load(tmp, reshape="model.layers.1.self_attn.k_proj.weight"),
     r"layers.1.self_attn.k_proj.weight has shape \(16, 63\) .*\(16, 64\)"),  # both shapes
    ("llama-missing-tensor", "call", lambda tmp: _llama_load(tmp, drop="model.layers.1.mlp.up_proj.weight"),
     "has no tensor layers.1.mlp.up_proj.weight, which a llama2 of this config.json needs"),
    ("llama-untied-without-lm_head", "call", lambda tmp: _llama_load(tmp, drop="lm_head.weight"),
     "has no tensor lm_head.weight"),
    ("llama-convert-without-tokenizer", "call", _convert_without_tokenizer,
     "{tmp}/tied has no tokenizer.json: copy the model's tokenizer files"),
    ("run-offline-hub", "run-hub", lambda tmp: ["gpt2"], _OFFLINE_GPT2_LOAD_HF),
    # to=hf: a checkpoint of this project into a Hugging Face folder
    ("export-to-neither", "run", lambda tmp: ["out", "to=onnx"],
     "^to=onnx: use to=ours .* or to=hf \\(a checkpoint of this project into a Hugging Face folder\\)$"),
    ("export-hf-folder", "call", lambda tmp: load_hf.main([_hf_save(tmp / "hf", **_HF_SMALL)[1], "to=hf"]),
     "{tmp}/hf is not a checkpoint of this project: to=hf exports a ckpt.pt written by train.py or load_hf.py"),
    ("export-corrupt", "call", lambda tmp: load_hf.main([_corrupt_checkpoint(tmp), "to=hf"]),
     "is not a checkpoint this project can load"),
    ("export-wrong-shape", "call", lambda tmp: load_hf.main([_export_with(tmp, d_model=32), "to=hf"]),
     "lacks token_embedding.weight or has it in another shape than its model_config makes it"),
    ("export-out_dir-not-writable", "call",
     lambda tmp: load_hf.main([_export_with(tmp), "to=hf", f"out_dir={write(tmp / 'a-file', 'x')}/hf"]),
     "cannot write {tmp}/a-file/hf \\(Not a directory\\): pass another out_dir="),
    ("export-without-tokenizer", "call", _export_without_tokenizer,
     "{tmp}/run/tokenizer has no tokenizer.json: copy the model's tokenizer files"),
    ("gpt2-no-layers", "call", lambda tmp: _gpt2_load(tmp, config={"n_layer": 0}),
     r"{tmp}/gpt2/config.json makes a model that cannot be built \(n_layers=0 must be a whole number of at least 1\)"),
]


@bad_input_table(_LOAD_HF_BAD_INPUT)
def test_load_hf_bad_input_says_what_to_do(tmp_path, how, given, message):
    says_what_to_do("load_hf.py", how, given, message, tmp_path)


def test_unreachable_hub_fails_fast_and_its_cache_still_loads(tmp_path):
    """Without HF_HUB_OFFLINE, a hub that does not answer (nothing listens at HF_ENDPOINT) is reported
    after one try, not after huggingface_hub's 25 s of retries; a model in the HF cache still loads."""
    env = {**offline_env(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9"}
    del env["HF_HUB_OFFLINE"]
    start = time.time()
    result = run_script("load_hf.py", "llm-from-scratch-tests/no-such-gpt2", env=env)
    assert time.time() - start < 15 and result.returncode == 2, result.stderr
    assert result.stderr.startswith("fetching llm-from-scratch-tests/no-such-gpt2 from the Hugging Face hub ...\n")
    assert re.search("cannot reach the Hugging Face hub .*python load_hf.py path/to/folder$", result.stderr.strip())
    # the cache's layout: models--owner--name/refs/main names the snapshot that holds the files
    _, folder = _hf_save(tmp_path / "hf", **_HF_SMALL)
    cached = tmp_path / "hf-home" / "hub" / "models--llm-from-scratch-tests--cached-gpt2"
    shutil.copytree(folder, cached / "snapshots" / ("0" * 40))
    (cached / "refs").mkdir()
    write(cached / "refs" / "main", "0" * 40)
    result = run_script("load_hf.py", "llm-from-scratch-tests/cached-gpt2", f"out_dir={tmp_path / 'out'}", env=env)
    assert result.returncode == 0, result.stderr
    assert "3,324,736 parameters (gpt2, float32)" in result.stdout


# ===== 5. data/prepare.py: the token cache and the training windows ====================================
# A corpus tokenized in pieces into a memmap gives the ids of the whole text; batches and the
# book's sliding windows read from it equal those read from memory.

def _corpus_text():
    """A text with the things a tokenizer cut could trip on: numbers, punctuation, runs of spaces and
    newlines, contractions, accents, <|endoftext|>."""
    lines = ["The painter sat by the window, and looked at the sea.", "Every effort moves you 1234 steps",
             "closer to the picture you want;  she didn't laugh\u2014but the light changed   ", "",
             "on the water of caf\u00e9 Gisburn<|endoftext|>Then, 3.14 years later...\t\"Why?\" he asked."]
    return "\n".join(lines[i % len(lines)] + f" {i}" * (i % 3) for i in range(400))


def _corpus_file(tmp_path):
    """_corpus_text in tmp_path/corpus.txt; the training runs of section 6 use it too."""
    path = tmp_path / "corpus.txt"
    path.write_text(_corpus_text(), encoding="utf-8")
    return str(path)


def test_memmap_batches_equal_in_memory_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "PIECE_BYTES", 50)  # many pieces, so many cuts between them
    tok = common.load_tokenizer("gpt2")
    data = _corpus_file(tmp_path)
    prepare.tokenize_corpus(data, tok)
    cache, dtype = prepare.token_cache(data, tok)
    tokens = np.memmap(cache, dtype=dtype, mode="r")
    ids = np.array(tok.encode(_corpus_text()))  # the whole text, encoded at once, in memory
    assert dtype == np.uint16 and np.array_equal(tokens, ids)

    cfg = train.TrainConfig(batch_size=4, seed=7)
    for cfg.max_iters in (100, 0):
        for step in range(12):
            starts = prepare.batch_starts(step, len(ids), 32, cfg)
            for from_disk, from_memory in zip(prepare.get_batch(tokens, starts, 32), prepare.get_batch(ids, starts, 32)):
                assert torch.equal(from_disk, from_memory)
    # epochs: the book's sliding windows (unfold), each once per epoch, in a new order each epoch
    windows = torch.from_numpy(ids).unfold(0, 33, 32)  # (n, t + 1)
    per_epoch = len(windows) // 4
    seen = [prepare.batch_starts(step, len(ids), 32, cfg) for step in range(2 * per_epoch)]
    first, second = torch.cat(seen[:per_epoch]), torch.cat(seen[per_epoch:])
    assert len(set(first.tolist())) == len(first) and not torch.equal(first, second)
    x, y = prepare.get_batch(tokens, seen[3], 32)
    assert torch.equal(x, windows[seen[3] // 32, :-1]) and torch.equal(y, windows[seen[3] // 32, 1:])
    assert not torch.equal(prepare.batch_starts(0, len(ids), 32, train.TrainConfig(batch_size=4, seed=8)),
                           seen[0])

    # a folder: its .txt files, in order, joined by <|endoftext|>; tokenized again when one changes
    folder = tmp_path / "books"
    (folder / "part2").mkdir(parents=True)
    (folder / "a.txt").write_text("First book. " * 40, encoding="utf-8")
    (folder / "part2" / "b.txt").write_bytes(_corpus_text()[:2000].replace("\n", "\r\n").encode())  # Windows
    (folder / "notes.md").write_text("not part of the corpus")

    def cached():
        prepare.tokenize_corpus(str(folder), tok)
        return np.fromfile(prepare.token_cache(str(folder), tok)[0], dtype=np.uint16)

    assert np.array_equal(cached(), tok.encode("First book. " * 40 + "<|endoftext|>" + _corpus_text()[:2000]))
    assert os.path.dirname(prepare.token_cache(str(folder), tok)[0]) == str(folder)  # inside, not beside it
    (folder / "a.txt").write_text("Second edition. " * 40, encoding="utf-8")
    assert np.array_equal(cached()[:5], tok.encode("Second edition. " * 40)[:5])
    monkeypatch.setattr(prepare, "encode_in_order", None)  # unchanged: read from the cache
    assert len(cached()) > 0


# ---- instruction data (data/instructions.py): the Alpaca prompt, the masked loss, the split

_COLORS = ["red", "green", "blue", "white", "black", "yellow", "brown", "grey", "pink", "orange"]


def _instructions_file(tmp_path, examples=None, name="instructions.json"):
    """A .json list of instructions (by default one per color, every second with an input), or any
    examples given, in tmp_path/name; a list of lines for a .jsonl file."""
    if examples is None:
        examples = [{"instruction": f"Name the color {c}.", "input": "Say it twice." if i % 2 else "",
                     "output": f"{c.title()}, {c}."} for i, c in enumerate(_COLORS)]
    text = "\n".join(map(json.dumps, examples)) if name.endswith(".jsonl") else json.dumps(examples)
    return write(tmp_path / name, text)


def test_instruction_loss_counts_the_response_tokens_only(tmp_path):
    tok = common.load_tokenizer("gpt2")
    train_split, val_split = instructions.load_examples(_instructions_file(tmp_path), tok, 64, 1, True)
    assert (len(train_split), len(val_split), train_split.format) == (9, 1, "alpaca")  # 90/10
    prompts = [tok.decode(ids[:n]) for ids, n in zip(train_split.ids, train_split.n_prompt)]
    for (ids, n), prompt in zip(zip(train_split.ids, train_split.n_prompt), prompts):
        color = prompt.split("Name the color ")[1].split(".")[0]
        with_input = _COLORS.index(color) % 2 == 1
        assert prompt == instructions.alpaca_prompt(f"Name the color {color}.", "Say it twice." * with_input)
        assert tok.decode(ids[n:]) == f"{color.title()}, {color}.<|endoftext|>"  # the output, then the end token
    assert prompts[0].startswith(instructions.ALPACA_PREAMBLE + "\n\n### Instruction:\nName the color ")
    assert sum("\n\n### Input:\nSay it twice.\n\n### Response:\n" in p for p in prompts) in (4, 5)

    rows = torch.tensor([0, 3, 5, 8])
    x, y = train_split.read(rows)
    assert x.shape == y.shape == (4, max(len(train_split.ids[r]) for r in rows.tolist()) - 1)  # the longest
    model = tiny_gpt2()
    loss = train.loss_fn(model, x, y)
    logits = model(x)
    by_hand = []  # the cross-entropy of each response token (and end token), predicted one position before
    for i, r in enumerate(rows.tolist()):
        ids, n = train_split.ids[r], train_split.n_prompt[r]
        by_hand += [-torch.log_softmax(logits[i, j - 1], -1)[ids[j]] for j in range(n, len(ids))]
    assert torch.allclose(loss, torch.stack(by_hand).mean(), atol=1e-6)

    # other prompt tokens: other inputs, the same positions counted
    changed = instructions.Examples([(ids, n) for ids, n in zip(train_split.ids, train_split.n_prompt)],
                                    True, tok.eot_id, "alpaca")
    changed.ids = [[(t + 7) % 50000 if j < n else t for j, t in enumerate(ids)]
                   for ids, n in zip(changed.ids, changed.n_prompt)]
    x2, y2 = changed.read(rows)
    assert not torch.equal(x2, x) and torch.equal(y2 != instructions.IGNORE, y != instructions.IGNORE)
    assert torch.equal(y2[y2 != instructions.IGNORE], y[y != instructions.IGNORE])
    # mask_prompt=false: every token but the padding counts, as in the book's main chapter
    whole, _ = instructions.load_examples(_instructions_file(tmp_path), tok, 64, 1, False)
    _, y3 = whole.read(rows)
    assert (y3 != instructions.IGNORE).sum() == sum(len(whole.ids[r]) - 1 for r in rows.tolist())

    # the split and the batches depend on the seed alone; an epoch visits every example once
    again, _ = instructions.load_examples(_instructions_file(tmp_path), tok, 64, 1, True)
    other, _ = instructions.load_examples(_instructions_file(tmp_path), tok, 64, 2, True)
    assert again.ids == train_split.ids and other.ids != train_split.ids
    cfg = train.TrainConfig(batch_size=3, seed=5)
    epoch = torch.cat([train_split.draw(step, cfg) for step in range(3)])
    assert sorted(epoch.tolist()) == list(range(9)) and not torch.equal(epoch, torch.cat(
        [train_split.draw(step, cfg) for step in range(3, 6)]))


# ===== 6. train.py: training runs, pretrained weights, resume, DDP and FSDP ============================
# Short runs of the tiny preset in process: the loss falls, pretrained weights and checkpoints to start
# from, resuming exactly; two processes under torchrun; a run killed while it checkpoints; bad input.

# a run of seconds: the tiny preset (2 layers) with 32-token windows, on the CPU in float32
_TINY_RUN = ["config=tiny", "context_length=32", "dtype=float32", "device=cpu", "eval_iters=1", "lr=1e-3",
             "warmup_steps=2"]


def _read_ckpt(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


# ---- training runs

def test_tiny_model_loss_falls(tmp_path, story, capsys):
    train.main(["config=tiny", f"data={story}", f"out_dir={tmp_path}", "epochs=4", "lr=3e-3",
                "warmup_steps=2", "device=cpu", "dtype=float32", "batch_size=4"])
    history = torch.load(tmp_path / "ckpt.pt", weights_only=True)["history"]
    assert history["train"][-1] < history["train"][0] - 1.0
    assert history["step_loss"][-1] < history["step_loss"][0] - 3.0
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert "epoch  4" in capsys.readouterr().out


def _on_pretrained(tmp, *extra):
    """One epoch of the story, from a small GPT-2 that transformers saved in tmp/hf."""
    _, folder = _hf_save(tmp / "hf", **_HF_SMALL)
    return [f"init_from={folder}", f"data={write_story(tmp)}", f"out_dir={tmp / 'out'}", "device=cpu",
            "dtype=float32", "epochs=1", *extra]


def test_hf_train_continues_pretrained_weights(tmp_path):
    # what may not change (n_layers=, config=, a longer seq_len=): see the bad-input table below
    train.main(_on_pretrained(tmp_path, "seq_len=64", "batch_size=4", "dropout=0", "flash=true", "lr=0",
                              "min_lr=0", "weight_decay=0"))
    folder = str(tmp_path / "hf")
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["model_config"]["d_model"] == 64 and ckpt["model_config"]["flash"] is True
    assert ckpt["train_config"]["init_from"] == folder and ckpt["train_config"]["seq_len"] == 64
    pretrained, _ = load_hf.load(folder)
    assert torch.equal(ckpt["model"]["blocks.1.mlp.up.weight"], pretrained.blocks[1].mlp.up.weight)  # lr=0


def test_init_from_a_checkpoint_starts_from_its_weights(tmp_path, one_thread):
    data = _corpus_file(tmp_path)
    train.main([*_TINY_RUN, f"data={data}", "max_iters=3", "n_layers=1", f"out_dir={tmp_path / 'a'}"])
    # lr=0: the weights stay as loaded; the architecture (n_layers=1) comes from the checkpoint, and
    # keys that say the same as it (context_length=32) may stay; config= may not
    same = [arg for arg in _TINY_RUN if not arg.startswith("config=")]
    with pytest.raises(UserError, match="config=tiny picks a model to train from scratch"):
        train.main([*_TINY_RUN, f"data={data}", f"init_from={tmp_path / 'a'}", f"out_dir={tmp_path / 'b'}"])
    train.main([*same, f"data={data}", "max_iters=1", "lr=0", "min_lr=0", f"init_from={tmp_path / 'a'}",
                f"out_dir={tmp_path / 'b'}"])
    a, b = _read_ckpt(tmp_path / "a"), _read_ckpt(tmp_path / "b")
    assert b["model_config"]["n_layers"] == 1 and b["step"] == 1  # a new run: fresh optimizer and schedule
    assert all(torch.equal(a["model"][name], weight) for name, weight in b["model"].items())


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, one_thread):
    loss_fn, calls = train.loss_fn, []

    def blows_up_at_step_5(model, x, y):
        calls.append(model.training)
        return loss_fn(model, x, y) * (float("nan") if calls.count(True) >= 5 else 1.0)

    monkeypatch.setattr(train, "loss_fn", blows_up_at_step_5)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"the loss became nan at step 5: .*ckpt.pt from step 4 is kept; lower lr"):
        train.main([*_TINY_RUN, f"data={_corpus_file(tmp_path)}", "max_iters=10", "ckpt_interval=2",
                    "eval_interval=100", f"out_dir={out}"])
    assert _read_ckpt(out)["step"] == 4



def test_dtype_is_autocast_and_weight_dtype_the_llama_weights(tmp_path, one_thread):
    """Two keys, two meanings: train.py's dtype= is the autocast dtype, a Llama's weight_dtype= the dtype
    its weights are created and kept in; a checkpoint that stored the latter as dtype still loads."""
    llama = ["--model", "llama2", "config=toy", "d_model=32", "n_layers=1", "n_heads=2", "n_kv_heads=2",
             "d_ff=64", "context_length=32", "device=cpu", "eval_iters=1", "max_iters=2",
             f"data={_corpus_file(tmp_path)}"]
    for weight_dtype, dtype in (("bfloat16", "float32"), ("float32", "bfloat16")):
        out = tmp_path / f"{weight_dtype}-{dtype}"
        train.main([*llama, f"weight_dtype={weight_dtype}", f"dtype={dtype}", f"out_dir={out}"])
        ckpt = _read_ckpt(out)
        assert ckpt["model_config"]["weight_dtype"] == weight_dtype
        assert {t.dtype for t in ckpt["model"].values()} == {getattr(torch, weight_dtype)}
        assert ckpt["train_config"]["dtype"] == dtype
    old = dict(ckpt, model_config={("dtype" if k == "weight_dtype" else k): v for k, v in ckpt["model_config"].items()})
    common.save_checkpoint(old, str(tmp_path / "old.pt"))
    model, loaded = sample.load_model(str(tmp_path / "old.pt"), "cpu")
    assert loaded["model_config"]["weight_dtype"] == "float32" and model.cfg.weight_dtype == "float32"


# ---- instruction finetuning and LoRA

_ANSWERS = {"Name a fruit.": "An apple.", "Name a color.": "Deep blue.", "Name a pet.": "A small cat."}


def _answers(out, capsys):
    """What sample.py chat=true answers to each instruction of _ANSWERS (greedy), with the checkpoint in out
    and the prompt format it records."""
    answers = {}
    for instruction in _ANSWERS:
        capsys.readouterr()
        sample.main([f"init_from={out}", "chat=true", f"prompt={instruction}", "temperature=0", "top_k=None",
                     "max_new_tokens=12"])
        answers[instruction] = capsys.readouterr().out.removesuffix("\n")
    return answers


def test_tiny_gpt2_trained_on_instructions_answers_them(tmp_path, one_thread, capsys):
    examples = [{"instruction": q, "input": "", "output": a} for q, a in _ANSWERS.items()] * 4
    out = tmp_path / "out"
    train.main(["config=tiny", "n_layers=1", "context_length=48", f"data={_instructions_file(tmp_path, examples)}",
                f"out_dir={out}", "device=cpu", "dtype=float32", "max_iters=80", "batch_size=4", "lr=1e-2",
                "eval_interval=80", "eval_iters=1", "dropout=0"])
    printed = capsys.readouterr().out
    assert "11 training examples and 1 to validate (0 of all cut to 49 tokens), alpaca prompts" in printed
    ckpt = _read_ckpt(out)
    assert ckpt["prompt_format"] == "alpaca" and ckpt["history"]["val"][-1] < 0.1
    assert re.search(r"\n  response: (An apple|Deep blue|A small cat)\.\n", printed)  # the validation example
    assert _answers(out, capsys) == _ANSWERS
    model, _ = sample.load_model(str(out), "cpu")  # input= fills the prompt's ### Input: part
    chat = sample.Chat(model.eval(), common.load_tokenizer("gpt2"), sample.SampleConfig(chat=True, input="x"),
                       "alpaca")
    expected = "### Instruction:\nName a fruit.\n\n### Input:\nx\n\n### Response:\n"
    assert common.load_tokenizer("gpt2").decode(chat.prompt_ids("Name a fruit.")).endswith(expected)


def test_tiny_llama_trained_on_chat_messages_answers_them(tmp_path, one_thread, capsys):
    """A Llama folder whose tokenizer has a chat template: .jsonl messages are laid out by the template,
    and the trained model answers each instruction given to the template as a user's message."""
    folder = tmp_path / "hf-llama"
    turns = [f"user: {q}</s>assistant: {a}</s>" for q, a in _ANSWERS.items()]
    tokenizer = _llama_tokenizer(folder, " ".join(turns * 20))
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}"
                               "{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(**{**_LLAMA_SMALL, "vocab_size": len(tokenizer)}, bos_token_id=1, eos_token_id=2,
                         **_LLAMA_HF_CONFIGS["llama2-gqa"][2])
    _llama_randomize(LlamaForCausalLM(config), seed=3).save_pretrained(folder)
    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in _ANSWERS.items()] * 4
    out = tmp_path / "out"
    train.main([f"init_from={folder}", f"data={_instructions_file(tmp_path, chats, 'chat.jsonl')}", f"out_dir={out}",
                "device=cpu", "dtype=float32", "seq_len=32", "max_iters=60", "batch_size=4", "lr=1e-2",
                "eval_interval=60", "eval_iters=1"])
    model, ckpt = sample.load_model(str(out), "cpu")
    assert ckpt["prompt_format"] == "chat_template"
    tokenizer = common.load_tokenizer(ckpt["tokenizer"])
    ids = instructions.prompt_ids(tokenizer, "chat_template", "Name a pet.")
    assert tokenizer.hf.decode(ids).replace(" ", "") == "<s>user:Nameapet.</s>assistant:"  # the template's layout
    assert _answers(out, capsys) == _ANSWERS


def test_lora_changes_the_adapted_matrices_only_by_rank_r(tmp_path, one_thread):
    data = _corpus_file(tmp_path)
    train.main([*_TINY_RUN, f"data={data}", "max_iters=1", f"out_dir={tmp_path / 'base'}"])
    same = [arg for arg in _TINY_RUN if not arg.startswith(("config=", "context_length="))]
    train.main([*same, f"data={data}", "max_iters=4", "lr=1e-2", "lora_rank=2", "lora_alpha=8",
                f"init_from={tmp_path / 'base'}", f"out_dir={tmp_path / 'lora'}"])
    base, lora = _read_ckpt(tmp_path / "base")["model"], _read_ckpt(tmp_path / "lora")
    assert lora["model"].keys() == base.keys()  # the ordinary state dict: merged
    adapted = [name for name in base if name.removesuffix(".weight") + ".linear.weight" in lora["lora"]]
    assert len(adapted) == 2 * 6  # wq, wk, wv, wo, up, down in each of the 2 blocks
    for name, weight in base.items():
        if name in adapted:
            change = (lora["model"][name] - weight).double()
            assert change.abs().max() > 1e-4 and torch.linalg.matrix_rank(change, rtol=1e-4) <= 2, name
            assert torch.equal(lora["lora"][name.removesuffix("weight") + "linear.weight"], weight)
        else:
            assert torch.equal(lora["model"][name], weight), name  # frozen: bit for bit
    assert set(lora["optimizer"]["state"]) == {k for k in lora["lora"] if k.endswith((".A", ".B"))}  # adapters only
    # the merged model (what sample.py loads) against the model with its adapters, unmerged
    merged, _ = sample.load_model(str(tmp_path / "lora"), "cpu")
    unmerged, _ = sample.load_model(str(tmp_path / "base"), "cpu")
    train.add_lora(unmerged, 2, 8.0)
    unmerged.load_state_dict(lora["lora"], strict=False)
    idx = torch.randint(0, 50257, (2, 32))
    assert (merged.eval()(idx) - unmerged.eval()(idx)).abs().max() < 1e-5


# ---- scale: DDP, FSDP, resume

def _scale_torchrun(*args):
    """train.py in 2 processes with the gloo backend, as torchrun --standalone picks a free port."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *args], cwd=HERE, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def _scale_one_process(tmp_path_factory):
    """The reference: one process, the step's batch of 4 windows as 2 micro-batches of 2."""
    tmp = tmp_path_factory.mktemp("scale")
    data = _corpus_file(tmp)
    args = [*_TINY_RUN, f"data={data}", "max_iters=4", "batch_size=4", "eval_interval=2"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train.main([*args, "grad_accum=2", f"out_dir={tmp / 'one'}"])
    torch.set_num_threads(threads)
    return args, _read_ckpt(tmp / "one"), tmp


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_scale_two_processes_match_one_process(_scale_one_process, mode):
    args, reference, tmp = _scale_one_process
    out = tmp / mode
    result = _scale_torchrun(*args, "grad_accum=1", f"fsdp={mode == 'fsdp'}", f"out_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("step     4  train loss") == 1  # only process 0 prints
    ckpt = _read_ckpt(out)
    for key in ("step_loss", "train", "val"):
        assert len(ckpt["history"][key]) == len(reference["history"][key])
        assert max(abs(a - b) for a, b in zip(ckpt["history"][key], reference["history"][key])) < 1e-5
    assert ckpt["model"].keys() == reference["model"].keys()  # the full state dict, gathered under FSDP
    for name, weight in ckpt["model"].items():
        assert (weight - reference["model"][name]).abs().max() < 1e-5, name
    assert len(ckpt["rng"]) == 2 and ckpt["step"] == 4
    loaded, _ = sample.load_model(str(out), "cpu")  # and sample.py reads it as any other
    assert loaded.lm_head.weight is loaded.token_embedding.weight


def test_scale_two_processes_with_lora_match_one_process(tmp_path):
    data = _corpus_file(tmp_path)
    args = [*_TINY_RUN, f"data={data}", "max_iters=3", "batch_size=4", "eval_interval=3", "lora_rank=2", "lr=1e-2"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train.main([*args, "grad_accum=2", f"out_dir={tmp_path / 'one'}"])
    torch.set_num_threads(threads)
    result = _scale_torchrun(*args, f"out_dir={tmp_path / 'two'}")
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = _read_ckpt(tmp_path / "one"), _read_ckpt(tmp_path / "two")
    for key in ("step_loss", "train", "val"):
        assert max(abs(a - b) for a, b in zip(one["history"][key], two["history"][key])) < 1e-5
    for name, weight in {**one["model"], **one["lora"]}.items():
        assert (weight - {**two["model"], **two["lora"]}[name]).abs().max() < 1e-5, name


class _ScaleStop(Exception):
    pass


def _stopped_at_first_checkpoint(monkeypatch, args, out_dir):
    """train.main(args) into out_dir, stopped right after it wrote its first checkpoint, as if killed then."""
    save = common.save_checkpoint

    def save_then_stop(checkpoint, path):
        save(checkpoint, path)
        raise _ScaleStop

    monkeypatch.setattr(train, "save_checkpoint", save_then_stop)
    with pytest.raises(_ScaleStop):
        train.main([*args, f"out_dir={out_dir}"])
    monkeypatch.setattr(train, "save_checkpoint", save)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mode", ["max_iters", "epochs", "lora"])
def test_scale_resume_is_exact(tmp_path, monkeypatch, mode):
    data = _corpus_file(tmp_path)
    # dropout on, so the random state must be restored too; epochs: the stop falls inside an epoch; lora:
    # the frozen weights, the adapters and their optimizer state
    run = {"max_iters": ["max_iters=8"], "epochs": ["epochs=3", "batch_size=2", "stride=1000"],
           "lora": ["max_iters=8", "lora_rank=2", "lr=1e-2"]}[mode]
    args = [*_TINY_RUN, f"data={data}", "dropout=0.1", "eval_interval=3", "ckpt_interval=4", *run]
    train.main([*args, f"out_dir={tmp_path / 'whole'}"])
    whole = _read_ckpt(tmp_path / "whole")

    _stopped_at_first_checkpoint(monkeypatch, args, tmp_path / "halves")
    assert _read_ckpt(tmp_path / "halves")["step"] == 4
    if mode == "max_iters":  # without the preset and model keys: the model comes from the checkpoint
        args = [arg for arg in args if arg.split("=")[0] not in ("config", "context_length", "dropout")]
    train.main([*args, "init_from=resume", f"out_dir={tmp_path / 'halves'}"])
    halves = _read_ckpt(tmp_path / "halves")

    n_steps = len(whole["history"]["step_loss"])
    assert halves["step"] == whole["step"] == n_steps
    assert n_steps == 9 if mode == "epochs" else n_steps == 8  # epochs: 3 of 3 steps, stopped in the 2nd
    assert halves["history"] == whole["history"]  # every loss, bit for bit
    for name, weight in {**whole["model"], **whole.get("lora", {})}.items():
        assert torch.equal(weight, {**halves["model"], **halves.get("lora", {})}[name]), name
    assert ("lora" in whole) == (mode == "lora")
    for name, state in whole["optimizer"]["state"].items():
        assert all(torch.equal(v, halves["optimizer"]["state"][name][k]) for k, v in state.items())
    log = [json.loads(line) for line in open(tmp_path / "halves" / "log.jsonl")]
    assert [line["step"] for line in log if "loss" in line] == list(range(1, n_steps + 1))  # none twice
    assert (tmp_path / "halves" / "loss.png").stat().st_size > 0


@pytest.mark.usefixtures("one_thread")
def test_checkpoint_in_todays_layout_loads_in_sample_and_resumes_in_train(tmp_path, capsys):
    """A checkpoint built by hand with the keys train.py writes today, so that it stays today's layout
    when train.py changes: sample.py still loads it, and train.py still resumes it."""
    data, out = _corpus_file(tmp_path), tmp_path / "run"
    # the run of _TINY_RUN with max_iters=4, stopped after its checkpoint at step 1
    model_cfg = gpt2.Config(**{**gpt2.PRESETS["tiny"], "context_length": 32})
    cfg = train.TrainConfig(data=data, config="tiny", out_dir=str(out), max_iters=4, ckpt_interval=1, lr=1e-3,
                            warmup_steps=2, eval_iters=1, device="cpu", dtype="float32")
    torch.manual_seed(0)
    model = gpt2.Transformer(model_cfg)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # as train.build_model groups them
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, fused=True)
    tokens = torch.randint(0, model_cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    loss = train.loss_fn(model, tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # the optimizer as train.py's save_training writes it: keyed by parameter name (a plain
    # optimizer.state_dict(), keyed by number, does not load: KeyError 'state.0.step')
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))
    tokens_seen = cfg.batch_size * model_cfg.context_length
    os.makedirs(out)
    common.save_checkpoint({
        "model_name": "gpt2",
        "model_config": dataclasses.asdict(model_cfg),
        "train_config": dataclasses.asdict(cfg),
        "tokenizer": "gpt2",
        "history": {"step_tokens": [tokens_seen], "step_loss": [loss.item()], "tokens": [tokens_seen],
                    "train": [loss.item()], "val": [loss.item()]},
        "step": 1,
        "model": model.state_dict(),
        "optimizer": optimizer_state,
        "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
        "rng": [{"cpu": torch.get_rng_state()}],
    }, str(out / "ckpt.pt"))

    loaded, ckpt = sample.load_model(str(out), "cpu")
    idx = torch.randint(0, model_cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(idx), model.eval()(idx))  # the saved weights
    assert ckpt["step"] == 1 and loaded.lm_head.weight is loaded.token_embedding.weight
    sample.main([f"init_from={out}", "max_new_tokens=5", "temperature=0"])
    text = capsys.readouterr().out
    assert text.startswith("Every effort moves you") and len(text.strip()) > len("Every effort moves you")

    train.main([*_TINY_RUN, f"data={data}", f"out_dir={out}", "init_from=resume", "max_iters=4"])
    assert "from step 1" in capsys.readouterr().out
    resumed = _read_ckpt(out)
    assert resumed["step"] == 4 and resumed["history"]["step_loss"][0] == loss.item()
    assert resumed["history"]["step_tokens"] == [tokens_seen * step for step in range(1, 5)]
    assert len(resumed["history"]["val"]) == 4
    # AdamW carried on from the saved state, its first step: three more make 4
    assert all(state["step"] == 4 for state in resumed["optimizer"]["state"].values())
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [line["step"] for line in log if "loss" in line] == [2, 3, 4]


def _scale_logged(out_dir, step):
    """Whether the run in out_dir has logged the given step (or a later one)."""
    try:
        return any(f'"step": {s},' in open(os.path.join(out_dir, "log.jsonl")).read() for s in (step, step + 1))
    except OSError:
        return False


def test_ctrl_c_after_the_first_epoch_resumes_from_its_checkpoint(tmp_path, story, capsys):
    """By default a run checkpoints at every evaluation (each epoch): Ctrl-C after the first epoch
    loses nothing. An earlier run's log.jsonl stays until the new run's first checkpoint."""
    out = tmp_path / "out"
    out.mkdir()
    old_log = '{"step": 1, "tokens": 2, "loss": 9.0}\n'
    (out / "log.jsonl").write_text(old_log)
    args = ["config=tiny", f"data={story}", f"out_dir={out}", "device=cpu", "dtype=float32", "eval_iters=1"]
    # preexec_fn: Ctrl-C's default action, even where the tests run in the background of a script, whose
    # children start with SIGINT ignored (and Python then installs no KeyboardInterrupt for it)
    run = subprocess.Popen([sys.executable, "train.py", *args, "epochs=100"], cwd=HERE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while True:  # the log is read before ckpt.pt is looked for: the log is replaced after ckpt.pt is written
        log = (out / "log.jsonl").read_text()
        if (out / "ckpt.pt").exists():
            break
        assert log == old_log and run.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 130 and "Traceback" not in stderr
    assert "interrupted; init_from=resume continues from the last checkpoint" in stderr
    saved = _read_ckpt(out)
    per_epoch = int(re.search(r"epoch  1  step +(\d+)", stdout).group(1))
    assert saved["step"] % per_epoch == 0 and saved["step"] >= per_epoch
    epochs = saved["step"] // per_epoch + 1
    train.main([*args, "init_from=resume", f"epochs={epochs}"])
    assert f"from step {saved['step']}" in capsys.readouterr().out
    resumed = _read_ckpt(out)
    assert resumed["step"] == epochs * per_epoch and len(resumed["history"]["step_loss"]) == resumed["step"]
    logged = [json.loads(line)["step"] for line in open(out / "log.jsonl") if '"loss"' in line]
    assert logged == list(range(1, resumed["step"] + 1))  # the old run's line is gone, none is missing
    train.main([*args, "max_iters=1"])  # a new run in the same out_dir: says it replaces the checkpoint
    assert "holds another run's ckpt.pt, which this run replaces" in capsys.readouterr().err


def test_scale_sigkill_while_checkpointing_leaves_a_resumable_checkpoint(tmp_path):
    data, out = _corpus_file(tmp_path), tmp_path / "out"
    args = [sys.executable, "train.py", *_TINY_RUN, f"data={data}", f"out_dir={out}", "max_iters=30",
            "ckpt_interval=1", "eval_interval=1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = []
    for delay in (0.0, 0.003, 0.02):  # after a checkpoint has begun to be written
        resume = ["init_from=resume"] if steps else []
        run = subprocess.Popen(args + resume, cwd=HERE, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        deadline, target = time.monotonic() + 120, (steps[-1] if steps else 0) + 2
        while not _scale_logged(out, target):  # a few steps on from the last round
            assert run.poll() is None and time.monotonic() < deadline, "training ended before it was killed"
            time.sleep(0.01)
        while not (out / "ckpt.pt.tmp").exists():  # the checkpoint of that step begins to be written
            assert run.poll() is None and time.monotonic() < deadline, "training ended before it was killed"
            time.sleep(0.0005)
        time.sleep(delay)
        run.kill()
        run.wait()
        (out / "ckpt.pt.tmp").unlink(missing_ok=True)  # so that the next round sees its own write begin
        model, ckpt = sample.load_model(str(out), "cpu")
        steps.append(ckpt["step"])
    assert steps == sorted(steps) and steps[-1] > steps[0]  # each round carried on from the last
    finish = subprocess.run(args + ["init_from=resume"], cwd=HERE, env=env, capture_output=True, text=True,
                            timeout=300)
    assert finish.returncode == 0, finish.stderr
    ckpt = _read_ckpt(out)
    assert ckpt["step"] == 30 and len(ckpt["history"]["step_loss"]) == 30
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [line["step"] for line in log if "loss" in line] == list(range(1, 31))


# ---- bad input (the table's columns: see bad_input_table at the top)

def _on_story(tmp, *extra, data=None):
    """The tiny preset on the story (or on data), on the CPU."""
    return ["config=tiny", f"data={data or write_story(tmp)}", f"out_dir={tmp / 'out'}", "device=cpu", *extra]


def _on_corpus(tmp, *extra):
    """One step of _TINY_RUN on _corpus_file."""
    return [*_TINY_RUN, f"data={_corpus_file(tmp)}", f"out_dir={tmp / 'out'}", "max_iters=1", *extra]


def _resume_another_model(tmp):
    """A 1-layer run in out_dir, then a command that resumes it as the tiny preset's 2 layers."""
    train.main(_on_corpus(tmp, "n_layers=1"))
    train.main(_on_corpus(tmp, "init_from=resume"))


_TRAIN_BAD_INPUT = [
    # the command line (parsing itself: the table of section 2)
    ("run-unknown-model", "run", lambda tmp: ["--model", "no_such_model"], "unknown model"),
    ("run-unknown-key", "run", lambda tmp: ["no_such_key=1"], "unknown key"),
    ("run-not-a-whole-number", "run", lambda tmp: ["epochs=abc"], "expected a whole number"),
    ("unknown-config", "call", lambda tmp: train.main(_on_story(tmp, "config=huge")), "unknown config 'huge'"),
    ("device-tpu", "call", lambda tmp: train.main(_on_story(tmp, "device=tpu")), "device=tpu"),
    # values that cannot work, refused before anything is loaded or built (nothing is written: no data=)
    ("run-n_heads-not-dividing", "run", lambda tmp: ["n_heads=5"],
     "^n_heads=5 does not divide d_model=768 into equal heads: use one that does, e.g. .*6"),
    ("run-n_kv_heads-not-dividing", "run", lambda tmp: ["--model", "llama3", "n_kv_heads=4"],
     "^n_kv_heads=4 does not divide n_heads=6 into equal groups: use one that does, e.g. .*3"),
    ("llama2-n_kv_heads-not-dividing", "call", lambda tmp: train.main(["--model", "llama2", "n_kv_heads=4"]),
     "n_kv_heads=4 does not divide n_heads=6"),
    ("llama-odd-head-width", "call", lambda tmp: train.main(["--model", "llama2", "d_model=390"]),
     "heads of 65, an odd width, and RoPE turns pairs"),
    ("run-lr-negative", "run", lambda tmp: ["lr=-1"], r"^lr=-1\.0 must be 0 \(the weights stay\) or a number above it, e\.g\. lr=5e-4$"),
    ("lr-nan", "call", lambda tmp: train.main(["lr=nan"]), "^lr=nan must be 0 .*or a number above it"),
    ("lr-inf", "call", lambda tmp: train.main(["lr=inf"]), "^lr=inf must be 0 .*or a number above it"),
    ("run-dropout", "run", lambda tmp: ["dropout=1.5"], r"^dropout=1\.5 must be in \[0, 1\)"),
    ("dropout-negative", "call", lambda tmp: train.main(["--model", "gpt2", "dropout=-0.1"]), r"dropout=-0\.1 must be in"),
    ("run-context_length-0", "run", lambda tmp: ["context_length=0"], "^context_length=0 must be a whole number of at least 1"),
    ("d_model-0", "call", lambda tmp: train.main(["d_model=0"]), "^d_model=0 must be a whole number of at least 1"),
    ("n_layers-0", "call", lambda tmp: train.main(["n_layers=0"]), "^n_layers=0 must be"),
    ("vocab_size-0", "call", lambda tmp: train.main(["vocab_size=0"]), "^vocab_size=0 must be"),
    ("d_ff-negative", "call", lambda tmp: train.main(["--model", "llama3", "d_ff=-1"]), "^d_ff=-1 must be"),
    ("norm_eps-0", "call", lambda tmp: train.main(["--model", "llama2", "norm_eps=0"]), r"^norm_eps=0\.0 must be .* above 0"),
    ("rope_theta-0", "call", lambda tmp: train.main(["--model", "llama3", "rope_theta=0"]), r"^rope_theta=0\.0 must be"),
    ("rope_high_freq_factor", "call", lambda tmp: train.main(
        ["--model", "llama3", "rope_factor=8", "rope_high_freq_factor=1"]), "above rope_low_freq_factor=1.0"),
    ("llama-weight_dtype", "call", lambda tmp: train.main(["--model", "llama2", "weight_dtype=float8"]),
     "^weight_dtype=float8 is not"),
    ("dtype", "call", lambda tmp: train.main(["dtype=float8"]), "^dtype=float8 is not supported"),
    ("run-stride-0", "run", lambda tmp: ["stride=0"], "^stride=0 must be 1 or more, or None$"),
    ("seq_len-0", "call", lambda tmp: train.main(["seq_len=0"]), "^seq_len=0 must be 1 or more"),
    ("epochs-0", "call", lambda tmp: train.main(["epochs=0"]), "^epochs=0 must be 1 or more"),
    ("run-min_lr-above-lr", "run", lambda tmp: ["config=tiny", "min_lr=1"], r"^min_lr=1\.0 must be a number from 0 up to lr=0\.0004"),
    ("run-warmup-negative", "run", lambda tmp: ["config=tiny", "warmup_steps=-5"], "^warmup_steps=-5 must be 0 or more"),
    ("max_iters-negative", "call", lambda tmp: train.main(["max_iters=-1"]), "^max_iters=-1 must be 0 or more"),
    ("weight_decay-negative", "call", lambda tmp: train.main(["weight_decay=-0.1"]), r"^weight_decay=-0\.1 must be 0"),
    ("weight_decay-nan", "call", lambda tmp: train.main(["weight_decay=nan"]), "^weight_decay=nan must be 0"),
    ("grad_clip-negative", "call", lambda tmp: train.main(["grad_clip=-1"]), r"^grad_clip=-1\.0 must be 0"),
    ("before-loading-weights", "call", lambda tmp: train.main(["init_from=/no/such/run", "lr=-1"]), "^lr=-1.0 must be"),
    # the data
    ("data-missing", "call", lambda tmp: train.main(_on_story(tmp, data=tmp / "missing.txt")), "not found"),
    ("data-empty", "call", lambda tmp: train.main(_on_story(tmp, data=write(tmp / "empty.txt", "  \n"))),
     "is empty"),
    ("data-latin1", "call", lambda tmp: train.main(_on_story(tmp, data=write(
        tmp / "latin1.txt", "caf\xe9 cr\xe8me ".encode("latin-1") * 50))), "not UTF-8"),
    ("data-windows-1252", "call", lambda tmp: train.main(_on_story(tmp, data=write(
        tmp / "win.txt", "\u201cquoted\u201d caf\xe9 ".encode("cp1252") * 50))),
     "not UTF-8 text \\(it seems to be cp1252\\): convert it, iconv -f cp1252 -t utf-8 {tmp}/win.txt > "),
    ("data-0-bytes", "call", lambda tmp: train.main(_on_story(tmp, data=write(tmp / "empty.txt", b""))),
     "empty.txt is empty"),
    ("run-data-0-bytes", "run", lambda tmp: _on_story(tmp, data=write(tmp / "empty.txt", b"")), "empty.txt is empty"),
    ("data-dev-null", "call", lambda tmp: train.main(_on_story(tmp, data="/dev/null")),
     "^data=/dev/null is not a regular file"),
    ("data-short", "call", lambda tmp: train.main(_on_story(tmp, data=write(
        tmp / "short.txt", "Too short to make a window of 64 tokens. " * 3))), "fewer than one window"),
    ("data-short-random-windows", "call", lambda tmp: train.main(_on_corpus(
        tmp, f"data={write(tmp / 'short.txt', 'Far too short for a window. ' * 5)}")), "fewer than one window"),
    ("data-folder-without-txt", "call",
     lambda tmp: train.main(_on_corpus(tmp, f"data={write(tmp / 'no-text')}")), "holds no .txt files"),
    ("batch-larger-than-data", "call", lambda tmp: train.main(_on_story(tmp, "batch_size=64")),
     "fewer than batch_size"),
    # pretrained weights bring their architecture
    ("pretrained-n_layers", "call", lambda tmp: train.main(_on_pretrained(tmp, "n_layers=4")),
     "n_layers=4 would change the architecture"),
    ("pretrained-context_length", "call", lambda tmp: train.main(_on_pretrained(tmp, "context_length=64")),
     "context_length=64 would change"),
    ("pretrained-config", "call", lambda tmp: train.main(_on_pretrained(tmp, "config=tiny")),
     "config=tiny picks a model to train from scratch"),
    ("pretrained-seq_len", "call", lambda tmp: train.main(_on_pretrained(tmp, "seq_len=256")),
     "seq_len=256 is longer than the model's context_length=128"),
    ("pretrained-typo", "call", lambda tmp: train.main(_on_pretrained(tmp, "--model", "gpt2", "lrr=1")),
     "did you mean 'lr'"),
    ("run-offline-hub", "run-hub", lambda tmp: ["init_from=gpt2"], _OFFLINE_GPT2),
    # resuming, or starting from a checkpoint
    ("resume-nothing", "call", lambda tmp: train.main(_on_corpus(tmp, "init_from=resume")),
     "init_from=resume found no checkpoint"),
    ("run-resume-nothing", "run", lambda tmp: _on_corpus(tmp, "init_from=resume"),
     "init_from=resume found no checkpoint"),
    ("init_from-nowhere", "call", lambda tmp: train.main(_on_corpus(tmp, "init_from=/no/such/run")),
     "no checkpoint at /no/such/run"),
    ("resume-another-model", "call", _resume_another_model,
     "holds a gpt2 model with n_layers=1, not the gpt2 model this command"),
    # processes, and where the run is written
    ("fsdp-without-torchrun", "call", lambda tmp: train.main(_on_corpus(tmp, "fsdp=true")),
     "launch with torchrun --nproc_per_node=N"),
    ("run-fsdp-without-torchrun", "run", lambda tmp: _on_corpus(tmp, "fsdp=true"),
     "launch with torchrun --nproc_per_node=N"),
    ("grad_accum-uneven", "call", lambda tmp: train.main(_on_corpus(tmp, "batch_size=4", "grad_accum=3")),
     "batch_size=4 does not split evenly .* grad_accum=3"),
    # instruction data and LoRA
    ("instructions-not-a-list", "call", lambda tmp: train.main(_on_story(tmp, data=write(tmp / "i.json", '{"a": 1}'))),
     "i.json must hold a JSON list of objects with .instruction., .input. and .output."),
    ("instructions-not-objects", "call", lambda tmp: train.main(_on_story(tmp, data=write(tmp / "i.json", "[1, 2]"))),
     "must hold a JSON list of objects"),
    ("instructions-not-json", "call", lambda tmp: train.main(_on_story(tmp, data=write(tmp / "i.json", "[{"))),
     "i.json is not valid UTF-8 JSON"),
    ("instructions-empty-list", "call", lambda tmp: train.main(_on_story(tmp, data=write(tmp / "i.json", "[]"))),
     "i.json holds no examples: pass a file with at least two"),
    ("instruction-without-output", "call", lambda tmp: train.main(_on_story(tmp, data=_instructions_file(
        tmp, [{"instruction": "Name a fruit.", "output": "An apple."}, {"instruction": "Name a pet."}]))),
     'example 1 of .* has no "output" text: every example needs an "instruction" and an "output"'),
    ("instruction-missing", "call", lambda tmp: train.main(_on_story(tmp, data=_instructions_file(
        tmp, [{"input": "x", "output": "y"}] * 3))), 'example 0 of .* has no "instruction" text'),
    ("instructions-all-too-long", "call", lambda tmp: train.main(_on_story(
        tmp, "context_length=32", data=_instructions_file(tmp, [{"instruction": "Name a fruit.",
                                                                 "output": "An apple. " * 20}] * 3))),
     r"every example of .* is longer than the context of 33 tokens: raise seq_len= .*or use shorter examples"),
    ("messages-without-chat-template", "call", lambda tmp: train.main(_on_story(tmp, data=_instructions_file(
        tmp, [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}] * 3,
        "chat.jsonl"))), "chat.jsonl holds chat messages, and this model's tokenizer has no chat template"),
    ("messages-not-ending-with-the-answer", "call", lambda tmp: train.main(_on_story(tmp, data=_instructions_file(
        tmp, [{"messages": [{"role": "user", "content": "Hi"}]}], "chat.jsonl"))),
     "example 0 of .* needs .messages.: .* that ends with the assistant's answer"),
    ("run-lora_rank-negative", "run", lambda tmp: ["lora_rank=-1"],
     r"^lora_rank=-1 must be 0 \(off\) or more, e\.g\. lora_rank=8"),
    ("lora_alpha-0", "call", lambda tmp: train.main(["lora_rank=8", "lora_alpha=0"]),
     r"^lora_alpha=0\.0 must be above 0"),
    ("resume-without-lora", "call", lambda tmp: [train.main(_on_corpus(tmp, "lora_rank=2")),
                                                 train.main(_on_corpus(tmp, "init_from=resume"))],
     "ckpt.pt was trained with lora_rank=2: resume with that lora_rank= and lora_alpha="),
    ("out_dir-under-a-file", "call", lambda tmp: train.main(
        ["config=tiny", f"data={write_story(tmp)}", f"out_dir={write(tmp / 'file', '')}/out"]),
     "cannot write to out_dir"),
    ("out_dir-under-a-file-random-windows", "call",
     lambda tmp: train.main(_on_corpus(tmp, f"out_dir={write(tmp / 'a-file', '')}/out")),
     "cannot write to out_dir"),
]


@bad_input_table(_TRAIN_BAD_INPUT)
@pytest.mark.usefixtures("one_thread")
def test_train_bad_input_says_what_to_do(tmp_path, how, given, message):
    says_what_to_do("train.py", how, given, message, tmp_path)


def test_train_under_torchrun_says_bad_input_once(tmp_path):
    """Not a row of the table: torchrun reports the failed processes its own way, in several lines and
    with its own exit status, after process 0 has said why, once."""
    result = _scale_torchrun(*_on_corpus(tmp_path, "batch_size=3"))
    assert result.returncode != 0
    assert result.stderr.count("train.py: batch_size=3 does not split evenly into 2 process(es)") == 1


# ===== 7. End to end: the scripts in subprocesses, as a user runs them =================================
# train.py then sample.py; load_hf.py then sample.py; train.py, load_hf.py to=hf, then sample.py; a Llama
# folder with its own tokenizer; chat with an instruct folder, one turn and two from standard input.

def test_train_then_sample_end_to_end(tmp_path, story):
    out = tmp_path / "out"
    result = run_script("train.py", "--model", "gpt2", "config=tiny", "epochs=1", f"data={story}",
                        f"out_dir={out}", "device=cpu")
    assert result.returncode == 0, result.stderr
    assert "train loss" in result.stdout and "val loss" in result.stdout
    assert (out / "ckpt.pt").exists() and (out / "loss.png").exists()
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["model_name"] == "gpt2" and ckpt["tokenizer"] == "gpt2"
    assert ckpt["model_config"]["n_layers"] == 2 and ckpt["train_config"]["epochs"] == 1

    result = run_script("sample.py", f"init_from={out}", "prompt=The painter", "max_new_tokens=12",
                        "seed=7")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The painter") and "tokens/s" in result.stderr
    again = run_script("sample.py", f"init_from={out}", "prompt=The painter", "max_new_tokens=12",
                       "seed=7")
    assert again.stdout == result.stdout  # same seed, same text

    batch = run_script("sample.py", f"init_from={out}", "num_samples=3", "max_new_tokens=5",
                       "temperature=0", f"prompt={'word ' * 100}")
    assert batch.returncode == 0, batch.stderr
    assert batch.stdout.count("--- sample") == 3
    assert "only its last 64 tokens are used" in batch.stderr  # a long prompt is cropped, with a note


def test_hf_convert_then_sample_in_subprocesses(tmp_path, capsys):
    _, folder = _hf_save(tmp_path / "hf", **_HF_SMALL)
    env, out = offline_env(tmp_path), tmp_path / "converted"
    convert = subprocess.run([sys.executable, "load_hf.py", folder, f"out_dir={out}"], cwd=HERE, env=env,
                             capture_output=True, text=True, timeout=300)
    assert convert.returncode == 0, convert.stderr
    assert "3,324,736 parameters (gpt2, float32)" in convert.stdout and f"init_from={out}" in convert.stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["model_name"] == "gpt2" and ckpt["model_config"]["n_layers"] == 2
    args = ["prompt=The painter", "temperature=0", "max_new_tokens=8"]
    converted = subprocess.run([sys.executable, "sample.py", f"init_from={out}", *args], cwd=HERE, env=env,
                               capture_output=True, text=True, timeout=300)
    assert converted.returncode == 0, converted.stderr
    sample.main([f"init_from={folder}", *args])  # the Hugging Face folder directly: the same text
    assert capsys.readouterr().out == converted.stdout and converted.stdout.startswith("The painter")
    # and with a hub id, offline: the rows run-offline-hub of sample.py's and train.py's bad-input tables


def test_train_llama3_then_export_then_sample(tmp_path, story, capsys):
    """train.py --model llama3 (scaled RoPE, grouped-query, tied), then load_hf.py out to=hf: sample.py,
    run as a user runs it, prints on the exported folder what it prints on the checkpoint."""
    out = tmp_path / "out"
    train.main(["--model", "llama3", "d_model=64", "n_layers=2", "n_heads=4", "n_kv_heads=2", "d_ff=128",
                "context_length=32", "rope_factor=8", "rope_original_context=16", "tie_weights=true", "max_iters=2",
                "eval_interval=2", "eval_iters=1", "dtype=float32", "device=cpu", f"data={story}", f"out_dir={out}"])
    capsys.readouterr()
    load_hf.main([str(out), "to=hf"])  # out_dir: out-hf beside out
    folder, printed = tmp_path / "out-hf", capsys.readouterr().out
    assert f"(LlamaForCausalLM, float32), written to {folder}: config.json" in printed
    assert f"python sample.py init_from={folder}" in printed
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_parameters"] == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 16}
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is True
    load_hf.main([str(out), "to=hf", f"out_dir={tmp_path / 'bf16'}", "dtype=bfloat16"])  # smaller, to share
    exported, ckpt = load_hf.load(str(tmp_path / "bf16"), dtype=None)
    model, _ = load_hf.load(str(folder), dtype=None)
    assert ckpt["model_config"] == {**dataclasses.asdict(model.cfg), "weight_dtype": "bfloat16"}
    assert all(torch.equal(tensor, model.state_dict()[key].to(torch.bfloat16))
               for key, tensor in exported.state_dict().items())
    capsys.readouterr()
    args = ["prompt=The painter", "temperature=0", "max_new_tokens=40"]  # past the context of 32
    sample.main([f"init_from={out}", *args])
    on_checkpoint = capsys.readouterr().out
    on_export = run_script("sample.py", f"init_from={folder}", *args, env=offline_env(tmp_path))
    assert on_export.returncode == 0, on_export.stderr
    assert on_export.stdout == on_checkpoint and on_checkpoint.startswith("The painter")


def _llama_tokenizer(folder, text):
    """A small BPE trained on text with the tokenizers library, SentencePiece-style as Llama 2's ('▁'
    marks a space; <s> starts each text, </s> ends it), saved into folder as transformers saves one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([text], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.save_pretrained(folder)
    return hf


def test_llama_folder_with_tokenizer_end_to_end(tmp_path, story):
    """sample.py on a Llama folder with its own tokenizer; load_hf.py then sample.py on the checkpoint;
    train.py continuing it; all give HF's greedy text."""
    folder = tmp_path / "hf-llama"
    tokenizer = _llama_tokenizer(folder, open(story).read())
    config = LlamaConfig(**{**_LLAMA_SMALL, "vocab_size": len(tokenizer)}, bos_token_id=1, eos_token_id=2,
                         **_LLAMA_HF_CONFIGS["llama2-gqa"][2])
    theirs = _llama_randomize(LlamaForCausalLM(config), seed=6).eval()  # continues with a new word, whose
    theirs.save_pretrained(folder)  # space a SentencePiece tokenizer drops when decoding it alone
    prompt_ids = tokenizer("The painter looked at")["input_ids"]
    assert prompt_ids[0] == 1  # <s>
    new = theirs.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=12)[0, len(prompt_ids):]
    expected = tokenizer.decode(prompt_ids + new.tolist(), skip_special_tokens=True) + "\n"
    assert expected.startswith("The painter looked at ")

    env, out = offline_env(tmp_path), tmp_path / "out-llama"
    # top_k=None: the default 200 is more than this tokenizer's 120 tokens
    args = ["prompt=The painter looked at", "temperature=0", "max_new_tokens=12", "top_k=None"]
    direct = subprocess.run([sys.executable, "sample.py", f"init_from={folder}", *args], cwd=HERE, env=env,
                            capture_output=True, text=True, timeout=300)
    assert direct.returncode == 0, direct.stderr
    assert direct.stdout == expected  # streamed, with the spaces SentencePiece puts before words
    convert = subprocess.run([sys.executable, "load_hf.py", str(folder), f"out_dir={out}"], cwd=HERE, env=env,
                             capture_output=True, text=True, timeout=300)
    assert convert.returncode == 0, convert.stderr
    assert f"parameters (llama2, float32), saved as {out / 'ckpt.pt'}" in convert.stdout
    assert torch.load(out / "ckpt.pt", weights_only=True)["tokenizer"] == "tokenizer"
    assert os.path.isfile(out / "tokenizer" / "tokenizer.json")  # a copy: out-llama stands alone
    os.rename(folder, tmp_path / "moved")
    converted = subprocess.run([sys.executable, "sample.py", f"init_from={out}", *args], cwd=HERE, env=env,
                               capture_output=True, text=True, timeout=300)
    assert converted.returncode == 0, converted.stderr
    assert converted.stdout == expected

    trained = tmp_path / "trained"  # lr=0: the weights stay, the tokenizer goes along
    train.main([f"init_from={out}", f"data={story}", f"out_dir={trained}", "device=cpu", "dtype=float32",
                "epochs=1", "seq_len=32", "lr=0", "min_lr=0", "eval_iters=1", "prompt=The painter"])
    assert os.path.isfile(trained / "tokenizer" / "tokenizer.json")
    model, ckpt = sample.load_model(str(trained), "cpu")
    assert ckpt["tokenizer"] == str(trained / "tokenizer")
    tokenizer = common.load_tokenizer(ckpt["tokenizer"])
    assert sample.complete(model.eval(), tokenizer, "The painter looked at", 12) + "\n" == expected

    # and resumed: the model and the tokenizer come from the run's own checkpoint and folder
    train.main(["init_from=resume", f"data={story}", f"out_dir={trained}", "device=cpu", "dtype=float32",
                "epochs=2", "seq_len=32", "lr=0", "min_lr=0", "eval_iters=1", "prompt=The painter"])
    resumed = torch.load(trained / "ckpt.pt", weights_only=True)
    assert resumed["model_name"] == "llama2" and resumed["step"] == 2 * ckpt["step"] > 0
    assert resumed["tokenizer"] == "tokenizer" and os.path.isfile(trained / "tokenizer" / "tokenizer.json")


@pytest.mark.parametrize("style", ["llama3", "llama2"])
def test_chat_with_an_instruct_folder_end_to_end(tmp_path, story, style, capsys):
    """sample.py chat=true gives transformers' replies: one turn (prompt=) on the folder and on
    load_hf.py's conversion of it, which keeps the template and the end tokens; then, in a subprocess,
    two turns from standard input with a system message, and /reset starting the conversation again."""
    folder, out = tmp_path / "instruct", tmp_path / "converted"
    theirs, hf_tokenizer = _instruct_folder(folder, open(story).read(), style)
    args = ["chat=true", "temperature=0", "max_new_tokens=10", "top_k=None"]
    one_turn = _hf_text(hf_tokenizer, _hf_reply(theirs, hf_tokenizer, _messages("", [], _CHAT[0]), 10)[1]) + "\n"
    sample.main([f"init_from={folder}", f"prompt={_CHAT[0]}", *args])
    assert capsys.readouterr().out == one_turn
    load_hf.main([str(folder), f"out_dir={out}"])
    assert os.path.isfile(out / "tokenizer" / "generation_config.json")
    assert common.load_tokenizer(str(out / "tokenizer")).end_ids == common.load_tokenizer(str(folder)).end_ids
    capsys.readouterr()
    sample.main([f"init_from={out}", f"prompt={_CHAT[0]}", *args])
    assert capsys.readouterr().out == one_turn

    system, turns = "Answer briefly.", []
    for message in _CHAT[:2]:
        reply = _hf_reply(theirs, hf_tokenizer, _messages(system, turns, message), 10)[1]
        turns.append((message, _hf_text(hf_tokenizer, reply)))
    result = subprocess.run([sys.executable, "sample.py", f"init_from={folder}", f"system={system}", *args],
                            input=f"{_CHAT[0]}\n{_CHAT[1]}\n\n/reset\n{_CHAT[0]}\n", cwd=HERE,
                            env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(reply + "\n" for reply in (turns[0][1], turns[1][1], turns[0][1]))
    assert "> " not in result.stderr and "tokens/s" in result.stderr  # no prompt: stdin is not a terminal


# ===== 8. On a GPU (skipped without CUDA) ===============================================================
# The CUDA paths of everything above, on a GPU: the same logits as the CPU, flash against einsum, the
# KV cache and compiled decoding against the readable path, a bfloat16 + flash + compiled train.py run
# that resumes exactly, torchrun with nccl, and sample.py on its checkpoint. Without a GPU, CI reports
# them skipped; README "On a GPU" gives the command that runs them together with bench.py.

_GPU = "cuda"
_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (README: On a GPU)")
_GPU_HF_MODELS = ["gpt2", "llama2-gqa", "llama3.1-scaled-mqa", "llama3.2-scaled-tied"]
# _TINY_RUN on the GPU, with the fast paths a GPU user turns on
_GPU_RUN = [arg for arg in _TINY_RUN if not arg.startswith(("device=", "dtype="))] + [
    f"device={_GPU}", "dtype=bfloat16", "flash=true", "compile=true"]


def _gpu_folder(name, tmp_path):
    """A small random Hugging Face folder (GPT-2 of _HF_SMALL, or a Llama of _LLAMA_HF_CONFIGS) and a
    batch of 2 prompts for it."""
    if name == "gpt2":
        theirs, folder = _hf_save(tmp_path, **_HF_SMALL)
        seq_len = 64
    else:
        theirs, _, seq_len = _llama_hf(name)
        theirs.save_pretrained(tmp_path)
        folder = str(tmp_path)
    return folder, _llama_ids(theirs, 2, seq_len)


@_cuda
@pytest.mark.parametrize("name", _GPU_HF_MODELS)
def test_gpu_logits_equal_the_cpus(name, tmp_path):
    """The models load_hf.py checks against transformers (sections 1 and 4), loaded onto the GPU."""
    folder, idx = _gpu_folder(name, tmp_path)
    # bfloat16: 0.1, the tolerance of test_llama_bfloat16_close_to_transformers. Its 8-bit mantissa moves
    # these logits by ~0.07 from float32, so two right bfloat16 results that sum in another order (the
    # GPU's kernels, the CPU's) may differ by about as much.
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 0.1)):
        cpu, _ = load_hf.load(folder, "cpu", dtype)
        gpu, _ = load_hf.load(folder, _GPU, dtype)
        assert {p.device.type for p in gpu.parameters()} == {torch.device(_GPU).type}
        with torch.no_grad():
            expected, got = cpu.eval()(idx), gpu.eval()(idx.to(_GPU)).cpu()
        diff = _llama_max_diff(got, expected)
        print(f"{name}, {dtype}: max |GPU - CPU logits| {diff:.2e}")
        assert diff < tolerance, (dtype, diff)


@_cuda
@pytest.mark.parametrize("name", list(_FAST_MODELS))
def test_gpu_flash_equals_einsum(name):
    """float32 as section 1 checks it; bfloat16, where F.scaled_dot_product_attention takes the GPU's
    flash kernel (in float32 it takes another), against einsum in bfloat16."""
    idx = _fast_ids(3, 16).to(_GPU)
    einsum, flash = _fast_model(name).to(_GPU), _fast_model(name, flash=True).to(_GPU)
    with torch.no_grad():
        assert _llama_max_diff(einsum(idx), flash(idx)) < 1e-5
        for model in (einsum, flash):  # the cached path, through the explicit mask
            model.setup_cache(3, 16)
            model(idx[:, :10], start_pos=0, use_cache=True)
        cached = [model(idx[:, 10:], start_pos=10, use_cache=True) for model in (einsum, flash)]
        assert _llama_max_diff(*cached) < 1e-5
        reference = einsum(idx)
        einsum.to(torch.bfloat16)
        flash.to(torch.bfloat16)
        got, expected = flash(idx), einsum(idx)
    print(f"{name}: bfloat16 flash against einsum {_llama_max_diff(got, expected):.3f}, against float32 "
          f"{_llama_max_diff(got, reference):.3f} (logits up to {reference.abs().max().item():.1f})")
    assert _llama_max_diff(got, expected) < 0.1  # bfloat16: as in test_gpu_logits_equal_the_cpus, and why


@_cuda
@pytest.mark.parametrize("name", list(_FAST_MODELS))
def test_gpu_greedy_with_the_cache_equals_without(name):
    idx = _fast_ids(3, 6)  # 6 + 30 tokens: the 16-token window slides 20 times
    expected = _fast_greedy(_fast_model(name), idx, 30, use_cache=False)  # the readable path, on the CPU
    for flash in (False, True):
        model = _fast_model(name, flash).to(_GPU)
        assert torch.equal(_fast_greedy(model, idx.to(_GPU), 30).cpu(), expected), flash
        assert torch.equal(_fast_greedy(model, idx.to(_GPU), 30, use_cache=False).cpu(), expected), flash


@_cuda
@pytest.mark.parametrize("name", ["gpt2", "llama3.1-scaled-mqa"])
def test_gpu_compiled_decoding_equals_eager(name):
    """sample.py compile=true on the GPU (torch.compile, dynamic shapes), as section 1 checks it on the CPU."""
    _check_compiled_decoding(name, _GPU)


@pytest.fixture
def _gpu_deterministic(monkeypatch):
    """Deterministic kernels for the test. On a GPU, atomic adds (the embedding's gradient, flash
    attention's backward) make two runs of the same steps differ in their last bits; with these, a
    run repeats bit for bit, so a difference after resuming can only come from the resume."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic workspace
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@_cuda
@pytest.mark.usefixtures("_gpu_deterministic")
def test_gpu_train_bfloat16_flash_compile_loss_falls_and_resumes_exactly(tmp_path, monkeypatch):
    """test_scale_resume_is_exact on the GPU, with bfloat16 autocast, flash attention and torch.compile."""
    args = [*_GPU_RUN, f"data={write_story(tmp_path)}", "lr=3e-3", "batch_size=4", "dropout=0.1", "max_iters=8",
            "eval_interval=4", "ckpt_interval=4"]
    train.main([*args, f"out_dir={tmp_path / 'whole'}"])
    whole = _read_ckpt(tmp_path / "whole")
    losses = whole["history"]["step_loss"]
    assert len(losses) == 8 and losses[-1] < losses[0] - 1.0, losses
    assert whole["history"]["train"][-1] < whole["history"]["train"][0] - 0.5  # steps 4 and 8
    assert whole["train_config"]["dtype"] == "bfloat16" and whole["train_config"]["compile"]
    assert {w.dtype for w in whole["model"].values()} == {torch.float32}  # autocast: float32 weights
    assert "cuda" in whole["rng"][0]  # the GPU's random state too, for dropout

    _stopped_at_first_checkpoint(monkeypatch, args, tmp_path / "halves")
    assert _read_ckpt(tmp_path / "halves")["step"] == 4
    train.main([*args, "init_from=resume", f"out_dir={tmp_path / 'halves'}"])
    halves = _read_ckpt(tmp_path / "halves")
    assert halves["step"] == 8 and halves["history"] == whole["history"]  # every loss, bit for bit
    for name, weight in whole["model"].items():
        assert torch.equal(weight, halves["model"][name]), name
    for name, state in whole["optimizer"]["state"].items():
        assert all(torch.equal(v, halves["optimizer"]["state"][name][k]) for k, v in state.items())


@pytest.fixture(scope="module")
def _gpu_torchrun(tmp_path_factory):
    """train.py under torchrun, one process on the GPU: bfloat16, flash, compile; NCCL says what it sets up."""
    tmp = tmp_path_factory.mktemp("gpu-torchrun")
    out = tmp / "out"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
         *_GPU_RUN, f"data={write_story(tmp)}", "lr=3e-3", "max_iters=12", "batch_size=4", f"out_dir={out}"],
        cwd=HERE, capture_output=True, text=True, timeout=600, env={**os.environ, "NCCL_DEBUG": "INFO"})
    return result, out


@_cuda
def test_gpu_torchrun_one_process_nccl_trains(_gpu_torchrun):
    result, out = _gpu_torchrun
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cuda:0 bfloat16, 1 processes" in result.stdout  # the process's GPU, under DDP
    assert "NCCL INFO" in result.stdout + result.stderr  # the backend is nccl
    ckpt = _read_ckpt(out)
    losses = ckpt["history"]["step_loss"]
    assert ckpt["step"] == 12 and losses[-1] < losses[0] - 1.0, losses
    assert len(ckpt["rng"]) == 1 and "cuda" in ckpt["rng"][0]


@_cuda
def test_gpu_sample_py_on_the_checkpoint(_gpu_torchrun, tmp_path):
    """sample.py on the GPU, eager and compile=true, prints what it prints on the CPU (greedy)."""
    _, out = _gpu_torchrun
    args = [f"init_from={out}", "prompt=The painter", "temperature=0", "max_new_tokens=20"]
    texts = {}
    for device, extra in (("cpu", []), (_GPU, []), (_GPU, ["compile=true"])):
        result = run_script("sample.py", *args, f"device={device}", *extra, env=offline_env(tmp_path))
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.startswith("The painter") and "tokens/s" in result.stderr
        texts[(device, *extra)] = result.stdout
    assert len(set(texts.values())) == 1, texts
