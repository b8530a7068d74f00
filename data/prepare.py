"""The corpus: tokenized once into a token cache beside it, and the windows train.py reads from it.

    python -m data.prepare data=books/                 # tokenize a large corpus before a torchrun job
    python -m data.prepare data=my.txt tokenizer=path/to/Llama-3.2-1B

train.py calls tokenize_corpus itself on first use (and again when a file changes), so running this
alone is never needed; for a corpus of gigabytes it does the work ahead of time, once, instead of
while the GPUs wait. A corpus is one UTF-8 text file or a folder of .txt files, joined by the end
token. Its text is cut into pieces of about a megabyte at places where the tokenizer always ends a
token, and the pieces are tokenized by one worker process per CPU core. train.py reads the cache
through np.memmap, in windows of context_length + 1 tokens (Windows): batch_starts says which windows
make the batch of each step, get_batch reads them. Instruction data (.json, .jsonl) is read by
data/instructions.py instead.

Imports common.py (the tokenizers and UserError); run from the project's folder.
"""
import collections
import functools
import glob
import json
import multiprocessing
import os
import re
import shlex
import sys
import tempfile
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from common import UserError, apply_overrides, load_tokenizer, parse_args, print_help, run
from data.instructions import is_instruction_data, load_examples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project's folder
VERDICT = "data/the-verdict.txt"  # relative to ROOT
VERDICT_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/"
               "01_main-chapter-code/the-verdict.txt")


def text_files(path):
    """The text files of the corpus: one file, or every .txt file in a folder and its subfolders.

    The Verdict is downloaded on first use, as in the book.
    """
    if path == VERDICT:  # the default lives in this folder, wherever train.py is run from
        path = os.path.join(ROOT, VERDICT)
    if not os.path.exists(path) and path == os.path.join(ROOT, VERDICT):
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
    if not os.path.exists(path):
        raise UserError(f"data file {path} not found: pass data=path/to/text.txt")
    if not os.path.isfile(path):  # /dev/null, a pipe
        raise UserError(f"data={path} is not a regular file: pass a text file or a folder of .txt files")
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
    return process_tokenizer.encode_to_numpy(text), text != "" and not text.isspace()


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
    """Where the corpus's token ids are kept, and their integer type: uint16 while they fit. A file's
    cache lies beside it (story.txt.gpt2.bin), a folder's inside it (books/tokens.gpt2.bin), so that
    a folder's never lands in the folder above, which may be /."""
    path = os.path.join(ROOT, VERDICT) if data == VERDICT else data
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    if os.path.isdir(path):
        return os.path.join(os.path.abspath(path), f"tokens.{tokenizer.tag}.bin"), dtype
    return os.path.abspath(path) + f".{tokenizer.tag}.bin", dtype


def seems_encoded_as(path):
    """The encoding a file that is not UTF-8 seems to be in, by its first bytes: UTF-16 by its byte
    order mark, else Windows-1252 where its bytes all decode as that, else Latin-1."""
    with open(path, "rb") as f:
        head = f.read(PIECE_BYTES)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    try:
        head.decode("cp1252")
        return "cp1252"
    except UnicodeDecodeError:
        return "latin1"


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
        raise UserError(f"cannot write the token cache {cache} for data={data} ({e.strerror}): "
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
                enc, name = seems_encoded_as(path), shlex.quote(path)
                raise UserError(f"{path} is not UTF-8 text (it seems to be {enc}): convert it, iconv -f {enc} -t "
                                f"utf-8 {name} > {name}.utf8 && mv {name}.utf8 {name}, or pass another data=") from None
        out.flush()
        os.fsync(out.fileno())
    if not any_text:
        os.remove(tmp)
        raise UserError(f"{data} is empty: pass a file with text in it as data=")
    os.replace(tmp, cache)
    with open(cache + ".json", "w") as f:
        json.dump({"files": stamp, "tokens": n_tokens, "tokenizer": tokenizer.name}, f)



def read_splits(cfg, tokenizer, context_length):
    """The training and validation splits of cfg.data: Windows of the corpus's token cache, the first 90%
    and the last 10% of its tokens, read through a memmap (a corpus larger than memory trains as well);
    or instruction Examples (data/instructions.py)."""
    if is_instruction_data(cfg.data):
        return load_examples(cfg.data, tokenizer, context_length, cfg.seed, cfg.mask_prompt)
    cache, dtype = token_cache(cfg.data, tokenizer)
    tokens = np.memmap(cache, dtype=dtype, mode="r")
    split = int(0.9 * len(tokens))
    parts = tokens[:split], tokens[split:]
    for part, what in zip(parts, ("training part", "validation part (last 10%)")):
        if len(part) <= context_length:
            raise UserError(f"the {what} of {cfg.data} has {len(part)} tokens, fewer than one window of "
                            f"{context_length + 1}: use a longer text or a smaller seq_len= or context_length=")
    return [Windows(part, context_length, cfg.stride or context_length) for part in parts]


# ----------------------------------------------------------------------------- windows

def window_starts(n_tokens, context_length, stride):
    """Where the windows of context_length + 1 tokens begin, every stride tokens."""
    return torch.arange(0, n_tokens - context_length, stride)


@functools.lru_cache(maxsize=1)  # drawn once per epoch, not at every step
def epoch_order(seed, epoch, n_windows):
    """The order of the training windows in an epoch: a shuffle drawn by a generator seeded with
    (seed, epoch), so that it depends on those alone."""
    return torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n_windows))


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


def schedule(cfg, train):
    """The run's length for the training split train (Windows, or instruction Examples): (total steps,
    steps per epoch or None, steps between evaluations)."""
    if cfg.max_iters:
        return cfg.max_iters, None, cfg.eval_interval or max(1, cfg.max_iters // 10)
    if len(train) < cfg.batch_size:
        raise UserError(f"{cfg.data} gives {len(train)} training {train.unit}, fewer than batch_size="
                        f"{cfg.batch_size}: use a smaller batch_size or context_length, or more data")
    steps_per_epoch = len(train) // cfg.batch_size  # the last, incomplete batch of an epoch is dropped
    return cfg.epochs * steps_per_epoch, steps_per_epoch, cfg.eval_interval or steps_per_epoch


def get_batch(tokens, starts, context_length):
    """Inputs (b, t) and the targets one token later (b, t): the windows at starts, read from tokens."""
    rows = np.stack([tokens[s:s + context_length + 1] for s in starts.tolist()]).astype(np.int64)
    rows = torch.from_numpy(rows)  # (b, t + 1)
    return rows[:, :-1], rows[:, 1:]


def eval_starts(n_tokens, context_length, stride, n):
    """n windows spread evenly over a split (repeating some if it has fewer): the same ones every time."""
    starts = window_starts(n_tokens, context_length, stride)
    return starts[torch.arange(n) * len(starts) // n]


class Windows:
    """One split of the corpus (tokens, in memory or a memmap) read in windows of context_length + 1
    tokens every stride: what train.py trains on. data/instructions.py's Examples has the same methods,
    so that train.py reads either: len() (windows), draw (the starts of a step's batch), eval_rows and
    read (a batch of inputs and targets)."""

    format, unit = None, "windows"  # no prompt format: plain text

    def __init__(self, tokens, context_length, stride):
        self.tokens, self.context_length, self.stride = tokens, context_length, stride

    def __len__(self):
        return len(window_starts(len(self.tokens), self.context_length, self.stride))

    def draw(self, step, cfg):
        return batch_starts(step, len(self.tokens), self.context_length, cfg)

    def eval_rows(self, n):
        return eval_starts(len(self.tokens), self.context_length, self.stride, n)

    def read(self, starts):
        return get_batch(self.tokens, starts, self.context_length)

    def describe(self, cfg):
        windows = ", random windows" if cfg.max_iters else f" in {len(self)} windows"
        return f"{len(self.tokens):,} training tokens{windows}"


@dataclass
class PrepareConfig:
    data: str = VERDICT          # UTF-8 text file, or a folder of .txt files
    tokenizer: str = "gpt2"      # gpt2, or a Hugging Face folder with tokenizer.json (a Llama's)


def main(argv):
    usage = "-m data.prepare"
    _, pairs, want_help = parse_args(argv, usage)
    cfg = PrepareConfig()
    apply_overrides(pairs, [cfg], usage)
    if want_help:
        print_help(__doc__, [("keys", cfg)])
        return
    tokenizer = load_tokenizer(cfg.tokenizer)
    tokenize_corpus(cfg.data, tokenizer)
    cache, dtype = token_cache(cfg.data, tokenizer)
    n_tokens = os.path.getsize(cache) // np.dtype(dtype).itemsize
    print(f"{cfg.data}: {n_tokens:,} tokens in {cache}")


if __name__ == "__main__":
    run(main, "data/prepare.py")
