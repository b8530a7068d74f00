"""Tests: python -m pytest test_models.py  (CPU, offline)."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import gpt2
import sample
import train
from train import UserError

HERE = os.path.dirname(os.path.abspath(__file__))


def run_script(*args, cwd=HERE):
    """Run train.py or sample.py in a fresh interpreter, as a user would."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def tiny_gpt2(**overrides):
    torch.manual_seed(0)
    return gpt2.Transformer(gpt2.Config(**{**gpt2.PRESETS["tiny"], **overrides})).eval()


@pytest.fixture
def story(tmp_path):
    """A small training text, so the tests need no download."""
    path = tmp_path / "story.txt"
    sentences = ["The painter sat by the window and looked at the sea.",
                 "Every effort moves you closer to the picture you want to paint.",
                 "She laughed, and the light changed on the water."]
    path.write_text(" ".join(sentences[i % 3] for i in range(120)), encoding="utf-8")
    return str(path)


# ---- GPT-2: shapes, parameter counts, attention

@pytest.mark.parametrize("preset, expected", [
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080),
    ("gpt2-xl", 1_557_611_200), ("verdict", 162_419_712)])
def test_gpt2_parameter_counts_match_transformers(preset, expected):
    with torch.device("meta"):
        model = gpt2.Transformer(gpt2.Config(**gpt2.PRESETS[preset]))
    assert gpt2.count_parameters(model) == expected


def test_gpt2_output_shape_and_tied_head():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.token_embedding.weight
    logits = model(torch.randint(0, 50257, (3, 17)))
    assert logits.shape == (3, 17, 50257)
    assert not tiny_gpt2(tie_weights=False).lm_head.weight is tiny_gpt2().token_embedding.weight


def test_gpt2_init_scales_residual_projections():
    model = gpt2.Transformer(gpt2.Config(n_layers=8, d_model=256, n_heads=4, vocab_size=1000))
    assert abs(model.blocks[0].mlp.up.weight.std().item() - 0.02) < 1e-3
    assert abs(model.blocks[0].attn.wo.weight.std().item() - 0.02 / 4) < 1e-3  # 1/sqrt(2 * 8)
    assert model.blocks[0].mlp.up.bias.abs().max() == 0


def test_gpt2_is_causal():
    model = tiny_gpt2()
    idx = torch.randint(0, 50257, (1, 20))
    changed = idx.clone()
    changed[0, 10:] = 7
    with torch.no_grad():
        assert torch.equal(model(idx)[:, :10], model(changed)[:, :10])


def test_gpt2_flash_matches_einsum():
    einsum, flash = tiny_gpt2(), tiny_gpt2(flash=True)
    flash.load_state_dict(einsum.state_dict())
    idx = torch.randint(0, 50257, (2, 64))
    with torch.no_grad():
        assert (einsum(idx) - flash(idx)).abs().max() < 1e-5
        for model in (einsum, flash):  # the cached path goes through the explicit mask
            model.setup_cache(2, 64)
            model(idx[:, :40], start_pos=0)
        assert (einsum(idx[:, 40:], start_pos=40) - flash(idx[:, 40:], start_pos=40)).abs().max() < 1e-5


# ---- generation: KV cache, sampling, end of text

def test_cached_logits_equal_full_sequence_logits():
    model = tiny_gpt2()
    idx = torch.randint(0, 50257, (3, 30))
    with torch.no_grad():
        full = model(idx)
        model.setup_cache(3, 30)
        steps = [model(idx[:, :12], start_pos=0)]  # prefill, then one token at a time
        steps += [model(idx[:, i:i + 1], start_pos=i) for i in range(12, 30)]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4


@pytest.mark.parametrize("batch", [1, 3])
def test_generation_with_and_without_cache_agree(batch):
    model = tiny_gpt2()  # context 64: 20 + 80 tokens go well past it
    idx = torch.randint(0, 50257, (batch, 20))
    with_cache = torch.stack(list(train.generate(model, idx, 80, use_cache=True)), dim=1)
    without = torch.stack(list(train.generate(model, idx, 80, use_cache=False)), dim=1)
    assert with_cache.shape == (batch, 80)
    assert torch.equal(with_cache, without)


class ScriptedModel(torch.nn.Module):
    """Stands in for a model: row r emits token r + 1 until step eot_at[r], then the end token."""

    def __init__(self, eot_at, eot_id=9):
        super().__init__()
        self.cfg = gpt2.Config(vocab_size=10, context_length=32)
        self.eot_at, self.eot_id, self.weight = eot_at, eot_id, torch.nn.Parameter(torch.zeros(1))

    def setup_cache(self, batch_size, max_len):
        pass

    def forward(self, idx, start_pos=None):
        logits = torch.zeros(idx.shape[0], idx.shape[1], 10)
        for r, step in enumerate(self.eot_at):
            new = idx.shape[1] + (start_pos or 0) - 1  # tokens generated so far (prompt: 1 token)
            logits[r, -1, self.eot_id if new >= step else r + 1] = 1.0
        return logits


def test_batched_generation_stops_each_row_at_end_of_text():
    model = ScriptedModel(eot_at=[2, 5, 100])
    out = torch.stack(list(train.generate(model, torch.zeros(3, 1, dtype=torch.long), 8, eot_id=9)), 1)
    assert out[0].tolist() == [1, 1, 9, 9, 9, 9, 9, 9]  # row 0 ended, and stays ended
    assert out[1].tolist() == [2, 2, 2, 2, 2, 9, 9, 9]
    assert out[2].tolist() == [3] * 8
    done = list(train.generate(ScriptedModel(eot_at=[2, 3]), torch.zeros(2, 1, dtype=torch.long), 50,
                               eot_id=9))
    assert len(done) == 4  # stops as soon as every row has ended


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.manual_seed(0)
    picks = {int(train.sample_next(logits, 1.0, 2, 1.0)) for _ in range(200)}
    assert picks == {0, 1}
    picks = {int(train.sample_next(logits, 1.0, None, 0.7)) for _ in range(200)}
    assert picks == {0, 1}  # 0.5 alone is under 0.7; 0.5 + 0.3 covers it
    picks = {int(train.sample_next(logits, 1.0, None, 0.4)) for _ in range(50)}
    assert picks == {0}
    assert int(train.sample_next(logits, 0.0, None, 1.0)) == 0  # greedy


def test_same_seed_same_sample():
    model = tiny_gpt2()
    idx = torch.randint(0, 50257, (2, 5))

    def draw(seed):
        torch.manual_seed(seed)
        return torch.stack(list(train.generate(model, idx, 20, temperature=1.0, top_k=50)), dim=1)

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


# ---- tokenizer

def test_tokenizer_matches_gpt2_ids_offline():
    tok = train.load_tokenizer("gpt2")
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
    ids = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 286, 617,
           34680, 27271, 13]
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text
    assert tok.vocab_size == 50257 and tok.eot_id == 50256


# ---- command line

def parsed(*argv, usage="train.py"):
    model_name, pairs, _ = train.parse_args(list(argv), usage)
    cfg, model_cfg = train.TrainConfig(), gpt2.Config()
    train.apply_overrides(pairs, [cfg, model_cfg], usage)
    return model_name, cfg, model_cfg


def test_overrides_are_parsed_into_the_field_types():
    name, cfg, model_cfg = parsed("--model", "gpt2", "lr=1", "--epochs=3", "flash=False", "stride=None",
                                  "prompt=a=b c", "n_layers=4", "dropout=0")
    assert name == "gpt2"
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.epochs == 3 and cfg.stride is None and cfg.prompt == "a=b c"
    assert model_cfg.flash is False and model_cfg.n_layers == 4 and model_cfg.dropout == 0.0
    assert parsed("flash=true")[2].flash is True and parsed("stride=16")[1].stride == 16


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt5"], "unknown model 'gpt5': choose one of gpt2"),
    (["--model"], "--model needs a name"),
    (["lrr=0.1"], "did you mean 'lr'"),
    (["epochs=abc"], "epochs=abc: expected a whole number"),
    (["lr=fast"], "lr=fast: expected a number"),
    (["flash=maybe"], "expected true or false"),
    (["epochs"], "'epochs' is not key=value"),
])
def test_bad_overrides_name_the_problem(argv, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        parsed(*argv)


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(UserError) as e:
        parsed("colour=red")
    assert "valid keys are" in str(e.value) and "batch_size" in str(e.value) and "n_layers" in str(e.value)


def test_help_lists_every_key_with_type_and_default(capsys):
    train.main(["--help"])
    out = capsys.readouterr().out
    for line in ("lr               float        0.0005", "n_layers         int          12",
                 "stride           int | None   None", "config           str          ''"):
        assert line in out


# ---- training

def test_train_errors_for_bad_data(tmp_path, story):
    def train_on(path, *extra):
        train.main(["config=tiny", f"data={path}", f"out_dir={tmp_path / 'out'}", "device=cpu", *extra])

    with pytest.raises(UserError, match="not found"):
        train_on(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="is empty"):
        train_on(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 50)
    with pytest.raises(UserError, match="not UTF-8"):
        train_on(tmp_path / "latin1.txt")
    (tmp_path / "short.txt").write_text("Too short to make a window of 64 tokens. " * 3)
    with pytest.raises(UserError, match="fewer than one window"):
        train_on(tmp_path / "short.txt")
    with pytest.raises(UserError, match="fewer than batch_size"):
        train_on(story, "batch_size=64")
    with pytest.raises(UserError, match="unknown config 'huge'"):
        train_on(story, "config=huge")
    with pytest.raises(UserError, match="device=tpu"):
        train_on(story, "device=tpu")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write to out_dir"):
        train.main(["config=tiny", f"data={story}", f"out_dir={blocker / 'out'}"])


def test_tiny_model_loss_falls(tmp_path, story, capsys):
    train.main(["config=tiny", f"data={story}", f"out_dir={tmp_path}", "epochs=4", "lr=3e-3",
                "warmup_steps=2", "device=cpu", "dtype=float32", "batch_size=4"])
    history = torch.load(tmp_path / "ckpt.pt", weights_only=True)["history"]
    assert history["train"][-1] < history["train"][0] - 1.0
    assert history["step_loss"][-1] < history["step_loss"][0] - 3.0
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert "epoch  4" in capsys.readouterr().out


def test_checkpoint_round_trip(tmp_path):
    model = tiny_gpt2(n_layers=1)
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint({"model": model.state_dict(), "model_name": "gpt2",
                           "model_config": model.cfg.__dict__, "tokenizer": "gpt2"}, path)
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the temporary file was renamed away
    loaded, ckpt = train.load_checkpoint(str(tmp_path), "cpu")
    idx = torch.randint(0, 50257, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(idx), loaded.eval()(idx))
    assert loaded.lm_head.weight is loaded.token_embedding.weight  # still tied


def test_missing_or_corrupt_checkpoint(tmp_path):
    with pytest.raises(UserError, match="no checkpoint at"):
        train.load_checkpoint(str(tmp_path), "cpu")
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="is not a checkpoint this project can load"):
        train.load_checkpoint(str(tmp_path), "cpu")


# ---- end to end, in subprocesses as a user runs them

def test_train_then_sample_end_to_end(tmp_path, story):
    out = tmp_path / "out"
    result = run_script("train.py", "--model", "gpt2", "config=tiny", "epochs=1", f"data={story}",
                        f"out_dir={out}", "device=cpu")
    assert result.returncode == 0, result.stderr
    assert "train loss" in result.stdout and "val loss" in result.stdout
    assert (out / "ckpt.pt").exists() and (out / "loss.png").exists()
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["model_name"] == "gpt2" and ckpt["tokenizer"] == "gpt2"
    assert ckpt["model_config"]["n_layers"] == 2 and ckpt["train_config"]["epochs"] == 1

    result = run_script("sample.py", f"init_from={out}", "prompt=The painter", "max_new_tokens=12",
                        "seed=7")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The painter") and "tokens/s" in result.stderr
    again = run_script("sample.py", f"init_from={out}", "prompt=The painter", "max_new_tokens=12",
                       "seed=7")
    assert again.stdout == result.stdout  # same seed, same text

    batch = run_script("sample.py", f"init_from={out}", "num_samples=3", "max_new_tokens=5",
                       "temperature=0", f"prompt={'word ' * 100}")
    assert batch.returncode == 0, batch.stderr
    assert batch.stdout.count("--- sample") == 3
    assert "only its last 64 tokens are used" in batch.stderr  # a long prompt is cropped, with a note


@pytest.mark.parametrize("script, args, message", [
    ("train.py", ["--model", "no_such_model"], "unknown model"),
    ("train.py", ["no_such_key=1"], "unknown key"),
    ("train.py", ["epochs=abc"], "expected a whole number"),
    ("sample.py", ["init_from=/no/such/dir"], "no checkpoint at"),
    ("sample.py", ["top_k=0"], "top_k=0"),
    ("sample.py", ["temperature=-1"], "negative"),
    ("sample.py", ["top_p=1.5"], "top_p=1.5"),
])
def test_bad_input_gives_one_line_and_status_2(tmp_path, script, args, message):
    if script == "sample.py" and not args[0].startswith("init_from"):  # needs a checkpoint to get there
        model = tiny_gpt2(n_layers=1)
        train.save_checkpoint({"model": model.state_dict(), "model_name": "gpt2",
                               "model_config": model.cfg.__dict__, "tokenizer": "gpt2"},
                              str(tmp_path / "ckpt.pt"))
        args = [*args, f"init_from={tmp_path}"]
    result = run_script(script, *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


# ---- scaling: DDP, FSDP, resume, memmap

_SCALE_TINY = ["config=tiny", "context_length=32", "dtype=float32", "device=cpu", "eval_iters=1", "lr=1e-3",
               "warmup_steps=2"]


def _scale_text():
    """A text with the things a tokenizer cut could trip on: numbers, punctuation, runs of spaces and
    newlines, contractions, accents, <|endoftext|>."""
    lines = ["The painter sat by the window, and looked at the sea.", "Every effort moves you 1234 steps",
             "closer to the picture you want;  she didn't laugh\u2014but the light changed   ", "",
             "on the water of caf\u00e9 Gisburn<|endoftext|>Then, 3.14 years later...\t\"Why?\" he asked."]
    return "\n".join(lines[i % len(lines)] + f" {i}" * (i % 3) for i in range(400))


def _scale_corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(_scale_text(), encoding="utf-8")
    return str(path)


def _scale_torchrun(*args):
    """train.py in 2 processes with the gloo backend, as torchrun --standalone picks a free port."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *args], cwd=HERE, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _scale_ckpt(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


@pytest.fixture
def _scale_one_thread():
    """One thread for the tiny models trained in this process: on a busy machine, threads that wait
    for each other make them ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def _scale_one_process(tmp_path_factory):
    """The reference: one process, the step's batch of 4 windows as 2 micro-batches of 2."""
    tmp = tmp_path_factory.mktemp("scale")
    data = _scale_corpus(tmp)
    args = [*_SCALE_TINY, f"data={data}", "max_iters=4", "batch_size=4", "eval_interval=2"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train.main([*args, "grad_accum=2", f"out_dir={tmp / 'one'}"])
    torch.set_num_threads(threads)
    return args, _scale_ckpt(tmp / "one"), tmp


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_scale_two_processes_match_one_process(_scale_one_process, mode):
    args, reference, tmp = _scale_one_process
    out = tmp / mode
    result = _scale_torchrun(*args, "grad_accum=1", f"fsdp={mode == 'fsdp'}", f"out_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("step     4  train loss") == 1  # only process 0 prints
    ckpt = _scale_ckpt(out)
    for key in ("step_loss", "train", "val"):
        assert len(ckpt["history"][key]) == len(reference["history"][key])
        assert max(abs(a - b) for a, b in zip(ckpt["history"][key], reference["history"][key])) < 1e-5
    assert ckpt["model"].keys() == reference["model"].keys()  # the full state dict, gathered under FSDP
    for name, weight in ckpt["model"].items():
        assert (weight - reference["model"][name]).abs().max() < 1e-5, name
    assert len(ckpt["rng"]) == 2 and ckpt["step"] == 4
    loaded, _ = train.load_checkpoint(str(out), "cpu")  # and sample.py reads it as any other
    assert loaded.lm_head.weight is loaded.token_embedding.weight


class _ScaleStop(Exception):
    pass


@pytest.mark.usefixtures("_scale_one_thread")
@pytest.mark.parametrize("mode", ["max_iters", "epochs"])
def test_scale_resume_is_exact(tmp_path, monkeypatch, mode):
    data = _scale_corpus(tmp_path)
    # dropout on, so the random state must be restored too; epochs: the stop falls inside an epoch
    run = ["max_iters=8"] if mode == "max_iters" else ["epochs=3", "batch_size=2", "stride=1000"]
    args = [*_SCALE_TINY, f"data={data}", "dropout=0.1", "eval_interval=3", "ckpt_interval=4", *run]
    train.main([*args, f"out_dir={tmp_path / 'whole'}"])
    whole = _scale_ckpt(tmp_path / "whole")

    save = train.save_checkpoint

    def save_then_stop(checkpoint, path):
        save(checkpoint, path)
        raise _ScaleStop

    monkeypatch.setattr(train, "save_checkpoint", save_then_stop)
    with pytest.raises(_ScaleStop):
        train.main([*args, f"out_dir={tmp_path / 'halves'}"])
    assert _scale_ckpt(tmp_path / "halves")["step"] == 4
    monkeypatch.setattr(train, "save_checkpoint", save)
    train.main([*args, "init_from=resume", f"out_dir={tmp_path / 'halves'}"])
    halves = _scale_ckpt(tmp_path / "halves")

    n_steps = len(whole["history"]["step_loss"])
    assert halves["step"] == whole["step"] == n_steps
    assert n_steps == 8 if mode == "max_iters" else n_steps == 9  # epochs: 3 of 3 steps, stopped in the 2nd
    assert halves["history"] == whole["history"]  # every loss, bit for bit
    for name, weight in whole["model"].items():
        assert torch.equal(weight, halves["model"][name]), name
    for name, state in whole["optimizer"]["state"].items():
        assert all(torch.equal(v, halves["optimizer"]["state"][name][k]) for k, v in state.items())
    log = [json.loads(line) for line in open(tmp_path / "halves" / "log.jsonl")]
    assert [line["step"] for line in log if "loss" in line] == list(range(1, n_steps + 1))  # none twice
    assert (tmp_path / "halves" / "loss.png").stat().st_size > 0


def _scale_logged(out_dir, step):
    """Whether the run in out_dir has logged the given step (or a later one)."""
    try:
        return any(f'"step": {s},' in open(os.path.join(out_dir, "log.jsonl")).read() for s in (step, step + 1))
    except OSError:
        return False


def test_scale_sigkill_while_checkpointing_leaves_a_resumable_checkpoint(tmp_path):
    data, out = _scale_corpus(tmp_path), tmp_path / "out"
    args = [sys.executable, "train.py", *_SCALE_TINY, f"data={data}", f"out_dir={out}", "max_iters=30",
            "ckpt_interval=1", "eval_interval=1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = []
    for delay in (0.0, 0.003, 0.02):  # after a checkpoint has begun to be written
        resume = ["init_from=resume"] if steps else []
        run = subprocess.Popen(args + resume, cwd=HERE, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        deadline, target = time.monotonic() + 120, (steps[-1] if steps else 0) + 2
        while not _scale_logged(out, target):  # a few steps on from the last round
            assert run.poll() is None and time.monotonic() < deadline, "training ended before it was killed"
            time.sleep(0.01)
        while not (out / "ckpt.pt.tmp").exists():  # the checkpoint of that step begins to be written
            assert run.poll() is None and time.monotonic() < deadline, "training ended before it was killed"
            time.sleep(0.0005)
        time.sleep(delay)
        run.kill()
        run.wait()
        (out / "ckpt.pt.tmp").unlink(missing_ok=True)  # so that the next round sees its own write begin
        model, ckpt = train.load_checkpoint(str(out), "cpu")
        steps.append(ckpt["step"])
    assert steps == sorted(steps) and steps[-1] > steps[0]  # each round carried on from the last
    finish = subprocess.run(args + ["init_from=resume"], cwd=HERE, env=env, capture_output=True, text=True,
                            timeout=300)
    assert finish.returncode == 0, finish.stderr
    ckpt = _scale_ckpt(out)
    assert ckpt["step"] == 30 and len(ckpt["history"]["step_loss"]) == 30
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [line["step"] for line in log if "loss" in line] == list(range(1, 31))


def test_scale_memmap_batches_equal_in_memory_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "PIECE_BYTES", 50)  # many pieces, so many cuts between them
    tok = train.load_tokenizer("gpt2")
    data = _scale_corpus(tmp_path)
    train.tokenize_corpus(data, tok)
    cache, dtype = train.token_cache(data, tok)
    tokens = np.memmap(cache, dtype=dtype, mode="r")
    ids = np.array(tok.encode(_scale_text()))  # the whole text, encoded at once, in memory
    assert dtype == np.uint16 and np.array_equal(tokens, ids)

    cfg = train.TrainConfig(batch_size=4, seed=7)
    for cfg.max_iters in (100, 0):
        for step in range(12):
            starts = train.batch_starts(step, len(ids), 32, cfg)
            for from_disk, from_memory in zip(train.get_batch(tokens, starts, 32), train.get_batch(ids, starts, 32)):
                assert torch.equal(from_disk, from_memory)
    # epochs: the book's sliding windows (unfold), each once per epoch, in a new order each epoch
    windows = torch.from_numpy(ids).unfold(0, 33, 32)  # (n, t + 1)
    per_epoch = len(windows) // 4
    seen = [train.batch_starts(step, len(ids), 32, cfg) for step in range(2 * per_epoch)]
    first, second = torch.cat(seen[:per_epoch]), torch.cat(seen[per_epoch:])
    assert len(set(first.tolist())) == len(first) and not torch.equal(first, second)
    x, y = train.get_batch(tokens, seen[3], 32)
    assert torch.equal(x, windows[seen[3] // 32, :-1]) and torch.equal(y, windows[seen[3] // 32, 1:])
    assert not torch.equal(train.batch_starts(0, len(ids), 32, train.TrainConfig(batch_size=4, seed=8)),
                           seen[0])

    # a folder: its .txt files, in order, joined by <|endoftext|>; tokenized again when one changes
    folder = tmp_path / "books"
    (folder / "part2").mkdir(parents=True)
    (folder / "a.txt").write_text("First book. " * 40, encoding="utf-8")
    (folder / "part2" / "b.txt").write_bytes(_scale_text()[:2000].replace("\n", "\r\n").encode())  # Windows
    (folder / "notes.md").write_text("not part of the corpus")

    def cached():
        train.tokenize_corpus(str(folder), tok)
        return np.fromfile(train.token_cache(str(folder), tok)[0], dtype=np.uint16)

    assert np.array_equal(cached(), tok.encode("First book. " * 40 + "<|endoftext|>" + _scale_text()[:2000]))
    (folder / "a.txt").write_text("Second edition. " * 40, encoding="utf-8")
    assert np.array_equal(cached()[:5], tok.encode("Second edition. " * 40)[:5])
    monkeypatch.setattr(train, "encode_in_order", None)  # unchanged: read from the cache
    assert len(cached()) > 0


def test_scale_init_from_a_checkpoint_starts_from_its_weights(tmp_path, _scale_one_thread):
    data = _scale_corpus(tmp_path)
    train.main([*_SCALE_TINY, f"data={data}", "max_iters=3", "n_layers=1", f"out_dir={tmp_path / 'a'}"])
    # lr=0: the weights stay as loaded; the architecture (n_layers=1) comes from the checkpoint
    train.main([*_SCALE_TINY, f"data={data}", "max_iters=1", "lr=0", f"init_from={tmp_path / 'a'}",
                f"out_dir={tmp_path / 'b'}"])
    a, b = _scale_ckpt(tmp_path / "a"), _scale_ckpt(tmp_path / "b")
    assert b["model_config"]["n_layers"] == 1 and b["step"] == 1  # a new run: fresh optimizer and schedule
    assert all(torch.equal(a["model"][name], weight) for name, weight in b["model"].items())


def test_scale_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, _scale_one_thread):
    loss_fn, calls = train.loss_fn, []

    def blows_up_at_step_5(model, x, y):
        calls.append(model.training)
        return loss_fn(model, x, y) * (float("nan") if calls.count(True) >= 5 else 1.0)

    monkeypatch.setattr(train, "loss_fn", blows_up_at_step_5)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"the loss became nan at step 5: .*ckpt.pt from step 4 is kept; lower lr"):
        train.main([*_SCALE_TINY, f"data={_scale_corpus(tmp_path)}", "max_iters=10", "ckpt_interval=2",
                    "eval_interval=100", f"out_dir={out}"])
    assert _scale_ckpt(out)["step"] == 4


def test_scale_bad_input_says_what_to_do(tmp_path, _scale_one_thread):
    data = _scale_corpus(tmp_path)
    base = [*_SCALE_TINY, f"data={data}", f"out_dir={tmp_path / 'out'}", "max_iters=1"]
    with pytest.raises(UserError, match="launch with torchrun --nproc_per_node=N"):
        train.main([*base, "fsdp=true"])
    with pytest.raises(UserError, match="batch_size=4 does not split evenly .* grad_accum=3"):
        train.main([*base, "batch_size=4", "grad_accum=3"])
    with pytest.raises(UserError, match="init_from=resume found no checkpoint"):
        train.main([*base, "init_from=resume"])
    with pytest.raises(UserError, match="no checkpoint at /no/such/run"):
        train.main([*base, "init_from=/no/such/run"])
    train.main([*base, "n_layers=1"])
    with pytest.raises(UserError, match="holds a gpt2 model with n_layers=1, not the gpt2 model this command"):
        train.main([*base, "init_from=resume"])  # 2 layers, the tiny preset's
    (tmp_path / "short.txt").write_text("Far too short for a window. " * 5)
    with pytest.raises(UserError, match="fewer than one window"):
        train.main([*base, f"data={tmp_path / 'short.txt'}"])
    (tmp_path / "no-text").mkdir()
    with pytest.raises(UserError, match="holds no .txt files"):
        train.main([*base, f"data={tmp_path / 'no-text'}"])
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="cannot write to out_dir"):
        train.main([*base, f"out_dir={tmp_path / 'a-file' / 'out'}"])


def test_scale_bad_input_gives_one_line_and_status_2(tmp_path):
    data = _scale_corpus(tmp_path)
    base = [*_SCALE_TINY, f"data={data}", f"out_dir={tmp_path / 'out'}", "max_iters=1"]
    for args in (["fsdp=true"], ["init_from=resume"]):
        result = run_script("train.py", *base, *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    # under torchrun, process 0 says it once, before torchrun reports the failed processes its own way
    result = _scale_torchrun(*base, "batch_size=3")
    assert result.returncode != 0
    assert result.stderr.count("train.py: batch_size=3 does not split evenly into 2 process(es)") == 1
