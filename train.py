"""Train a model from scratch on a text file: The Verdict, a short story, unless you pass another.

    python train.py                              # GPT-2 'verdict' preset, 10 epochs on The Verdict
    python train.py --model gpt2 config=tiny epochs=2 data=my.txt
    python train.py init_from=gpt2 seq_len=256   # continue training GPT-2's published weights
    python train.py init_from=resume             # carry on where the run in out_dir stopped
    python train.py data=books/ max_iters=5000   # a large corpus: random windows, tokenized once into a memmap
    python train.py init_from=gpt2-medium data=instruction-data.json epochs=2 lora_rank=8   # answer instructions
    torchrun --nproc_per_node=4 train.py data=books/ max_iters=5000 fsdp=true   # several GPUs or processes
    python train.py --help                       # every key, with its type and default

Any key of TrainConfig below, or of the model's Config, can be set as key=value (or --key=value).

The file reads top to bottom: the settings; configure (the command line, the model, the weights to
start from) and check; the data, LoRA, the model and its optimizer; then main, the training loop. It imports
common.py (command line, tokenizers, checkpoint files), data/prepare.py (the token cache), data/instructions.py
(instruction examples), load_hf.py (Hugging Face weights) and sample.py (the sample at each evaluation).
"""
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import load_hf
from common import (MODELS, UserError, apply_overrides, check_model_config, check_settings, import_model,
                    is_checkpoint, load_tokenizer, model_config, parse_args, pick_device, pick_dtype, print_help,
                    read_checkpoint, run, save_checkpoint)
from data.instructions import IGNORE, is_instruction_data
from data.prepare import VERDICT, read_splits, schedule, tokenize_corpus
from sample import complete, generate, until_end


@dataclass
class TrainConfig:
    data: str = VERDICT          # UTF-8 text file, a folder of .txt files, or instructions (.json, .jsonl)
    config: str = ""             # model preset (gpt2: verdict, tiny, gpt2, ...); "" = the model's default
    init_from: str = "scratch"   # scratch = a new model; resume = carry on out_dir/ckpt.pt; or pretrained weights:
    #                              gpt2 ... gpt2-xl, a Hugging Face folder, a checkpoint (fresh optimizer)
    out_dir: str = "out"         # where ckpt.pt, log.jsonl and loss.png go
    epochs: int = 10             # passes over the training windows (unless max_iters is set)
    max_iters: int = 0           # > 0: train this many steps on random windows instead of epochs
    batch_size: int = 2          # windows per step, over all processes and micro-batches together
    grad_accum: int = 1          # micro-batches per process and step, gradients summed: less memory, same step
    seq_len: int | None = None   # tokens per training window; None = context_length
    stride: int | None = None    # step between training windows; None = seq_len (no overlap)
    lr: float = 4e-4             # learning rate (the peak, with warmup_steps or decay_lr); the book's
    decay_lr: bool = False       # cosine decay from lr to min_lr after the warmup; false = a constant lr
    min_lr: float = 1e-5         # where decay_lr's cosine ends
    warmup_steps: int = 0        # linear warmup from 0 (max_iters runs on a large corpus: try a few hundred)
    weight_decay: float = 0.1    # AdamW, on weight matrices and embeddings only
    grad_clip: float = 1.0       # max gradient norm; 0 = off
    eval_interval: int = 0       # steps between evaluations; 0 = after every epoch, or 10 per max_iters run
    eval_iters: int = 5          # batches used to estimate train and validation loss at each evaluation
    ckpt_interval: int | None = None  # steps between checkpoints; None = at every evaluation; 0 = at the end only
    prompt: str = "Every effort moves you"  # continued greedily at each evaluation
    seed: int = 123
    device: str = "auto"         # auto = cuda, then mps, then cpu; under torchrun each process takes its own GPU
    dtype: str = "auto"          # float32, bfloat16 or float16 (autocast); auto = bfloat16 where fast
    fsdp: bool = False           # under torchrun: shard parameters, gradients and optimizer state across processes
    compile: bool = False        # torch.compile the model for training and evaluation
    mask_prompt: bool = True     # instruction data: the loss counts the responses only; false = the whole text
    lora_rank: int = 0           # > 0: train low-rank adapters of this rank on the blocks' linear layers only
    lora_alpha: float | None = None  # the adapters' output is scaled by lora_alpha / lora_rank; None = 2 x rank


# ----------------------------------------------------------------------------- the command line

KEEPS_WEIGHTS = ("dropout", "flash")  # the model keys that may change when training pretrained weights


def processes():
    """This process's place in the run: torchrun starts one per GPU (or CPU share) and says its rank."""
    env, rank = os.environ, int(os.environ.get("RANK", 0))
    return SimpleNamespace(distributed="RANK" in env, rank=rank, local_rank=int(env.get("LOCAL_RANK", 0)),
                           world_size=int(env.get("WORLD_SIZE", 1)), master=rank == 0)  # master: prints, writes


def starting_point(cfg, model_name, ckpt_path):
    """The checkpoint dict the weights (resuming: and the training state) come from, None for a new model:
    a checkpoint of this project (its file or out_dir), or Hugging Face weights (a hub id, a folder)."""
    if cfg.init_from == "scratch":
        return None
    if cfg.init_from == "resume":
        if not os.path.isfile(ckpt_path):
            raise UserError(f"init_from=resume found no checkpoint at {ckpt_path}: pass the out_dir= of the run "
                            f"to continue, or start a new one with init_from=scratch")
        init = read_checkpoint(ckpt_path)
        if "optimizer" not in init:
            raise UserError(f"{ckpt_path} holds weights but no training state to resume: start from its "
                            f"weights with init_from={ckpt_path} instead")
        return init
    if is_checkpoint(cfg.init_from):
        init = read_checkpoint(cfg.init_from)
    else:
        model, init = load_hf.load(cfg.init_from, "cpu")
        init["model"] = model.state_dict()
    if cfg.config:  # pretrained weights bring their own architecture
        raise UserError(f"config={cfg.config} picks a model to train from scratch, but init_from="
                        f"{cfg.init_from} brings its own: leave config out")
    if model_name not in (None, init["model_name"]):
        raise UserError(f"--model {model_name} does not match init_from={cfg.init_from}, which holds a "
                        f"{init['model_name']} model: leave --model out")
    return init


def configure(argv):
    """(cfg, model name, its Config, where it comes from, the checkpoint dict to start from or None)
    from the command line; None after printing --help."""
    usage = "train.py"
    model_name, pairs, want_help = parse_args(argv, usage)
    cfg = TrainConfig()
    train_keys = {f.name for f in dataclasses.fields(cfg)}
    apply_overrides({k: v for k, v in pairs.items() if k in train_keys}, [cfg], usage)
    check_values(cfg, processes())
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    init = None if want_help and cfg.init_from == "resume" else starting_point(cfg, model_name, ckpt_path)
    if init is not None and (cfg.init_from != "resume" or (model_name is None and not cfg.config)):
        # the checkpoint's own model; resuming, unless the command names another to compare it with
        model_name, source = init["model_name"], f"init_from={cfg.init_from}"
        model_cfg = import_model(model_name).Config(**init["model_config"])
    else:
        model_name = model_name or "gpt2"
        source = f"config={cfg.config or MODELS[model_name]}"
        model_cfg = model_config(import_model(model_name), cfg.config or MODELS[model_name])
    built = dataclasses.replace(model_cfg)
    apply_overrides({k: v for k, v in pairs.items() if k not in train_keys}, [cfg, model_cfg], usage)
    if want_help:
        shown = dataclasses.replace(cfg, config=cfg.config or ("" if init else MODELS[model_name]))  # by name
        print_help(__doc__, [("training keys", shown), (f"model keys ({model_name}, {source})", model_cfg)], True)
        return None
    check(cfg, model_name, model_cfg, built, init, ckpt_path)
    return cfg, model_name, model_cfg, source, init


def check_values(cfg, procs):
    """Refuse, in one line, a training value that cannot work, before anything is loaded."""
    check_settings(cfg, [
        ("epochs batch_size eval_iters grad_accum", lambda v: v >= 1, "must be 1 or more"),
        ("seq_len stride", lambda v: v is None or v >= 1, "must be 1 or more, or None"),
        ("max_iters eval_interval seed warmup_steps", lambda v: v >= 0, "must be 0 or more"),
        ("ckpt_interval", lambda v: v is None or v >= 0, "must be 0 or more, or None (at every evaluation)"),
        ("lr", lambda v: 0 <= v < math.inf, "must be 0 (the weights stay) or a number above it, e.g. lr=5e-4"),
        ("min_lr", lambda v: 0 <= v <= cfg.lr, f"must be a number from 0 up to lr={cfg.lr}"),
        ("weight_decay", lambda v: 0 <= v < math.inf, "must be 0 (none) or more, e.g. weight_decay=0.1"),
        ("grad_clip", lambda v: v >= 0, "must be 0 (off) or more, e.g. grad_clip=1.0"),
        ("fsdp", lambda v: not v or procs.distributed, "shards the model: launch with torchrun --nproc_per_node=N"),
        ("lora_rank", lambda v: v >= 0, "must be 0 (off) or more, e.g. lora_rank=8"),
        ("lora_rank", lambda v: not (v and cfg.fsdp), "does not work with fsdp=true yet: leave fsdp out (DDP)"),
        ("lora_alpha", lambda v: v is None or 0 < v < math.inf, "must be above 0, e.g. lora_alpha=16"),
        ("batch_size", lambda v: v % (procs.world_size * cfg.grad_accum) == 0,
         f"does not split evenly into {procs.world_size} process(es) x grad_accum={cfg.grad_accum} micro-batches: "
         f"make batch_size a multiple of {procs.world_size * cfg.grad_accum}")])


def check(cfg, model_name, model_cfg, built, init, ckpt_path):
    """Refuse, in one line each, settings that cannot work, before anything is built or loaded."""
    if cfg.init_from not in ("scratch", "resume"):
        changed = [f"{f.name}={getattr(model_cfg, f.name)}" for f in dataclasses.fields(model_cfg)
                   if f.name not in KEEPS_WEIGHTS and getattr(model_cfg, f.name) != getattr(built, f.name)]
        if changed:
            raise UserError(f"{' '.join(changed)} would change the architecture of init_from={cfg.init_from}: "
                            f"leave it out (only {' and '.join(KEEPS_WEIGHTS)} may change; seq_len= sets "
                            f"shorter training windows)")
    check_model_config(model_cfg)
    check_settings(cfg, [("seq_len", lambda v: (v or 0) <= model_cfg.context_length, f"is longer than the model's "
                          f"context_length={model_cfg.context_length}: use at most {model_cfg.context_length}")])
    if cfg.init_from == "resume" and (
            init["model_name"] != model_name or init["model_config"] != dataclasses.asdict(model_cfg)):
        differ = [f"{k}={v}" for k, v in init["model_config"].items() if getattr(model_cfg, k, None) != v]
        raise UserError(f"{ckpt_path} holds a {init['model_name']} model"
                        f"{' with ' + ', '.join(differ) if differ else ''}, not the {model_name} model "
                        f"this command builds: resume with the --model, config= and model keys of the run "
                        f"that wrote it (or none of them), or pass another out_dir=")
    if cfg.init_from == "resume" and (was := init["train_config"].get("lora_rank", 0)) != cfg.lora_rank:
        raise UserError(f"{ckpt_path} was trained with lora_rank={was}: resume with that lora_rank= and lora_alpha=")


def pick_place(cfg, procs):
    """The device and autocast dtype of this process, after checking that out_dir can be written."""
    device = pick_device(cfg.device)
    if procs.distributed and device.type == "cuda":
        device = torch.device("cuda", procs.local_rank)  # one GPU per process on each machine
    elif procs.distributed and device.type != "cpu":
        raise UserError(f"torchrun runs on CUDA GPUs or on the CPU, not {device.type}: pass device=cpu")
    dtype = pick_dtype(cfg.dtype, device)
    if procs.master and cfg.init_from != "resume" and os.path.isfile(os.path.join(cfg.out_dir, "ckpt.pt")):
        print(f"train.py: note: {cfg.out_dir} holds another run's ckpt.pt, which this run replaces at its first "
              f"checkpoint (init_from=resume would continue it instead)", file=sys.stderr)
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=cfg.out_dir).close()
    except OSError as e:
        raise UserError(f"cannot write to out_dir={cfg.out_dir} ({e.strerror}): pass another out_dir=")
    return device, dtype


# ----------------------------------------------------------------------------- data

def load_data(cfg, model_cfg, init, ctx, procs, device):
    """The tokenizer (pretrained weights keep theirs), and the training and validation splits (read_splits). One
    process on each machine tokenizes a corpus into its cache, if out of date, before the process group starts."""
    tokenizer = load_tokenizer(init["tokenizer"] if init else "gpt2")
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise UserError(f"vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size}: leave vocab_size at its default")
    if procs.local_rank == 0 and not is_instruction_data(cfg.data):  # instructions: small, read by every process
        tokenize_corpus(cfg.data, tokenizer)
    if device.type == "cuda":  # the current GPU, whose random state a checkpoint saves and restores
        torch.cuda.set_device(device)
    if procs.distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        dist.barrier()
    return tokenizer, *read_splits(cfg, tokenizer, ctx)


# ----------------------------------------------------------------------------- LoRA

class LoRALinear(torch.nn.Module):
    """A frozen nn.Linear plus a low-rank update that trains, scale * x A B (the book's LinearWithLoRA)."""

    def __init__(self, linear, rank, scale):
        super().__init__()
        self.linear, self.scale, w = linear, scale, linear.weight
        self.A = torch.nn.Parameter(torch.nn.init.kaiming_uniform_(  # as nn.Linear initialises its weight
            torch.empty(w.shape[1], rank, dtype=w.dtype), a=math.sqrt(5)))
        self.B = torch.nn.Parameter(torch.zeros(rank, w.shape[0], dtype=w.dtype))  # so the model starts as it was

    def forward(self, x):  # (b, t, d_in) -> (b, t, d_out)
        return self.linear(x) + (x @ self.A @ self.B) * self.scale


def add_lora(model, rank, alpha):
    """Freeze the model, and wrap each nn.Linear in its blocks (wq, wk, wv, wo, the MLP's) in a LoRALinear."""
    model.requires_grad_(False)
    for block in model.blocks:
        for name, module in list(block.named_modules()):
            if isinstance(module, torch.nn.Linear):
                parent, _, leaf = name.rpartition(".")
                setattr(block.get_submodule(parent), leaf, LoRALinear(module, rank, alpha / rank))


def merge_lora(state, scale):
    """(the ordinary state dict, each adapted W merged into W + scale * (A B)^T, for sample.py and init_from=;
    the adapted layers' own, to resume: the adapters and W itself, as merged - scale * (A B)^T is not W again)."""
    lora = {k: v for k, v in state.items() if ".linear." in k or k.endswith((".A", ".B"))}
    merged = {k.replace(".linear.", "."): v for k, v in state.items() if not k.endswith((".A", ".B"))}
    for layer in (k.removesuffix(".A") for k in lora if k.endswith(".A")):
        w, update = merged[layer + ".weight"], lora[layer + ".A"].float() @ lora[layer + ".B"].float()
        merged[layer + ".weight"] = (w.float() + scale * update.T).to(w.dtype)  # (d_out, d_in)
    return merged, lora


# ----------------------------------------------------------------------------- model and optimizer

def build_model(cfg, arch, model_cfg, init, device, procs):
    """The model (raw, and as trained: compiled, DDP), AdamW, the loss scaler, the step and the loss history,
    with init's weights and, resuming, its training state. Built whole on the CPU, the same on every process
    (same seed), LoRA's adapters added, then moved to the device or, under FSDP, sharded (each block, the rest)."""
    torch.manual_seed(cfg.seed)
    raw_model = arch.Transformer(model_cfg)
    if init is not None:
        try:
            set_model_state_dict(raw_model, init["model"], options=StateDictOptions(full_state_dict=True))
        except (RuntimeError, KeyError, ValueError) as e:
            raise UserError(f"the weights of {cfg.init_from} do not fit this model ({str(e).splitlines()[0]}): "
                            f"leave out the model keys that change its shape") from None
    if cfg.lora_rank:
        add_lora(raw_model, cfg.lora_rank, cfg.lora_alpha or 2 * cfg.lora_rank)
        if cfg.init_from == "resume":  # the adapted layers as they were, frozen weights included (merge_lora)
            raw_model.load_state_dict(init["lora"], strict=False)
    if cfg.fsdp:
        mesh = init_device_mesh(device.type, (procs.world_size,))
        for block in raw_model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(raw_model, mesh=mesh)
    else:
        raw_model.to(device)
    trained = [p for p in raw_model.parameters() if p.requires_grad]  # with LoRA, the adapters only
    decay, no_decay = [p for p in trained if p.dim() >= 2], [p for p in trained if p.dim() < 2]  # matrices: decay
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")
    step, history = 0, {"step_tokens": [], "step_loss": [], "tokens": [], "train": [], "val": []}
    if cfg.init_from == "resume":  # optimizer, schedule and data position (the step), random state
        set_optimizer_state_dict(raw_model, optimizer, init["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        if scaler.is_enabled() and init["scaler"]:
            scaler.load_state_dict(init["scaler"])
        step, history = init["step"], init["history"]
        if len(init["rng"]) == procs.world_size:
            torch.set_rng_state(init["rng"][procs.rank]["cpu"])
            if device.type == "cuda" and "cuda" in init["rng"][procs.rank]:
                torch.cuda.set_rng_state(init["rng"][procs.rank]["cuda"])
    elif procs.rank > 0:
        torch.manual_seed(cfg.seed + procs.rank)  # dropout differs between processes
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if procs.distributed and not cfg.fsdp:  # DDP: every process holds the whole model and averages gradients
        model = DDP(model, device_ids=[procs.local_rank] if device.type == "cuda" else None)
    return raw_model, model, optimizer, scaler, step, history


# ----------------------------------------------------------------------------- training

def loss_fn(model, x, y):
    logits = model(x)  # (b, t, vocab); instruction data's targets are IGNORE outside the responses
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE)


@torch.no_grad()
def estimate_loss(model, split, rows, micro_batch, autocast, device, procs):
    """The mean loss over the windows or examples rows of split; each process takes its share, in micro-batches."""
    model.eval()
    total = torch.zeros((), device=device)
    for chunk in rows.view(procs.world_size, -1)[procs.rank].split(micro_batch):
        x, y = split.read(chunk)
        with autocast:
            total += loss_fn(model, x.to(device), y.to(device)) * len(chunk)
    if procs.world_size > 1:
        dist.all_reduce(total)
    model.train()
    return total.item() / len(rows)


def optimizer_step(model, optimizer, scaler, split, rows, cfg, autocast, device, procs):
    """One training step on the windows or examples rows of split (this process's share of the batch):
    forward and backward in grad_accum micro-batches, gradients averaged over the processes and clipped,
    then AdamW. Returns the loss, the mean over the whole batch, and the number of targets it counted."""
    sums = torch.zeros(2, device=device)  # the loss, the targets counted
    for i, micro in enumerate(rows.split(len(rows) // cfg.grad_accum)):
        x, y = split.read(micro)
        # DDP averages the gradients across processes during backward: only on the last micro-batch
        last = i == cfg.grad_accum - 1
        with model.no_sync() if isinstance(model, DDP) and not last else nullcontext():
            with autocast:
                loss = loss_fn(model, x.to(device), y.to(device)) / cfg.grad_accum
            scaler.scale(loss).backward()
        sums += torch.stack([loss.detach(), (y != IGNORE).sum().to(device)])
    if procs.world_size > 1:
        dist.all_reduce(sums)
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)  # float16: skipped if a gradient overflowed (the loss is then not finite)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    loss_sum, n_targets = sums.tolist()
    return loss_sum / procs.world_size, int(n_targets)


def evaluation_sample(model, tokenizer, val, prompt):
    """The greedy response to the first validation instruction, or with a corpus the continuation of prompt."""
    if val.format is None:
        return complete(model, tokenizer, prompt, 50)
    new = generate(model, torch.tensor([val.prompt(0)], device=next(model.parameters()).device), 50,
                   end_ids=tokenizer.end_ids)
    return "response: " + tokenizer.decode(until_end([int(t) for t in new], tokenizer.end_ids))


def lr_at(step, total_steps, cfg):
    """Linear warmup to cfg.lr, then cfg.lr, or with decay_lr a cosine decay to cfg.min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if not cfg.decay_lr:
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def plot_losses(history, path):
    """loss.png: the loss of each step, and the train and validation loss at each evaluation."""
    import matplotlib  # here, not at the top: it takes a second to import, and only process 0 plots
    matplotlib.use("Agg")  # no window: the picture goes to a file
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["step_tokens"], history["step_loss"], alpha=0.3, label="train (each step)")
    ax.plot(history["tokens"], history["train"], "o-", label="train")
    ax.plot(history["tokens"], history["val"], "o-", label="validation")
    ax.set(xlabel="tokens seen", ylabel="cross-entropy loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path + ".tmp", format="png")
    os.replace(path + ".tmp", path)  # a viewer refreshing the file never sees half a picture
    plt.close(fig)


def open_log(path, step, ckpt_path):
    """The metrics log, opened for appending. A new run writes path.new, which replaces path at its first
    checkpoint (an earlier run's log lives on until then); resuming keeps the lines up to step."""
    new = path + ".new"
    if step == 0:
        return open(new, "w", buffering=1)
    stopped = os.path.exists(new) and os.path.getmtime(new) <= os.path.getmtime(ckpt_path)  # before the rename
    with open(new if stopped else path if os.path.exists(path) else os.devnull) as f:
        kept = [line for line in f if line.endswith("}\n") and json.loads(line)["step"] <= step]  # whole lines
    with open(path, "w") as f:
        f.writelines(kept)
    if os.path.exists(new):  # used, or left by a run that stopped before its checkpoint
        os.remove(new)
    return open(path, "a", buffering=1)  # line-buffered: each line reaches the file as it is written


def save_training(path, raw_model, optimizer, scaler, checkpoint, world_size):
    """Checkpoint the run: everything init_from=resume needs to carry on exactly. Every process takes
    part: under FSDP the full model and optimizer state are gathered from the shards (onto the CPU of
    process 0, which alone writes), and each process's random state is kept; with LoRA, see merge_lora."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    checkpoint["model"] = get_model_state_dict(raw_model, options=options)
    if adapted := [m for m in raw_model.modules() if isinstance(m, LoRALinear)]:
        checkpoint["model"], checkpoint["lora"] = merge_lora(checkpoint["model"], adapted[0].scale)
    checkpoint["optimizer"] = get_optimizer_state_dict(raw_model, optimizer, options=options)
    checkpoint["scaler"] = scaler.state_dict()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    checkpoint["rng"] = [rng]  # one per process
    if world_size > 1:
        checkpoint["rng"] = [None] * world_size
        dist.all_gather_object(checkpoint["rng"], rng)
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_checkpoint(checkpoint, path)


def main(argv):
    setup = configure(argv)
    if setup is None:  # --help
        return
    cfg, model_name, model_cfg, source, init = setup
    procs = processes()
    device, dtype = pick_place(cfg, procs)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")

    # data: windows of ctx + 1 tokens (inputs and the targets one token later), or instruction examples
    ctx = cfg.seq_len or model_cfg.context_length
    tokenizer, train, val = load_data(cfg, model_cfg, init, ctx, procs, device)
    total_steps, steps_per_epoch, eval_interval = schedule(cfg, train)
    micro_batch = cfg.batch_size // (procs.world_size * cfg.grad_accum)
    splits = [(split, split.eval_rows(cfg.eval_iters * cfg.batch_size)) for split in (train, val)]

    # the model and its optimizer
    arch = import_model(model_name)
    raw_model, model, optimizer, scaler, step, history = build_model(cfg, arch, model_cfg, init, device, procs)
    del init  # let go of the memory-mapped checkpoint file
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    saved_tokenizer = tokenizer.save(cfg.out_dir) if procs.master else tokenizer.name  # a Llama's: copied
    if procs.master:
        n_train = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)  # LoRA: the adapters only
        print(f"{model_name} ({source}): {arch.count_parameters(raw_model):,} parameters, {n_train:,} training "
              f"({n_train / arch.count_parameters(raw_model):.2%}), {train.describe(cfg)}, {total_steps} steps of "
              f"{cfg.batch_size} {train.unit}, {device} "
              f"{str(dtype).removeprefix('torch.')}{f', {procs.world_size} processes' * procs.distributed}"
              + (f", from step {step}" if step else ""))
        log = open_log(os.path.join(cfg.out_dir, "log.jsonl"), step, ckpt_path)
        if step >= total_steps:
            print(f"{ckpt_path} is already at step {step} of {total_steps}: raise max_iters= or epochs= to train on")
        if cfg.warmup_steps > total_steps:
            print(f"train.py: note: warmup_steps={cfg.warmup_steps} is longer than the run ({total_steps} steps):"
                  f" the learning rate never reaches lr={cfg.lr}", file=sys.stderr)

    # the loop: one optimizer step per batch, an evaluation every eval_interval steps
    ckpt_interval = eval_interval if cfg.ckpt_interval is None else cfg.ckpt_interval
    tokens_seen = history["step_tokens"][-1] if history["step_tokens"] else 0
    trained = step < total_steps
    saved_step, bar, t_start = (step if cfg.init_from == "resume" else None), None, time.perf_counter()
    while step < total_steps:
        if bar is None:  # a progress bar for each stretch between evaluations
            stop = min(total_steps, (step // eval_interval + 1) * eval_interval)
            desc = f"epoch {step // steps_per_epoch + 1}/{cfg.epochs}" if steps_per_epoch else f"steps to {stop}"
            bar = tqdm(total=stop - step, desc=desc, leave=False, dynamic_ncols=True,
                       disable=None if procs.master else True)
            t0, stretch_tokens = time.perf_counter(), 0
        lr = lr_at(step, total_steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        mine = train.draw(step, cfg).view(procs.world_size, -1)[procs.rank]  # my share of the batch
        step_loss, n_targets = optimizer_step(model, optimizer, scaler, train, mine, cfg, autocast, device, procs)
        if not math.isfinite(step_loss):
            kept = f"{ckpt_path} from step {saved_step} is kept" if saved_step else "no checkpoint was written"
            raise UserError(f"the loss became {step_loss} at step {step + 1}: {kept}; lower lr= (now {cfg.lr}) "
                            f"or use dtype=bfloat16 or float32 instead of float16")
        step += 1
        tokens_seen += n_targets  # the tokens the loss counted: a window's all, an example's response
        stretch_tokens += n_targets
        history["step_tokens"].append(tokens_seen)
        history["step_loss"].append(step_loss)
        tokens_per_s = stretch_tokens / (time.perf_counter() - t0)
        if procs.master:
            bar.update()
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens_per_s:.0f}")
            log.write(json.dumps({"step": step, "tokens": tokens_seen, "loss": step_loss, "lr": lr,
                                  "tokens_per_s": tokens_per_s, "time": time.perf_counter() - t_start}) + "\n")

        if step % eval_interval == 0 or step == total_steps:
            bar.close()
            bar = None
            losses = [estimate_loss(model, split, rows, micro_batch, autocast, device, procs) for split, rows in splits]
            for key, value in zip(("tokens", "train", "val"), (tokens_seen, *losses)):
                history[key].append(value)
            raw_model.eval()  # every process generates: under FSDP each forward needs them all
            with autocast:
                sample = evaluation_sample(raw_model, tokenizer, val, cfg.prompt)
            raw_model.train()
            if procs.master:
                where = (f"epoch {step // steps_per_epoch:2d}  step {step:4d}"
                         if steps_per_epoch and step % steps_per_epoch == 0 else f"step {step:5d}")
                print(f"{where}  train loss {losses[0]:.3f}  val loss {losses[1]:.3f}  {tokens_per_s:.0f} tokens/s")
                print("  " + sample.replace("\n", " "))
                log.write(json.dumps({"step": step, "tokens": tokens_seen, "train_loss": losses[0],
                                      "val_loss": losses[1]}) + "\n")
                plot_losses(history, os.path.join(cfg.out_dir, "loss.png"))
        if (ckpt_interval and step % ckpt_interval == 0) or step == total_steps:
            save_training(ckpt_path, raw_model, optimizer, scaler,
                          {"model_name": model_name, "model_config": dataclasses.asdict(model_cfg),
                           "train_config": dataclasses.asdict(cfg), "tokenizer": saved_tokenizer,
                           "prompt_format": val.format, "history": history, "step": step}, procs.world_size)
            if procs.master and saved_step is None and log.name.endswith(".new"):
                os.replace(log.name, log.name.removesuffix(".new"))  # the new run's log takes over
            saved_step = step

    if procs.master:
        if trained:
            print(f"saved {ckpt_path}, {os.path.join(cfg.out_dir, 'log.jsonl')} and "
                  f"{os.path.join(cfg.out_dir, 'loss.png')}")
        log.close()
    if procs.distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    run(main, "train.py", interrupted="interrupted; init_from=resume continues from the last checkpoint, "
                                      "if one was written")
