"""Generate text with a model trained by train.py, or with GPT-2's published weights.

    python sample.py                                     # out/ckpt.pt, continuing "Every effort moves you"
    python sample.py prompt="I had always" temperature=0 # greedy
    python sample.py top_k=50 top_p=0.9 num_samples=3    # three samples, generated as one batch
    python sample.py init_from=gpt2-xl                   # GPT-2's published weights (see load_hf.py)
    python sample.py init_from=path/to/Llama-3.2-1B      # a Llama folder, with its own tokenizer
    python sample.py init_from=path/to/Llama-3.2-1B-Instruct chat=true  # a conversation, typed line by line
    python sample.py init_from=... chat=true prompt="Why is the sky blue?" system="Answer briefly."
    python sample.py --help                              # every key, with its type and default

This file holds generation: sample_next picks a token, generate extends a batch step by step with the
KV cache and stops each row at any of the tokenizer's end tokens, complete turns a prompt into text
(train.py prints one at each evaluation), Chat holds a conversation with an instruct model (its chat
template, the KV cache kept between turns), load_model rebuilds a model from a checkpoint of train.py
or, through load_hf.py, from Hugging Face weights, and lay_out_for_decoding (the output head) and
compile_for_decoding make generating on a CPU faster. It imports common.py (command line, tokenizers, checkpoint files),
load_hf.py and data/instructions.py (the prompt of a model finetuned on instructions), and nothing of
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
from data import instructions


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
    chat: bool = False           # talk to an instruct model through its chat template: answer prompt=, or
                                 #   without prompt= each line of standard input in one conversation
    system: str = ""             # chat: the system message ("" = none)
    input: str = ""              # chat: what each message works on (a model finetuned here in the book's
                                 #   Alpaca format: its ### Input: part); "" = none


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
def generate(model, idx, max_new_tokens, temperature=0.0, top_k=None, top_p=1.0, end_ids=(),
             use_cache=True, cached=None):
    """Extend idx (b, t), yielding the new token ids (b,) step by step.

    A row that has produced one of end_ids keeps repeating it; generation stops when all rows have.
    Past the context length the oldest tokens are dropped, as the book's crop does. cached=None sets
    up a new KV cache; cached=n says that the model's cache (set up by the caller, as a chat does
    once at the context length) already holds idx's first n positions: only the rest is computed.
    """
    ctx = model.cfg.context_length
    if use_cache and cached is None:
        model.setup_cache(idx.shape[0], min(ctx, idx.shape[1] + max_new_tokens))
    ends = torch.tensor(list(end_ids), dtype=idx.dtype, device=idx.device)
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    cached = cached or 0  # positions whose keys and values are in the cache
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
        next_id = torch.where(done, idx[:, -1], next_id)  # an ended row repeats its end token
        done |= torch.isin(next_id, ends)
        idx = torch.cat([idx, next_id[:, None]], dim=1)
        yield next_id
        if done.all():
            break


def until_end(ids, end_ids):
    """The ids before the first end token."""
    return next((ids[:i] for i, t in enumerate(ids) if t in end_ids), ids)


def complete(model, tokenizer, prompt, max_new_tokens, **kwargs):
    """The prompt and its continuation as text (the first row only)."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]  # an empty prompt starts a new text
    new = [int(t) for t in generate(model, torch.tensor([ids], device=device), max_new_tokens,
                                    end_ids=tokenizer.end_ids, **kwargs)]
    shown = ids if prompt else []  # not the end token an empty prompt starts from
    return tokenizer.decode(shown + until_end(new, tokenizer.end_ids))


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
    if cfg.chat and cfg.num_samples > 1:
        raise UserError(f"chat=true gives one reply at a time, not num_samples={cfg.num_samples}: leave "
                        f"num_samples at 1")
    if cfg.system and not cfg.chat:
        raise UserError("system= is the system message of a chat: add chat=true, or leave system= out")
    if cfg.input and not cfg.chat:
        raise UserError("input= is what a chat message works on: add chat=true, or put it into prompt=")
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
    """Store the output head's weight transposed in memory, on a CPU: the same (vocab, d_model) tensor to
    nn.Linear and the same logits, computed faster.

    Generating a token multiplies one vector by every weight matrix, and the largest is the head's
    (50,257 x 768 in GPT-2, a third of the 124M model). On a CPU that matrix-vector product streams the
    weight faster when it is stored (d_model, vocab): x @ W.T then reads W.T row after row (README:
    Speed); the blocks' smaller matrices run about as fast either way. The head becomes a transposed
    view of a transposed copy, so one matrix is copied, and a tied embedding shares it still. Only for
    generating: training keeps the usual layout.
    """
    head = model.lm_head
    if head.weight.device.type != "cpu":
        return model  # GPU matrix kernels read either layout as fast
    relaid = torch.nn.Parameter(head.weight.detach().t().contiguous().t(), requires_grad=head.weight.requires_grad)
    if model.token_embedding.weight is head.weight:
        model.token_embedding.weight = relaid  # tied: both names, one tensor
    head.weight = relaid
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

    def finish(self):
        """Print what is held back (bytes the sample ended in the middle of a character with), then a newline."""
        print(self.tokenizer.decode(self.ids)[self.shown:], flush=True)


class Chat:
    """One conversation with an instruct model, its KV cache kept from turn to turn.

    Each reply is what the model gives for the tokenizer's chat template applied to the whole
    conversation so far, the earlier replies as text, as apply_chat_template + generate give it. The
    cache is set up once, at the context length: a turn computes only the ids after the longest
    common prefix of its conversation and the ids already cached (the earlier turns, mostly).
    """

    def __init__(self, model, tokenizer, cfg, prompt_format="chat_template"):
        self.model, self.tokenizer, self.cfg, self.format = model, tokenizer, cfg, prompt_format
        self.system = [{"role": "system", "content": cfg.system}] if cfg.system else []
        self.turns = []  # [message, reply] of each turn so far, the oldest first
        self.cached = []  # the ids whose keys and values the model's cache holds, from position 0
        self.n_tokens, self.seconds = 0, 0.0  # generated, and the time it took
        if cfg.use_cache:
            model.setup_cache(1, model.cfg.context_length)

    def reset(self):
        self.turns = []  # the cache stays: a new conversation shares at least its first ids

    def prompt_ids(self, message):
        """The ids of the conversation with message added; when it leaves too little room for
        max_new_tokens in the context, without its oldest turns (the system message stays)."""
        ctx, dropped = self.model.cfg.context_length, 0
        if self.format == "alpaca":  # a model finetuned here in the book's format, which has no turns:
            self.turns = []  # each instruction is answered on its own
        while True:
            messages = self.system + [{"role": role, "content": text} for turn in self.turns
                                      for role, text in zip(("user", "assistant"), turn)]
            ids = (instructions.prompt_ids(self.tokenizer, self.format, message, self.cfg.input)
                   if not messages else self.tokenizer.chat_ids(messages + instructions.user_message(
                       message, self.cfg.input)))
            if len(ids) + self.cfg.max_new_tokens <= ctx or not self.turns:
                break
            self.turns.pop(0)
            dropped += 1
        if dropped:
            print(f"sample.py: note: the conversation outgrew the context length {ctx}: its {dropped} oldest "
                  f"turn(s) were dropped", file=sys.stderr)
        if len(ids) >= ctx:
            raise UserError(f"the message makes a conversation of {len(ids)} tokens, more than the context "
                            f"length {ctx}: send a shorter one")
        return ids

    def answer(self, message):
        """Print the reply to message, streamed, then a newline; the ids generated (with the end token,
        if it came)."""
        ids, cfg, end_ids = self.prompt_ids(message), self.cfg, self.tokenizer.end_ids
        ctx = self.model.cfg.context_length
        keep = min(common_prefix(ids, self.cached), len(ids) - 1) if cfg.use_cache else None
        idx = torch.tensor([ids], device=next(self.model.parameters()).device)
        steps = generate(self.model, idx, min(cfg.max_new_tokens, ctx - len(ids)), cfg.temperature, cfg.top_k,
                         cfg.top_p, end_ids, cfg.use_cache, cached=keep)
        t0, new, printer = time.perf_counter(), [], Printer(self.tokenizer, [])  # the reply alone
        for next_id in steps:
            new.append(int(next_id[0]))
            if new[-1] in end_ids:
                break
            printer.add(new[-1])
        printer.finish()
        self.n_tokens, self.seconds = self.n_tokens + len(new), self.seconds + time.perf_counter() - t0
        self.cached = ids + new[:-1]  # the last new token was never fed to the model
        self.turns.append([message, self.tokenizer.decode(until_end(new, end_ids))])
        return new


def common_prefix(a, b):
    """How many leading ids a and b share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def typed_lines(stdin):
    """The lines of stdin without their newline, asking with "> " on stderr when a person types them."""
    while True:
        if stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:  # the end of the input (Ctrl-D on a terminal)
            if stdin.isatty():
                print(file=sys.stderr)  # what comes next starts a line of its own
            return
        yield line.rstrip("\n")


def chat(model, tokenizer, cfg, prompt_format, message=None):
    """Answer message; without one, each line of standard input in turn, in one conversation, until
    the end of the input ("/reset" starts a new conversation)."""
    conversation = Chat(model, tokenizer, cfg, prompt_format)
    torch.manual_seed(cfg.seed)
    for line in [message] if message is not None else typed_lines(sys.stdin):
        if line.strip() == "/reset":
            conversation.reset()
        elif line.strip() or message is not None:
            conversation.answer(line)
    if conversation.seconds:
        print(f"({conversation.n_tokens} tokens in {conversation.seconds:.2f} s: "
              f"{conversation.n_tokens / conversation.seconds:.1f} tokens/s)", file=sys.stderr)


def continue_text(model, tokenizer, cfg):
    """Print cfg.prompt and its continuation: streamed for one sample, else num_samples of them."""
    ids = tokenizer.encode(cfg.prompt) or [tokenizer.eot_id]  # an empty prompt starts a new text
    ctx = model.cfg.context_length
    if len(ids) > ctx:
        print(f"sample.py: note: the prompt has {len(ids)} tokens, more than the context length {ctx};"
              f" only its last {ctx} tokens are used", file=sys.stderr)
        ids = ids[-ctx:]
    shown = ids if cfg.prompt else []  # the prompt as printed: not the end token an empty one starts from
    idx = torch.tensor([ids] * cfg.num_samples, device=next(model.parameters()).device)
    if cfg.compile:  # compile now, so that tokens/s below measures generating alone
        t0 = time.perf_counter()
        model = compile_for_decoding(model)
        warmup = generate(model, idx, cfg.max_new_tokens, use_cache=cfg.use_cache)
        next(warmup), next(warmup, None)  # the prompt, then one new token: a compiled graph each
        print(f"(compiled in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    torch.manual_seed(cfg.seed)
    steps = generate(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                     tokenizer.end_ids, cfg.use_cache)
    t0, n_tokens = time.perf_counter(), 0
    if cfg.num_samples == 1:  # stream the text as it comes
        print(tokenizer.decode(shown), end="", flush=True)
        printer = Printer(tokenizer, ids)
        for next_id in steps:
            n_tokens += 1
            if int(next_id[0]) in tokenizer.end_ids:
                break
            printer.add(int(next_id[0]))
        printer.finish()
    else:
        new = torch.stack(list(steps), dim=1).tolist()  # (num_samples, steps)
        n_tokens = len(new[0]) * cfg.num_samples
        for i, row in enumerate(new):
            print(f"--- sample {i + 1}\n{tokenizer.decode(shown + until_end(row, tokenizer.end_ids))}")
    seconds = time.perf_counter() - t0
    print(f"({n_tokens} tokens in {seconds:.2f} s: {n_tokens / seconds:.1f} tokens/s)", file=sys.stderr)


def load_for_sampling(cfg, model_name, dtype):
    """The model of init_from, in dtype (None: as stored), in eval mode and laid out for decoding, its
    tokenizer, and the prompt format to chat in: the one it was finetuned with here (train.py records
    it), else its tokenizer's chat template; refuses, in one line, what does not fit the settings."""
    model, ckpt = load_model(cfg.init_from, pick_device(cfg.device), dtype=None)  # None: HF weights as stored
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
    prompt_format = ckpt.get("prompt_format") or ("chat_template" if tokenizer.chat_template else None)
    if cfg.chat and prompt_format is None:
        raise UserError(f"{cfg.init_from} has no chat template (its tokenizer: {ckpt['tokenizer']}): chat=true "
                        f"needs an instruct model, whose tokenizer has one as Llama-3.2-1B-Instruct's does, or "
                        f"one finetuned on instructions with train.py; pass such a model as init_from=, or "
                        f"leave chat= out to continue a text")
    if cfg.system and prompt_format == "alpaca":
        raise UserError(f"{cfg.init_from} was finetuned in the Alpaca prompt format, which has no system "
                        f"message: leave system= out")
    if dtype is not None:
        model = model.to(dtype)
    return lay_out_for_decoding(model.eval()), tokenizer, prompt_format


def main(argv):
    model_name, pairs, want_help = parse_args(argv, "sample.py")
    cfg = SampleConfig()
    apply_overrides(pairs, [cfg], "sample.py")
    if want_help:
        print_help(__doc__, [("keys", cfg)])
        return
    dtype = check(cfg)
    model, tokenizer, prompt_format = load_for_sampling(cfg, model_name, dtype)
    if not cfg.chat:
        continue_text(model, tokenizer, cfg)
        return
    if cfg.compile:  # compiled on the first turn
        model = compile_for_decoding(model)
    chat(model, tokenizer, cfg, prompt_format, cfg.prompt if "prompt" in pairs else None)  # no prompt=: stdin


if __name__ == "__main__":
    run(main, "sample.py")
