"""Train a model from scratch on a text file: The Verdict, a short story, unless you pass another.

    python train.py                              # GPT-2 'verdict' preset, 10 epochs on The Verdict
    python train.py --model gpt2 config=tiny epochs=2 data=my.txt
    python train.py init_from=gpt2 seq_len=256   # continue training GPT-2's published weights
    python train.py --help                       # every key, with its type and default

Any key of TrainConfig below, or of the model's Config, can be set as key=value (or --key=value).
This file also holds what sample.py shares with it: the command line, the tokenizer, checkpoints
and generation.
"""
import dataclasses
import difflib
import importlib
import math
import os
import sys
import time
import types
import urllib.request
from contextlib import nullcontext
from dataclasses import dataclass

import tiktoken
import torch
import torch.nn.functional as F
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {"gpt2": "verdict", "llama2": "toy", "llama3": "toy"}  # architecture file -> default preset
VERDICT = "data/the-verdict.txt"
VERDICT_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/"
               "01_main-chapter-code/the-verdict.txt")


@dataclass
class TrainConfig:
    data: str = VERDICT          # UTF-8 text file to train on
    config: str = ""             # model preset (gpt2: verdict, tiny, gpt2, ...); "" = the model's default
    init_from: str = "scratch"   # or pretrained weights: gpt2 ... gpt2-xl, a Hugging Face folder, a checkpoint
    out_dir: str = "out"         # where ckpt.pt and loss.png go
    epochs: int = 10
    batch_size: int = 2
    seq_len: int | None = None   # tokens per training window; None = context_length
    stride: int | None = None    # step between training windows; None = seq_len (no overlap)
    lr: float = 5e-4             # peak learning rate, reached after warmup_steps
    min_lr: float = 1e-5         # cosine decay ends here
    warmup_steps: int = 10       # linear warmup from 0
    weight_decay: float = 0.1    # AdamW, on weight matrices and embeddings only
    grad_clip: float = 1.0       # max gradient norm; 0 = off
    eval_iters: int = 5          # batches used to estimate train and validation loss each epoch
    prompt: str = "Every effort moves you"  # continued greedily after each epoch
    seed: int = 123
    device: str = "auto"         # auto = cuda, then mps, then cpu
    dtype: str = "auto"          # float32, bfloat16 or float16 (autocast); auto = bfloat16 where fast


class UserError(Exception):
    """A mistake in the command line or an input file: reported in one line, exit status 2."""


# ----------------------------------------------------------------------------- command line

def parse_value(key, text, typ):
    """Turn the command-line text of key=text into the field's type (int, float, bool, str, X | None)."""
    if isinstance(typ, types.UnionType):  # X | None
        if text.lower() == "none":
            return None
        typ = next(t for t in typ.__args__ if t is not type(None))
    if typ is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise UserError(f"{key}={text}: expected true or false")
    try:
        return typ(text)
    except ValueError:
        raise UserError(f"{key}={text}: expected {'a number' if typ is float else 'a whole number' if typ is int else 'text'},"
                        f" e.g. {key}={1.0 if typ is float else 1}") from None


def parse_args(argv, usage):
    """Split argv into (model name, {key: text}); --help prints the keys and exits."""
    model_name, pairs, want_help = None, {}, False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            want_help = True
            continue
        if arg == "--model":
            if not args:
                raise UserError(f"--model needs a name: one of {', '.join(MODELS)}")
            arg = "model=" + args.pop(0)
        key, sep, text = arg.removeprefix("--").partition("=")
        if not sep:
            raise UserError(f"'{arg}' is not key=value; run python {usage} --help for the keys")
        if key == "model":
            model_name = text
        else:
            pairs[key] = text
    if model_name is not None and model_name not in MODELS:
        raise UserError(f"unknown model '{model_name}': choose one of {', '.join(MODELS)}")
    return model_name, pairs, want_help


def apply_overrides(pairs, targets, usage):
    """Set each key=text on whichever dataclass instance in targets has that field."""
    for key, text in pairs.items():
        target = next((t for t in targets if key in {f.name for f in dataclasses.fields(t)}), None)
        if target is None:
            known = sorted(f.name for t in targets for f in dataclasses.fields(t))
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean '{near[0]}'? " if near else ""
            raise UserError(f"unknown key '{key}': {hint}valid keys are {', '.join(known)}"
                            f" (python {usage} --help shows their types)")
        field = next(f for f in dataclasses.fields(target) if f.name == key)
        setattr(target, key, parse_value(key, text, field.type))


def print_help(doc, sections):
    print(doc.strip().split("\n\n")[1] if "\n\n" in doc else doc)
    for title, obj in sections:
        print(f"\n{title}:")
        for f in dataclasses.fields(obj):
            typ = str(f.type).replace("<class '", "").replace("'>", "")
            print(f"  {f.name:16s} {typ:12s} {getattr(obj, f.name)!r}")


def import_model(name):
    return importlib.import_module(name)  # gpt2.py, llama2.py, ...: each defines Config, PRESETS, Transformer


def model_config(arch, preset):
    if preset not in arch.PRESETS:
        raise UserError(f"unknown config '{preset}' for {arch.__name__}: choose one of "
                        f"{', '.join(arch.PRESETS)}")
    return arch.Config(**arch.PRESETS[preset])


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name} is not a device: use auto, cpu, cuda, cuda:1 or mps") from None
    if (device.type == "cuda" and not torch.cuda.is_available()) or (
            device.type == "mps" and not torch.backends.mps.is_available()):
        raise UserError(f"device={name} is not available on this machine: use device=cpu or auto")
    return device


def pick_dtype(name, device):
    if name == "auto":  # bf16 where the hardware runs it fast: recent GPUs, and CPUs with AVX-512 BF16/AMX
        fast_bf16 = (torch.cuda.is_bf16_supported() if device.type == "cuda"
                     else device.type == "cpu" and torch.cpu._is_avx512_bf16_supported())
        return torch.bfloat16 if fast_bf16 else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise UserError(f"dtype={name} is not supported: use auto, {', '.join(dtypes)}")
    return dtypes[name]


# ----------------------------------------------------------------------------- tokenizer and data

class Tokenizer:
    """GPT-2's byte-pair encoding, built from data/gpt2.tiktoken so that it works offline."""

    name = "gpt2"

    def __init__(self):
        ranks = load_tiktoken_bpe(os.path.join(HERE, "data", "gpt2.tiktoken"))
        self.enc = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                     special_tokens={"<|endoftext|>": 50256})
        self.eot_id = 50256
        self.vocab_size = self.enc.n_vocab  # 50257

    def encode(self, text):
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids):
        return self.enc.decode(ids)

    def save(self, out_dir):
        """What a checkpoint in out_dir records to find this tokenizer again: here, nothing to copy."""
        return "gpt2"


class HFTokenizer:
    """A Hugging Face tokenizer folder (tokenizer.json, which Llama checkpoints bring), read with
    transformers' AutoTokenizer from local files only, behind the same interface as Tokenizer."""

    def __init__(self, folder):
        if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
            raise UserError(f"{folder} has no tokenizer.json: copy the model's tokenizer files "
                            f"(tokenizer.json, tokenizer_config.json) beside its config.json")
        from transformers import AutoTokenizer  # here, not at the top: importing it takes seconds
        try:
            self.hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as e:  # a truncated or foreign file
            raise UserError(f"cannot read the tokenizer in {folder} ({type(e).__name__}): copy the model's "
                            f"tokenizer files again") from None
        self.name = folder
        self.eot_id = self.hf.eos_token_id  # Llama 3: <|end_of_text|>, Llama 2: </s>
        self.vocab_size = len(self.hf)  # special tokens included

    def encode(self, text):
        return self.hf.encode(text)  # with the start token (<s>, <|begin_of_text|>) the model expects

    def decode(self, ids):
        return self.hf.decode(ids, skip_special_tokens=True)

    def save(self, out_dir):
        """A copy in out_dir/tokenizer, so that the checkpoint there stands alone; it records the folder."""
        self.hf.save_pretrained(os.path.join(out_dir, "tokenizer"))
        return "tokenizer"  # relative to the checkpoint's folder, see load_checkpoint


def load_tokenizer(name):
    """GPT-2's tokenizer ("gpt2"), or the Hugging Face tokenizer in the folder name (a Llama's)."""
    return Tokenizer() if name == "gpt2" else HFTokenizer(name)


def read_text(path):
    """The training text; The Verdict is downloaded on first use, as in the book."""
    if path == VERDICT:  # the default lives beside this file, wherever it is run from
        path = os.path.join(HERE, VERDICT)
    if not os.path.exists(path) and path == os.path.join(HERE, VERDICT):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with urllib.request.urlopen(VERDICT_URL, timeout=15) as response:
                text = response.read()
            with open(path, "wb") as f:
                f.write(text)
        except OSError as e:
            raise UserError(f"could not download The Verdict ({e}): save {VERDICT_URL} as {path}, "
                            f"or train on another file with data=path/to/text.txt") from None
    if not os.path.isfile(path):
        raise UserError(f"data file {path} not found: pass data=path/to/text.txt")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: convert it (iconv -t utf-8) or pass another data=")
    if not text.strip():
        raise UserError(f"{path} is empty: pass a file with text in it as data=")
    return text


def make_windows(ids, context_length, stride, what):
    """Sliding windows over the token ids: inputs (n, t) and the targets one token later (n, t)."""
    ids = torch.tensor(ids, dtype=torch.long)
    if len(ids) <= context_length:
        raise UserError(f"the {what} has {len(ids)} tokens, fewer than one window of context_length + 1 = "
                        f"{context_length + 1}: use a longer text or a smaller seq_len= or context_length=")
    windows = ids.unfold(0, context_length + 1, stride)  # (n, t + 1)
    return windows[:, :-1], windows[:, 1:]


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(checkpoint, path):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, device, dtype=torch.float32):
    """Rebuild the model saved by train.py from a checkpoint file or the out_dir holding ckpt.pt; or
    load GPT-2 from a Hugging Face folder or hub id, in dtype (None: as stored) through load_hf.py."""
    if not os.path.isfile(path) and not os.path.isfile(os.path.join(path, "ckpt.pt")):
        import load_hf  # here, not at the top: load_hf.py imports this file
        return load_hf.load(path, device, dtype)  # it also says when path is nothing loadable
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        arch = import_model(ckpt["model_name"])
        model = arch.Transformer(arch.Config(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except Exception as e:  # truncated file, not a checkpoint, or weights of another shape
        raise UserError(f"{path} is not a checkpoint this project can load ({type(e).__name__}): "
                        f"retrain it with python train.py or pass another init_from=") from None
    if ckpt["tokenizer"] != "gpt2":  # a tokenizer folder beside ckpt.pt (HFTokenizer.save)
        ckpt["tokenizer"] = os.path.join(os.path.dirname(path), ckpt["tokenizer"])
    return model.to(device), ckpt


# ----------------------------------------------------------------------------- generation

def sample_next(logits, temperature, top_k, top_p):
    """Pick the next token id of each row from its logits (b, vocab): greedy at temperature 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:  # keep the k most likely tokens
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]  # (b, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:  # nucleus: the smallest set of tokens whose probability adds up to top_p
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # the top token always stays
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, num_samples=1).squeeze(-1)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=0.0, top_k=None, top_p=1.0, eot_id=None,
             use_cache=True):
    """Extend idx (b, t), yielding the new token ids (b,) step by step.

    Rows that have produced eot_id keep repeating it; generation stops when all rows have. Past the
    context length the oldest tokens are dropped, as the book's crop does.
    """
    ctx = model.cfg.context_length
    if use_cache:
        model.setup_cache(idx.shape[0], min(ctx, idx.shape[1] + max_new_tokens))
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    cached = 0  # positions whose keys and values are in the cache
    for _ in range(max_new_tokens):
        if not use_cache:
            logits = model(idx[:, -ctx:], last_only=True)
        else:
            if idx.shape[1] > ctx:  # the window slid: every position moved, so refill the cache
                cached = 0
            start = max(0, idx.shape[1] - ctx)  # first token inside the window
            logits = model(idx[:, start + cached:], start_pos=cached, last_only=True)
            cached = idx.shape[1] - start
        next_id = sample_next(logits[:, -1], temperature, top_k, top_p)  # (b,)
        if eot_id is not None:
            next_id = next_id.masked_fill(done, eot_id)
            done |= next_id == eot_id
        idx = torch.cat([idx, next_id[:, None]], dim=1)
        yield next_id
        if done.all():
            break


def complete(model, tokenizer, prompt, max_new_tokens, **kwargs):
    """The prompt and its continuation as text (the first row only)."""
    device = next(model.parameters()).device
    idx = torch.tensor([tokenizer.encode(prompt)], device=device)
    new = [int(t) for t in generate(model, idx, max_new_tokens, eot_id=tokenizer.eot_id, **kwargs)]
    if tokenizer.eot_id in new:
        new = new[:new.index(tokenizer.eot_id)]
    return tokenizer.decode(idx[0].tolist() + new)


# ----------------------------------------------------------------------------- training

def batches(x, y, batch_size, shuffle, generator=None):
    order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    for i in range(0, len(x) - batch_size + 1 if shuffle else len(x), batch_size):  # drop_last when shuffling
        j = order[i:i + batch_size]
        yield x[j], y[j]


def loss_fn(model, x, y):
    logits = model(x)  # (b, t, vocab)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


@torch.no_grad()
def estimate_loss(model, x, y, cfg, autocast, device):
    model.eval()
    losses = []
    n = cfg.eval_iters * cfg.batch_size
    for xb, yb in batches(x[:n], y[:n], cfg.batch_size, shuffle=False):
        with autocast:
            losses.append(loss_fn(model, xb.to(device), yb.to(device)).item())
    model.train()
    return sum(losses) / len(losses)


def lr_at(step, total_steps, cfg):
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def plot_losses(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["step_tokens"], history["step_loss"], alpha=0.3, label="train (each step)")
    ax.plot(history["tokens"], history["train"], "o-", label="train")
    ax.plot(history["tokens"], history["val"], "o-", label="validation")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


KEEPS_WEIGHTS = ("dropout", "flash")  # the model keys that may change when training pretrained weights


def pretrained_model(cfg, model_name, pairs, usage):
    """The model whose weights cfg.init_from holds, with pairs applied to cfg and to its config; keys
    that would change its architecture are refused, since the weights would no longer fit."""
    if cfg.config:
        raise UserError(f"config={cfg.config} picks a model to train from scratch, but init_from="
                        f"{cfg.init_from} brings its own: leave config out")
    loaded, ckpt = load_checkpoint(cfg.init_from, "cpu")
    if model_name not in (None, ckpt["model_name"]):
        raise UserError(f"--model {model_name} does not match init_from={cfg.init_from}, which holds a "
                        f"{ckpt['model_name']} model: leave --model out")
    model_cfg = dataclasses.replace(loaded.cfg)
    apply_overrides(pairs, [cfg, model_cfg], usage)
    changed = [f"{f.name}={getattr(model_cfg, f.name)}" for f in dataclasses.fields(model_cfg)
               if f.name not in KEEPS_WEIGHTS and getattr(model_cfg, f.name) != getattr(loaded.cfg, f.name)]
    if changed:
        raise UserError(f"{' '.join(changed)} would change the architecture of init_from={cfg.init_from}: "
                        f"leave it out (only {' and '.join(KEEPS_WEIGHTS)} may change; seq_len= sets "
                        f"shorter training windows)")
    with torch.device("meta"):  # rebuilt with the new dropout and flash, around the same weights
        model = import_model(ckpt["model_name"]).Transformer(model_cfg)
    model.load_state_dict(loaded.state_dict(keep_vars=True), assign=True)  # the same Parameters: still tied
    return model, ckpt["model_name"], ckpt["tokenizer"]


def main(argv):
    usage = "train.py"
    model_name, pairs, want_help = parse_args(argv, usage)
    cfg = TrainConfig()
    apply_overrides({k: v for k, v in pairs.items() if k in ("config", "init_from")}, [cfg], usage)
    if cfg.init_from == "scratch":
        model_name = model_name or "gpt2"
        model_cfg = model_config(import_model(model_name), cfg.config or MODELS[model_name])
        apply_overrides(pairs, [cfg, model_cfg], usage)
        tokenizer_name = "gpt2"
    else:
        pretrained, model_name, tokenizer_name = pretrained_model(cfg, model_name, pairs, usage)
        model_cfg = pretrained.cfg
    arch = import_model(model_name)
    what = (cfg.config or MODELS[model_name]) if cfg.init_from == "scratch" else f"init_from={cfg.init_from}"
    if want_help:
        print_help(__doc__, [("training keys", cfg), (f"model keys ({model_name}, {what})", model_cfg)])
        return
    if min(cfg.epochs, cfg.batch_size, cfg.eval_iters, cfg.stride or 1, cfg.seq_len or 1) < 1:
        raise UserError("epochs, batch_size, eval_iters, stride and seq_len must be at least 1")
    if (cfg.seq_len or 0) > model_cfg.context_length:
        raise UserError(f"seq_len={cfg.seq_len} is longer than the model's context_length="
                        f"{model_cfg.context_length}: use at most {model_cfg.context_length}")

    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, ".write-test"), "w"):
            pass
        os.remove(os.path.join(cfg.out_dir, ".write-test"))
    except OSError as e:
        raise UserError(f"cannot write to out_dir={cfg.out_dir} ({e.strerror}): pass another out_dir=")

    # data: the first 90% of the text trains, the last 10% validates
    tokenizer = load_tokenizer(tokenizer_name)  # pretrained weights keep theirs (a Llama's own)
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise UserError(f"vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size}: leave vocab_size at its default")
    text = read_text(cfg.data)
    split = int(0.9 * len(text))
    ctx = cfg.seq_len or model_cfg.context_length
    stride = cfg.stride or ctx
    train_x, train_y = make_windows(tokenizer.encode(text[:split]), ctx, stride, f"training part of {cfg.data}")
    val_x, val_y = make_windows(tokenizer.encode(text[split:]), ctx, stride,
                                f"validation part (last 10%) of {cfg.data}")
    if len(train_x) < cfg.batch_size:
        raise UserError(f"{cfg.data} gives {len(train_x)} training windows, fewer than batch_size="
                        f"{cfg.batch_size}: use a smaller batch_size or context_length, or a longer text")

    torch.manual_seed(cfg.seed)
    model = (arch.Transformer(model_cfg) if cfg.init_from == "scratch" else pretrained).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and embeddings, not biases or norms
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, fused=True)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    steps_per_epoch = len(train_x) // cfg.batch_size
    total_steps = cfg.epochs * steps_per_epoch
    print(f"{model_name} ({what}): {arch.count_parameters(model):,} parameters,"
          f" {len(train_x) * ctx:,} training tokens in {len(train_x)} windows, {total_steps} steps,"
          f" {device} {str(dtype).removeprefix('torch.')}")

    history = {"step_tokens": [], "step_loss": [], "tokens": [], "train": [], "val": []}
    generator = torch.Generator().manual_seed(cfg.seed)
    tokens_seen, step = 0, 0
    for epoch in range(1, cfg.epochs + 1):
        bar = tqdm(batches(train_x, train_y, cfg.batch_size, True, generator), total=steps_per_epoch,
                   desc=f"epoch {epoch}/{cfg.epochs}", leave=False, dynamic_ncols=True, disable=None)
        t0, epoch_tokens = time.perf_counter(), 0
        for xb, yb in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, cfg)
            with autocast:
                loss = loss_fn(model, xb.to(device), yb.to(device))
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += xb.numel()
            epoch_tokens += xb.numel()
            history["step_tokens"].append(tokens_seen)
            history["step_loss"].append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}",
                            tok_s=f"{epoch_tokens / (time.perf_counter() - t0):.0f}")
        bar.close()
        train_loss = estimate_loss(model, train_x, train_y, cfg, autocast, device)
        val_loss = estimate_loss(model, val_x, val_y, cfg, autocast, device)
        for key, value in (("tokens", tokens_seen), ("train", train_loss), ("val", val_loss)):
            history[key].append(value)
        model.eval()
        with autocast:
            sample = complete(model, tokenizer, cfg.prompt, 50)
        model.train()
        print(f"epoch {epoch:2d}  step {step:4d}  train loss {train_loss:.3f}  val loss {val_loss:.3f}"
              f"  {epoch_tokens / (time.perf_counter() - t0):.0f} tokens/s")
        print("  " + sample.replace("\n", " "))

    path = os.path.join(cfg.out_dir, "ckpt.pt")
    save_checkpoint({"model": model.state_dict(), "model_name": model_name,
                     "model_config": dataclasses.asdict(model_cfg), "train_config": dataclasses.asdict(cfg),
                     "tokenizer": tokenizer.save(cfg.out_dir), "history": history}, path)
    plot_losses(history, os.path.join(cfg.out_dir, "loss.png"))
    print(f"saved {path} and {os.path.join(cfg.out_dir, 'loss.png')}")


if __name__ == "__main__":
    sys.modules["train"] = sys.modules["__main__"]  # so that load_hf.py imports this module, not a copy
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("train.py: interrupted; nothing was saved", file=sys.stderr)
        sys.exit(130)
