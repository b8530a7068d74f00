"""Load published weights from Hugging Face into our models, one tensor at a time: GPT-2 into gpt2.py,
Llama 2, 3, 3.1 and 3.2 into llama2.py or llama3.py.

    python load_hf.py gpt2                       # downloaded once into the HF cache, written to out-gpt2/ckpt.pt
    python load_hf.py path/to/Llama-3.2-1B       # a folder: config.json, *.safetensors, tokenizer.json
    python load_hf.py path/to/folder out_dir=out-mine dtype=float32
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

This file imports the three model files and common.py (command line, tokenizers, checkpoint files);
sample.py and train.py import it to take a hub id or folder as init_from=. huggingface_hub is imported
only when something is downloaded.
"""
import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
from safetensors import safe_open

import gpt2
import llama2
import llama3
from common import (UserError, apply_overrides, check_model_config, import_model, load_tokenizer, parse_args,
                    pick_dtype, print_help, run, save_checkpoint)

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


# config.json's model_type -> (reads its config, lists its tensors, the prefix that the *ForCausalLM
# class puts before the names listed: removed where present, since older GPT-2 files lack it)
FAMILIES = {"gpt2": (gpt2_config, gpt2_tensors, "transformer."),
            "llama": (llama_config, llama_tensors, "model.")}


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
            for name in ("tokenizer.json", "tokenizer_config.json"):
                try:
                    fetch(name)
                except RemoteEntryNotFoundError:  # sample.py will say what is missing
                    pass
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
    read_config, list_tensors, prefix = FAMILIES[hf["model_type"]]
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


# ----------------------------------------------------------------------------- command line

@dataclass
class ConvertConfig:
    out_dir: str = ""            # where ckpt.pt goes; "" = out-<name>, e.g. out-gpt2
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
                            "as a Llama's)")
        return
    if len(sources) > 1:
        raise UserError(f"one source at a time, not {' and '.join(sources)}")
    dtype = pick_dtype(cfg.dtype, None)  # checkpoint = as stored (None)
    source = sources[0]
    model, ckpt = load(source, "cpu", dtype, pass_folder="python load_hf.py path/to/folder")
    tokenizer = load_tokenizer(ckpt["tokenizer"])  # a Llama's own must be there: sample.py will need it
    out_dir = cfg.out_dir or "out-" + os.path.basename(os.path.normpath(source))
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


if __name__ == "__main__":
    run(main, "load_hf.py")
