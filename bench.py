"""Benchmarks, run side by side with transformers on the same machine in one run.

    python bench.py              # every section
    python bench.py train        # one section: train
    python bench.py train steps=5
    python bench.py tokenize     # 100 MB of text into the token cache: parallel against one thread
    python bench.py ddp          # 2-process DDP against 1 process, on the CPU

Machines are shared and noisy, so compare the ratios within one run rather than absolute numbers.
"""
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import gpt2
import train

SETTINGS = {"steps": 3, "batch_size": 4, "seq_len": 256}


def timed(fn, steps, warmup=1):
    """Seconds per call of fn, after warmup calls."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def hf_gpt2(n_positions=1024):
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_positions=n_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def bench_train():
    """Training tokens/s of the 124M GPT-2 (batch 4 x 256), ours against GPT2LMHeadModel."""
    b, t, steps = SETTINGS["batch_size"], SETTINGS["seq_len"], SETTINGS["steps"]
    x = torch.randint(0, 50257, (b, t))
    y = torch.randint(0, 50257, (b, t))
    print(f"\n## train: 124M GPT-2, batch {b} x {t} tokens, AdamW, CPU threads {torch.get_num_threads()}")
    print(f"| {'model':32s} | {'dtype':9s} | {'tokens/s':>9s} | {'vs HF':>6s} |")
    print(f"|{'-' * 34}|{'-' * 11}|{'-' * 11}|{'-' * 8}|")
    for dtype in (torch.float32, torch.bfloat16):
        results = {}
        for name in ("transformers GPT2LMHeadModel", "ours, einsum attention", "ours, flash=True"):
            torch.manual_seed(0)
            if name.startswith("transformers"):
                model = hf_gpt2()
                loss_of = lambda: model(x, labels=y).loss
            else:
                model = gpt2.Transformer(gpt2.Config(flash="flash" in name))
                loss_of = lambda: F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step():
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    loss = loss_of()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            results[name] = b * t / timed(step, steps)
            del model, optimizer
            hf = results["transformers GPT2LMHeadModel"]
            print(f"| {name:32s} | {str(dtype)[6:]:9s} | {results[name]:9.0f} | {results[name] / hf:5.2f}x |",
                  flush=True)


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


def bench_tokenize():
    """Tokenizing 100 MB of text: one thread against the parallel token cache builder of train.py.

    Besides MB/s, the CPU time used (this process's threads and its worker processes): on a machine
    shared with other work, workers that find no free core show it as fewer cores used, and MB per
    CPU-second says how well they use what they get.
    """
    tokenizer = train.load_tokenizer("gpt2")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "corpus.txt")
        generated_text(path, 100)
        megabytes = os.path.getsize(path) / 1e6
        print(f"\n## tokenize: {megabytes:.0f} MB of generated text, GPT-2 BPE (tiktoken), {os.cpu_count()} CPU cores")
        print(f"| {'how':56s} | {'MB/s':>5s} | {'vs one thread':>13s} | {'cores used':>10s} | {'MB per CPU-s':>12s} |")
        print(f"|{'-' * 58}|{'-' * 7}|{'-' * 15}|{'-' * 12}|{'-' * 14}|")

        def pieces():
            bounds = train.piece_bounds(path)
            return (train.read_piece(path, start, end) for start, end in zip(bounds, bounds[1:]))

        def one_thread():  # the loop a user would write: encode each piece in turn
            return sum(len(tokenizer.encode(piece)) for piece in pieces())

        def encode_batch():  # tiktoken's batch encoder (threads, Python lists), turned into uint16 arrays
            n = 0
            all_pieces = pieces()
            while batch := list(itertools.islice(all_pieces, 4 * os.cpu_count())):
                for ids in tokenizer.enc.encode_batch(batch, num_threads=os.cpu_count(),
                                                      allowed_special={"<|endoftext|>"}):
                    n += len(np.array(ids, dtype=np.uint16))
            return n

        def cache():  # train.py: read, encode in worker processes, write the uint16 cache, fsync
            for stale in (".gpt2.bin", ".gpt2.bin.json"):
                if os.path.exists(path + stale):
                    os.remove(path + stale)
            train.tokenize_corpus(path, tokenizer)
            return os.path.getsize(path + ".gpt2.bin") // 2

        base, n_tokens = None, set()
        for name, fn in (("single-threaded encode loop over the pieces", one_thread),
                         (f"tiktoken encode_batch, {os.cpu_count()} threads, lists -> uint16", encode_batch),
                         (f"train.py token cache, {os.cpu_count()} worker processes", cache)):
            t0, cpu0 = time.perf_counter(), sum(os.times()[:4])  # user and system, self and children
            n_tokens.add(fn())
            seconds, cpu = time.perf_counter() - t0, sum(os.times()[:4]) - cpu0
            base = base or megabytes / seconds
            print(f"| {name:56s} | {megabytes / seconds:5.1f} | {megabytes / seconds / base:12.2f}x | "
                  f"{cpu / seconds:10.2f} | {megabytes / cpu:12.1f} |", flush=True)
        assert len(n_tokens) == 1, "the three ways gave different numbers of tokens"


def bench_ddp():
    """Training throughput of 2-process DDP (gloo) against 1 process, at the same global batch.

    tokens/s comes from the runs' own log.jsonl, leaving out the first steps. The CPU time comes from
    two runs of each kind, one longer than the other by `extra` steps: the difference is what those
    steps cost, without the start-up, the final evaluation or the checkpoint.
    """
    short, extra, batch = 4, 12, 16
    shape = dict(d_model=128, n_layers=4, n_heads=4, context_length=128)
    with tempfile.TemporaryDirectory() as folder:
        data = os.path.join(folder, "corpus.txt")
        generated_text(data, 2)
        args = ["train.py", "config=tiny", *(f"{k}={v}" for k, v in shape.items()), f"data={data}",
                f"batch_size={batch}", "eval_interval=1000", "eval_iters=1", "ckpt_interval=0", "dtype=float32",
                "device=cpu"]
        with torch.device("meta"):
            n_params = gpt2.count_parameters(gpt2.Transformer(gpt2.Config(**{**gpt2.PRESETS["tiny"], **shape})))
        print(f"\n## ddp: GPT-2 {n_params / 1e6:.1f}M parameters, global batch {batch} x {shape['context_length']} "
              f"tokens, float32, gloo, {os.cpu_count()} CPU cores")
        print(f"| {'run':38s} | {'cores':>5s} | {'tokens/s':>8s} | {'per core':>8s} | {'vs 1 process':>12s} | "
              f"{'tokens per CPU-s':>16s} | {'vs 1 process':>12s} |")
        print(f"|{'-' * 40}|{'-' * 7}|{'-' * 10}|{'-' * 10}|{'-' * 14}|{'-' * 18}|{'-' * 14}|")
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        base = None
        for name, cores, launch, extra_args, threads in (
                ("1 process, 1 thread, grad_accum=2", 1, [sys.executable], ["grad_accum=2"], "1"),
                ("torchrun: 2 processes x 1 thread, DDP", 2, torchrun, [], "1"),
                ("1 process, 2 threads, grad_accum=2", 2, [sys.executable], ["grad_accum=2"], "2")):
            cpu = []
            for steps in (short, short + extra):
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
            print(f"| {name:38s} | {cores:5d} | {rate:8.0f} | {rate / cores:8.0f} | {rate / cores / base[0]:11.2f}x | "
                  f"{per_cpu_second:16.0f} | {per_cpu_second / base[1]:11.2f}x |", flush=True)


SECTIONS = {"train": bench_train, "tokenize": bench_tokenize, "ddp": bench_ddp}

def main(argv):
    names = [a for a in argv if "=" not in a] or list(SECTIONS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and (key not in SETTINGS or not value.isdigit()):
            return f"'{arg}': settings are {', '.join(f'{k}=N' for k in SETTINGS)}"
        if sep:
            SETTINGS[key] = int(value)
    for name in names:
        if name not in SECTIONS:
            return f"unknown section '{name}': choose from {', '.join(SECTIONS)}"
    for name in names:
        SECTIONS[name]()


if __name__ == "__main__":
    error = main(sys.argv[1:])
    if error:
        print(f"bench.py: {error}", file=sys.stderr)
        sys.exit(2)
