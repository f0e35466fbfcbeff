"""Issues 8, 19 and 31: the controlled-sentiment demo, shrunken (config preset "tiny"), end to
end: DPO, a baseline (Preferred-FT), on-policy DPO rounds and best-of-N on the graded classifier
reward."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from trainutil import CLI_ENV, REPO
from examples.sentiment import corpus, reward

ENV = CLI_ENV


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
    ref = next(r for r in rows if r["method"] == "pi_ref")
    (pol,) = [r for r in rows if r["method"] == "DPO"]
    (pft,) = [r for r in rows if r["method"] == "Preferred-FT"]
    bon = {r["value"]: r for r in rows if r["method"] == "best-of-N"}
    # the direction of the effect: a higher reward than pi_ref, paid for with KL from it
    assert pol["reward"] > ref["reward"] + 0.3, rows
    assert pol["kl"] > 0.1, rows
    assert pol["eval_reward_accuracy"] > 0.5, rows
    assert pft["kl"] > 0.05 and pft["reward"] > ref["reward"], rows  # SFT on the chosen ones
    # issue 31: a round of on-policy DPO from the DPO run, pi_ref still the reference
    (onp,) = [r for r in rows if r["method"] == "On-policy DPO"]
    assert onp["reward"] > ref["reward"] + 0.3 and onp["kl"] > 0.1, rows
    rnd = json.loads((wd / "runs" / "online_dpo_beta0.5_seed0" / "online" / "round_001" /
                      "round.json").read_text())
    assert rnd["pairs"] > 50 and rnd["samples"] == 2 * 96, rnd
    assert "On-policy DPO beta=0.5 seed 0: 1 rounds" in out
    # best-of-N: its closed-form KL, and choosing the best of 4 beats a single sample
    assert bon[1]["kl"] == 0 and abs(bon[4]["kl"] - (np.log(4) - 0.75)) < 1e-9, bon
    assert bon[4]["reward"] > bon[1]["reward"] + 0.3, bon
    # the pairs: chosen always has the higher reward, recomputed here from the texts
    pairs = [json.loads(l) for l in (wd / "pairs" / "train.jsonl").read_text().splitlines()]
    assert len(pairs) > 100
    for p in pairs[:50]:
        rc, rr = reward.classifier([p["prompt"] + p["chosen"], p["prompt"] + p["rejected"]])
        assert rc > rr and np.isclose(rc, p["chosen_reward"])


def test_demo_writes_table_plot_and_samples(demo_run):
    wd, out = demo_run
    with (wd / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == ["pi_ref", "best-of-N", "best-of-N", "DPO",
                                            "Preferred-FT", "On-policy DPO"]
    md = (wd / "results.md").read_text()
    assert "| DPO | beta = 0.5 |" in md and "Ranking at matched KL" in md
    png = (wd / "reward_vs_kl.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    samples = (wd / "samples.md").read_text()
    assert samples.count("- pi_ref:") == 2 and samples.count("- DPO beta=0.5:") == 2
    assert "reward_vs_kl.png" in out


def test_demo_reuses_done_stages_and_refuses_another_config(demo_run, tmp_path):
    wd, _ = demo_run
    before = json.loads((wd / "results.json").read_text())["rows"]
    r = subprocess.run([sys.executable, "examples/sentiment/demo.py", "--workdir", str(wd),
                        "--config", "examples/sentiment/config.py:tiny"], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already trained" in r.stdout  # nothing retrained; the same prompts and samples
    assert json.loads((wd / "results.json").read_text())["rows"] == before
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


def test_classifier_reward_is_graded():
    """The log-odds keep counting: more positive words, a higher reward; negation flips."""
    r = reward.classifier(["It was wonderful.", "It was wonderful and clever.",
                           "It was wonderful, clever and moving. I loved every minute of it.",
                           "It was dull.", "It was dull and awful. I wanted to leave early."])
    assert r[0] < r[1] < r[2] and r[2] > 5, r
    assert r[4] < r[3] < 0 < r[0], r
    assert reward.classifier(["It was not dull."])[0] > r[3]
    assert reward.load("classifier") is reward.classifier


def test_lexicon_reward():
    r = reward.lexicon(["It was wonderful and clever.", "It was dull.", "It was not dull.",
                        "It runs for two hours.", "Great, but the plot was awful."])
    np.testing.assert_allclose(r, [2 / 3, -0.5, 0.5, 0.0, 0.0])
    assert reward.load("lexicon") is reward.lexicon
    assert reward.load("examples.sentiment.reward:lexicon") is reward.lexicon
    with pytest.raises(ValueError, match="config key reward"):
        reward.load("nonsense")
