"""Speed, measured side by side with transformers on the same weights, on this machine, in one run.

    python bench.py                                  # every section, 124M GPT-2, float32
    python bench.py decode prefill                   # some sections: machine decode prefill chat
                                                     #   train load tokenize ddp finetune
    python bench.py --model llama3 config=toy        # Llama 3 (toy preset) against LlamaForCausalLM
    python bench.py decode compile=true              # settings: key=value; --help lists them
    python bench.py device=cuda machine train decode # on a GPU (device=auto picks it): README "On a GPU"

The defaults keep a run of every section under about 15 minutes on a 2-core CPU that computes in
float32 only: 128 new tokens in decode, and without its torch.compile rows (compile=true adds them,
a few minutes of compiling each on such a CPU); the bfloat16 rows only where bfloat16 is fast (bf16=).
On a GPU the settings left at None take the GPU's defaults (PER_DEVICE): training in bfloat16 at
16 x 1024 with flash attention and torch.compile, decoding in bfloat16, compiled rows included; times
wait for the GPU (torch.cuda.synchronize), memory is torch.cuda.max_memory_allocated, and the peaks
measured are the GPU's (a large bfloat16 matmul, a device-to-device copy). load, tokenize and ddp
measure the CPU whatever device= says.

Machines are shared and noisy: every figure is the best of several runs taken in turns, and the
ratios within one run mean more than the absolute numbers. The `machine` section measures what the
others are compared with: the memory bandwidth decoding can at best reach, and the matmul peak.

It measures the scripts through their public functions: generate and compile_for_decoding from
sample.py, load and export from load_hf.py, tokenize_corpus from data/prepare.py, the command line and the
tokenizer from common.py; train.py is run as a user runs it (ddp section), and its loss and LoRA are
called directly (finetune section). transformers is
imported only by the sections that compare with it.
"""
import dataclasses
import gc
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import common
import gpt2
import load_hf
import train
from common import (MODELS, UserError, apply_overrides, import_model, load_tokenizer, model_config,
                    parse_args, pick_device, pick_dtype, print_help)
from data import instructions, prepare
from sample import compile_for_decoding, generate, lay_out_for_decoding


@dataclass
class BenchConfig:
    config: str = ""             # model preset; "" = gpt2 (124M) for GPT-2, toy for Llama
    repeats: int = 3             # timed runs of each row, taken in turns; the fastest counts
    prompt_len: int = 8          # decode: prompt tokens
    new_tokens: int = 128        # decode: tokens generated per run
    num_samples: int = 8         # decode: rows of the batched runs
    prefill_len: int = 512       # prefill: prompt tokens
    batch_size: int | None = None      # train; None = 4 on a CPU, 16 on a GPU
    seq_len: int | None = None         # train; None = 256 on a CPU, 1024 on a GPU
    steps: int | None = None           # train: timed steps per row, after one warmup step; None = 3 / 10
    compile: bool | None = None        # decode: also with torch.compile, as sample.py compile=true
                                       #   (minutes on a CPU); None = false on a CPU, true on a GPU
    compile_train: bool | None = None  # train: also with torch.compile; None = false on a CPU, true on a GPU
    bf16: str = "auto"           # bfloat16 rows (matmul peak, train): auto = where dtype=auto picks
                                 #   bfloat16 (CPUs with AVX-512 BF16 or AMX, recent GPUs); true; false
    device: str = "auto"         # auto = cuda, then cpu; cuda, cuda:1, cpu


SETTINGS = BenchConfig()
PER_DEVICE = {  # the settings left at None: (on a CPU, on a GPU)
    "batch_size": (4, 16), "seq_len": (256, 1024), "steps": (3, 10), "compile": (False, True),
    "compile_train": (False, True)}
DEVICE = torch.device("cpu")  # set by main from device=


def on_gpu():
    return DEVICE.type == "cuda"


def dtypes():
    """The dtypes measured: float32, and bfloat16 where it is fast (bf16=auto) or asked for.

    A CPU without AVX-512 BF16 or AMX emulates bfloat16: there one 2048^3 matmul takes minutes, and
    a run that samples the matmul peak again and again printed nothing for half an hour.
    """
    fast = pick_dtype("auto", DEVICE) == torch.bfloat16
    bf16 = {"auto": fast, "true": True, "false": False}[SETTINGS.bf16]
    return (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)


def bf16_note():
    """Why the bfloat16 rows are missing, for the tables that would have had them; "" if they are not."""
    if torch.bfloat16 in dtypes():
        return ""
    if SETTINGS.bf16 == "false":
        return "bfloat16 rows skipped (bf16=false)."
    return ("bfloat16 rows skipped: this CPU has no fast bfloat16 (AVX-512 BF16 or AMX), dtype=auto trains "
            "in float32 here; bf16=true measures them anyway (slowly).")


def progress(section, what):
    """One line on stderr as a step starts, so that a long run shows what it is doing."""
    print(f"[{section}] {what} ...", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- measuring

def sync():
    """Wait until the GPU has done the work queued so far: CUDA calls return before it is done."""
    if on_gpu():
        torch.cuda.synchronize(DEVICE)


def best_time(fn, repeats):
    """Seconds of the fastest of `repeats` calls (after the caller's warmup)."""
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Highest resident memory of this process while the block runs, above where it started (MiB).

    A thread samples it every few milliseconds, so the peak of a short spike may be missed. Freed
    memory is handed back to the system first (malloc_trim), so that rows don't hide in each other's.
    On a GPU: the GPU memory allocated by PyTorch, whose peak CUDA itself keeps (max_memory_allocated).
    """

    def __enter__(self):
        gc.collect()
        if on_gpu():
            sync()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(DEVICE)
            self.start = torch.cuda.memory_allocated(DEVICE)
            return self
        try:
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: the baseline is a little high, that's all
            pass
        self.start = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.003)

    def __exit__(self, *exc):
        if on_gpu():
            sync()
            self.mib = (torch.cuda.max_memory_allocated(DEVICE) - self.start) / 2**20
            return
        self.running = False
        self.thread.join()
        self.mib = (max(self.peak, rss()) - self.start) / 2**20


def weight_bytes(model):
    """Bytes of weights read to decode one token: all of them except the rows an embedding looks up."""
    params = {id(p): p for p in model.parameters()}
    head = model.get_output_embeddings().weight if hasattr(model, "get_output_embeddings") \
        else model.lm_head.weight
    lookups = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.weight is not head]
    return sum(p.nbytes for p in params.values()) - sum(w.nbytes for w in lookups)


def matmul_flops_per_token(model, seq_len):
    """Forward FLOPs per token: 2 per weight in a matmul, plus attention's q.k and weights.v."""
    cfg = model.cfg
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 2 * linear + 4 * cfg.n_layers * seq_len * cfg.d_model  # attention over seq_len keys


def table(title, header, rows, note=""):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    print(f"\n## {title}\n")
    for r in [header, ["-" * w for w in widths]] + rows:
        print("| " + " | ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                for i, (c, w) in enumerate(zip(r, widths))) + " |")
    if note:
        print(f"\n{note}")
    sys.stdout.flush()


# ----------------------------------------------------------------------------- the models

def build_ours(model_name, **changes):
    """Our model of the preset, float32, on DEVICE; changes (vocab_size=, flash=) go into its Config."""
    arch = import_model(model_name)
    cfg = model_config(arch, SETTINGS.config or ("gpt2" if model_name == "gpt2" else MODELS[model_name]))
    if hasattr(cfg, "dropout"):
        cfg.dropout = 0.0  # as in transformers' eval and our train comparison: no dropout anywhere
    if hasattr(cfg, "weight_dtype"):
        cfg.weight_dtype = "float32"
    for key, value in changes.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    with torch.device(DEVICE):  # initialised where it runs: a 1B model's init takes a GPU no time
        return arch.Transformer(cfg)


def build_hf(ours):
    """transformers' model of the same architecture, holding the same weights as ours: converted as
    python load_hf.py to=hf converts them (load_hf.hf_tensors, the loading tables walked backwards).
    Attention through F.scaled_dot_product_attention (attn_implementation="sdpa"), as ours with flash."""
    from transformers import AutoModelForCausalLM
    model_name, cfg = type(ours).__module__, ours.cfg  # gpt2, llama2 or llama3
    hf_config = load_hf.FAMILIES[load_hf.FAMILY[model_name]][1](cfg, attn_implementation="sdpa")
    with torch.device(DEVICE):  # initialised where it runs, as ours
        hf = AutoModelForCausalLM.from_config(hf_config)
    state = load_hf.hf_tensors(model_name, cfg, ours.state_dict(), None)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and (not missing or cfg.tie_weights), missing
    return hf.to(DEVICE)


def set_flash(model, flash):
    for block in model.blocks:
        block.attn.flash = flash


# ----------------------------------------------------------------------------- sections

class Machine:
    """What the other figures are compared with, measured again and again during the run; each keeps
    its best sample, since a busy moment of a shared machine can only make a sample lower.

    read_gbs:  memory read bandwidth, summing a 1 GiB float32 tensor (far bigger than the caches)
    copy_gbs:  on a GPU, a device-to-device copy of that 1 GiB, bytes read + bytes written per second:
               how a GPU's memory bandwidth is quoted, and what its decoding is compared with
    gemv_gbs:  the same 1 GiB as a matrix times a vector through F.linear: eager decoding's pattern
    peak_float32, peak_bfloat16: n x n x n matmul GFLOP/s, n = 2048 on a CPU, 8192 on a GPU (bfloat16:
               see dtypes; float32 on a GPU without TF32, PyTorch's default)
    """

    def __init__(self):
        self.best = {}
        self.samples = 0

    def sample(self):
        progress("machine", f"sample {self.samples + 1}: read bandwidth, matmul peak "
                            f"({', '.join(str(dt)[6:] for dt in dtypes())})")

        def keep(key, value):
            self.best[key] = max(self.best.get(key, 0.0), value)

        def seconds(fn):  # a GPU does these in a millisecond: 10 calls between two synchronisations
            calls = 10 if on_gpu() else 1
            fn()
            return best_time(lambda: [fn() for _ in range(calls)], 5) / calls

        with torch.no_grad():
            x = torch.ones(2**28, device=DEVICE)  # written, so every page is really there (torch.empty's are not)
            keep("read_gbs", x.nbytes / seconds(x.sum) / 1e9)
            if on_gpu():
                y = torch.empty_like(x)
                keep("copy_gbs", 2 * x.nbytes / seconds(lambda: y.copy_(x)) / 1e9)
                y = None
            w, v = x.view(-1, 1024), torch.ones(1024, device=DEVICE)
            keep("gemv_gbs", w.nbytes / seconds(lambda: F.linear(v, w)) / 1e9)
            x = w = None  # free the 1 GiB before the matmuls
            n = self.matmul_size()
            for dtype in dtypes():
                a, b = (torch.randn(n, n, dtype=dtype, device=DEVICE) for _ in range(2))
                keep(f"peak_{str(dtype)[6:]}", 2 * n**3 / seconds(lambda: a @ b) / 1e9)
        self.samples += 1
        return self

    def __getitem__(self, key):
        return self.best[key]

    @staticmethod
    def matmul_size():
        return 8192 if on_gpu() else 2048  # big enough to keep a GPU's tensor cores busy

    @staticmethod
    def bandwidth():
        """(key, name) of the bandwidth decoding is compared with: a GPU's copy, a CPU's read."""
        return ("copy_gbs", "copy bandwidth") if on_gpu() else ("read_gbs", "read bandwidth")

    def report(self):
        if on_gpu():
            name = f"{torch.cuda.get_device_name(DEVICE)}, CUDA {torch.version.cuda}"
        else:
            cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                        if line.startswith("model name")), "?")
            name = f"{cpu}, {torch.get_num_threads()} threads"
        rows = [["read: sum of a 1 GiB float32 tensor", f"{self['read_gbs']:.1f} GB/s"]]
        if on_gpu():
            rows.append(["copy: 1 GiB device to device (read + written)", f"{self['copy_gbs']:.1f} GB/s"])
        rows.append(["read: 1 GiB float32 matrix x vector (F.linear)", f"{self['gemv_gbs']:.1f} GB/s"])
        n = self.matmul_size()
        rows += [[f"matmul peak, {str(dt)[6:]} ({n} x {n} x {n})", f"{self['peak_' + str(dt)[6:]]:.0f} GFLOP/s"]
                 for dt in dtypes()]
        table(f"machine: {name}, torch {torch.__version__}; best of {self.samples} samples taken during the run",
              ["what", "measured"], rows, bf16_note())


MACHINE = Machine()
TABLES = []  # functions that print a section's table, called at the end against MACHINE's best


def bench_machine(model_name):
    """The machine alone: memory read bandwidth and matmul peak, three samples (more come with the others)."""
    for _ in range(3):
        MACHINE.sample()


def decode_dtype():
    """Decoding's weights: float32 on a CPU (which may have no fast bfloat16), bfloat16 on a GPU, as
    published Llama weights are and as a GPU user samples."""
    return torch.bfloat16 if on_gpu() else torch.float32


def bench_decode(model_name):
    """Decode tokens/s: batch 1 and num_samples, greedy, against transformers' generate."""
    MACHINE.sample()
    p, n, k, repeats = SETTINGS.prompt_len, SETTINGS.new_tokens, SETTINGS.num_samples, SETTINGS.repeats
    dt, flash = decode_dtype(), on_gpu()  # a GPU: flash attention, as transformers' sdpa
    as_trained = build_ours(model_name, flash=flash).to(dt).eval()  # the head (vocab, d_model) in memory
    if p + n > as_trained.cfg.context_length:  # transformers' generate cannot slide past it, as ours does
        raise UserError(f"prompt_len={p} + new_tokens={n} is more than the context length "
                        f"{as_trained.cfg.context_length} of this model: lower new_tokens=")
    hf = build_hf(as_trained).to(dt).eval()
    ours = build_ours(model_name, flash=flash).to(dt).eval()
    ours.load_state_dict(as_trained.state_dict())
    ours = lay_out_for_decoding(ours)  # as sample.py does: on a CPU, the head (d_model, vocab) in memory
    per_step = weight_bytes(ours)
    assert per_step == weight_bytes(hf)
    gen = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(0, ours.cfg.vocab_size, (b, p), generator=gen).to(DEVICE) for b in (1, k)}

    def run_ours(model, b, use_cache=True):
        return lambda: torch.stack(list(generate(model, prompts[b], n, use_cache=use_cache)), dim=1)

    def run_hf(b):
        return lambda: hf.generate(prompts[b], attention_mask=torch.ones_like(prompts[b]), do_sample=False,
                                   max_new_tokens=n, min_new_tokens=n, pad_token_id=0)[:, p:]

    def compiled_copy():  # its own model: a compiled model recompiles when its caches change size
        model = build_ours(model_name, flash=flash).to(dt).eval()
        model.load_state_dict(ours.state_dict())
        return compile_for_decoding(model)

    # name: (batch size, run once -> token ids (b, n), transformers' row of that batch size)
    rows = {"transformers generate": (1, run_hf(1)), "ours, KV cache": (1, run_ours(ours, 1)),
            "ours, no cache": (1, run_ours(ours, 1, use_cache=False))}
    if not on_gpu():  # what lay_out_for_decoding gains
        rows["ours, KV cache, head stored as trained (vocab, d_model)"] = (1, run_ours(as_trained, 1))
    if SETTINGS.compile:
        rows["ours, KV cache, compile=true"] = (1, run_ours(compiled_copy(), 1))
    rows[f"transformers generate, batch {k}"] = (k, run_hf(k))
    rows[f"ours, KV cache, batch {k}"] = (k, run_ours(ours, k))
    if SETTINGS.compile:
        rows[f"ours, KV cache, compile=true, batch {k}"] = (k, run_ours(compiled_copy(), k))
    what = lambda name, b: f"{name.replace(f', batch {k}', '')}, batch {b}, {str(dt)[6:]}, {n} tokens"
    seconds, memory, ids = {}, {}, {}
    with torch.no_grad():
        for name, (b, run) in rows.items():  # the first run: warmup (and compiling), memory, token ids
            progress("decode", f"{what(name, b)}, first run" + (" (compiling: minutes)" if "compile" in name else ""))
            t0 = time.perf_counter()
            with PeakMemory() as mem:
                ids[name] = run()
            memory[name], seconds[name] = mem.mib, time.perf_counter() - t0
            if "compile" in name:
                print(f"({name}: first run, compiling included, {seconds[name]:.0f} s)", flush=True)
        for i in range(repeats):  # then in turns, so that a busy moment of the machine hits them all
            for name, (b, run) in rows.items():
                if "no cache" not in name:  # slow, and timed once above already
                    progress("decode", f"{what(name, b)}, timed run {i + 1} of {repeats}")
                    seconds[name] = min(seconds[name], best_time(run, 1))
            MACHINE.sample()
    for name, (b, run) in rows.items():
        print(f"({name}: {b * n / seconds[name]:.1f} tokens/s)", flush=True)

    def report():
        out = []
        bandwidth, bandwidth_name = MACHINE.bandwidth()
        for name, (b, run) in rows.items():
            batch1 = name.replace(f", batch {k}", "")
            theirs = "transformers generate" + ("" if b == 1 else f", batch {k}")
            gbs = per_step * n / seconds[name] / 1e9  # weights are read once per step, for all rows
            out.append([name, f"{b * n / seconds[name]:.1f}", f"{seconds[theirs] / seconds[name]:.2f}x",
                        f"{seconds[batch1] / seconds[name] * b:.1f}x" if b > 1 else "",
                        f"{gbs:.1f}", f"{gbs / MACHINE[bandwidth]:.0%}", f"{memory[name]:.0f}",
                        "yes" if torch.equal(ids[name], ids[theirs]) else "no"])
        table(f"decode: {model_name} ({sum(p.numel() for p in ours.parameters()) / 1e6:.0f}M parameters),"
              f" {str(dt)[6:]}{', flash attention' * flash}, {p}-token prompt, {n} new tokens, greedy; "
              f"{per_step / 1e6:.0f} MB of weights read per step",
              ["", "tokens/s", "vs transformers", "vs batch 1", "weights GB/s", f"of {bandwidth_name}",
               "MiB beyond weights", "same ids as transformers"], out)
    TABLES.append(report)


def bench_prefill(model_name):
    """Prefill: the whole prompt in one forward pass, up to the first new token's logits."""
    MACHINE.sample()
    t, repeats = SETTINGS.prefill_len, SETTINGS.repeats
    ours = build_ours(model_name).eval()
    t = min(t, ours.cfg.context_length)
    hf = build_hf(ours).eval()
    idx = torch.randint(0, ours.cfg.vocab_size, (1, t), generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def run_ours(flash, last_only=True):
        def run():
            set_flash(ours, flash)
            ours.setup_cache(1, t)
            return ours(idx, use_cache=True, last_only=last_only)[:, -1]
        return run

    rows = {"transformers (logits_to_keep=1)": lambda: hf(idx, use_cache=True, logits_to_keep=1).logits[:, -1],
            "ours, einsum attention": run_ours(False), "ours, flash=True": run_ours(True),
            "ours, flash=True, logits at every position": run_ours(True, last_only=False)}
    seconds, memory = {}, {}
    with torch.no_grad():
        for name, run in rows.items():
            progress("prefill", f"{name}, float32, {t} tokens, first run")
            with PeakMemory() as mem:
                run()
            memory[name] = mem.mib
        for i in range(repeats):
            progress("prefill", f"every row, timed run {i + 1} of {repeats}")
            for name, run in rows.items():
                seconds[name] = min(seconds.get(name, float("inf")), best_time(run, 1))
            MACHINE.sample()
    flops = matmul_flops_per_token(ours, t / 2) * t  # on average a position attends to t/2 keys
    hf_s = seconds["transformers (logits_to_keep=1)"]
    print(f"(prefill: {', '.join(f'{name} {t / s:.0f}' for name, s in seconds.items())} tokens/s)",
          flush=True)
    TABLES.append(lambda: table(
        f"prefill: {model_name}, float32, batch 1, a {t}-token prompt to the first new token",
        ["", "tokens/s", "vs transformers", "GFLOP/s", "of float32 peak", "MiB beyond weights"],
        [[name, f"{t / s:.0f}", f"{hf_s / s:.2f}x", f"{flops / s / 1e9:.0f}",
          f"{flops / s / 1e9 / MACHINE['peak_float32']:.0%}", f"{memory[name]:.0f}"]
         for name, s in seconds.items()]))


def bench_chat(model_name):
    """A second chat turn, the first turn's KV cache kept, against a fresh run of the whole conversation.

    As sample.py's Chat: one cache at the context length; the second turn's conversation is the first's
    (prefill_len tokens), its reply (new_tokens), and a 32-token message; its reply is new_tokens long.
    The kept cache prefills only what follows the longest common prefix, the fresh run all of it. A
    Llama: llama3 (toy preset, 48M, its context made 1024) unless --model llama2; config= another size.
    """
    MACHINE.sample()
    p, n, repeats = SETTINGS.prefill_len, SETTINGS.new_tokens, SETTINGS.repeats
    arch = import_model("llama2" if model_name == "llama2" else "llama3")
    cfg = model_config(arch, SETTINGS.config or MODELS[arch.__name__])
    cfg.context_length, cfg.weight_dtype = max(cfg.context_length, 1024, p + 2 * n + 32), "float32"
    torch.manual_seed(0)
    model = lay_out_for_decoding(arch.Transformer(cfg).eval())  # as sample.py loads it
    gen = torch.Generator().manual_seed(4)
    first = torch.randint(0, cfg.vocab_size, (1, p), generator=gen)
    model.setup_cache(1, cfg.context_length)  # once, as Chat does: the turns share it
    reply = torch.stack(list(generate(model, first, n, cached=0)), dim=1)
    message = torch.randint(0, cfg.vocab_size, (1, 32), generator=gen)
    second = torch.cat([first, reply, message], dim=1)  # the conversation of the second turn
    keep = p + n - 1  # the first turn's last token was sampled, never fed: not in the cache

    def turn(cached, tokens):
        return lambda: torch.stack(list(generate(model, second, tokens, cached=cached)), dim=1)

    rows = {"second turn, cache kept": keep, "fresh run of the whole conversation": 0}
    seconds = {(name, tokens): float("inf") for name in rows for tokens in (1, n)}
    with torch.no_grad():
        same = torch.equal(turn(keep, n)(), turn(0, n)())  # the cache's prefix is rewritten with the same ids
        for i in range(repeats):  # in turns, so that a busy moment of the machine hits them all
            progress("chat", f"every row, timed run {i + 1} of {repeats}")
            for (name, tokens) in seconds:
                seconds[name, tokens] = min(seconds[name, tokens], best_time(turn(rows[name], tokens), 1))
            MACHINE.sample()
    fresh = "fresh run of the whole conversation"
    print(f"(chat: second turn {seconds[next(iter(rows)), n]:.2f} s, fresh {seconds[fresh, n]:.2f} s)", flush=True)
    TABLES.append(lambda: table(
        f"chat: {arch.__name__} ({sum(t.numel() for t in model.parameters()) / 1e6:.0f}M parameters), float32, "
        f"batch 1, greedy; second turn of a {second.shape[1]}-token conversation, {n}-token reply",
        ["", "tokens prefilled", "first token ms", "vs fresh", "whole reply s", "vs fresh"],
        [[name, second.shape[1] - cached, f"{seconds[name, 1] * 1e3:.0f}",
          f"{seconds[fresh, 1] / seconds[name, 1]:.1f}x", f"{seconds[name, n]:.2f}",
          f"{seconds[fresh, n] / seconds[name, n]:.2f}x"] for name, cached in rows.items()],
        f"same reply both ways: {'yes' if same else 'no'}"))


PADDED_VOCAB = 50304  # GPT-2's 50,257 rounded up to a multiple of 128, as nanoGPT pads it: the head's
                      # matmuls then tile evenly; the tokenizer and the data stay as they are


def train_rows(model_name):
    """The train section's rows. A CPU: transformers, ours with einsum and with flash attention. A GPU:
    what a GPU user runs, bfloat16 autocast and flash attention (transformers': sdpa), eager and compiled,
    and for GPT-2 ours with the vocabulary padded to PADDED_VOCAB."""
    if not on_gpu():
        names = ["transformers", "ours, einsum attention", "ours, flash=True"]
        return names + ["ours, flash=True, torch.compile"] * SETTINGS.compile_train
    names = ["transformers (sdpa)", "ours, flash=True"]
    if SETTINGS.compile_train:
        names += ["transformers (sdpa), torch.compile", "ours, flash=True, torch.compile"]
    if model_name == "gpt2":
        names.append(f"{names[-1]}, vocab padded to {PADDED_VOCAB:,}")
    return names


def bench_train(model_name):
    """Training tokens/s (forward, backward, fused AdamW step), ours against transformers."""
    MACHINE.sample()
    b, t, steps = SETTINGS.batch_size, SETTINGS.seq_len, SETTINGS.steps
    gen = torch.Generator().manual_seed(3)
    names = train_rows(model_name)
    results = []  # (name, dtype, seconds per step, FLOPs per step, peak MiB)
    for dtype in (torch.bfloat16,) if on_gpu() else dtypes():  # a GPU trains in bfloat16 autocast
        steppers, memory, x = {}, {}, None
        for name in names:  # build each, and take one step: warmup, and the memory it needs
            progress("train", f"{name}, {str(dtype)[6:]}, batch {b} x {t}, warmup step"
                              + (" (compiling: a minute or more)" if "compile" in name else ""))
            with PeakMemory() as mem:
                ours = build_ours(model_name, **({"vocab_size": PADDED_VOCAB} if "padded" in name else {}))
                if x is None:  # the first row is transformers': the model's own vocabulary
                    t = min(t, ours.cfg.context_length)
                    x = torch.randint(0, ours.cfg.vocab_size, (b, t + 1), generator=gen).to(DEVICE)
                    # every row does this work: a padded head's extra rows are not counted as useful
                    flops = 3 * matmul_flops_per_token(ours, t) * b * t  # backward: twice the forward
                steppers[name] = train_step(ours, name, dtype, x[:, :-1], x[:, 1:])
                del ours  # transformers' row keeps only its own copy of the weights
                steppers[name]()
                sync()
            memory[name] = mem.mib
        seconds = {name: float("inf") for name in names}
        for i in range(steps):  # in turns, so that a busy moment of the machine hits them all
            for name, step in steppers.items():
                progress("train", f"{name}, {str(dtype)[6:]}, timed step {i + 1} of {steps}")
                seconds[name] = min(seconds[name], best_time(step, 1))
            MACHINE.sample()
        for name in names:
            results.append((name, str(dtype)[6:], seconds[name], flops, memory[name]))
            print(f"({name}, {str(dtype)[6:]}: {b * t / seconds[name]:.0f} tokens/s)", flush=True)
        del steppers

    def report():
        hf = {(dt, "compile" in name): s for name, dt, s, _, _ in results if name.startswith("transformers")}
        theirs = lambda name, dt: hf.get((dt, "compile" in name), hf[dt, False])  # compiled: against compiled
        note = bf16_note()
        if on_gpu() and model_name == "gpt2":
            note = "The book: 142,000 tokens/s for the 124M model on one A100 (bf16, flash, compile)."
        table(f"train: {model_name}, batch {b} x {t} tokens, forward + backward + fused AdamW step, "
              f"bfloat16 = autocast, on {DEVICE.type}", ["", "dtype", "tokens/s", "vs transformers", "GFLOP/s",
                                                         "MFU (of measured peak)", "peak MiB"],
              [[name, dt, f"{b * t / s:.0f}", f"{theirs(name, dt) / s:.2f}x", f"{flops / s / 1e9:.0f}",
                f"{flops / s / 1e9 / MACHINE['peak_' + dt]:.0%}", f"{mib:.0f}"]
               for name, dt, s, flops, mib in results], note)
    TABLES.append(report)


def train_step(ours, name, dtype, x, y):
    """One training step of the row `name`, as a function; transformers' model gets ours's weights."""
    if name.startswith("transformers"):
        model = build_hf(ours)
        forward = torch.compile(model) if "compile" in name else model
        loss_of = lambda: forward(x, labels=x).loss  # it shifts the labels itself
    else:
        model = ours
        set_flash(model, "flash" in name)
        forward = torch.compile(model) if "compile" in name else model
        loss_of = lambda: F.cross_entropy(forward(x).flatten(0, 1).float(), y.flatten())
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def resident_mib():
    """(now, peak) resident memory of this process, in MiB; Linux only."""
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def load_child(loader, folder):
    """In a fresh interpreter: load folder with loader, then run one forward pass; print what it cost.

    transformers' from_pretrained memory-maps the file and returns at once: the weights are read from
    disk (or the page cache) when first used. Ours reads them into memory before it returns. So the
    time and peak memory up to the first forward pass are the fair comparison; both are printed.
    """
    torch.set_num_threads(1)  # on a busy 2-core machine, 2 threads make one forward pass take 0.07 to 1.8 s
    t0 = time.perf_counter()
    if loader == "ours":
        import load_hf
        load = lambda: load_hf.load(folder)[0]
    else:
        from transformers import GPT2LMHeadModel
        load = lambda: GPT2LMHeadModel.from_pretrained(folder)
    result = {"import_s": time.perf_counter() - t0}
    baseline, _ = resident_mib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the resident memory now
    t0 = time.perf_counter()
    model = load().eval()
    result |= {"load_s": time.perf_counter() - t0, "load_mib": resident_mib()[1] - baseline}
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long))
    result |= {"first_s": time.perf_counter() - t0, "first_mib": resident_mib()[1] - baseline}
    print(json.dumps(result))


def in_fresh_processes(section, name, code):
    """Run code (which prints one JSON line) in SETTINGS.repeats fresh interpreters: the median of each figure."""
    runs = []
    for i in range(SETTINGS.repeats):
        progress(section, f"{name}, fresh process {i + 1} of {SETTINGS.repeats}")
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               cwd=os.path.dirname(os.path.abspath(__file__)))
        runs.append(json.loads(child.stdout.splitlines()[-1]))
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def read_through(path):
    with open(path, "rb") as f:
        while f.read(1 << 24):  # into the page cache, so that no run pays for the disk
            pass


def bench_load(model_name):
    """Loading the 124M GPT-2 from a save_pretrained folder, each run in a fresh interpreter; then
    exporting it (bench_export).

    GPT-2 whatever --model says: the loader is the same code for every family.
    """
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        progress("load", "saving a 124M GPT2LMHeadModel with save_pretrained")
        GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
        weights_mib = 124_439_808 * 4 / 2**20
        read_through(os.path.join(folder, "model.safetensors"))
        for name, loader in (("transformers GPT2LMHeadModel.from_pretrained", "transformers"),
                             ("ours, load_hf.load", "ours")):
            m = in_fresh_processes("load", name, f"import bench; bench.load_child({loader!r}, {folder!r})")
            print(f"({name}: load {m['load_s']:.2f} s, {m['load_mib']:.0f} MiB)", flush=True)
            rows.append([name, f"{m['import_s']:.2f}", f"{m['load_s']:.2f}",
                         f"{m['load_mib']:.0f} MiB = {m['load_mib'] / weights_mib:.2f}x", f"{m['first_s']:.2f}",
                         f"{m['first_mib']:.0f} MiB = {m['first_mib'] / weights_mib:.2f}x"])
        TABLES.append(lambda: table(
            f"load: 124M GPT-2 from safetensors ({weights_mib:.0f} MiB of float32 weights), median of "
            f"{SETTINGS.repeats} fresh processes, 1 thread; memory is peak resident memory above the process's "
            f"after its imports", ["loader", "import s", "load s", "peak while loading",
                                   "load + first forward s", "peak up to first forward"], rows))
        bench_export(folder, weights_mib)


def export_child(exporter, source, out_dir):
    """In a fresh interpreter: write source as a Hugging Face folder out_dir; print what it cost.

    ours: load_hf.export of a checkpoint of this project (ckpt.pt, memory-mapped); transformers: the same
    weights from their Hugging Face folder, from_pretrained then save_pretrained. transformers is imported
    first in both, so that memory counts from after the imports alike.
    """
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast  # noqa: F401
    from transformers.convert_slow_tokenizer import TikTokenConverter  # noqa: F401
    if exporter == "ours":
        import load_hf
        export = lambda: load_hf.export(source, out_dir)
    else:
        export = lambda: GPT2LMHeadModel.from_pretrained(source).save_pretrained(out_dir)
    result = {"import_s": time.perf_counter() - t0}
    baseline, _ = resident_mib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the resident memory now
    t0 = time.perf_counter()
    export()
    result |= {"export_s": time.perf_counter() - t0, "export_mib": resident_mib()[1] - baseline,
               "file_mib": os.path.getsize(os.path.join(out_dir, "model.safetensors")) / 2**20}
    print(json.dumps(result))


def bench_export(hf_folder, weights_mib):
    """Exporting the 124M GPT-2 (random weights) with load_hf.py to=hf, against transformers' own
    round of from_pretrained and save_pretrained on a folder of the same size; each in fresh processes.
    What matters is the peak memory against the weights: at most one copy beyond the checkpoint's."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        progress("load", "saving a 124M GPT-2 of ours (random weights) as a checkpoint")
        torch.manual_seed(0)
        model = gpt2.Transformer(gpt2.Config())
        common.save_checkpoint({"model_name": "gpt2", "model_config": dataclasses.asdict(model.cfg),
                                "tokenizer": "gpt2", "train_config": {}, "model": model.state_dict()},
                               os.path.join(tmp, "ckpt.pt"))
        del model
        read_through(os.path.join(tmp, "ckpt.pt"))
        for name, exporter, source in (("transformers from_pretrained + save_pretrained", "transformers", hf_folder),
                                       ("ours, load_hf.py to=hf (load_hf.export)", "ours", tmp)):
            out_dir = os.path.join(tmp, exporter + "-hf")
            m = in_fresh_processes("load", name, f"import bench; bench.export_child({exporter!r}, {source!r}, "
                                                 f"{out_dir!r})")
            print(f"({name}: {m['export_s']:.2f} s, {m['export_mib']:.0f} MiB)", flush=True)
            rows.append([name, f"{m['import_s']:.2f}", f"{m['export_s']:.2f}",
                         f"{m['export_mib']:.0f} MiB = {m['export_mib'] / weights_mib:.2f}x", f"{m['file_mib']:.0f}"])
    TABLES.append(lambda: table(
        f"export: 124M GPT-2 into a Hugging Face folder ({weights_mib:.0f} MiB of float32 weights), median of "
        f"{SETTINGS.repeats} fresh processes, 1 thread; memory is peak resident memory above the process's after "
        f"its imports (transformers' in both)", ["exporter", "import s", "export s", "peak while exporting",
                                                 "model.safetensors MiB"], rows))


def generated_text(path, megabytes, seed=0):
    """Write about megabytes of English-looking text: lines of random words, numbers and punctuation."""
    words = ("the of and to in a is that for it as was with be by on not he I this are or his from at which "
             "but have an they you were her she there been one all we their has would when if so no what up "
             "painter picture Gisburn Stroud canvas effort moves closer light water laughed window sea "
             "always thought genius sketch studio Riviera cheap wife villa terrace portrait").split()
    marks = ["", "", "", "", ",", ".", ";", "?", "!"]
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < megabytes * 1_000_000:
            lines = []
            for _ in range(10_000):  # a line: 6 to 17 words, some with punctuation, now and then a number
                n = rng.integers(6, 18)
                line = [words[i] + marks[m] for i, m in zip(rng.integers(0, len(words), n),
                                                            rng.integers(0, len(marks), n))]
                if rng.random() < 0.2:
                    line.insert(rng.integers(0, n), str(rng.integers(0, 10_000)))
                lines.append(" ".join(line).rstrip(",.;?!"))
            f.write("\n".join(lines) + "\n")


def text_pieces(path, size=1_000_000):
    """The file's text in pieces of about size characters, each cut just after a newline.

    Every line of generated_text starts with a word or a number and ends with one, and GPT-2's
    tokenizer ends a token at such a newline and never looks across it: the pieces give exactly the
    tokens of the whole text (bench_tokenize checks it against the token cache). In other text, two
    newlines in a row or an indented line would make the cut change a few tokens.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = 0
    while start < len(text):
        end = text.find("\n", start + size) + 1 or len(text)
        yield text[start:end]
        start = end


def bench_tokenize(model_name):
    """Tokenizing 100 MB of text: one thread against the parallel token cache builder (data/prepare.py).

    Besides MB/s, the CPU time used (this process's threads and its worker processes): on a machine
    shared with other work, workers that find no free core show it as fewer cores used, and MB per
    CPU-second says how well they use what they get. GPT-2's tokenizer whatever --model says.
    """
    tokenizer = load_tokenizer("gpt2")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "corpus.txt")
        progress("tokenize", "writing 100 MB of generated text")
        generated_text(path, 100)
        megabytes = os.path.getsize(path) / 1e6

        def one_thread():  # the loop a user would write: encode each piece in turn
            return sum(len(tokenizer.encode(piece)) for piece in text_pieces(path))

        def encode_batch():  # tiktoken's batch encoder (threads, Python lists), turned into uint16 arrays
            n = 0
            all_pieces = text_pieces(path)
            while batch := list(itertools.islice(all_pieces, 4 * os.cpu_count())):
                for ids in tokenizer.enc.encode_batch(batch, num_threads=os.cpu_count(),
                                                      allowed_special={"<|endoftext|>"}):
                    n += len(np.array(ids, dtype=np.uint16))
            return n

        def cache():  # what train.py calls: read, encode in worker processes, write the uint16 cache, fsync
            cache_path, dtype = prepare.token_cache(path, tokenizer)
            for stale in (cache_path, cache_path + ".json"):
                if os.path.exists(stale):
                    os.remove(stale)
            prepare.tokenize_corpus(path, tokenizer)
            return os.path.getsize(cache_path) // np.dtype(dtype).itemsize

        base, n_tokens = None, set()
        for name, fn in (("single-threaded encode loop over the pieces", one_thread),
                         (f"tiktoken encode_batch, {os.cpu_count()} threads, lists -> uint16", encode_batch),
                         (f"data/prepare.py token cache, {os.cpu_count()} worker processes", cache)):
            progress("tokenize", name)
            t0, cpu0 = time.perf_counter(), sum(os.times()[:4])  # user and system, self and children
            n_tokens.add(fn())
            seconds, cpu = time.perf_counter() - t0, sum(os.times()[:4]) - cpu0
            base = base or megabytes / seconds
            print(f"({name}: {megabytes / seconds:.1f} MB/s)", flush=True)
            rows.append([name, f"{megabytes / seconds:.1f}", f"{megabytes / seconds / base:.2f}x",
                         f"{cpu / seconds:.2f}", f"{megabytes / cpu:.1f}"])
        assert len(n_tokens) == 1, f"the three ways gave different numbers of tokens: {n_tokens}"
    TABLES.append(lambda: table(
        f"tokenize: {megabytes:.0f} MB of generated text, GPT-2 BPE (tiktoken), {os.cpu_count()} CPU cores",
        ["how", "MB/s", "vs one thread", "cores used", "MB per CPU-s"], rows))


def bench_ddp(model_name):
    """Training throughput of 2-process DDP (gloo) against 1 process, at the same global batch.

    tokens/s comes from the runs' own log.jsonl, leaving out the first steps. The CPU time comes from
    two runs of each kind, one longer than the other by `extra` steps: the difference is what those
    steps cost, without the start-up, the final evaluation or the checkpoint. A small GPT-2 whatever
    --model says: what is measured is the communication, not the model.
    """
    short, extra, batch = 4, 12, 16
    shape = dict(d_model=128, n_layers=4, n_heads=4, context_length=128)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        data = os.path.join(folder, "corpus.txt")
        generated_text(data, 2)
        args = ["train.py", "config=tiny", *(f"{k}={v}" for k, v in shape.items()), f"data={data}",
                f"batch_size={batch}", "eval_interval=1000", "eval_iters=1", "ckpt_interval=0", "dtype=float32",
                "device=cpu"]
        with torch.device("meta"):
            n_params = gpt2.count_parameters(gpt2.Transformer(gpt2.Config(**{**gpt2.PRESETS["tiny"], **shape})))
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        base = None
        for name, cores, launch, extra_args, threads in (
                ("1 process, 1 thread, grad_accum=2", 1, [sys.executable], ["grad_accum=2"], "1"),
                ("torchrun: 2 processes x 1 thread, DDP", 2, torchrun, [], "1"),
                ("1 process, 2 threads, grad_accum=2", 2, [sys.executable], ["grad_accum=2"], "2")):
            cpu = []
            for steps in (short, short + extra):
                progress("ddp", f"{name}, train.py max_iters={steps}")
                out = os.path.join(folder, f"out-{len(cpu)}")
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                result = subprocess.run([*launch, *args, *extra_args, f"max_iters={steps}", f"out_dir={out}"],
                                        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": threads},
                                        cwd=os.path.dirname(os.path.abspath(__file__)))
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                if result.returncode != 0:
                    sys.exit(f"bench.py: {name} failed:\n{result.stderr[-2000:]}")
                cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl")) if '"loss"' in line]
            rate = (log[-1]["tokens"] - log[short - 1]["tokens"]) / (log[-1]["time"] - log[short - 1]["time"])
            per_cpu_second = extra * batch * shape["context_length"] / (cpu[1] - cpu[0])
            base = base or (rate, per_cpu_second)
            print(f"({name}: {rate:.0f} tokens/s)", flush=True)
            rows.append([name, str(cores), f"{rate:.0f}", f"{rate / cores:.0f}", f"{rate / cores / base[0]:.2f}x",
                         f"{per_cpu_second:.0f}", f"{per_cpu_second / base[1]:.2f}x"])
    TABLES.append(lambda: table(
        f"ddp: GPT-2 {n_params / 1e6:.1f}M parameters, global batch {batch} x {shape['context_length']} tokens, "
        f"float32, gloo, {os.cpu_count()} CPU cores",
        ["run", "cores", "tokens/s", "per core", "vs 1 process", "tokens per CPU-s", "vs 1 process"], rows))


def bench_finetune(model_name):
    """Finetuning: LoRA (rank 8) against full finetuning, instruction against pretraining batches.

    Each row is train.py's step (the batch read by its split, train.loss_fn, backward, fused AdamW over
    the parameters that train), on batches of the same shape: random windows of a token array, or
    instruction examples of exactly the window's length (no padding), the first half of each a prompt
    the loss skips. Memory is counted tensor by tensor at the first step (step_memory), not read from
    the process's resident size, which the allocator's reuse of the rows before blurs.
    """
    b, t, steps, rank = SETTINGS.batch_size, SETTINGS.seq_len, SETTINGS.steps, 8
    rows = [("full finetuning, pretraining batches", 0, "windows"),
            ("full finetuning, instruction batches", 0, "examples"),
            (f"LoRA rank {rank}, pretraining batches", rank, "windows")]
    gen = torch.Generator().manual_seed(4)
    steppers, memory, n_trained = {}, {}, {}
    for name, lora_rank, kind in rows:
        progress("finetune", f"{name}, batch {b} x {t}, first step (memory)")
        model = build_ours(model_name)
        t = min(t, model.cfg.context_length)
        ids = torch.randint(0, model.cfg.vocab_size, (b, t + 1), generator=gen)
        if kind == "windows":
            split, batch = prepare.Windows(ids.flatten().numpy(), t, t + 1), torch.arange(b) * (t + 1)
        else:
            examples = [(row, t // 2) for row in ids.tolist()]  # the first half of each: the prompt
            split, batch = instructions.Examples(examples, True, 0, "alpaca"), torch.arange(b)
        if lora_rank:
            train.add_lora(model, lora_rank, 2 * lora_rank)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
        memory[name] = step_memory(model, optimizer, *(z.to(DEVICE) for z in split.read(batch)))
        n_trained[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        steppers[name] = finetune_step(model, optimizer, split, batch)
    seconds = {name: float("inf") for name in steppers}
    for i in range(steps):  # in turns, so that a busy moment of the machine hits them all
        for name, step in steppers.items():
            progress("finetune", f"{name}, timed step {i + 1} of {steps}")
            seconds[name] = min(seconds[name], best_time(step, 1))
    full = rows[0][0]
    mib = lambda n: f"{n / 2**20:.1f}"
    TABLES.append(lambda: table(
        f"finetune: {model_name}, batch {b} x {t} tokens, float32, {DEVICE.type}, one step = batch + forward + backward + fused AdamW",
        ["", "parameters trained", "AdamW state MiB", "vs full", "gradients MiB", "activations MiB",
         "step memory MiB", "vs full", "s per step", "tokens/s", "vs full"],
        [[name, f"{n_trained[name]:,}", mib(m["state"]), f"{m['state'] / memory[full]['state']:.1%}", mib(m["grads"]),
          mib(m["saved"]), mib(m["total"]), f"{m['total'] / memory[full]['total']:.2f}x", f"{seconds[name]:.2f}",
          f"{b * t / seconds[name]:.0f}", f"{seconds[full] / seconds[name]:.2f}x"]
         for name, m in ((name, memory[name]) for name, _, _ in rows)],
        "step memory = weights + gradients + AdamW state + the activations autograd saves for backward (at most what a "
        "step holds at once); tokens/s counts every input position (an instruction batch's prompt too), so that rows "
        "of the same shape compare per token; vs full: the ratio to the first row (for speed, above 1 is faster)."))


def step_memory(model, optimizer, x, y):
    """Take one step, counting its memory in bytes: the weights, the activations autograd saves for
    backward (each storage once, the weights left out), the gradients, and AdamW's state after it."""
    weights = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    saved = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = train.loss_fn(model, x, y)
    loss.backward()
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state = sum(v.nbytes for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    total = sum(weights.values()) + sum(saved.values()) + grads + state
    return {"state": state, "grads": grads, "saved": sum(saved.values()), "total": total}


def finetune_step(model, optimizer, split, rows):
    """One step of train.py on the batch rows of split, as a function."""
    def step():
        x, y = split.read(rows)  # on the CPU, as train.py reads them, then moved
        train.loss_fn(model, x.to(DEVICE), y.to(DEVICE)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


SECTIONS = {"machine": bench_machine, "decode": bench_decode, "prefill": bench_prefill, "chat": bench_chat,
            "train": bench_train, "load": bench_load, "tokenize": bench_tokenize, "ddp": bench_ddp,
            "finetune": bench_finetune}


def main(argv):
    names = [a for a in argv if "=" not in a and not a.startswith("-") and a in SECTIONS]
    model_name, pairs, want_help = parse_args([a for a in argv if a not in names], "bench.py")
    apply_overrides(pairs, [SETTINGS], "bench.py")
    if want_help:
        print_help(__doc__, [("keys", SETTINGS)])
        return
    if SETTINGS.bf16 not in ("auto", "true", "false"):
        raise UserError(f"bf16={SETTINGS.bf16}: expected auto, true or false")
    global DEVICE
    DEVICE = pick_device(SETTINGS.device)  # device=cuda without a GPU: one line, exit status 2
    if DEVICE.type not in ("cpu", "cuda"):
        raise UserError(f"device={SETTINGS.device}: bench.py measures a CPU or a CUDA GPU: pass device=cpu")
    for key, (cpu, gpu) in PER_DEVICE.items():
        if getattr(SETTINGS, key) is None:
            setattr(SETTINGS, key, gpu if on_gpu() else cpu)
    model_name = model_name or "gpt2"
    where = torch.cuda.get_device_name(DEVICE) if on_gpu() else f"{torch.get_num_threads()} threads"
    print(f"bench.py: {model_name}, {where}, load average {os.getloadavg()[0]:.1f}", flush=True)
    for name in names or SECTIONS:
        progress(name, SECTIONS[name].__doc__.split("\n")[0].rstrip("."))
        SECTIONS[name](model_name)
    if MACHINE.samples:  # the sections that compare with the machine took samples
        MACHINE.report()
    for report in TABLES:
        report()
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} "
          f"{os.getloadavg()[2]:.1f} (1, 5, 15 minutes)")


if __name__ == "__main__":
    common.run(main, "bench.py")
