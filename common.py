"""What every script here shares: the key=value command line and its one-line errors, the tokenizers,
and checkpoint files (written atomically, read memory-mapped).

    from common import UserError, parse_args, apply_overrides, load_tokenizer, read_checkpoint, ...

train.py, sample.py, load_hf.py and bench.py import it; it imports no script, only the model files
(gpt2.py, llama2.py, llama3.py) by name in import_model, so the imports run one way:
model files <- common.py <- load_hf.py <- sample.py <- train.py (and bench.py on top).
"""
import dataclasses
import difflib
import hashlib
import importlib
import inspect
import io
import json
import math
import os
import shutil
import sys
import textwrap
import time
import tokenize
import types

import numpy as np
import tiktoken
import torch
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

HERE = os.path.dirname(os.path.abspath(__file__))
# architecture file -> its default preset; the first is the default of --model
MODELS = {"gpt2": "verdict", "llama2": "toy", "llama3": "toy"}


class UserError(Exception):
    """A mistake in the command line or an input file: reported in one line, exit status 2."""


def run(main, script, interrupted=""):
    """A script's entry point: main(argv), with a UserError reported in one line on stderr and exit
    status 2 (no traceback), Ctrl-C quiet (but for the interrupted note), and output cut short by a
    closed pipe (| head) quiet too."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process stops; one says why
            print(f"{script}: {e}", file=sys.stderr)
        else:
            time.sleep(2)  # torchrun stops all processes when one exits: give process 0 time to say why
        sys.exit(2)
    except KeyboardInterrupt:
        if interrupted:
            print(f"{script}: {interrupted}", file=sys.stderr)
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


def field_comments(cls):
    """{field: its meaning}: the comment beside each field in cls's source, and the comment lines just
    under it (a continuation), so that --help says what the dataclass already says."""
    fields, meanings, current, row, column = {f.name for f in dataclasses.fields(cls)}, {}, None, 0, 0
    tokens = list(tokenize.generate_tokens(io.StringIO(textwrap.dedent(inspect.getsource(cls))).readline))
    for before, tok, after in zip(tokens, tokens[1:], tokens[2:]):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            text_column = tok.start[1] + len(tok.string) - len(tok.string.lstrip("#").lstrip())
            beside = tok.start[0] == row and current not in meanings
            under = (tok.start[0] == row + 1 and current in meanings and tok.line.lstrip().startswith("#")
                     and text_column >= column)  # indented under the comment beside: its next line
            if current and (beside or under):
                meanings[current] = f"{meanings[current]} {text}" if under else text
                row, column = tok.start[0], tok.start[1] if beside else column
            else:
                current = None  # a comment of its own, above a field or between them
        elif tok.type == tokenize.NAME and before.type in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT,
                                                            tokenize.DEDENT):  # a statement starts
            current, row = (tok.string if tok.string in fields and after.string == ":" else None), tok.end[0]
        elif current and tok.type not in (tokenize.NEWLINE, tokenize.NL):
            row = tok.end[0]  # the field's statement may take several lines
    return meanings


def help_line(name, typ, default, meaning, widths):
    """One key of --help: name, type and default in columns, the meaning beside them (wrapped under
    itself), or on the next line when the default is too long to leave it room."""
    head = f"  {name:{widths[0]}s} {typ:{widths[1]}s} {default}"
    indent = " " * (2 + widths[0] + 1 + widths[1] + 1 + 14)
    if not meaning:
        return head
    if len(head) >= len(indent):
        return head + "\n" + textwrap.fill(meaning, 118, initial_indent=indent, subsequent_indent=indent)
    return textwrap.fill(meaning, 118, initial_indent=f"{head:{len(indent)}s}", subsequent_indent=indent)


def models_help():
    """The --model choices and each one's presets, the defaults first."""
    lines = []
    for i, (name, default) in enumerate(MODELS.items()):
        presets = [default + " (default)"] + [p for p in import_model(name).PRESETS if p != default]
        head = f"  --model {name}{' (default)' if i == 0 else ''}: presets "
        lines.append(textwrap.fill(", ".join(presets), 118, initial_indent=head, subsequent_indent=" " * 6))
    return "\n".join(lines)


def print_help(doc, sections, models=False):
    """The doc's second paragraph, then each (title, dataclass instance) section's keys: name, type,
    default and meaning; with models=True first the --model choices and their presets (config=)."""
    print(doc.strip().split("\n\n")[1] if "\n\n" in doc else doc)
    if models:
        print(f"\nmodels (--model NAME; config=PRESET picks its size):\n{models_help()}")
    for title, obj in sections:
        print(f"\n{title}:")
        meanings = field_comments(type(obj))
        types = {f.name: str(f.type).replace("<class '", "").replace("'>", "") for f in dataclasses.fields(obj)}
        widths = max(16, *(len(name) + 1 for name in types)), max(12, *(len(typ) + 1 for typ in types.values()))
        for name, typ in types.items():
            print(help_line(name, typ, repr(getattr(obj, name)), meanings.get(name, ""), widths))


# ----------------------------------------------------------------------------- checking settings

def check_settings(cfg, rules):
    """Refuse the first value of cfg that breaks its rule, in one line. rules: (keys, works(value),
    what is wrong and what works), keys separated by spaces; those cfg does not have are skipped, so that one table
    serves the three model Configs."""
    for keys, works, what in rules:
        for key in keys.split():
            if hasattr(cfg, key) and not works(getattr(cfg, key)):
                raise UserError(f"{key}={getattr(cfg, key)} {what}")


def nearest_divisors(n, near):
    """The four divisors of n nearest to near, e.g. for n_heads= of d_model=768 near 5: 3, 4, 6, 8."""
    return ", ".join(map(str, sorted(sorted((d for d in range(1, n + 1) if n % d == 0),
                                            key=lambda d: abs(d - near))[:4])))


def check_model_config(cfg):
    """Refuse, in one line, a model Config (of gpt2.py, llama2.py or llama3.py: they share the names)
    that cannot be built, before it is."""
    sizes = "vocab_size context_length d_model n_layers n_heads n_kv_heads d_ff rope_original_context"
    check_settings(cfg, [(sizes, lambda v: v >= 1, "must be a whole number of at least 1")])
    if cfg.d_model % cfg.n_heads:
        raise UserError(f"n_heads={cfg.n_heads} does not divide d_model={cfg.d_model} into equal heads: "
                        f"use one that does, e.g. {nearest_divisors(cfg.d_model, cfg.n_heads)}")
    if hasattr(cfg, "n_kv_heads") and cfg.n_heads % cfg.n_kv_heads:
        raise UserError(f"n_kv_heads={cfg.n_kv_heads} does not divide n_heads={cfg.n_heads} into equal groups: "
                        f"use one that does, e.g. {nearest_divisors(cfg.n_heads, cfg.n_kv_heads)}")
    if hasattr(cfg, "rope_theta") and cfg.d_model // cfg.n_heads % 2:
        raise UserError(f"d_model={cfg.d_model} / n_heads={cfg.n_heads} gives heads of {cfg.d_model // cfg.n_heads}, "
                        f"an odd width, and RoPE turns pairs: choose an even head width")
    positive = lambda v: 0 < v < math.inf  # noqa: E731  (and not nan)
    check_settings(cfg, [
        ("dropout", lambda v: 0 <= v < 1, "must be in [0, 1), e.g. dropout=0.1, or 0 for none"),
        ("norm_eps", positive, "must be a small number above 0, e.g. norm_eps=1e-5"),
        ("embedding_std", positive, "must be a number above 0, e.g. embedding_std=0.02"),
        ("rope_theta", positive, "must be a number above 0, e.g. rope_theta=10000"),
        ("rope_factor", lambda v: v is None or positive(v), "must be a number above 0, e.g. 8, or None for no scaling"),
        ("rope_low_freq_factor", positive, "must be a number above 0, e.g. rope_low_freq_factor=1"),
        ("rope_high_freq_factor", lambda v: cfg.rope_factor is None or cfg.rope_low_freq_factor < v < math.inf,
         f"must be above rope_low_freq_factor={getattr(cfg, 'rope_low_freq_factor', '')}, e.g. 4"),
        ("weight_dtype", lambda v: v in ("float32", "bfloat16", "float16"),
         "is not a dtype for the weights: use float32, bfloat16 or float16"),
    ])


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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(name, device):
    """The dtype= of train.py and bench.py: auto = bfloat16 where the hardware runs it fast (recent GPUs,
    CPUs with AVX-512 BF16/AMX), else float32; device=None: the dtype= of weights as sample.py and
    load_hf.py take it, where checkpoint = as stored (None)."""
    if name == "auto" and device is not None:
        fast_bf16 = (torch.cuda.get_device_capability(device)[0] >= 8  # Ampere on; before: emulated, slow
                     if device.type == "cuda" else device.type == "cpu" and torch.cpu._is_avx512_bf16_supported())
        return torch.bfloat16 if fast_bf16 else torch.float32
    if name == "checkpoint" and device is None:
        return None
    if name not in DTYPES:
        raise UserError(f"dtype={name} is not supported: use {'auto' if device else 'checkpoint'}, {', '.join(DTYPES)}")
    return DTYPES[name]


# ----------------------------------------------------------------------------- tokenizers

class Tokenizer:
    """GPT-2's byte-pair encoding, built from data/gpt2.tiktoken so that it works offline."""

    name = tag = "gpt2"
    chat_template = None  # messages cannot become ids: GPT-2 was not trained to chat

    def __init__(self):
        ranks = load_tiktoken_bpe(os.path.join(HERE, "data", "gpt2.tiktoken"))
        self.enc = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                     special_tokens={"<|endoftext|>": 50256})
        self.eot_id = 50256
        self.end_ids = (50256,)  # generation stops at any of these
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
        ends = generation_end_ids(folder) + ((self.eot_id,) if self.eot_id is not None else ())
        self.end_ids = tuple(dict.fromkeys(ends))  # generation stops at any; each once, in order
        self.vocab_size = len(self.hf)  # special tokens included
        # the Jinja template of an instruct model (tokenizer_config.json's or chat_template.jinja), or None
        self.chat_template = self.hf.chat_template

    def chat_ids(self, messages):
        """The ids of a conversation, [{"role": "system" | "user" | "assistant", "content": text}, ...],
        formatted by the tokenizer's own chat template and ending where the assistant's reply starts."""
        try:
            return self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
        except Exception as e:  # the template's own raise_exception (a model without a system role), or a bad file
            raise UserError(f"the chat template of {self.name} cannot format this conversation "
                            f"({type(e).__name__}: {' '.join(str(e).split())}): leave system= out if the model "
                            f"takes none, or copy the model's tokenizer files again") from None

    def encode(self, text):
        return self.hf.encode(text)  # with the start token (<s>, <|begin_of_text|>) the model expects

    def encode_to_numpy(self, text):  # a corpus's pieces: no start token in the middle of a text
        return np.array(self.hf.encode(text, add_special_tokens=False), dtype=np.uint32)

    def decode(self, ids):
        return self.hf.decode(ids, skip_special_tokens=True)

    def save(self, out_dir):
        """A copy in out_dir/tokenizer, so that the checkpoint there stands alone; it records the folder."""
        copy = os.path.join(out_dir, "tokenizer")
        if os.path.abspath(self.name) != os.path.abspath(copy):
            self.hf.save_pretrained(copy)
            if os.path.isfile(os.path.join(self.name, "generation_config.json")):  # its end tokens
                shutil.copyfile(os.path.join(self.name, "generation_config.json"),
                                os.path.join(copy, "generation_config.json"))
        return "tokenizer"  # relative to the checkpoint's folder, see read_checkpoint


def generation_end_ids(folder):
    """The end tokens that folder's generation_config.json lists (eos_token_id: an id or a list of them;
    an instruct model's end of turn among them), or () without that file."""
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return ()
    try:
        with open(path, encoding="utf-8") as f:
            ids = json.load(f).get("eos_token_id")
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        if not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ValueError(f"eos_token_id {ids}")
    except (ValueError, TypeError, AttributeError) as e:  # not JSON, or not the ids of tokens
        raise UserError(f"cannot read the end tokens in {path} ({type(e).__name__}): copy the model's "
                        f"generation_config.json again, or delete it to stop at the tokenizer's end token") from None
    return tuple(ids)


def load_tokenizer(name):
    """GPT-2's tokenizer ("gpt2"), or the Hugging Face tokenizer in the folder name (a Llama's)."""
    return Tokenizer() if name == "gpt2" else HFTokenizer(name)


# ----------------------------------------------------------------------------- checkpoint files

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
    if "dtype" in ckpt["model_config"]:  # a Llama's weight_dtype, written as dtype by earlier versions
        ckpt["model_config"]["weight_dtype"] = ckpt["model_config"].pop("dtype")
    if ckpt["tokenizer"] != "gpt2":  # a tokenizer folder beside ckpt.pt (HFTokenizer.save)
        ckpt["tokenizer"] = os.path.join(os.path.dirname(path), ckpt["tokenizer"])
    return ckpt


def is_checkpoint(path):
    return os.path.isfile(path) or os.path.isfile(os.path.join(path, "ckpt.pt"))
