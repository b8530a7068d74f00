"""Generate text with a model trained by train.py, or with GPT-2's published weights.

    python sample.py                                     # out/ckpt.pt, continuing "Every effort moves you"
    python sample.py prompt="I had always" temperature=0 # greedy
    python sample.py top_k=50 top_p=0.9 num_samples=3    # three samples, generated as one batch
    python sample.py init_from=gpt2-xl                   # GPT-2's published weights (see load_hf.py)
    python sample.py init_from=path/to/Llama-3.2-1B      # a Llama folder, with its own tokenizer
    python sample.py --help                              # every key, with its type and default

This file holds generation: sample_next picks a token, generate extends a batch step by step with the
KV cache, complete turns a prompt into text (train.py prints one at each evaluation), load_model
rebuilds a model from a checkpoint of train.py or, through load_hf.py, from Hugging Face weights, and
lay_out_for_decoding and compile_for_decoding make generating on a CPU faster. It
imports common.py (command line, tokenizers, checkpoint files) and load_hf.py, and nothing of
training: it starts without torch.distributed.
"""
import math
import sys
import time
from dataclasses import dataclass

import torch

import load_hf
from common import (UserError, apply_overrides, check_settings, import_model, is_checkpoint, load_tokenizer,
                    parse_args, pick_device, pick_dtype, print_help, read_checkpoint, run)


@dataclass
class SampleConfig:
    init_from: str = "out"       # checkpoint file, its out_dir, a Hugging Face folder or hub id (gpt2, ...)
    prompt: str = "Every effort moves you"
    max_new_tokens: int = 50
    temperature: float = 0.8     # 0 = greedy (always the most likely token)
    top_k: int | None = 200      # sample among the k most likely tokens; None = all
    top_p: float = 1.0           # nucleus: among the most likely tokens that make up top_p; 1.0 = off
    num_samples: int = 1         # samples generated together as one batch
    seed: int = 123              # the same seed gives the same text
    device: str = "auto"         # auto = cuda, then mps, then cpu
    dtype: str = "checkpoint"    # checkpoint = as stored; or float32, bfloat16, float16
    use_cache: bool = True       # KV cache: each step computes only the new token
    compile: bool = False        # torch.compile the model: faster decoding after a minute of compiling


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
            logits = model(idx[:, start + cached:], start_pos=cached, use_cache=True, last_only=True)
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
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]  # an empty prompt starts a new text
    new = [int(t) for t in generate(model, torch.tensor([ids], device=device), max_new_tokens,
                                    eot_id=tokenizer.eot_id, **kwargs)]
    if tokenizer.eot_id in new:
        new = new[:new.index(tokenizer.eot_id)]
    return tokenizer.decode((ids if prompt else []) + new)  # not the end token an empty prompt starts from


def load_model(path, device, dtype=torch.float32):
    """The model saved by train.py in a checkpoint file or the out_dir holding ckpt.pt, and its
    checkpoint dict; or one from a Hugging Face folder or hub id through load_hf.py, in dtype (None:
    as stored)."""
    if not is_checkpoint(path):
        return load_hf.load(path, device, dtype)  # it also says when path is nothing loadable
    ckpt = read_checkpoint(path)
    try:
        arch = import_model(ckpt["model_name"])
        model = arch.Transformer(arch.Config(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except Exception as e:  # weights of another shape, or of a model this version does not have
        raise UserError(f"{path} is not a checkpoint this project can load ({type(e).__name__}): "
                        f"retrain it with python train.py or pass another init_from=") from None
    return model.to(device), ckpt


def check(cfg):
    """Refuse, in one line, a sampling value that cannot work, before the model is loaded; the weights'
    dtype to sample in (None: as stored)."""
    check_settings(cfg, [
        ("max_new_tokens num_samples", lambda v: v >= 1, "must be at least 1"),
        ("temperature", lambda v: 0 <= v < math.inf, "is negative or not a number: use 0 for greedy or a value > 0"),
        ("top_k", lambda v: v is None or v >= 1, "must be at least 1, or None for no limit"),
        ("top_p", lambda v: 0 < v <= 1, "must be in (0, 1]: 1.0 turns nucleus sampling off")])
    return pick_dtype(cfg.dtype, None)


def compile_for_decoding(model):
    """torch.compile, set up for generating one token at a time.

    dynamic=True: the number of cached positions grows every step, and that should not recompile.
    On a CPU, freezing (the weights become constants, pre-packed for the matrix kernels) and
    max-autotune (which may choose inductor's own C++ matrix-vector kernels) make float32 decoding
    about twice as fast as without compiling; plain torch.compile gains little there (README: Speed).
    Freezing is a setting for the whole process: a model compiled for inference afterwards would
    not see its weights change, so use this in a script that only generates.
    """
    if next(model.parameters()).device.type != "cpu":
        return torch.compile(model, dynamic=True)
    import torch._inductor.config  # here: the compiler's settings are needed only when compiling
    import torch._inductor.select_algorithm
    torch._inductor.config.freezing = True  # as an option of torch.compile it is not applied
    torch._inductor.select_algorithm.PRINT_AUTOTUNE = False  # else each tuned matmul prints a table
    return torch.compile(model, dynamic=True, options={
        "max_autotune": True, "max_autotune_report_choices_stats": False})


def lay_out_for_decoding(model):
    """Store each linear layer's weight (in, out) in memory, on a CPU: the same (out, in) tensor to
    nn.Linear and the same products, read faster.

    Generating one token multiplies a vector by every weight matrix, and on a CPU that product (x @ W.T)
    streams W faster when W.T's rows are contiguous, that is when W is stored as (in, out), the way
    Hugging Face's GPT-2 stores its Conv1D weights (README: Speed). Each weight becomes a transposed
    view of a transposed copy, one matrix at a time, so memory grows by one matrix at most; a tied
    head and embedding stay one tensor. Only for generating: training keeps the usual layout.
    """
    if next(model.parameters()).device.type != "cpu":
        return model  # GPU matrix kernels read either layout as fast
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    relaid = {}
    for module in model.modules():
        for name, weight in list(module.named_parameters(recurse=False)):
            if id(weight) in linear:
                if id(weight) not in relaid:
                    relaid[id(weight)] = torch.nn.Parameter(weight.detach().t().contiguous().t(),
                                                            requires_grad=weight.requires_grad)
                setattr(module, name, relaid[id(weight)])  # the old matrix goes when its last name does
    return model


class Printer:
    """Streams one sample to the terminal, holding back bytes that don't yet make a whole character.
    New tokens are decoded after the prompt's: alone, a SentencePiece tokenizer's (Llama 2's) would
    lose the space before their first word."""

    def __init__(self, tokenizer, prompt_ids):
        self.tokenizer, self.ids = tokenizer, list(prompt_ids)
        self.shown = len(tokenizer.decode(self.ids))

    def add(self, token_id):
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            print(text[self.shown:], end="", flush=True)
            self.shown = len(text)


def main(argv):
    model_name, pairs, want_help = parse_args(argv, "sample.py")
    cfg = SampleConfig()
    apply_overrides(pairs, [cfg], "sample.py")
    if want_help:
        print_help(__doc__, [("keys", cfg)])
        return
    dtype = check(cfg)
    device = pick_device(cfg.device)
    model, ckpt = load_model(cfg.init_from, device, dtype=None)  # None: Hugging Face weights as stored
    if model_name is not None and model_name != ckpt["model_name"]:
        raise UserError(f"--model {model_name} does not match the checkpoint, which holds a "
                        f"{ckpt['model_name']} model: leave --model out")
    tokenizer = load_tokenizer(ckpt["tokenizer"])
    if model.cfg.vocab_size < tokenizer.vocab_size:  # possible in a Hugging Face folder
        raise UserError(f"the model knows {model.cfg.vocab_size} tokens, fewer than the {ckpt['tokenizer']} "
                        f"tokenizer's {tokenizer.vocab_size}: it was trained with another tokenizer")
    if cfg.top_k is not None and cfg.top_k > tokenizer.vocab_size:
        raise UserError(f"top_k={cfg.top_k} must be between 1 and the vocabulary size {tokenizer.vocab_size},"
                        f" or None for no limit")
    if dtype is not None:
        model = model.to(dtype)
    model = lay_out_for_decoding(model.eval())

    ids = tokenizer.encode(cfg.prompt) or [tokenizer.eot_id]  # an empty prompt starts a new text
    ctx = model.cfg.context_length
    if len(ids) > ctx:
        print(f"sample.py: note: the prompt has {len(ids)} tokens, more than the context length {ctx};"
              f" only its last {ctx} tokens are used", file=sys.stderr)
        ids = ids[-ctx:]
    shown = ids if cfg.prompt else []  # the prompt as printed: not the end token an empty one starts from
    idx = torch.tensor([ids] * cfg.num_samples, device=device)
    if cfg.compile:  # compile now, so that tokens/s below measures generating alone
        t0 = time.perf_counter()
        model = compile_for_decoding(model)
        warmup = generate(model, idx, cfg.max_new_tokens, use_cache=cfg.use_cache)
        next(warmup), next(warmup, None)  # the prompt, then one new token: a compiled graph each
        print(f"(compiled in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    torch.manual_seed(cfg.seed)
    steps = generate(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                     tokenizer.eot_id, cfg.use_cache)
    t0, n_tokens = time.perf_counter(), 0
    if cfg.num_samples == 1:  # stream the text as it comes
        print(tokenizer.decode(shown), end="", flush=True)
        printer = Printer(tokenizer, ids)
        for next_id in steps:
            n_tokens += 1
            if next_id[0] == tokenizer.eot_id:
                break
            printer.add(int(next_id[0]))
        print()
    else:
        new = torch.stack(list(steps), dim=1).tolist()  # (num_samples, steps)
        n_tokens = len(new[0]) * cfg.num_samples
        for i, row in enumerate(new):
            if tokenizer.eot_id in row:
                row = row[:row.index(tokenizer.eot_id)]
            print(f"--- sample {i + 1}\n{tokenizer.decode(shown + row)}")
    seconds = time.perf_counter() - t0
    print(f"({n_tokens} tokens in {seconds:.2f} s: {n_tokens / seconds:.1f} tokens/s)", file=sys.stderr)


if __name__ == "__main__":
    run(main, "sample.py")
