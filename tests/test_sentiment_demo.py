"""Issue 8: the controlled-sentiment demo, shrunken (config preset "tiny"), end to end."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from trainutil import REPO
from examples.sentiment import corpus, reward

ENV = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu",
       "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's main command on the tiny preset, as a newcomer runs it."""
    wd = tmp_path_factory.mktemp("sentiment") / "wd"
    r = subprocess.run([sys.executable, "examples/sentiment/demo.py", "--workdir", str(wd),
                        "--config", "examples/sentiment/config.py:tiny"], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return wd, r.stdout


def test_demo_moves_reward_up_at_a_kl_cost(demo_run):
    wd, out = demo_run
    for i in range(1, 7):  # every stage reports its start and its end
        assert out.count(f"[{i}/6]") == 2, out
    rows = json.loads((wd / "results.json").read_text())["rows"]
    ref = next(r for r in rows if r["model"] == "pi_ref")
    (pol,) = [r for r in rows if r["model"] == "pi_theta"]
    # the direction of the effect: a higher reward than pi_ref, paid for with KL from it
    assert pol["reward"] > ref["reward"] + 0.1, rows
    assert pol["kl"] > 0.1, rows
    assert pol["eval_reward_accuracy"] > 0.5, rows
    # the pairs: chosen always has the higher reward, recomputed here from the texts
    pairs = [json.loads(l) for l in (wd / "pairs" / "train.jsonl").read_text().splitlines()]
    assert len(pairs) > 100
    for p in pairs[:50]:
        rc, rr = reward.lexicon([p["prompt"] + p["chosen"], p["prompt"] + p["rejected"]])
        assert rc > rr and np.isclose(rc, p["chosen_reward"])


def test_demo_writes_table_plot_and_samples(demo_run):
    wd, out = demo_run
    with (wd / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["model"] for r in table] == ["pi_ref", "pi_theta"]
    assert "| pi_theta | 0.5 |" in (wd / "results.md").read_text()
    png = (wd / "reward_vs_kl.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    samples = (wd / "samples.md").read_text()
    assert samples.count("- pi_ref:") == 2 and samples.count("- pi_theta (beta=0.5):") == 2
    assert "reward_vs_kl.png" in out


def test_demo_reuses_done_stages_and_refuses_another_config(demo_run, tmp_path):
    wd, _ = demo_run
    r = subprocess.run([sys.executable, "examples/sentiment/demo.py", "--workdir", str(wd),
                        "--config", "examples/sentiment/config.py:tiny",
                        "--config.dpo_learning_rate=0.1"], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "holds a demo run of another config" in r.stderr


def test_corpus_is_seeded_and_varied():
    a, b = corpus.reviews(300, seed=3), corpus.reviews(300, seed=3)
    assert a == b and a != corpus.reviews(300, seed=4)
    assert len(set(a)) > 290
    scores = reward.lexicon(a)
    assert (scores > 0).mean() > 0.25 and (scores < 0).mean() > 0.25  # both sentiments


def test_lexicon_reward():
    r = reward.lexicon(["It was wonderful and clever.", "It was dull.", "It was not dull.",
                        "It runs for two hours.", "Great, but the plot was awful."])
    np.testing.assert_allclose(r, [2 / 3, -0.5, 0.5, 0.0, 0.0])
    assert reward.load("lexicon") is reward.lexicon
    assert reward.load("examples.sentiment.reward:lexicon") is reward.lexicon
    with pytest.raises(ValueError, match="config key reward"):
        reward.load("nonsense")
