"""Issue 31: on-policy DPO rounds (dpo_jax/online.py). A tiny two-round run from the CLI with a
``module:function`` reward; a SIGKILL in each phase (sampling, scoring, training) and reruns end
with the uninterrupted run's pairs and bitwise its weights; bad rewards are one line; pairing."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from trainutil import CLI_ENV
from dpo_jax import online
from dpo_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
REWARD = textwrap.dedent("""
    def vowels(prompts, completions, **kw):
        return [sum(c.count(x) for x in "aeiou") / (1 + len(c)) for c in completions]
""")
KILL_DRIVER = textwrap.dedent("""
    import os, signal, sys
    from dpo_jax import online, steps
    phase, at = os.environ.get("KILL", "none:0").split(":")
    at = int(at)
    kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
    sample, score, make = online.sample, online.score, steps.make_train_step
    def sample_and_kill(*a, seed, **k):
        if phase == "sample" and seed % 1000 == at:
            kill()
        return sample(*a, seed=seed, **k)
    def score_and_kill(fn, spec, prompts, samples, r):
        if phase == "score" and r == at:
            kill()
        return score(fn, spec, prompts, samples, r)
    from dpo_jax import trainer
    train_round, training = trainer.train_and_evaluate, [""]
    def train_and_note(config, workdir):
        training[0] = str(workdir)
        return train_round(config, workdir)
    def make_and_kill(*a, **k):
        fn = make(*a, **k)
        def step(state, *rest):
            if (phase == "train" and f"round_{at:03d}" in training[0]
                    and int(state["step"]) == 2):
                kill()
            return fn(state, *rest)
        return step
    online.sample, online.score = sample_and_kill, score_and_kill
    trainer.train_and_evaluate, steps.make_train_step = train_and_note, make_and_kill
    import train
    train.check_overrides(sys.argv)
    train.app.run(train.main)
""")


def cli(tmp_path, workdir, kill="none:0"):
    (tmp_path / "rewards_mod.py").write_text(REWARD)
    prompts = tmp_path / "prompts.jsonl"
    rows = [json.loads(l) for l in (ROOT / "data/tiny/eval.jsonl").read_text().splitlines()]
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows[:12]))
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_DRIVER)
    args = [sys.executable, str(driver), "--config", "configs/tiny.py", "--workdir",
            str(workdir), "--config.online_rounds=2", f"--config.online_prompts={prompts}",
            "--config.online_reward=rewards_mod:vowels", "--config.online_samples_per_prompt=3",
            "--config.online_max_new_tokens=6", "--config.online_batch_size=8",
            "--config.max_steps=3", "--config.warmup_steps=0", "--config.save_steps=1",
            "--config.sample_prompts=0", "--config.eval_steps=0", "--config.logging_steps=1",
            "--config.progress_bar=False", f"--config.data_cache_dir={tmp_path / 'cache'}"]
    # one device and the session's compilation cache, as every CLI test (trainutil.CLI_ENV)
    env = dict(CLI_ENV, KILL=kill, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_rounds_train_from_the_cli_and_a_kill_in_each_phase_resumes_bitwise(tmp_path):
    straight = tmp_path / "straight"
    r = cli(tmp_path, straight)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((straight / "summary.json").read_text())
    assert [x["round"] for x in summary["rounds"]] == [1, 2]
    for n in (1, 2):
        rdir = straight / "online" / f"round_{n:03d}"
        info = json.loads((rdir / "round.json").read_text())
        pairs = [json.loads(l) for l in (rdir / "pairs.jsonl").read_text().splitlines()]
        assert info["prompts"] == 12 and info["samples"] == 36
        assert len(pairs) + info["ties_dropped"] + info["empty_dropped"] == 12  # one per prompt
        assert all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
        assert (rdir / "train" / "hf" / "model.safetensors").exists()
    # round 2 sampled from round 1's policy, and trained against the initial model
    assert "sampling 12 x 3 completions from " + str(straight / "online" / "round_001") \
        in r.stderr
    assert "reference: from " + str(straight / "online" / "initial") in r.stderr
    import transformers
    assert type(transformers.AutoModelForCausalLM.from_pretrained(straight / "hf")).__name__ \
        == "GPT2LMHeadModel"

    resumed = tmp_path / "resumed"
    for kill in ("sample:2", "score:2", "train:2"):  # each phase of round 2, one after another
        r = cli(tmp_path, resumed, kill)
        assert r.returncode == -9, (kill, r.returncode, r.stderr[-3000:])
    r = cli(tmp_path, resumed)
    assert r.returncode == 0, r.stderr[-3000:]
    for n in (1, 2):
        for name in ("samples.jsonl", "rewards.jsonl", "pairs.jsonl"):
            rel = Path("online") / f"round_{n:03d}" / name
            assert (straight / rel).read_bytes() == (resumed / rel).read_bytes(), rel
    assert ((straight / "hf" / "model.safetensors").read_bytes()
            == (resumed / "hf" / "model.safetensors").read_bytes())
    # the rounds' files are reused only under the settings that made them
    from trainutil import tiny_config
    from dpo_jax import config as configs
    c = tiny_config(tmp_path, online_rounds=2, online_prompts=str(tmp_path / "prompts.jsonl"),
                    online_reward="rewards_mod:vowels", online_samples_per_prompt=4)
    from dpo_jax.checkpoint import CheckpointMismatch
    with pytest.raises(CheckpointMismatch, match=r"online was trained with other settings than "
                                                 r"this run's \(.*online_samples_per_prompt: "
                                                 r"3 -> 4"):
        online._check_settings(configs.build(c), resumed / "online" / "settings.json")


def test_a_reward_that_is_not_one_finite_float_per_completion_is_one_line():
    prompts, samples = ["a", "b"], [["x", "y"], ["z", "w"]]
    nan = lambda prompts, completions: [0.0, 1.0, float("nan"), 2.0]
    with pytest.raises(ConfigError, match=r"round 3: online_reward='m:nan' returned nan for "
                                          r"completion 2 \(prompt 1: 'b'\); 1 of 4 are not "
                                          r"finite"):
        online.score(nan, "m:nan", prompts, samples, 3)
    short = lambda prompts, completions: [0.0, 1.0]
    with pytest.raises(ConfigError, match=r"returned shape \(2,\) for 4 completions"):
        online.score(short, "m:short", prompts, samples, 1)
    text = lambda prompts, completions: ["good"] * 4
    with pytest.raises(ConfigError, match=r"online_reward='m:text' returned"):
        online.score(text, "m:text", prompts, samples, 1)
    with pytest.raises(ConfigError, match=r"neither module:function nor an HF"):
        online.reward_function("no_colon_here")


def test_pairings_and_ties():
    prompts = ["p", "q"]
    samples = [["a", "b", "c"], ["d", "e", "f"]]
    rewards = [[0.1, 0.9, 0.5], [0.2, 0.2, 0.2]]  # q: all tied
    pairs, dropped = online.make_pairs(prompts, samples, rewards, "best_worst", 0)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("b", "a")]
    assert dropped == {"ties": 1, "empty": 0}
    pairs, dropped = online.make_pairs(prompts, samples, rewards, "all_pairs", 0)
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {("b", "a"), ("c", "a"), ("b", "c")}
    assert dropped == {"ties": 3, "empty": 0}
    pairs, dropped = online.make_pairs(prompts, samples, rewards, "random_pair", 0)
    assert len(pairs) == 1 and dropped["ties"] == 1
    assert pairs[0]["chosen_reward"] > pairs[0]["rejected_reward"]
    assert online.make_pairs(prompts, samples, rewards, "random_pair", 0) == (pairs, dropped)
    pairs, dropped = online.make_pairs(["p"], [["a", " "]], [[1.0, 0.0]], "best_worst", 0)
    assert not pairs and dropped == {"ties": 0, "empty": 1}  # EOS first: nothing to train on


def test_rounds_need_prompts_and_a_reward(tmp_path):
    from trainutil import tiny_config
    from dpo_jax import config as configs
    with pytest.raises(ConfigError, match=r"online_rounds=2 needs online_prompts and "
                                          r"online_reward"):
        configs.build(tiny_config(tmp_path, online_rounds=2))


def test_sampling_split_over_devices_gives_the_tokens_of_one():
    """The rows of a sampling batch split over 8 devices: the same tokens as on one."""
    import jax
    from flax import nnx
    from dpo_jax import sampling
    from dpo_jax.models import gpt2
    model = gpt2.GPT2(gpt2.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2,
                                      n_head=4), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ids, mask = sampling.left_pad([rng.integers(1, 64, n).tolist() for n in
                                   rng.integers(2, 9, 16)], 0, 8)
    sc = sampling.SamplingConfig(max_new_tokens=6, temperature=1.0)
    one = sampling.generate(model, ids, mask, sc, seed=3)
    eight = sampling.generate(model, ids, mask, sc, seed=3, devices=jax.devices()[:8])
    np.testing.assert_array_equal(one, eight)


def test_a_sequence_classification_folder_is_a_reward(tmp_path):
    """online_reward = an HF reward model's folder (one output): its logit of prompt +
    completion, as transformers computes it."""
    torch = pytest.importorskip("torch")
    import transformers
    from tokenizers_offline import llama_like
    tok = llama_like()
    tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    rm = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_labels=1,
        pad_token_id=tok.pad_token_id)).eval()
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    fn = online.reward_function(str(tmp_path / "rm"))
    prompts, completions = ["The film", "A story"], [" was good", " was dull and long"]
    got = fn(prompts=prompts, completions=completions)
    with torch.no_grad():
        want = [rm(**tok(p + c, return_tensors="pt")).logits[0, 0].item()
                for p, c in zip(prompts, completions)]
    np.testing.assert_allclose(got, want, atol=1e-5)
    two = tmp_path / "two"
    cfg2 = transformers.LlamaConfig(**{k: v for k, v in rm.config.to_dict().items()
                                       if k not in ("id2label", "label2id")}, num_labels=2)
    transformers.LlamaForSequenceClassification(cfg2).save_pretrained(two)
    tok.save_pretrained(two)
    with pytest.raises(ConfigError, match=r"a reward model has one output \(num_labels=1\), "
                                          r"this one 2"):
        online.reward_function(str(two))


def test_a_reference_of_its_own_folder(tmp_path):
    """ref_model_name_or_path (TRL's ref_model): full tuning scores against that model; LoRA
    (whose reference is its base) and a model of other shapes are one line each."""
    import jax
    from trainutil import tiny_config
    from dpo_jax import hf, models, trainer
    base = tiny_config(tmp_path, max_steps=2, warmup_steps=0, sample_prompts=0, eval_steps=0)
    trainer.train_and_evaluate(base, tmp_path / "first")
    run = trainer.setup(tiny_config(tmp_path, ref_model_name_or_path=str(tmp_path / "first" / "hf"),
                                    max_steps=2, warmup_steps=0), tmp_path / "second")
    _, want = hf.load_pretrained_params(str(tmp_path / "first" / "hf"))
    for k, v in models.flatten(jax.tree.map(np.asarray, run.frozen)).items():
        np.testing.assert_array_equal(v, np.asarray(models.flatten(want)[k]), err_msg=k)
    assert "reference: from " in "\n".join(run.describe())
    run.ckpt.close()
    with pytest.raises(ConfigError, match=r"ref_model_name_or_path=.*: LoRA's and DoRA's "
                                          r"reference is their base"):
        trainer.setup(tiny_config(tmp_path, lora_rank=4, ref_model_name_or_path=str(
            tmp_path / "first" / "hf")), tmp_path / "third")
    import transformers  # a GPT-2 of another width, as transformers writes one
    m = base.model
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=m.vocab_size, n_positions=m.n_positions, n_embd=32, n_layer=m.n_layer,
        n_head=m.n_head)).save_pretrained(tmp_path / "wide")
    with pytest.raises(ConfigError, match=r"not a model of the policy's family and shapes"):
        trainer.setup(tiny_config(tmp_path, ref_model_name_or_path=str(tmp_path / "wide")),
                      tmp_path / "fourth")
