"""Load published weights from Hugging Face into our models, one tensor at a time: GPT-2 into gpt2.py,
Llama 2, 3, 3.1 and 3.2 into llama2.py or llama3.py; and export our checkpoints the other way (to=hf).

    python load_hf.py gpt2                       # downloaded once into the HF cache, written to out-gpt2/ckpt.pt
    python load_hf.py path/to/Llama-3.2-1B       # a folder: config.json, *.safetensors, tokenizer.json
    python load_hf.py path/to/folder out_dir=out-mine dtype=float32
    python load_hf.py out to=hf                  # out/ckpt.pt as a Hugging Face folder, out-hf/
    python sample.py init_from=gpt2-medium       # sample.py and train.py also take a hub id or folder directly
    python train.py init_from=gpt2 seq_len=256   # continue training the pretrained weights

A source is a hub id (gpt2, gpt2-medium, gpt2-large, gpt2-xl, or owner/name such as
openai-community/gpt2 or meta-llama/Llama-3.2-1B), fetched through huggingface_hub's download and cache
as transformers does, or a folder written by save_pretrained: config.json and model.safetensors (or its
shards, listed in model.safetensors.index.json, or pytorch_model.bin). config.json's model_type picks
the family, and every size is read from it.

Hugging Face's GPT-2 is the same network as gpt2.py's, stored differently: its linear layers are
Conv1D, whose weight is (in, out), the transpose of nn.Linear's (out, in); the query, key and value
projections are one fused c_attn; the output head is the token embedding (tied). gpt2_tensors below
lists every tensor, one line each.

Hugging Face's Llama stores every weight as nn.Linear does, so llama_tensors copies each as it is. The
file is llama3.py when the RoPE is Llama 3's (Llama 3.1's frequency scaling, or Llama 3's base theta
500,000), llama2.py otherwise. A Llama brings its own tokenizer: the folder's tokenizer.json, read with
transformers' AutoTokenizer; a converted checkpoint keeps a copy of it in out_dir/tokenizer.

Memory: the model is built on the meta device (shapes only) and given the file's tensors themselves
with load_state_dict(assign=True). A safetensors file is memory-mapped, as transformers does, so
nothing is copied: our (out, in) weights are transposed views of HF's (in, out) memory, which
nn.Linear multiplies by as fast, and the pages are read from disk when first used. Only a change of
dtype or device makes copies, one tensor at a time. Loading never holds two copies of the weights.
The checkpoint written keeps the dtype the weights are stored in (GPT-2's float32, Llama 3's bfloat16)
unless dtype= says otherwise.

Exporting (to=hf) walks the same tables backwards (to_hf beside to_ours): our tensors, concatenated for
c_attn and transposed for Conv1D, under the *ForCausalLM's names, a tied lm_head left out, into
model.safetensors; config.json from transformers' GPT2Config or LlamaConfig (gpt2_hf_config and
llama_hf_config read their config functions backwards), generation_config.json, and the tokenizer's
files: a Llama's folder as it is, GPT-2's built from data/gpt2.tiktoken. The folder loads with
AutoModelForCausalLM and AutoTokenizer, and with load() again, to the same tensors.

This file imports the three model files and common.py (command line, tokenizers, checkpoint files);
sample.py and train.py import it to take a hub id or folder as init_from=. huggingface_hub is imported
only when something is downloaded, transformers only when something is exported.
"""
import dataclasses
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
from safetensors import safe_open

import gpt2
import llama2
import llama3
from common import (HERE, UserError, apply_overrides, check_model_config, import_model, is_checkpoint,
                    load_tokenizer, parse_args, pick_dtype, print_help, read_checkpoint, run, save_checkpoint)

GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # hub ids that have no owner/ part
AS_IS, CONV1D = "as is", "Conv1D"  # how HF stores one of our tensors: unchanged, or transposed


# ----------------------------------------------------------------------------- GPT-2

def gpt2_config(hf, folder):
    """gpt2.py's Config from config.json (hf, a dict); missing keys take GPT2Config's defaults, as in
    transformers. Variants gpt2.py does not implement are refused."""
    d_model = hf.get("n_embd", 768)
    implemented = {  # config.json keys that have variants -> the values gpt2.py implements
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # GELU, tanh approximation
        "n_inner": (None, 4 * d_model),  # the MLP is 4 x d_model wide
        "scale_attn_weights": (True,),  # scores / sqrt(d_head)
        "scale_attn_by_inverse_layer_idx": (False,),
        "add_cross_attention": (False,),
    }
    unsupported = [f"{key}={hf[key]}" for key, ok in implemented.items() if key in hf and hf[key] not in ok]
    if unsupported:
        raise UserError(f"{folder}/config.json sets {', '.join(unsupported)}, which gpt2.py does not "
                        f"implement: only GPT-2's own architecture can be loaded")
    cfg = gpt2.Config(
        vocab_size=hf.get("vocab_size", 50257),
        context_length=hf.get("n_positions", 1024),
        d_model=d_model,
        n_layers=hf.get("n_layer", 12),
        n_heads=hf.get("n_head", 12),
        dropout=hf.get("resid_pdrop", 0.1),  # HF has three rates (embd, attn, resid), all 0.1 in GPT-2
        qkv_bias=True,
        tie_weights=hf.get("tie_word_embeddings", True),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )
    if cfg.d_model % cfg.n_heads:
        raise UserError(f"{folder}/config.json: n_embd={cfg.d_model} is not a multiple of n_head={cfg.n_heads}")
    return "gpt2", "gpt2", cfg  # architecture file, tokenizer, config


def gpt2_hf_config(cfg, **shared):
    """transformers' GPT2Config for gpt2.py's Config: gpt2_config read backwards. shared: the keys every
    family's config.json has (architectures, dtype, bos_token_id, eos_token_id)."""
    from transformers import GPT2Config  # here, not at the top: importing transformers takes seconds
    return GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_weights,
        **shared)


def gpt2_tensors(cfg):
    """Each tensor of an HF GPT-2 checkpoint -> (how it is stored, the tensors of ours it holds).

    c_attn holds our wq, wk and wv side by side; names are GPT2Model's (GPT2LMHeadModel adds
    'transformer.'). An untied lm_head is stored as is; a tied one is not needed.
    """
    tensors = {
        "wte.weight": (AS_IS, "token_embedding.weight"),
        "wpe.weight": (AS_IS, "position_embedding.weight"),
    }
    for i in range(cfg.n_layers):
        h, b = f"h.{i}", f"blocks.{i}"
        tensors |= {
            f"{h}.ln_1.weight":        (AS_IS, f"{b}.attn_norm.weight"),
            f"{h}.ln_1.bias":          (AS_IS, f"{b}.attn_norm.bias"),
            f"{h}.attn.c_attn.weight": (CONV1D, f"{b}.attn.wq.weight", f"{b}.attn.wk.weight",
                                        f"{b}.attn.wv.weight"),
            f"{h}.attn.c_attn.bias":   (AS_IS, f"{b}.attn.wq.bias", f"{b}.attn.wk.bias", f"{b}.attn.wv.bias"),
            f"{h}.attn.c_proj.weight": (CONV1D, f"{b}.attn.wo.weight"),
            f"{h}.attn.c_proj.bias":   (AS_IS, f"{b}.attn.wo.bias"),
            f"{h}.ln_2.weight":        (AS_IS, f"{b}.mlp_norm.weight"),
            f"{h}.ln_2.bias":          (AS_IS, f"{b}.mlp_norm.bias"),
            f"{h}.mlp.c_fc.weight":    (CONV1D, f"{b}.mlp.up.weight"),
            f"{h}.mlp.c_fc.bias":      (AS_IS, f"{b}.mlp.up.bias"),
            f"{h}.mlp.c_proj.weight":  (CONV1D, f"{b}.mlp.down.weight"),
            f"{h}.mlp.c_proj.bias":    (AS_IS, f"{b}.mlp.down.bias"),
        }
    tensors["ln_f.weight"] = (AS_IS, "final_norm.weight")
    tensors["ln_f.bias"] = (AS_IS, "final_norm.bias")
    if not cfg.tie_weights:
        tensors["lm_head.weight"] = (AS_IS, "lm_head.weight")
    return tensors


# ----------------------------------------------------------------------------- Llama 2, 3, 3.1, 3.2

LLAMA3_ROPE = {  # Llama 3.1's RoPE scaling in config.json -> llama3.py's Config
    "factor": "rope_factor",
    "low_freq_factor": "rope_low_freq_factor",
    "high_freq_factor": "rope_high_freq_factor",
    "original_max_position_embeddings": "rope_original_context",
}


def llama_config(hf, folder):
    """llama2.py's or llama3.py's Config from config.json (hf, a dict); missing keys take LlamaConfig's
    defaults, as in transformers. Variants neither file implements are refused.

    The file is llama3.py when the RoPE is Llama 3's: Llama 3.1's frequency scaling (rope_type llama3,
    also in 3.2), which only llama3.py implements, or Llama 3's base theta of 500,000. Anything else is
    llama2.py, which has grouped-query attention and a tied head too (Llama 2 70B, other Llamas).
    """
    # transformers 5 writes rope_parameters, theta included; older files rope_theta and rope_scaling
    # (null, or a dict with a rope_type; "type" in the oldest)
    rope = {"rope_theta": hf.get("rope_theta", 10000.0), **(hf.get("rope_scaling") or {}),
            **(hf.get("rope_parameters") or {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    d_model, n_heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    implemented = {  # config.json's settings that have variants -> the values our Llama files implement
        "hidden_act": ("silu",),  # the SwiGLU gate
        "attention_bias": (False,),
        "mlp_bias": (False,),
        "head_dim": (None, d_model // n_heads),  # d_head = d_model / n_heads
        "rope_type": ("default", "llama3"),  # plain RoPE, or Llama 3.1's scaling
    }
    settings = {**hf, "rope_type": rope_type}
    unsupported = [f"{key}={settings[key]}" for key, ok in implemented.items()
                   if key in settings and settings[key] not in ok]
    if unsupported:
        raise UserError(f"{folder}/config.json sets {', '.join(unsupported)}, which llama2.py and llama3.py "
                        f"do not implement: only Llama 2, 3, 3.1 and 3.2's architecture can be loaded")
    n_kv_heads = hf.get("num_key_value_heads") or n_heads  # absent or null in older files: no GQA
    if d_model % n_heads or n_heads % n_kv_heads:
        raise UserError(f"{folder}/config.json: num_attention_heads={n_heads} must divide hidden_size="
                        f"{d_model} and be a multiple of num_key_value_heads={n_kv_heads}")
    fields = dict(
        vocab_size=hf.get("vocab_size", 32000),
        context_length=hf.get("max_position_embeddings", 2048),
        d_model=d_model,
        n_layers=hf.get("num_hidden_layers", 32),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        d_ff=hf.get("intermediate_size", 11008),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope["rope_theta"],
        tie_weights=hf.get("tie_word_embeddings", False),
        weight_dtype=hf.get("dtype") or hf.get("torch_dtype") or "float32",  # load() records the weights' own
    )
    if rope_type == "llama3":
        missing = [key for key in LLAMA3_ROPE if key not in rope]
        if missing:
            raise UserError(f"{folder}/config.json's llama3 RoPE scaling lacks {', '.join(missing)}: "
                            f"copy the model's own config.json")
        fields |= {ours: rope[theirs] for theirs, ours in LLAMA3_ROPE.items()}
    arch = llama3 if rope_type == "llama3" or rope["rope_theta"] == 500000.0 else llama2
    return arch.__name__, folder, arch.Config(**fields)  # architecture file, tokenizer (the folder's), config


def llama_hf_config(cfg, **shared):
    """transformers' LlamaConfig for llama2.py's or llama3.py's Config: llama_config read backwards
    (transformers 5's rope_parameters; Llama 3.1's scaling when rope_factor is set). shared: as in
    gpt2_hf_config."""
    from transformers import LlamaConfig
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if getattr(cfg, "rope_factor", None) is not None:  # only llama3.py has the scaling
        rope |= {"rope_type": "llama3", **{theirs: getattr(cfg, ours) for theirs, ours in LLAMA3_ROPE.items()}}
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.context_length, rms_norm_eps=cfg.norm_eps, rope_parameters=rope,
        tie_word_embeddings=cfg.tie_weights, hidden_act="silu", attention_bias=False, mlp_bias=False, **shared)


def llama_tensors(cfg):
    """Each tensor of an HF Llama checkpoint -> (how it is stored, the tensor of ours it holds).

    HF stores every weight as nn.Linear (out, in) and nn.Embedding keep them; names are LlamaModel's
    (LlamaForCausalLM adds 'model.'). An untied lm_head is stored as is; a tied one is not needed. The
    rows of q_proj and k_proj were permuted when Meta's checkpoints were converted, so that RoPE pairs
    the two halves of each head, as rotate() in llama2.py and llama3.py does.
    """
    tensors = {"embed_tokens.weight": (AS_IS, "token_embedding.weight")}
    for i in range(cfg.n_layers):
        h, b = f"layers.{i}", f"blocks.{i}"
        tensors |= {
            f"{h}.input_layernorm.weight":          (AS_IS, f"{b}.attn_norm.weight"),
            f"{h}.self_attn.q_proj.weight":         (AS_IS, f"{b}.attn.wq.weight"),
            f"{h}.self_attn.k_proj.weight":         (AS_IS, f"{b}.attn.wk.weight"),
            f"{h}.self_attn.v_proj.weight":         (AS_IS, f"{b}.attn.wv.weight"),
            f"{h}.self_attn.o_proj.weight":         (AS_IS, f"{b}.attn.wo.weight"),
            f"{h}.post_attention_layernorm.weight": (AS_IS, f"{b}.mlp_norm.weight"),
            f"{h}.mlp.gate_proj.weight":            (AS_IS, f"{b}.mlp.gate.weight"),
            f"{h}.mlp.up_proj.weight":              (AS_IS, f"{b}.mlp.up.weight"),
            f"{h}.mlp.down_proj.weight":            (AS_IS, f"{b}.mlp.down.weight"),
        }
    tensors["norm.weight"] = (AS_IS, "final_norm.weight")
    if not cfg.tie_weights:
        tensors["lm_head.weight"] = (AS_IS, "lm_head.weight")
    return tensors


# config.json's model_type -> (reads its config, writes it, lists its tensors, the prefix that the
# *ForCausalLM class puts before the names listed: removed where present, since older GPT-2 files lack
# it), and the *ForCausalLM class that an export names in config.json's architectures
FAMILIES = {"gpt2": (gpt2_config, gpt2_hf_config, gpt2_tensors, "transformer."),
            "llama": (llama_config, llama_hf_config, llama_tensors, "model.")}
HF_CLASS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
FAMILY = {"gpt2": "gpt2", "llama2": "llama", "llama3": "llama"}  # our architecture file -> its family


# ----------------------------------------------------------------------------- finding the files

def is_hub_id(source):
    return source in GPT2_SIZES or re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None


def hub_answers(repo_id):
    """Whether the hub answers one request for repo_id's config.json, made once, with a short timeout.
    Unanswered, huggingface_hub retries each file for 25 s before it gives up (and then uses the cache)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=5)
    except HfHubHTTPError:  # it answered, with an error that download then reports
        return True
    except Exception:  # no connection (the network's error, a timeout), or HF_HUB_OFFLINE=1
        return False
    return True


def download(repo_id, pass_folder="init_from=path/to/folder"):
    """The HF cache's folder for a hub model, after fetching config.json, the weights and (but for GPT-2,
    whose tokenizer is data/gpt2.tiktoken) the tokenizer into it. pass_folder: how the script that was
    run takes a folder instead, for the message when the hub is out of reach."""
    from huggingface_hub import hf_hub_download  # here: only a download needs it, and it is slow to import
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError)
    from huggingface_hub.utils import logging
    logging.set_verbosity_error()  # its warnings of failed requests would come before our one line
    print(f"fetching {repo_id} from the Hugging Face hub ...", file=sys.stderr, flush=True)
    cache_only = not hub_answers(repo_id)  # then the files come from the cache, or fail at once

    def fetch(name):
        return hf_hub_download(repo_id, name, local_files_only=cache_only)

    try:
        config = fetch("config.json")
        folder = os.path.dirname(config)
        if read_json(config).get("model_type") != "gpt2":
            # the tokenizer, its chat template (in tokenizer_config.json or a file of its own) and the
            # end tokens generation stops at (generation_config.json)
            for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                         "generation_config.json"):
                try:
                    fetch(name)
                except (RemoteEntryNotFoundError, LocalEntryNotFoundError):  # not there, or not cached:
                    pass  # sample.py says what is missing if it needs it
        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
            try:
                path = fetch(name)
            except RemoteEntryNotFoundError:  # the repository has no such file: try the next kind
                continue
            if name.endswith(".index.json"):  # sharded: fetch every shard
                for shard in sorted(set(read_json(path)["weight_map"].values())):
                    fetch(shard)
            return folder
    except LocalEntryNotFoundError:  # no connection (or HF_HUB_OFFLINE=1), and not in the cache
        raise UserError(f"cannot reach the Hugging Face hub for '{repo_id}' (offline?): download it "
                        f"elsewhere and pass the folder, {pass_folder}") from None
    except RepositoryNotFoundError:
        raise UserError(f"'{repo_id}' is neither a folder here nor a model on the Hugging Face hub (or it "
                        f"is gated: log in with hf auth login): check the name") from None
    except HfHubHTTPError as e:
        raise UserError(f"the Hugging Face hub refused '{repo_id}' ({type(e).__name__}): "
                        f"try again later, or download it elsewhere and pass the folder") from None
    raise UserError(f"the hub model '{repo_id}' has no model.safetensors or pytorch_model.bin to load")


def find_folder(source, pass_folder="init_from=path/to/folder"):
    """The local folder holding source's config.json and weights: source itself, or the HF cache's copy."""
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise UserError(f"no checkpoint at {source}: expected ckpt.pt (written by train.py) or, for Hugging "
                            f"Face weights, config.json and model.safetensors (written by save_pretrained)")
        return source
    if os.path.isfile(source):
        raise UserError(f"{source} is a file: pass the folder that holds it and config.json")
    if is_hub_id(source):
        return download(source, pass_folder)
    raise UserError(f"no checkpoint at {source}: train one with python train.py, or pass a folder written "
                    f"by save_pretrained or a hub id ({', '.join(GPT2_SIZES)})")


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}): it should be the JSON file save_pretrained writes") from None


def weight_files(folder):
    """The checkpoint's weight files: model.safetensors, its shards, or pytorch_model.bin."""
    index = os.path.join(folder, "model.safetensors.index.json")
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return [os.path.join(folder, name)]
    if os.path.isfile(index):
        shards = sorted(set(read_json(index)["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise UserError(f"{folder} lacks {missing[0]}, a shard its model.safetensors.index.json lists: "
                            f"copy the whole folder")
        return [os.path.join(folder, s) for s in shards]
    raise UserError(f"{folder} has config.json but no model.safetensors or pytorch_model.bin: save the "
                    f"model with save_pretrained, or copy its weight file beside config.json")


def read_tensors(path):
    """Every tensor in a weight file as (HF name, tensor), one at a time."""
    try:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:  # memory-mapped: each tensor is a view of the file
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:  # pytorch_model.bin: a pickle, read whole (and never run: weights_only)
            state = torch.load(path, map_location="cpu", weights_only=True)
            while state:
                yield state.popitem()  # dropped here, so that a change of dtype never holds two copies
    except Exception as e:  # truncated, or not a weight file at all
        raise UserError(f"cannot read {path} ({type(e).__name__}): download or save it again") from None


# ----------------------------------------------------------------------------- loading

def to_ours(hf_name, tensor, layout, shapes, path):
    """Our tensors (of the given shapes) from one HF tensor, after checking the shape HF stored."""
    rows = [shape[0] for shape in shapes]  # ours sit one after another along the output dimension
    expected = (sum(rows), *shapes[0][1:])
    if layout == CONV1D:
        expected = expected[::-1]  # Conv1D: (in, out)
    if tuple(tensor.shape) != expected:
        raise UserError(f"{hf_name} has shape {tuple(tensor.shape)} in {path}, but config.json's sizes make "
                        f"it {expected}: the weights and config.json do not belong together")
    if layout == CONV1D:
        tensor = tensor.t()  # nn.Linear's (out, in): a view of the same memory, not a copy
    return tensor.split(rows)


def to_hf(parts, layout, dtype=None):
    """One HF tensor from ours (parts), to_ours backwards: one after another along the output dimension,
    then transposed for Conv1D, contiguous as a safetensors file stores it. It is a copy only where the
    layout changes (Conv1D, c_attn's three parts) or dtype does (None: keep it)."""
    tensor = parts[0] if len(parts) == 1 else torch.cat(parts)  # (out, in)
    if layout == CONV1D:
        tensor = tensor.t()  # Conv1D's (in, out)
    return tensor.to(dtype or tensor.dtype).contiguous()


def skeleton(arch, cfg):
    """arch's model with its tensors on the meta device: shapes only, no memory.

    Its random initialisation would be thrown away, and on the meta device normal_ has no fast kernel:
    its first call imports torch._dynamo (about 1 s and 70 MB). So normal_ does nothing meanwhile.
    """
    normal_, nn.init.normal_ = nn.init.normal_, lambda tensor, *args, **kwargs: tensor
    try:
        with torch.device("meta"):
            return arch.Transformer(cfg)
    finally:
        nn.init.normal_ = normal_


def load(source, device="cpu", dtype=torch.float32, pass_folder="init_from=path/to/folder"):
    """The model in a Hugging Face folder or hub id, on device, and its description as train.py's
    checkpoints hold it (model_name, model_config, tokenizer). dtype=None keeps the stored dtype;
    pass_folder says, when the hub is out of reach, how to pass a folder instead."""
    folder = find_folder(source, pass_folder)
    hf = read_json(os.path.join(folder, "config.json"))
    if hf.get("model_type") not in FAMILIES:
        raise UserError(f"{folder} holds a '{hf.get('model_type')}' model (config.json's model_type): "
                        f"load_hf.py reads {', '.join(FAMILIES)}")
    read_config, _, list_tensors, prefix = FAMILIES[hf["model_type"]]
    model_name, tokenizer, cfg = read_config(hf, folder)
    try:
        check_model_config(cfg)
    except UserError as e:  # a value of ours, read from config.json's own names
        raise UserError(f"{folder}/config.json makes a model that cannot be built ({e}): copy the model's "
                        f"own config.json") from None
    model = skeleton(import_model(model_name), cfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}

    wanted, state = list_tensors(cfg), {}
    for path in weight_files(folder):
        for hf_name, tensor in read_tensors(path):
            name = hf_name.removeprefix(prefix)
            if name not in wanted:  # buffers older files keep (causal masks, RoPE angles), a tied lm_head
                continue
            layout, *ours = wanted.pop(name)
            for our_name, part in zip(ours, to_ours(name, tensor, layout, [shapes[n] for n in ours], path)):
                state[our_name] = part.to(device, dtype)  # the same tensor if both already match
    if wanted:
        raise UserError(f"{folder} has no tensor {next(iter(wanted))}"
                        f"{f' (nor {len(wanted) - 1} more)' if len(wanted) > 1 else ''}, which a "
                        f"{model_name} of this config.json needs: copy the complete checkpoint")
    if cfg.tie_weights:  # one Parameter under both names: assign=True then keeps the head tied
        state["lm_head.weight"] = state["token_embedding.weight"] = nn.Parameter(state["token_embedding.weight"])
    model.load_state_dict(state, assign=True)
    if hasattr(cfg, "weight_dtype"):  # llama2.py's and llama3.py's Config say which dtype the weights are in
        cfg.weight_dtype = str(state["token_embedding.weight"].dtype).removeprefix("torch.")
    return model, {"model_name": model_name, "model_config": dataclasses.asdict(cfg), "tokenizer": tokenizer,
                   "source": source}


# ----------------------------------------------------------------------------- exporting (to=hf)

def read_ours(source):
    """A checkpoint of this project, to export: (model_name, its Config, its tensors, its tokenizer).
    Its tensors stay memory-mapped (read_checkpoint); their shapes are checked against the Config's."""
    if not is_checkpoint(source):
        raise UserError(f"{source} is not a checkpoint of this project: to=hf exports a ckpt.pt written by "
                        f"train.py or load_hf.py, or the out_dir holding one")
    ckpt = read_checkpoint(source)
    state, model_name = ckpt["model"], ckpt["model_name"]
    if model_name not in FAMILY:
        raise UserError(f"{source} holds a '{model_name}' model, which this version does not have: "
                        f"export it with the version of this project that wrote it")
    try:
        arch = import_model(model_name)
        cfg = arch.Config(**ckpt["model_config"])
        wrong = [name for name, t in skeleton(arch, cfg).state_dict().items()
                 if name not in state or state[name].shape != t.shape]
    except Exception as e:  # a model_config this version does not know
        raise UserError(f"{source} is not a checkpoint this project can export ({type(e).__name__}): "
                        f"retrain it with python train.py") from None
    if wrong:
        raise UserError(f"{source} lacks {wrong[0]} or has it in another shape than its model_config makes "
                        f"it: retrain it with python train.py")
    return model_name, cfg, state, ckpt["tokenizer"]


def our_tensor(state, name):
    """Our tensor name from a checkpoint's state; a bias the model was built without (GPT-2 with
    qkv_bias=False, as the book trains it) is zeros, which computes the same."""
    if name not in state and name.endswith(".bias"):
        weight = state[name.removesuffix("bias") + "weight"]
        return torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return state[name]


def hf_tensors(model_name, cfg, state, dtype):
    """The *ForCausalLM's tensors from our state: the table that load() reads, walked backwards. A tied
    lm_head is left out, as save_pretrained leaves it: transformers ties it from tie_word_embeddings."""
    _, _, list_tensors, prefix = FAMILIES[FAMILY[model_name]]
    tensors = {}
    for hf_name, (layout, *ours) in list_tensors(cfg).items():
        name = hf_name if hf_name == "lm_head.weight" else prefix + hf_name
        tensors[name] = to_hf([our_tensor(state, n) for n in ours], layout, dtype)
    return tensors


def hf_tokenizer(name, context_length):
    """A checkpoint's tokenizer as a transformers tokenizer: a Llama's folder as it is, or GPT-2's,
    built from data/gpt2.tiktoken (no download): transformers turns tiktoken's ranks into a byte-level
    BPE's vocabulary and merges; the text is split before them by GPT-2's own pattern, as GPT-2's
    tokenizer.json does it; <|endoftext|> is its start, end and unknown token."""
    if name != "gpt2":
        return load_tokenizer(name).hf
    from tokenizers import pre_tokenizers
    from transformers import GPT2TokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    end = "<|endoftext|>"
    bpe = TikTokenConverter(os.path.join(HERE, "data", "gpt2.tiktoken"), extra_special_tokens=[end]).converted()
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's pattern is built in
    return GPT2TokenizerFast(tokenizer_object=bpe, bos_token=end, eos_token=end, unk_token=end,
                             model_max_length=context_length)


def add_older_keys(path):
    """config.json as transformers 4.x, and the tools that read its layout, read it too: rope_theta and
    rope_scaling beside transformers 5's rope_parameters (a Llama 3.1 RoPE read as plain RoPE would be
    wrong without a word), torch_dtype beside dtype. transformers 5 reads both."""
    hf = read_json(path)
    rope = hf.get("rope_parameters")
    if rope:
        scaling = {key: value for key, value in rope.items() if key != "rope_theta"}
        hf |= {"rope_theta": rope["rope_theta"], "rope_scaling": None if rope["rope_type"] == "default" else scaling}
    hf["torch_dtype"] = hf["dtype"]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2, sort_keys=True)


def export(source, out_dir, dtype=None):
    """Write the checkpoint source into out_dir as a Hugging Face folder: config.json, model.safetensors,
    generation_config.json and the tokenizer's files. dtype=None keeps the stored dtype. Returns
    (the *ForCausalLM class, its parameter count, the dtype).

    Memory: the checkpoint is memory-mapped and its tensors written where they lie; only Conv1D's
    transposes, c_attn's concatenation and a change of dtype are copies, held until the file is written:
    at most one copy of the weights beside the checkpoint's. The tokenizer goes first, and is dropped
    before the weights are read.
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig
    model_name, cfg, state, tokenizer_name = read_ours(source)
    tokenizer = hf_tokenizer(tokenizer_name, cfg.context_length)  # first: a Llama's may be missing
    family, ids = FAMILY[model_name], dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    weight_dtype = str(dtype or state["token_embedding.weight"].dtype).removeprefix("torch.")
    config = FAMILIES[family][1](cfg, architectures=[HF_CLASS[family]], dtype=weight_dtype, **ids)
    generation = os.path.join(tokenizer_name, "generation_config.json")  # a Llama folder's end tokens
    try:
        os.makedirs(out_dir, exist_ok=True)
        config.save_pretrained(out_dir)
        add_older_keys(os.path.join(out_dir, "config.json"))
        if tokenizer_name != "gpt2" and os.path.isfile(generation):
            shutil.copy(generation, out_dir)
        else:
            GenerationConfig(**ids).save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        del tokenizer  # GPT-2's, converted, takes some 85 MiB
        tensors = hf_tensors(model_name, cfg, state, dtype)
        n_params = sum(t.numel() for t in tensors.values())
        weights = os.path.join(out_dir, "model.safetensors")
        save_file(tensors, weights + ".tmp", metadata={"format": "pt"})  # as save_pretrained marks it
        os.replace(weights + ".tmp", weights)  # never a half-written model.safetensors
    except OSError as e:
        raise UserError(f"cannot write {out_dir} ({e.strerror}): pass another out_dir=") from None
    return HF_CLASS[family], n_params, weight_dtype


# ----------------------------------------------------------------------------- command line

@dataclass
class ConvertConfig:
    to: str = "ours"             # ours = Hugging Face weights into a checkpoint of this project;
                                 #   hf = a checkpoint of this project into a Hugging Face folder
    out_dir: str = ""            # where it goes; "" = out-<name> (e.g. out-gpt2), or with to=hf the
                                 #   checkpoint's folder and -hf (out -> out-hf)
    dtype: str = "checkpoint"    # checkpoint = as stored (GPT-2: float32, Llama: bfloat16), or float32, ...


def main(argv):
    usage = "load_hf.py SOURCE"
    sources = [a for a in argv if "=" not in a and not a.startswith("-")]
    _, pairs, want_help = parse_args([a for a in argv if a not in sources], usage)
    cfg = ConvertConfig()
    apply_overrides(pairs, [cfg], usage)
    if want_help or not sources:
        print_help(__doc__, [("keys", cfg)])
        if not want_help:
            raise UserError("say what to load: python load_hf.py gpt2 (or gpt2-medium, ..., or a folder such "
                            "as a Llama's), or what to export: python load_hf.py out to=hf")
        return
    if len(sources) > 1:
        raise UserError(f"one source at a time, not {' and '.join(sources)}")
    if cfg.to not in ("ours", "hf"):
        raise UserError(f"to={cfg.to}: use to=ours (Hugging Face weights into a checkpoint of this project, "
                        f"the default) or to=hf (a checkpoint of this project into a Hugging Face folder)")
    dtype = pick_dtype(cfg.dtype, None)  # checkpoint = as stored (None)
    (to_hf_folder if cfg.to == "hf" else to_checkpoint)(sources[0], cfg.out_dir, dtype)


def to_checkpoint(source, out_dir, dtype):
    """python load_hf.py SOURCE: Hugging Face weights into out_dir/ckpt.pt."""
    model, ckpt = load(source, "cpu", dtype, pass_folder="python load_hf.py path/to/folder")
    tokenizer = load_tokenizer(ckpt["tokenizer"])  # a Llama's own must be there: sample.py will need it
    out_dir = out_dir or "out-" + os.path.basename(os.path.normpath(source))
    path = os.path.join(out_dir, "ckpt.pt")
    try:
        os.makedirs(out_dir, exist_ok=True)
        ckpt["tokenizer"] = tokenizer.save(out_dir)  # a Llama's: copied, so that out_dir stands alone
        save_checkpoint({**ckpt, "model": model.state_dict(), "train_config": {}}, path)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}): pass another out_dir=")
    n_params = import_model(ckpt["model_name"]).count_parameters(model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"{source}: {n_params:,} parameters ({ckpt['model_name']}, {dtype}), saved as {path}")
    print(f"try: python sample.py init_from={out_dir}")


def to_hf_folder(source, out_dir, dtype):
    """python load_hf.py SOURCE to=hf: a checkpoint of this project into the Hugging Face folder out_dir,
    then what to do with it."""
    folder = source if os.path.isdir(source) else os.path.dirname(source) or "."
    out_dir = out_dir or os.path.abspath(folder) + "-hf"
    hf_class, n_params, dtype = export(source, out_dir, dtype)
    print(f"{source}: {n_params:,} parameters ({hf_class}, {dtype}), written to {out_dir}: "
          f"{', '.join(sorted(os.listdir(out_dir)))}")
    print(f"try: python sample.py init_from={out_dir}\n"
          f"  or in Python: AutoModelForCausalLM.from_pretrained({out_dir!r}) and AutoTokenizer.from_pretrained(...)\n"
          f"  share it on the Hugging Face hub: hf upload your-name/your-model {out_dir}\n"
          f"  llama.cpp (GGUF): python convert_hf_to_gguf.py {out_dir} --outfile model.gguf")


if __name__ == "__main__":
    run(main, "load_hf.py")
