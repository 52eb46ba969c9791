"""Tiny trained default: training lowers the loss (deterministically), the committed checkpoint reaches its
recorded held-out accuracy, and infill never changes fixed tokens."""

import json

import pytest
import torch

from dgemma.model.checkpoint import load_checkpoint
from dgemma.cli import main
from dgemma.runtime.torch_backend import TorchBackend
from dgemma.generation.sampler import generate
from dgemma.tiny import DEFAULT_CHECKPOINT
from dgemma.model.tokens import Tokenizer
from dgemma.tiny.task import SortTask, encode_batch, evaluate
from dgemma.tiny.train import train_tiny


def test_training_lowers_loss_and_is_deterministic(tmp_path):
    a = train_tiny(tmp_path / "a", steps=8, batch=16, seed=3, log_every=0)
    b = train_tiny(None, steps=8, batch=16, seed=3, log_every=0)
    assert a["losses"] == b["losses"]  # same seed, same run
    assert sum(a["losses"][-2:]) / 2 < sum(a["losses"][:2]) / 2 - 0.5
    ck = load_checkpoint(tmp_path / "a")  # written in the real layout, with its tokenizer
    assert ck.config.num_hidden_layers == 3 and (tmp_path / "a" / "tokenizer.json").exists()


def test_committed_checkpoint_reaches_recorded_accuracy():
    note = json.loads((DEFAULT_CHECKPOINT / "TRAINING.json").read_text())
    rec = note["heldout"]
    res = evaluate(DEFAULT_CHECKPOINT, n=rec["n"], seed=rec["seed"])
    assert res["accuracy"] == pytest.approx(rec["accuracy"]) and res["accuracy"] >= 0.9
    assert res["mean_steps_per_canvas"] == pytest.approx(rec["mean_steps_per_canvas"])
    assert res["mean_steps_per_canvas"] < 10  # adaptive stopping really stops (a random model runs all 48)


def test_infill_never_changes_fixed_tokens():
    ck = load_checkpoint(DEFAULT_CHECKPOINT)
    tok = Tokenizer(DEFAULT_CHECKPOINT)
    task = SortTask()
    import random

    pairs = [task.example(random.Random(s)) for s in range(4)]
    prompt, clean = encode_batch(tok, ck.config, pairs)
    template = torch.full_like(clean, -1)
    template[:, 4:6] = clean[:, 4:6]  # a few answer tokens fixed
    template[:, 30] = tok.encode("7")[0]  # and one the model would never write there
    fixed = template >= 0
    drafts = []
    res = generate(TorchBackend(ck.model, 256), prompt, ck.sampler, torch.Generator().manual_seed(0),
                   on_step=lambda ev: drafts.append(ev.draft.clone()), template=template)
    for d in drafts:
        assert torch.equal(d[fixed], template[fixed])
    assert torch.equal(res.new_tokens[fixed], template[fixed])
    # an all-holes template is the plain generation (same RNG draws)
    plain = generate(TorchBackend(ck.model, 256), prompt, ck.sampler, torch.Generator().manual_seed(0))
    holes = generate(TorchBackend(ck.model, 256), prompt, ck.sampler, torch.Generator().manual_seed(0),
                     template=torch.full_like(clean, -1))
    assert torch.equal(plain.sequences, holes.sequences)


def test_infill_cli_and_bad_template(capsys):
    assert main(["generate", "--prompt", "sort: 3 1 4 1 5 9 2 6 5 3", "--infill", "1 1 2 _ _ _ _ _ _ _ 6 9",
                 "--json", "--seed", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"].startswith("1 1 2 ") and out["token_ids"][20:23] == [161, 139, 164]
    with pytest.raises(Exception, match="infill template must be"):
        generate(TorchBackend(load_checkpoint(DEFAULT_CHECKPOINT).model, 256), torch.tensor([[2, 3]]),
                 load_checkpoint(DEFAULT_CHECKPOINT).sampler, torch.Generator(), template=torch.zeros(1, 5).long())


def test_eval_cli(capsys):
    assert main(["eval", "--n", "20", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["accuracy"] >= 0.8 and res["task"] == "sort"
    assert main(["eval", "--task", "sudoku"]) == 2
    assert "unknown task 'sudoku'; valid: sort" in capsys.readouterr().err
