"""Instruction data: examples of (instruction, input, output) that teach a pretrained model to answer.

    python train.py init_from=gpt2-medium data=instruction-data.json epochs=2   # the book's chapter 7

Two file formats. A .json file holds a list of {"instruction", "input", "output"} objects (the book's
instruction-data.json, and Alpaca's format; "input" may be empty or missing). A .jsonl file holds one
{"messages": [{"role": ..., "content": ...}, ...]} per line, the chat format of Hugging Face datasets,
whose last message is the assistant's answer; it needs a tokenizer with a chat template.

Each example is formatted as the model's prompt format and tokenized once: GPT-2's tokenizer gets
the book's Alpaca prompt (alpaca_prompt), then the output and <|endoftext|>; a tokenizer with a chat
template gets the template (instruction and input as the user's message, output as the assistant's).
The loss counts the response tokens only: the targets of the prompt and of the padding are -100,
which cross_entropy's ignore_index skips. Batches pad each example to the longest one in the batch.

sample.py builds the same prompt for a model trained here from the checkpoint's "prompt_format":
prompt_ids(tokenizer, format, instruction, input) gives the ids to continue.

Imports common.py (UserError) only, so that sample.py can import it too.
"""
import json
import os

import numpy as np
import torch

from common import UserError

IGNORE = -100  # the target of positions the loss skips (cross_entropy's default ignore_index)

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")


def is_instruction_data(path):
    return path.endswith((".json", ".jsonl"))


def alpaca_prompt(instruction, input=""):
    """The book's prompt (its format_input, then the response header): the model continues after it."""
    text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
    if input:  # the Input part only when there is one
        text += f"\n\n### Input:\n{input}"
    return text + "\n\n### Response:\n"


def prompt_format(tokenizer):
    """The prompt format a model with this tokenizer is trained with: its chat template, if it has one."""
    return "chat_template" if tokenizer.chat_template else "alpaca"


def user_message(instruction, input=""):
    return [{"role": "user", "content": f"{instruction}\n\n{input}" if input else instruction}]


def conversation_ids(tokenizer, messages):
    """The whole conversation as the tokenizer's chat template lays it out, the last reply closed."""
    return list(tokenizer.hf.apply_chat_template(messages, tokenize=True, return_dict=False))


def prompt_ids(tokenizer, format, instruction, input=""):
    """The token ids the model continues to answer an instruction, in the prompt format it was trained with."""
    if format == "chat_template":
        return list(tokenizer.chat_ids(user_message(instruction, input)))  # as sample.py's chat lays it out
    return tokenizer.encode(alpaca_prompt(instruction, input))


# ----------------------------------------------------------------------------- reading and checking

def read_examples(path):
    """The examples of a .json file (a list of objects with instruction, input and output) or of a .jsonl
    file (one {"messages": [...]} per line, the answer last), checked: dicts of either kind."""
    if not os.path.isfile(path):
        raise UserError(f"data file {path} not found: pass data=path/to/instructions.json")
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                records = [json.loads(line) for line in f if line.strip()]
            else:
                records = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid UTF-8 JSON ({str(e).splitlines()[0]}): fix the file or pass "
                        f"another data=") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise UserError(f"{path} must hold a JSON list of objects with \"instruction\", \"input\" and "
                        f"\"output\", as the book's instruction-data.json does")
    if not records:
        raise UserError(f"{path} holds no examples: pass a file with at least two")
    return [checked(r, i, path) for i, r in enumerate(records)]


def checked(record, i, path):
    """Example i of the file, with its input ("" if none); a record with a missing or empty part stops the run."""
    if "messages" in record:
        messages = record["messages"]
        if (not isinstance(messages, list) or len(messages) < 2 or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages) or messages[-1]["role"] != "assistant"):
            raise UserError(f"example {i} of {path} needs \"messages\": a list of {{\"role\", \"content\"}} "
                            f"objects that ends with the assistant's answer")
        return record
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str) or not record[key]:
            raise UserError(f"example {i} of {path} has no \"{key}\" text: every example needs an "
                            f"\"instruction\" and an \"output\" (\"input\" may be empty)")
    return {**record, "input": record.get("input") or ""}


# ----------------------------------------------------------------------------- tokenizing

def encode(tokenizer, format, example):
    """(the example's token ids, how many of them are the prompt): the loss counts the rest."""
    if format == "chat_template":
        messages = example.get("messages") or [*user_message(example["instruction"], example["input"]),
                                               {"role": "assistant", "content": example["output"]}]
        prompt, ids = list(tokenizer.chat_ids(messages[:-1])), conversation_ids(tokenizer, messages)
        n_prompt = next((i for i, (a, b) in enumerate(zip(prompt, ids)) if a != b), len(prompt))
        return ids, n_prompt
    prompt = tokenizer.encode(alpaca_prompt(example["instruction"], example["input"]))  # with a Llama's start token
    response = tokenizer.encode_to_numpy(example["output"]).tolist()  # without one
    return prompt + response + [tokenizer.eot_id], len(prompt)


class Examples:
    """One split of the instruction data: each example's token ids and the length of its prompt.

    The same interface as data.prepare.Windows, so that train.py reads either: len() (examples), draw
    (the rows of a step's batch), eval_rows and read (a batch of inputs and targets).
    """

    unit = "examples"

    def __init__(self, examples, mask_prompt, end_id, format, note=""):
        self.format, self.note = format, note  # the prompt format; what describe says besides the count
        self.ids = [ids for ids, _ in examples]
        self.n_prompt = [n for _, n in examples]
        self.mask_prompt = mask_prompt  # false: the loss counts the prompt too, as the book's main chapter
        self.end_id = end_id  # pads the inputs (its targets are IGNORE)

    def __len__(self):
        return len(self.ids)

    def draw(self, step, cfg):
        """The examples of step's batch, a function of (seed, step) alone: each epoch visits every one once,
        in an order drawn for that epoch; max_iters draws them at random."""
        if cfg.max_iters:
            return torch.from_numpy(np.random.default_rng([cfg.seed, step]).integers(0, len(self), cfg.batch_size))
        epoch, i = divmod(step, len(self) // cfg.batch_size)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(self))
        return torch.from_numpy(order[i * cfg.batch_size:(i + 1) * cfg.batch_size])

    def eval_rows(self, n):
        """n examples spread evenly over the split (repeating some if it has fewer): the same every time."""
        return torch.arange(n) * len(self) // n

    def describe(self, cfg):
        return f"{len(self)} training examples{self.note}, {self.format} prompts"

    def prompt(self, row):
        """The prompt of an example: what the model answers at each evaluation."""
        return self.ids[row][:self.n_prompt[row]]

    def read(self, rows):
        """Inputs (b, t) and targets (b, t), t the longest example of rows minus one: the targets of the
        prompt and of the padding are IGNORE."""
        rows = rows.tolist()
        t = max(len(self.ids[r]) for r in rows) - 1
        x = torch.full((len(rows), t), self.end_id, dtype=torch.long)
        y = torch.full((len(rows), t), IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):
            ids = torch.tensor(self.ids[r])
            x[i, :len(ids) - 1], y[i, :len(ids) - 1] = ids[:-1], ids[1:]
            if self.mask_prompt:  # target j is token j + 1: from the first response token on, they count
                y[i, :self.n_prompt[r] - 1] = IGNORE
        return x, y


def load_examples(path, tokenizer, context_length, seed, mask_prompt):
    """(training Examples, validation Examples): 90% of the examples to train, 10% to validate, split by an
    order drawn from the seed. An example longer than context_length + 1 tokens is cut."""
    records = read_examples(path)
    format = prompt_format(tokenizer)
    if format == "alpaca" and any("messages" in example for example in records):
        raise UserError(f"{path} holds chat messages, and this model's tokenizer has no chat template: "
                        f"start from a model folder whose tokenizer has one, or use .json instructions")
    encoded = [encode(tokenizer, format, example) for example in records]
    longer = [len(ids) > context_length + 1 for ids, _ in encoded]
    if all(longer):
        raise UserError(f"every example of {path} is longer than the context of {context_length + 1} tokens: "
                        f"raise seq_len= (up to context_length) or use shorter examples")
    # a cut example keeps its first context_length + 1 tokens; one whose response is cut away is left out
    kept = [(ids[:context_length + 1], n) for ids, n in encoded if n < min(len(ids), context_length + 1)]
    if len(kept) < 2:
        raise UserError(f"{path} gives {len(kept)} example(s) with a response inside the context: it needs "
                        f"at least 2, one to train on and one to validate")
    order = np.random.default_rng(seed).permutation(len(kept))
    n_val = max(1, len(kept) // 10)
    split = [[kept[i] for i in part] for part in (order[n_val:], order[:n_val])]
    note = f" and {n_val} to validate ({sum(longer)} of all cut to {context_length + 1} tokens)"
    return [Examples(part, mask_prompt, tokenizer.eot_id, format, note) for part in split]
