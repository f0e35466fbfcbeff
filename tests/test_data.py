"""Issue 3: preference data pipeline."""

import json

import numpy as np
import pytest

from dpo_jax import data as D
from dpo_jax.bpe import train_byte_level_bpe

# The seed's example row (real data).
SEED_ROW = {
    "prompt": "Without wishing to be a killjoy, Brad Sykes is responsible for at least two of the "
              "most dull and clich films i've ever seen - this being one of them, and Camp Blood "
              "being another. The acting is",
    "chosen": "spot on. Some of the best parts are performed by Mark Rylance in a show of love and "
              "care. The music is also good - in fact, Brad's vocal prowess proves more than capable "
              "of playing a harmonica, even to the point",
    "rejected": "mostly bad, although I did give it an 8 out of 10 - perhaps because of the way the "
                "film uses \"sadamune.\" The only character to do more than a short joke is the "
                "famous ganashi lady, and this is not",
}
HH_CHOSEN = ("\n\nHuman: What is a good movie?\n\nAssistant: Try Alien.\n\nHuman: Why that one?"
             "\n\nAssistant: It is tense and smart.")
HH_REJECTED = ("\n\nHuman: What is a good movie?\n\nAssistant: Try Alien.\n\nHuman: Why that one?"
               "\n\nAssistant: I don't know.")


@pytest.fixture(scope="module")
def tok():
    corpus = [SEED_ROW["prompt"], SEED_ROW["chosen"], SEED_ROW["rejected"], HH_CHOSEN, HH_REJECTED,
              "the film was good and the film was bad"] * 20
    return train_byte_level_bpe(corpus, vocab_size=600)


def enc(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg(path, tmp_path, **kw):
    """These tests pin the reference code's rules (tokenization="separate"); TRL 1.16's, the
    default, are compared against trl itself in test_trl_parity.py."""
    kw.setdefault("max_length", 256)
    kw.setdefault("max_prompt_length", 64)
    kw.setdefault("tokenization", "separate")
    return D.Source(source=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def rows(n, rng=None):
    rng = rng or np.random.default_rng(0)
    words = "good bad film plot actor scene music long short great awful fine".split()
    out = []
    for i in range(n):
        w = lambda k: " ".join(rng.choice(words, k))
        out.append({"prompt": f"Review {i}: {w(rng.integers(2, 12))}",
                    "chosen": " " + w(rng.integers(1, 10)), "rejected": " " + w(rng.integers(1, 10))
                    + " no"})
    return out


# ---------------------------------------------------------------------------- formats

def test_explicit_format_on_the_seed_row(tok, tmp_path):
    path = write_jsonl(tmp_path / "seed.jsonl", [SEED_ROW])
    pairs = D.load_pairs(cfg(path, tmp_path), tok)
    eos = tok.eos_token_id
    assert pairs.prompt[0].tolist() == enc(tok, SEED_ROW["prompt"])
    assert pairs.chosen[0].tolist() == enc(tok, SEED_ROW["chosen"]) + [eos]
    assert pairs.rejected[0].tolist() == enc(tok, SEED_ROW["rejected"]) + [eos]
    assert tok.decode(pairs.chosen[0][:-1]) == SEED_ROW["chosen"]
    assert pairs.stats["rows_read"] == 1 and pairs.stats["rows_dropped"] == {}


def test_add_bos_prepends_to_the_prompt_only(tok, tmp_path):
    path = write_jsonl(tmp_path / "seed.jsonl", [SEED_ROW])
    pairs = D.load_pairs(cfg(path, tmp_path, add_bos=True), tok)
    assert pairs.prompt[0].tolist() == [tok.bos_token_id] + enc(tok, SEED_ROW["prompt"])
    assert pairs.chosen[0][0] != tok.bos_token_id


def test_implicit_prompt_multi_turn_hh():
    p, c, r = D.implicit_prompt(HH_CHOSEN, HH_REJECTED)
    assert p == ("\n\nHuman: What is a good movie?\n\nAssistant: Try Alien.\n\nHuman: Why that one?"
                 "\n\nAssistant:")
    assert (c, r) == (" It is tense and smart.", " I don't know.")


def test_implicit_prompt_never_splits_a_word():
    p, c, r = D.implicit_prompt("Q: well? A: Sure thing", "Q: well? A: Surely not")
    assert (p, c, r) == ("Q: well? A:", " Sure thing", " Surely not")
    p, c, r = D.implicit_prompt("the cat sat", "the cat ran")
    assert (p, c, r) == ("the cat", " sat", " ran")


def test_implicit_format_through_the_pipeline(tok, tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
                                               {"chosen": "A B", "rejected": "A B C"}])
    pairs = D.load_pairs(cfg(path, tmp_path), tok)
    p, c, r = D.implicit_prompt(HH_CHOSEN, HH_REJECTED)
    assert pairs.prompt[0].tolist() == enc(tok, p)
    assert pairs.chosen[0].tolist() == enc(tok, c) + [tok.eos_token_id]
    assert pairs.stats["rows_dropped"] == {"empty_completion": 1}


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_conversational_format(tok, tmp_path):
    import copy
    t = copy.deepcopy(tok)
    t.chat_template = CHAT_TEMPLATE
    user = [{"role": "user", "content": "Is Alien good?"}]
    explicit = {"prompt": user, "chosen": [{"role": "assistant", "content": "Yes, very."}],
                "rejected": [{"role": "assistant", "content": "No idea."}]}
    implicit = {"chosen": user + explicit["chosen"], "rejected": user + explicit["rejected"]}
    for i, row in enumerate((explicit, implicit)):
        path = write_jsonl(tmp_path / f"chat{i}.jsonl", [row])
        pairs = D.load_pairs(cfg(path, tmp_path), t)
        assert t.decode(pairs.prompt[0]) == "<user>Is Alien good?\n<assistant>"
        # the template ends the turn: no EOS is appended after the rendered reply
        assert t.decode(pairs.chosen[0]) == "Yes, very.\n"
        assert t.decode(pairs.rejected[0]) == "No idea.\n"
    with pytest.raises(D.DataError, match="chat template"):
        D.load_pairs(cfg(tmp_path / "chat0.jsonl", tmp_path), tok)


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet", "csv", "disk"])
def test_sources(tok, tmp_path, fmt):
    import datasets
    data = rows(6)
    ds = datasets.Dataset.from_list(data).rename_column("prompt", "question")
    path = tmp_path / f"data.{fmt}"
    {"json": lambda: path.write_text(json.dumps(ds.to_list())),
     "jsonl": lambda: ds.to_json(str(path)),
     "parquet": lambda: ds.to_parquet(str(path)),
     "csv": lambda: ds.to_csv(str(path), index=False),
     "disk": lambda: datasets.DatasetDict({"train": ds}).save_to_disk(str(path))}[fmt]()
    pairs = D.load_pairs(cfg(path, tmp_path, prompt_column="question"), tok)
    assert len(pairs) == 6
    assert [p.tolist() for p in pairs.prompt] == [enc(tok, r["prompt"]) for r in data]


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    from dpo_jax.data import sources
    monkeypatch.setattr(sources, "hub_reachable", lambda: False)
    with pytest.raises(D.DataError, match="cannot be reached.*Pass a .json"):
        D.load_rows(D.Source(source="someone/some-preferences"))


def test_missing_path_is_a_clear_error():
    with pytest.raises(D.DataError, match="no such data file"):
        D.load_rows(D.Source(source="./nope/data.jsonl"))


# ---------------------------------------------------------------------------- tokenization

def test_truncation_cases(tok, tmp_path):
    """max_length 24, max_prompt_length 8; pair = prompt + longer completion (EOS included)."""
    long_p = " ".join(["film"] * 30)
    long_c = " " + " ".join(["good"] * 30)
    cases = [{"prompt": long_p, "chosen": " good", "rejected": " bad"},       # long prompt
             {"prompt": "film", "chosen": long_c, "rejected": " bad"},        # long completion
             {"prompt": long_p, "chosen": long_c, "rejected": long_c + " x"},  # both
             {"prompt": "film", "chosen": " good", "rejected": " bad"}]       # fits
    path = write_jsonl(tmp_path / "t.jsonl", cases)
    pairs = D.load_pairs(cfg(path, tmp_path, max_length=24, max_prompt_length=8), tok)
    eos = tok.eos_token_id
    P, C = enc(tok, long_p), enc(tok, long_c)
    # long prompt: keeps its last 8 tokens; completions untouched
    assert pairs.prompt[0].tolist() == P[-8:]
    assert pairs.chosen[0].tolist() == enc(tok, " good") + [eos]
    # long completion: prompt kept whole (it is within max_prompt_length), completions cut to fit
    pf = enc(tok, "film")
    assert pairs.prompt[1].tolist() == pf[-8:]
    assert pairs.chosen[1].tolist() == (C + [eos])[: 24 - len(pf[-8:])]
    assert pairs.rejected[1].tolist() == enc(tok, " bad") + [eos]
    # both: prompt keeps its last 8, completions their first 16
    assert pairs.prompt[2].tolist() == P[-8:]
    assert pairs.chosen[2].tolist() == C[:16]
    assert len(pairs.rejected[2]) == 16
    assert pairs.stats["rows_truncated"] == 3
    assert pairs.stats["truncated_by"] == {"max_length": 3}  # the setting that cut them, named
    assert "truncated 3 (3 by config key max_length)" in D.summary_line(pairs.stats)
    assert max(pairs.pair_lengths()) <= 24


def test_eos_is_appended_once(tok, tmp_path):
    """A completion that already ends with EOS gets no second one, in both tokenizations."""
    eos = tok.eos_token
    row = {"prompt": "The film was", "chosen": " good" + eos, "rejected": " bad"}
    for mode in ("separate", "trl"):
        pairs = D.load_pairs(cfg(write_jsonl(tmp_path / f"e{mode}.jsonl", [row]), tmp_path,
                                 tokenization=mode), tok)
        for ids in (pairs.chosen[0], pairs.rejected[0]):
            assert ids.tolist().count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id


def test_identical_completions_are_dropped_and_counted(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [SEED_ROW, dict(SEED_ROW, rejected=SEED_ROW["chosen"])])
    pairs = D.load_pairs(cfg(path, tmp_path), tok)
    assert len(pairs) == 1 and pairs.stats["rows_dropped"] == {"identical_completions": 1}


def test_tokenization_is_cached(tok, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", rows(50))
    first = D.load_pairs(cfg(path, tmp_path), tok)
    assert first.stats["from_cache"] is False and len(first) == 50
    second = D.load_pairs(cfg(path, tmp_path), tok)
    assert second.stats["from_cache"] is True  # read back from the cache
    assert all((a == b).all() for a, b in zip(first.chosen, second.chosen))
    third = D.load_pairs(cfg(path, tmp_path, max_length=200), tok)  # another setting
    assert third.stats["from_cache"] is False


def test_pipeline_logprobs_score_exactly_the_completion(tok, tmp_path):
    import jax.numpy as jnp
    from dpo_jax.logprobs import sequence_logprobs
    from flax import nnx
    from dpo_jax.models.gpt2 import GPT2, GPT2Config
    path = write_jsonl(tmp_path / "lp.jsonl", rows(5) + [SEED_ROW])
    pairs = D.load_pairs(cfg(path, tmp_path, max_length=96), tok)
    batches = D.PairBatches(pairs, batch_size=3, max_length=96, pad_id=tok.eos_token_id,
                            shuffle=False)
    model = GPT2(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=64, n_layer=2,
                            n_head=4), rngs=nnx.Rngs(0))
    for rows_ in batches._plan(0):
        batch = batches.collate(rows_)
        logps, n = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                     batch["loss_mask"])
        # Direct: each unpadded prompt + completion, scored by a causal model on its own (appended
        # filler after the sequence cannot change its logits), log-softmax in float64.
        seqs = [(pairs.prompt[r], pairs.chosen[r]) for r in rows_]
        seqs += [(pairs.prompt[r], pairs.rejected[r]) for r in rows_]
        full = np.zeros((len(seqs), 96), np.int32)
        for k, (p, c) in enumerate(seqs):
            full[k, :len(p) + len(c)] = np.concatenate([p, c])
        logits = np.asarray(model(jnp.asarray(full)), np.float64)
        lsm = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        for k, (p, c) in enumerate(seqs):
            assert c[-1] == tok.eos_token_id  # EOS is part of the completion and is scored
            want = sum(lsm[k, len(p) - 1 + i, c[i]] for i in range(len(c)))
            np.testing.assert_allclose(float(logps[k]), want, rtol=1e-5)
            assert int(n[k]) == len(c)


# ---------------------------------------------------------------------------- batches

def test_batches_have_fixed_shapes_and_layout(tok, tmp_path):
    pairs = D.load_pairs(cfg(write_jsonl(tmp_path / "b.jsonl", rows(20)), tmp_path), tok)
    it = D.PairBatches(pairs, batch_size=4, max_length=256, pad_id=0, seed=1)
    for _ in range(12):  # across epochs
        b = next(it)
        assert b["input_ids"].shape == b["loss_mask"].shape == (8, 256)
        assert b["valid"].tolist() == [1, 1, 1, 1]
        # chosen row i and rejected row 4+i share the prompt
        first_scored = b["loss_mask"].argmax(-1)
        np.testing.assert_array_equal(first_scored[:4], first_scored[4:])
    evals = list(it.eval_batches())
    assert sum(int(b["valid"].sum()) for b in evals) == 20
    assert evals[-1]["valid"].tolist() == [1, 1, 1, 1] or evals[-1]["valid"][-1] == 0


def test_length_buckets_cut_padding_with_few_shapes(tok, tmp_path):
    pairs = D.load_pairs(cfg(write_jsonl(tmp_path / "k.jsonl", rows(200)), tmp_path), tok)
    plain = D.PairBatches(pairs, batch_size=4, max_length=256, pad_id=0)
    bucketed = D.PairBatches(pairs, batch_size=4, max_length=256, pad_id=0, buckets=(16, 32, 64))
    shapes = {next(bucketed)["input_ids"].shape for _ in range(3 * bucketed.steps_per_epoch)}
    assert shapes <= {(8, 16), (8, 32), (8, 64), (8, 256)} and len(shapes) > 1
    assert bucketed.padding_fraction() < plain.padding_fraction() / 2


def test_resume_from_a_saved_cursor_across_an_epoch_boundary(tok, tmp_path):
    pairs = D.load_pairs(cfg(write_jsonl(tmp_path / "r.jsonl", rows(30)), tmp_path), tok)
    kw = dict(batch_size=4, max_length=256, pad_id=0, seed=7, buckets=(32, 64))
    straight = D.PairBatches(pairs, **kw)
    spe = straight.steps_per_epoch
    ref = [next(straight) for _ in range(2 * spe + 3)]
    k = spe - 2  # save shortly before the epoch ends
    first = D.PairBatches(pairs, **kw)
    for _ in range(k):
        next(first)
    state = json.loads(json.dumps(first.state()))  # it must survive serialization
    resumed = D.PairBatches(pairs, state=state, **kw)
    for want in ref[k:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    # different epochs are different orders
    assert not all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(ref[:spe], ref[spe:]))


# ---------------------------------------------------------------------------- bad input

BAD = {
    "missing column": (lambda p: write_jsonl(p, [{"prompt": "a", "chosen": "b"}]),
                       r"no column 'rejected'; the data has \['chosen', 'prompt'\]"),
    "number": (lambda p: write_jsonl(p, [SEED_ROW, dict(SEED_ROW, chosen=5)]),
               r"row 2: column 'chosen' holds a int"),
    "null": (lambda p: write_jsonl(p, [SEED_ROW, dict(SEED_ROW, rejected=None)]),
             r"row 2: column 'rejected' is null"),
    "empty string": (lambda p: write_jsonl(p, [SEED_ROW, dict(SEED_ROW, prompt="")]),
                     r"row 2: column 'prompt' is an empty string"),
    "non-utf8": (lambda p: p.write_bytes(json.dumps(SEED_ROW).encode() + b"\n"
                                         + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'),
                 r"line 2: bytes that are not UTF-8"),
    "malformed json": (lambda p: p.write_text(json.dumps(SEED_ROW) + "\n" + '{"prompt": "a", '
                                              '"chosen": "b", "rejected": \n'),
                       r"line 2: malformed JSON line"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_named(tok, tmp_path, case):
    make, pattern = BAD[case]
    path = tmp_path / "bad.jsonl"
    make(path)
    with pytest.raises(D.DataError, match=pattern) as e:
        D.load_pairs(cfg(path, tmp_path), tok)
    assert "bad.jsonl" in str(e.value)


@pytest.mark.parametrize("case", sorted(set(BAD) - {"missing column"}))
def test_skip_switch_counts_bad_rows(tok, tmp_path, case):
    make, _ = BAD[case]
    path = tmp_path / "bad.jsonl"
    make(path)
    pairs = D.load_pairs(cfg(path, tmp_path, on_bad_row="skip"), tok)
    assert len(pairs) == 1
    assert pairs.stats["rows_dropped"] == {"bad_row": 1}
    assert pairs.stats["rows_read"] == 2
