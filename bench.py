"""Benchmarks, run side by side with transformers on the same machine in one run.

    python bench.py              # every section
    python bench.py train        # one section: train
    python bench.py train steps=5
    python bench.py load repeats=5

Machines are shared and noisy, so compare the ratios within one run rather than absolute numbers.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import gpt2

SETTINGS = {"steps": 3, "batch_size": 4, "seq_len": 256, "repeats": 3}


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


def bench_load():
    """Loading the 124M GPT-2 from a save_pretrained folder, each run in a fresh interpreter."""
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as folder:
        hf_gpt2().save_pretrained(folder)
        weights_mib = 124_439_808 * 4 / 2**20
        with open(os.path.join(folder, "model.safetensors"), "rb") as f:
            while f.read(1 << 24):  # into the page cache, so that no run pays for the disk
                pass
        print(f"\n## load: 124M GPT-2 from safetensors ({weights_mib:.0f} MiB of float32 weights), "
              f"median of {SETTINGS['repeats']} fresh processes, 1 thread; memory is peak resident memory "
              f"above the process's after its imports")
        print("| loader | import s | load s | peak while loading | load + first forward s | "
              "peak up to first forward |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, loader in (("transformers GPT2LMHeadModel.from_pretrained", "transformers"),
                             ("ours, load_hf.load", "ours")):
            runs = []
            for _ in range(SETTINGS["repeats"]):
                code = f"import bench; bench.load_child({loader!r}, {folder!r})"
                child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__)))
                runs.append(json.loads(child.stdout.splitlines()[-1]))
            m = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            print(f"| {name} | {m['import_s']:.2f} | {m['load_s']:.2f} | {m['load_mib']:.0f} MiB = "
                  f"{m['load_mib'] / weights_mib:.2f}x | {m['first_s']:.2f} | {m['first_mib']:.0f} MiB = "
                  f"{m['first_mib'] / weights_mib:.2f}x |", flush=True)


SECTIONS = {"train": bench_train, "load": bench_load}

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
