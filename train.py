"""Train a model from scratch on a text file: The Verdict, a short story, unless you pass another.

    python train.py                              # GPT-2 'verdict' preset, 15 epochs on The Verdict
    python train.py --model gpt2 config=tiny epochs=2 data=my.txt
    python train.py init_from=gpt2 seq_len=256   # continue training GPT-2's published weights
    python train.py init_from=resume             # carry on where the run in out_dir stopped
    python train.py data=books/ max_iters=5000   # a large corpus: random windows, tokenized once into a memmap
    torchrun --nproc_per_node=4 train.py data=books/ max_iters=5000 fsdp=true   # several GPUs or processes
    python train.py --help                       # every key, with its type and default

Any key of TrainConfig below, or of the model's Config, can be set as key=value (or --key=value).
This file also holds what sample.py shares with it: the command line, the tokenizer, checkpoints
and generation.
"""
import collections
import dataclasses
import difflib
import functools
import glob
import hashlib
import importlib
import json
import math
import multiprocessing
import os
import re
import sys
import tempfile
import time
import types
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
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
    data: str = VERDICT          # UTF-8 text file, or a folder of .txt files
    config: str = ""             # model preset (gpt2: verdict, tiny, gpt2, ...); "" = the model's default
    init_from: str = "scratch"   # scratch = a new model; resume = carry on out_dir/ckpt.pt; or pretrained weights:
    #                              gpt2 ... gpt2-xl, a Hugging Face folder, a checkpoint (fresh optimizer)
    out_dir: str = "out"         # where ckpt.pt, log.jsonl and loss.png go
    epochs: int = 15             # passes over the training windows (unless max_iters is set)
    max_iters: int = 0           # > 0: train this many steps on random windows instead of epochs
    batch_size: int = 2          # windows per step, over all processes and micro-batches together
    grad_accum: int = 1          # micro-batches per process and step, gradients summed: less memory, same step
    seq_len: int | None = None   # tokens per training window; None = context_length
    stride: int | None = None    # step between training windows; None = seq_len (no overlap)
    lr: float = 5e-4             # peak learning rate, reached after warmup_steps
    min_lr: float = 1e-5         # cosine decay ends here
    warmup_steps: int = 10       # linear warmup from 0
    weight_decay: float = 0.1    # AdamW, on weight matrices and embeddings only
    grad_clip: float = 1.0       # max gradient norm; 0 = off
    eval_interval: int = 0       # steps between evaluations; 0 = after every epoch, or 10 per max_iters run
    eval_iters: int = 5          # batches used to estimate train and validation loss at each evaluation
    ckpt_interval: int = 1000    # steps between checkpoints, besides the one at the end; 0 = only at the end
    prompt: str = "Every effort moves you"  # continued greedily at each evaluation
    seed: int = 123
    device: str = "auto"         # auto = cuda, then mps, then cpu; under torchrun each process takes its own GPU
    dtype: str = "auto"          # float32, bfloat16 or float16 (autocast); auto = bfloat16 where fast
    fsdp: bool = False           # under torchrun: shard parameters, gradients and optimizer state across processes
    compile: bool = False        # torch.compile the model for training and evaluation


class UserError(Exception):
    """A mistake in the command line or an input file: reported in one line, exit status 2."""


def run(main, script):
    """A script's entry point: main(argv), with a UserError reported in one line on stderr and exit
    status 2 (no traceback), Ctrl-C quiet, and output cut short by a closed pipe (| head) quiet too."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"{script}: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.stdout = None
        sys.exit(1)


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

    name = tag = "gpt2"

    def __init__(self):
        ranks = load_tiktoken_bpe(os.path.join(HERE, "data", "gpt2.tiktoken"))
        self.enc = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                     special_tokens={"<|endoftext|>": 50256})
        self.eot_id = 50256
        self.vocab_size = self.enc.n_vocab  # 50257

    def encode(self, text):
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def encode_to_numpy(self, text):  # the same ids as a uint32 array: no Python list, faster for long texts
        return self.enc.encode_to_numpy(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids):
        return self.enc.decode(ids)

    def save(self, out_dir):
        """What a checkpoint in out_dir records to find this tokenizer again: here, nothing to copy."""
        return "gpt2"


class HFTokenizer:
    """A Hugging Face tokenizer folder (tokenizer.json, which Llama checkpoints bring), read with
    transformers' AutoTokenizer from local files only, behind the same interface as Tokenizer."""

    def __init__(self, folder):
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise UserError(f"{folder} has no tokenizer.json: copy the model's tokenizer files "
                            f"(tokenizer.json, tokenizer_config.json) beside its config.json")
        from transformers import AutoTokenizer  # here, not at the top: importing it takes seconds
        try:
            self.hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as e:  # a truncated or foreign file
            raise UserError(f"cannot read the tokenizer in {folder} ({type(e).__name__}): copy the model's "
                            f"tokenizer files again") from None
        self.name = folder
        with open(path, "rb") as f:  # names the token cache of a corpus: one per tokenizer
            self.tag = "tok-" + hashlib.sha1(f.read()).hexdigest()[:10]
        self.eot_id = self.hf.eos_token_id  # Llama 3: <|end_of_text|>, Llama 2: </s>
        self.vocab_size = len(self.hf)  # special tokens included

    def encode(self, text):
        return self.hf.encode(text)  # with the start token (<s>, <|begin_of_text|>) the model expects

    def encode_to_numpy(self, text):  # a corpus's pieces: no start token in the middle of a text
        return np.array(self.hf.encode(text, add_special_tokens=False), dtype=np.uint32)

    def decode(self, ids):
        return self.hf.decode(ids, skip_special_tokens=True)

    def save(self, out_dir):
        """A copy in out_dir/tokenizer, so that the checkpoint there stands alone; it records the folder."""
        if os.path.abspath(self.name) != os.path.abspath(os.path.join(out_dir, "tokenizer")):
            self.hf.save_pretrained(os.path.join(out_dir, "tokenizer"))
        return "tokenizer"  # relative to the checkpoint's folder, see read_checkpoint


def load_tokenizer(name):
    """GPT-2's tokenizer ("gpt2"), or the Hugging Face tokenizer in the folder name (a Llama's)."""
    return Tokenizer() if name == "gpt2" else HFTokenizer(name)


def text_files(path):
    """The text files of the corpus: one file, or every .txt file in a folder and its subfolders.

    The Verdict is downloaded on first use, as in the book.
    """
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
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True))
        if not files:
            raise UserError(f"the folder {path} holds no .txt files: pass a folder of .txt files or a text file")
        return files
    if not os.path.isfile(path):
        raise UserError(f"data file {path} not found: pass data=path/to/text.txt")
    return [path]


PIECE_BYTES = 1 << 20  # text is tokenized in pieces of about a megabyte, in parallel


def piece_bounds(path):
    """Where to cut the file into pieces of about PIECE_BYTES: byte offsets, from 0 to its size.

    Each cut falls just before white space that follows an ASCII letter or digit. GPT-2's tokenizer
    always ends a token there and never looks across, so the pieces, encoded one by one, give exactly
    the tokens of the whole text. Where a piece's length of text holds no such place (Chinese has no
    spaces), the cut falls after a newline instead, and the tokens there may differ a little.
    """
    size, bounds, at = os.path.getsize(path), [0], PIECE_BYTES
    with open(path, "rb") as f:
        while at < size:
            f.seek(at)
            ahead = f.read(PIECE_BYTES)
            if found := re.search(rb"[A-Za-z0-9](?=\s)", ahead) or re.search(rb"\n", ahead):
                bounds.append(at + found.end())
                at = bounds[-1] + PIECE_BYTES
            else:
                at += len(ahead)
    return bounds + [size]


def read_piece(path, start, end):
    """The text of bytes start:end of the file, with its newlines read as open() reads them."""
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read(end - start).decode("utf-8")
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def start_tokenizer_process(name):
    global process_tokenizer
    process_tokenizer = load_tokenizer(name)


def encode_piece(path, start, end):
    """In a worker process: the piece's token ids, and whether it holds more than white space."""
    text = read_piece(path, start, end)
    return process_tokenizer.encode_to_numpy(text), not text.isspace()


def encode_in_order(workers, path):
    """Each piece's encode_piece result, in order, computed by the worker processes a few pieces ahead."""
    pending, bounds = collections.deque(), piece_bounds(path)
    for start, end in zip(bounds, bounds[1:]):
        pending.append(workers.submit(encode_piece, path, start, end))
        if len(pending) > 2 * os.cpu_count():  # enough to keep every process busy, and no more in memory
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def token_cache(data, tokenizer):
    """Where the corpus's token ids are kept, beside it, and their integer type: uint16 while they fit."""
    path = os.path.join(HERE, VERDICT) if data == VERDICT else data
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    return os.path.abspath(path).rstrip(os.sep) + f".{tokenizer.tag}.bin", dtype


def tokenize_corpus(data, tokenizer):
    """Tokenize the corpus into its token cache, unless the cache already holds the text as it is now.

    The files are joined by <|endoftext|>, their pieces tokenized by one process per CPU core. The
    cache is the raw array of ids, so np.memmap can read any window of it without loading the rest;
    beside it, a .json records the files' sizes and modification times, and a change to any of them
    makes the next run tokenize again.
    """
    files = text_files(data)
    cache, dtype = token_cache(data, tokenizer)
    stamp = [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]
    try:
        with open(cache + ".json") as f:
            if json.load(f)["files"] == stamp and os.path.getsize(cache) > 0:
                return
    except (OSError, ValueError, KeyError):
        pass  # no cache yet, or a broken one: make it
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cache), suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write the token cache beside {data} ({e.strerror}): "
                        f"copy the text to a folder you can write to") from None
    # Processes rather than threads: tiktoken's threads (its encode_batch) contend for shared state
    # and reached 1.2x one thread's speed on 2 cores, these processes 2x (python bench.py tokenize).
    # fork starts them at once, without importing torch again; main calls this before the process
    # group starts threads of its own.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    workers = ProcessPoolExecutor(os.cpu_count(), context, start_tokenizer_process, (tokenizer.name,))
    n_tokens, any_text = 0, False
    with workers, os.fdopen(fd, "wb") as out:
        for i, path in enumerate(files):
            if i > 0:
                np.array([tokenizer.eot_id], dtype=dtype).tofile(out)
            try:
                for ids, has_text in encode_in_order(workers, path):
                    ids.astype(dtype).tofile(out)
                    n_tokens, any_text = n_tokens + len(ids), any_text or has_text
            except UnicodeDecodeError:
                os.remove(tmp)
                raise UserError(f"{path} is not UTF-8 text: convert it (iconv -t utf-8) or pass another data=")
        out.flush()
        os.fsync(out.fileno())
    if not any_text:
        os.remove(tmp)
        raise UserError(f"{data} is empty: pass a file with text in it as data=")
    os.replace(tmp, cache)
    with open(cache + ".json", "w") as f:
        json.dump({"files": stamp, "tokens": n_tokens, "tokenizer": tokenizer.name}, f)


def window_starts(n_tokens, context_length, stride):
    """Where the windows of context_length + 1 tokens begin, every stride tokens."""
    return torch.arange(0, n_tokens - context_length, stride)


@functools.lru_cache(maxsize=1)
def epoch_order(seed, epoch, n_windows):
    """The order of the training windows in an epoch: the epoch-th shuffle of one generator seeded
    with seed, replayed from the start so that it depends on (seed, epoch) alone."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epoch + 1):
        order = torch.randperm(n_windows, generator=generator)
    return order


def batch_starts(step, n_tokens, context_length, cfg):
    """Where the windows of the training batch of step begin.

    The batch is a function of (seed, step) alone, so a resumed run reads on exactly where it stopped.
    Epochs: the windows every stride tokens, shuffled anew each epoch. max_iters: random windows.
    """
    if cfg.max_iters:
        rng = np.random.default_rng([cfg.seed, step])
        return torch.from_numpy(rng.integers(0, n_tokens - context_length, cfg.batch_size))
    stride = cfg.stride or context_length
    n_windows = len(window_starts(n_tokens, context_length, stride))
    epoch, i = divmod(step, n_windows // cfg.batch_size)
    return epoch_order(cfg.seed, epoch, n_windows)[i * cfg.batch_size:(i + 1) * cfg.batch_size] * stride


def get_batch(tokens, starts, context_length):
    """Inputs (b, t) and the targets one token later (b, t): the windows at starts, read from tokens."""
    rows = np.stack([tokens[s:s + context_length + 1] for s in starts.tolist()]).astype(np.int64)
    rows = torch.from_numpy(rows)  # (b, t + 1)
    return rows[:, :-1], rows[:, 1:]


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(checkpoint, path):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)  # make the rename itself survive a power cut
    finally:
        os.close(folder)


def read_checkpoint(path):
    """The checkpoint dict saved by train.py, from a file or the out_dir holding ckpt.pt.

    Its tensors stay memory-mapped on the CPU: only those that are used (the model's, for sampling)
    are read from disk.
    """
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train one with python train.py, or pass init_from=")
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        ckpt["model_name"], ckpt["model_config"], ckpt["model"]
    except Exception as e:  # truncated file, or not a checkpoint
        raise UserError(f"{path} is not a checkpoint this project can load ({type(e).__name__}): "
                        f"retrain it with python train.py or pass another init_from=") from None
    if ckpt["tokenizer"] != "gpt2":  # a tokenizer folder beside ckpt.pt (HFTokenizer.save)
        ckpt["tokenizer"] = os.path.join(os.path.dirname(path), ckpt["tokenizer"])
    return ckpt


def is_checkpoint(path):
    return os.path.isfile(path) or os.path.isfile(os.path.join(path, "ckpt.pt"))


def load_checkpoint(path, device, dtype=torch.float32):
    """Rebuild the model saved by train.py from a checkpoint file or the out_dir holding ckpt.pt; or
    load one from a Hugging Face folder or hub id, in dtype (None: as stored), through load_hf.py."""
    if not is_checkpoint(path):
        import load_hf  # here, not at the top: load_hf.py imports this file
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


KEEPS_WEIGHTS = ("dropout", "flash")  # the model keys that may change when training pretrained weights


def load_pretrained(name):
    """The weights a run starts from when init_from is neither scratch nor resume, as a checkpoint
    dict: a checkpoint of this project (a file, or the out_dir holding ckpt.pt), or Hugging Face
    weights (gpt2 ... gpt2-xl, a hub id, a folder) through load_hf.py, in float32 for training."""
    if is_checkpoint(name):
        return read_checkpoint(name)
    model, ckpt = load_checkpoint(name, "cpu")
    return {**ckpt, "model": model.state_dict()}


def save_training(path, raw_model, optimizer, scaler, checkpoint, world_size):
    """Checkpoint the run: everything init_from=resume needs to carry on exactly.

    Every process takes part: under FSDP the full model and optimizer state are gathered from the
    shards (onto the CPU of process 0, which alone writes), and each process's random state is kept.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    checkpoint["model"] = get_model_state_dict(raw_model, options=options)
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

def loss_fn(model, x, y):
    logits = model(x)  # (b, t, vocab)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def eval_starts(n_tokens, context_length, stride, n):
    """n windows spread evenly over a split (repeating some if it has fewer): the same ones every time."""
    starts = window_starts(n_tokens, context_length, stride)
    return starts[torch.arange(n) * len(starts) // n]


@torch.no_grad()
def estimate_loss(model, tokens, starts, context_length, micro_batch, autocast, device, rank, world_size):
    """The mean loss over the windows at starts; each process takes its share, in micro-batches."""
    model.eval()
    total = torch.zeros((), device=device)
    for chunk in starts.view(world_size, -1)[rank].split(micro_batch):
        x, y = get_batch(tokens, chunk, context_length)
        with autocast:
            total += loss_fn(model, x.to(device), y.to(device)) * len(chunk)
    if world_size > 1:
        dist.all_reduce(total)
    model.train()
    return total.item() / len(starts)


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
    fig.savefig(path + ".tmp", format="png")
    os.replace(path + ".tmp", path)  # a viewer refreshing the file never sees half a picture
    plt.close(fig)


def open_log(path, step):
    """The metrics log, opened for appending, keeping only the lines of steps before a resumed step."""
    kept = []
    if step > 0 and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line)
                except (ValueError, KeyError):
                    pass  # a line cut short by a crash
    with open(path, "w") as f:
        f.writelines(kept)
    return open(path, "a", buffering=1)  # line-buffered: each line reaches the file as it is written


def main(argv):
    usage = "train.py"
    model_name, pairs, want_help = parse_args(argv, usage)
    cfg = TrainConfig()
    train_keys = {f.name for f in dataclasses.fields(cfg)}
    apply_overrides({k: v for k, v in pairs.items() if k in train_keys}, [cfg], usage)
    model_pairs = {k: v for k, v in pairs.items() if k not in train_keys}
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    init = None  # the checkpoint dict the weights (and when resuming, the training state) come from
    if cfg.init_from == "resume" and not want_help:
        if not os.path.isfile(ckpt_path):
            raise UserError(f"init_from=resume found no checkpoint at {ckpt_path}: pass the out_dir= of the run "
                            f"to continue, or start a new one with init_from=scratch")
        init = read_checkpoint(ckpt_path)
        if "optimizer" not in init:
            raise UserError(f"{ckpt_path} holds weights but no training state to resume: start from its "
                            f"weights with init_from={ckpt_path} instead")
    if cfg.init_from not in ("scratch", "resume"):  # pretrained weights bring their own architecture
        init = load_pretrained(cfg.init_from)
        if cfg.config:
            raise UserError(f"config={cfg.config} picks a model to train from scratch, but init_from="
                            f"{cfg.init_from} brings its own: leave config out")
        if model_name not in (None, init["model_name"]):
            raise UserError(f"--model {model_name} does not match init_from={cfg.init_from}, which holds a "
                            f"{init['model_name']} model: leave --model out")
    if init is not None and (cfg.init_from != "resume" or (model_name is None and not cfg.config)):
        # the checkpoint's own model; resuming, unless the command names another to compare it with
        model_name, source = init["model_name"], f"init_from={cfg.init_from}"
        arch = import_model(model_name)
        model_cfg = arch.Config(**init["model_config"])
    else:
        model_name = model_name or "gpt2"
        source = f"config={cfg.config or MODELS[model_name]}"
        arch = import_model(model_name)
        model_cfg = model_config(arch, cfg.config or MODELS[model_name])
    built = dataclasses.replace(model_cfg)
    apply_overrides(model_pairs, [cfg, model_cfg], usage)
    if want_help:
        print_help(__doc__, [("training keys", cfg), (f"model keys ({model_name}, {source})", model_cfg)])
        return
    if cfg.init_from not in ("scratch", "resume"):
        changed = [f"{f.name}={getattr(model_cfg, f.name)}" for f in dataclasses.fields(model_cfg)
                   if f.name not in KEEPS_WEIGHTS and getattr(model_cfg, f.name) != getattr(built, f.name)]
        if changed:
            raise UserError(f"{' '.join(changed)} would change the architecture of init_from={cfg.init_from}: "
                            f"leave it out (only {' and '.join(KEEPS_WEIGHTS)} may change; seq_len= sets "
                            f"shorter training windows)")
    if min(cfg.epochs, cfg.batch_size, cfg.eval_iters, cfg.stride or 1, cfg.seq_len or 1, cfg.grad_accum) < 1:
        raise UserError("epochs, batch_size, eval_iters, stride, seq_len and grad_accum must be at least 1")
    if min(cfg.max_iters, cfg.eval_interval, cfg.ckpt_interval, cfg.seed) < 0:
        raise UserError("max_iters, eval_interval, ckpt_interval and seed must not be negative")
    if (cfg.seq_len or 0) > model_cfg.context_length:
        raise UserError(f"seq_len={cfg.seq_len} is longer than the model's context_length="
                        f"{model_cfg.context_length}: use at most {model_cfg.context_length}")

    # torchrun starts one process per GPU (or CPU share) and tells each its rank in the environment
    distributed = "RANK" in os.environ
    if cfg.fsdp and not distributed:
        raise UserError("fsdp=true shards the model over several processes: launch with "
                        "torchrun --nproc_per_node=N train.py ... fsdp=true")
    rank, local_rank, world_size = 0, 0, 1
    if distributed:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
    master = rank == 0  # the one process that prints, plots and writes
    if cfg.batch_size % (world_size * cfg.grad_accum):
        raise UserError(f"batch_size={cfg.batch_size} does not split evenly into {world_size} process(es) x "
                        f"grad_accum={cfg.grad_accum} micro-batches: make batch_size a multiple of "
                        f"{world_size * cfg.grad_accum}")
    micro_batch = cfg.batch_size // (world_size * cfg.grad_accum)
    device = pick_device(cfg.device)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process on each machine
    elif distributed and device.type != "cpu":
        raise UserError(f"torchrun runs on CUDA GPUs or on the CPU, not {device.type}: pass device=cpu")
    dtype = pick_dtype(cfg.dtype, device)
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, f".write-test-{rank}"), "w"):
            pass
        os.remove(os.path.join(cfg.out_dir, f".write-test-{rank}"))
    except OSError as e:
        raise UserError(f"cannot write to out_dir={cfg.out_dir} ({e.strerror}): pass another out_dir=")
    if cfg.init_from == "resume" and (
            init["model_name"] != model_name or init["model_config"] != dataclasses.asdict(model_cfg)):
        differ = [f"{k}={v}" for k, v in init["model_config"].items() if getattr(model_cfg, k, None) != v]
        raise UserError(f"{ckpt_path} holds a {init['model_name']} model"
                        f"{' with ' + ', '.join(differ) if differ else ''}, not the {model_name} model "
                        f"this command builds: resume with the --model, config= and model keys of the run "
                        f"that wrote it (or none of them), or pass another out_dir=")

    # data: the corpus's tokens, cached beside it and read through a memmap; the first 90% train, the
    # last 10% validate. One process on each machine tokenizes (if the cache is not up to date yet),
    # before the process group starts: the others wait for it in the barrier below.
    tokenizer = load_tokenizer(init["tokenizer"] if init else "gpt2")  # pretrained weights keep theirs
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise UserError(f"vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size}: leave vocab_size at its default")
    if local_rank == 0:
        tokenize_corpus(cfg.data, tokenizer)
    if distributed:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        dist.barrier()
    cache, token_dtype = token_cache(cfg.data, tokenizer)
    tokens = np.memmap(cache, dtype=token_dtype, mode="r")
    split = int(0.9 * len(tokens))
    train_tokens, val_tokens = tokens[:split], tokens[split:]
    ctx = cfg.seq_len or model_cfg.context_length
    stride = cfg.stride or ctx
    for part, what in ((train_tokens, "training part"), (val_tokens, "validation part (last 10%)")):
        if len(part) <= ctx:
            raise UserError(f"the {what} of {cfg.data} has {len(part)} tokens, fewer than one window of "
                            f"{ctx + 1}: use a longer text or a smaller seq_len= or context_length=")
    n_windows = len(window_starts(len(train_tokens), ctx, stride))
    if cfg.max_iters:
        total_steps, steps_per_epoch = cfg.max_iters, None
        eval_interval = cfg.eval_interval or max(1, cfg.max_iters // 10)
    else:
        if n_windows < cfg.batch_size:
            raise UserError(f"{cfg.data} gives {n_windows} training windows, fewer than batch_size="
                            f"{cfg.batch_size}: use a smaller batch_size or context_length, or a longer text")
        steps_per_epoch = n_windows // cfg.batch_size  # the last, incomplete batch of an epoch is dropped
        total_steps = cfg.epochs * steps_per_epoch
        eval_interval = cfg.eval_interval or steps_per_epoch
    n_eval = cfg.eval_iters * cfg.batch_size
    train_eval = eval_starts(len(train_tokens), ctx, stride, n_eval)
    val_eval = eval_starts(len(val_tokens), ctx, stride, n_eval)

    # the model: built whole on the CPU, the same on every process (same seed); then either moved to
    # the device, or, under FSDP, cut into shards (each block, then the rest) of which each process
    # keeps one on its device
    torch.manual_seed(cfg.seed)
    raw_model = arch.Transformer(model_cfg)
    if cfg.fsdp:
        mesh = init_device_mesh(device.type, (world_size,))
        for block in raw_model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(raw_model, mesh=mesh)
    else:
        raw_model.to(device)
    decay = [p for p in raw_model.parameters() if p.dim() >= 2]  # matrices and embeddings, not biases or norms
    no_decay = [p for p in raw_model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step, history = 0, {"step_tokens": [], "step_loss": [], "tokens": [], "train": [], "val": []}
    if init is not None:
        try:
            set_model_state_dict(raw_model, init["model"], options=StateDictOptions(full_state_dict=True))
        except (RuntimeError, KeyError, ValueError) as e:
            raise UserError(f"the weights of {cfg.init_from} do not fit this model ({str(e).splitlines()[0]}): "
                            f"leave out the model keys that change its shape") from None
    if cfg.init_from == "resume":  # optimizer, schedule and data position (the step), random state
        set_optimizer_state_dict(raw_model, optimizer, init["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        if scaler.is_enabled() and init["scaler"]:
            scaler.load_state_dict(init["scaler"])
        step, history = init["step"], init["history"]
        if len(init["rng"]) == world_size:
            torch.set_rng_state(init["rng"][rank]["cpu"])
            if device.type == "cuda" and "cuda" in init["rng"][rank]:
                torch.cuda.set_rng_state(init["rng"][rank]["cuda"])
    elif rank > 0:
        torch.manual_seed(cfg.seed + rank)  # dropout differs between processes
    del init  # let go of the memory-mapped checkpoint file
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if distributed and not cfg.fsdp:  # DDP: every process holds the whole model and averages gradients
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())
    saved_tokenizer = tokenizer.save(cfg.out_dir) if master else tokenizer.name  # a Llama's: copied beside
    if master:
        what = (f"{len(train_tokens):,} training tokens in {n_windows} windows" if not cfg.max_iters else
                f"{len(train_tokens):,} training tokens, random windows")
        print(f"{model_name} ({source}): {arch.count_parameters(raw_model):,} "
              f"parameters, {what}, {total_steps} steps of {cfg.batch_size} windows, {device} "
              f"{str(dtype).removeprefix('torch.')}" + (f", {world_size} processes" if distributed else "")
              + (f", from step {step}" if step else ""))
        log = open_log(os.path.join(cfg.out_dir, "log.jsonl"), step)

    trained = step < total_steps
    if master and not trained:
        print(f"{ckpt_path} is already at step {step} of {total_steps}: raise max_iters= or epochs= to train on")
    tokens_seen = history["step_tokens"][-1] if history["step_tokens"] else 0
    saved_step, bar, t_start = (step if cfg.init_from == "resume" else None), None, time.perf_counter()
    while step < total_steps:
        if bar is None:  # a progress bar for each stretch between evaluations
            desc = (f"epoch {step // steps_per_epoch + 1}/{cfg.epochs}" if steps_per_epoch else
                    f"steps to {min(total_steps, (step // eval_interval + 1) * eval_interval)}")
            bar = tqdm(total=min(total_steps, (step // eval_interval + 1) * eval_interval) - step, desc=desc,
                       leave=False, dynamic_ncols=True, disable=None if master else True)
            t0, stretch_tokens = time.perf_counter(), 0
        lr = lr_at(step, total_steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        mine = batch_starts(step, len(train_tokens), ctx, cfg).view(world_size, -1)[rank]  # this process's share
        loss_sum = torch.zeros((), device=device)
        for i, micro in enumerate(mine.split(micro_batch)):
            x, y = get_batch(train_tokens, micro, ctx)
            # DDP averages the gradients across processes during backward: only on the last micro-batch
            last = i == cfg.grad_accum - 1
            with model.no_sync() if isinstance(model, DDP) and not last else nullcontext():
                with autocast:
                    loss = loss_fn(model, x.to(device), y.to(device)) / cfg.grad_accum
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if world_size > 1:
            dist.all_reduce(loss_sum)
        step_loss = loss_sum.item() / world_size  # the mean over the whole batch of the step
        if not math.isfinite(step_loss):
            kept = f"{ckpt_path} from step {saved_step} is kept" if saved_step else "no checkpoint was written"
            raise UserError(f"the loss became {step_loss} at step {step + 1}: {kept}; lower lr= (now {cfg.lr}) "
                            f"or use dtype=bfloat16 or float32 instead of float16")
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += cfg.batch_size * ctx
        stretch_tokens += cfg.batch_size * ctx
        history["step_tokens"].append(tokens_seen)
        history["step_loss"].append(step_loss)
        tokens_per_s = stretch_tokens / (time.perf_counter() - t0)
        if master:
            bar.update()
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens_per_s:.0f}")
            log.write(json.dumps({"step": step, "tokens": tokens_seen, "loss": step_loss, "lr": lr,
                                  "tokens_per_s": tokens_per_s,
                                  "time": time.perf_counter() - t_start}) + "\n")

        if step % eval_interval == 0 or step == total_steps:
            bar.close()
            bar = None
            train_loss = estimate_loss(model, train_tokens, train_eval, ctx, micro_batch, autocast, device, rank,
                                       world_size)
            val_loss = estimate_loss(model, val_tokens, val_eval, ctx, micro_batch, autocast, device, rank,
                                     world_size)
            for key, value in (("tokens", tokens_seen), ("train", train_loss), ("val", val_loss)):
                history[key].append(value)
            raw_model.eval()  # every process generates: under FSDP each forward needs them all
            with autocast:
                sample = complete(raw_model, tokenizer, cfg.prompt, 50)
            raw_model.train()
            if master:
                where = (f"epoch {step // steps_per_epoch:2d}  step {step:4d}"
                         if steps_per_epoch and step % steps_per_epoch == 0 else f"step {step:5d}")
                print(f"{where}  train loss {train_loss:.3f}  val loss {val_loss:.3f}  {tokens_per_s:.0f} tokens/s")
                print("  " + sample.replace("\n", " "))
                log.write(json.dumps({"step": step, "tokens": tokens_seen, "train_loss": train_loss,
                                      "val_loss": val_loss}) + "\n")
                plot_losses(history, os.path.join(cfg.out_dir, "loss.png"))
        if (cfg.ckpt_interval and step % cfg.ckpt_interval == 0) or step == total_steps:
            save_training(ckpt_path, raw_model, optimizer, scaler,
                          {"model_name": model_name, "model_config": dataclasses.asdict(model_cfg),
                           "train_config": dataclasses.asdict(cfg), "tokenizer": saved_tokenizer,
                           "history": history, "step": step}, world_size)
            saved_step = step

    if master:
        if trained:
            print(f"saved {ckpt_path}, {os.path.join(cfg.out_dir, 'log.jsonl')} and "
                  f"{os.path.join(cfg.out_dir, 'loss.png')}")
        log.close()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.modules["train"] = sys.modules["__main__"]  # so that load_hf.py imports this module, not a copy
    try:
        main(sys.argv[1:])
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process stops; one says why
            print(f"train.py: {e}", file=sys.stderr)
        else:
            time.sleep(2)  # torchrun stops all processes when one exits: give process 0 time to say why
        sys.exit(2)
    except KeyboardInterrupt:
        print("train.py: interrupted; init_from=resume continues from the last checkpoint, if one was written",
              file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # e.g. --help piped into head: stop quietly
        sys.stdout = None
        sys.exit(1)
