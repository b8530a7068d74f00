"""Benchmarks, run side by side with transformers on the same machine in one run.

    python bench.py              # every section
    python bench.py train        # one section: train
    python bench.py train steps=5

Machines are shared and noisy, so compare the ratios within one run rather than absolute numbers.
"""
import sys
import time

import torch
import torch.nn.functional as F

import gpt2

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


SECTIONS = {"train": bench_train}

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
