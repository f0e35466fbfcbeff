"""The DPO paper's controlled-sentiment experiment (Section 6.1, Figure 2 left), in miniature.

    python examples/sentiment/demo.py --workdir runs/sentiment        # offline, ~5 min on 2 CPUs

Stages, each reported as it runs (a stage whose output is already in the workdir is not redone):
  1. corpus: seeded synthetic movie reviews (corpus.py) and a byte-level BPE tokenizer on them
  2. SFT: a small GPT-2 learns to write reviews (loss_type="sft", the normal trainer): pi_ref
  3. pairs: two pi_ref samples per review prefix (2-8 tokens), scored by the reward (reward.py),
     chosen = the higher; ties are dropped. Train prompts and held-out prompts are disjoint.
  4. DPO: the normal trainer, from pi_ref, once per (beta, seed) of the config
  5. evaluation on the held-out prompts: mean reward of samples (temperature 1) and the sequence
     KL(pi_theta || pi_ref) = E_{y ~ pi_theta}[log pi_theta(y|x) - log pi_ref(y|x)], estimated
     from the same samples; the eval pairs' reward accuracy from the trainer
  6. report: results.csv / results.md, reward_vs_kl.png, samples.md (pi_ref | pi_theta)

``--config examples/sentiment/config.py:full`` runs the paper's own setting (GPT-2, IMDb, a
sentiment classifier) with the same code where the hub is reachable.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

STAGES = 6


class Stage:
    """Prints '[i/6] name ...' and, at the end, the seconds it took."""

    def __init__(self, i: int, name: str):
        self.i, self.name = i, name

    def __enter__(self):
        self.t = time.perf_counter()
        print(f"[{self.i}/{STAGES}] {self.name} ...", flush=True)
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            print(f"[{self.i}/{STAGES}] {self.name}: done in {time.perf_counter() - self.t:.0f} s",
                  flush=True)


def _write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# =========================================================================== 1. corpus

def load_corpus(c, extra: int) -> list[str]:
    """Review texts: synthetic (c.reviews for SFT + ``extra`` for prompts) or a dataset's text
    column (full)."""
    if not c.dataset_name:
        from examples.sentiment import corpus
        return corpus.reviews(c.reviews + extra, seed=1234)
    from dpo_jax import data
    ds = data.load_rows(data.DataConfig(source=c.dataset_name, split=c.dataset_split))
    if c.text_column not in ds.column_names:
        raise ValueError(f"{c.dataset_name}: no column {c.text_column!r} (config key "
                         f"text_column); columns: {ds.column_names}")
    return [t.replace("<br />", " ") for t in ds[c.text_column]]


def word_prefix(tokenizer, text: str, rng, lo: int, hi: int):
    """A prefix of ``text`` of whole words whose token count lies in [lo, hi], or None."""
    words = text.split(" ")
    ok = []
    for n in range(1, len(words)):
        k = len(tokenizer(" ".join(words[:n]), add_special_tokens=False)["input_ids"])
        if k > hi:
            break
        if k >= lo:
            ok.append(n)
    if not ok:
        return None
    n = ok[rng.integers(len(ok))]
    return " ".join(words[:n]), " " + " ".join(words[n:])


def stage_corpus(c, work: Path):
    """Writes corpus/{sft_train,sft_eval}.jsonl and the tokenizer; returns (tokenizer,
    train prompt texts, held-out prompt texts). The prompts come from reviews SFT never saw."""
    from dpo_jax import hf
    out = work / "corpus"
    n_prompts = c.train_prompts + c.eval_prompts
    n_held = n_prompts + n_prompts // 10 + 16  # reviews held out of SFT: they give the prompts
    texts = load_corpus(c, n_held)
    if len(texts) < 2 * n_held:
        raise ValueError(f"{len(texts)} reviews are too few for {n_prompts} prompts (config keys "
                         "reviews, train_prompts, eval_prompts)")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(texts))
    held, sft_texts = [texts[i] for i in order[:n_held]], [texts[i] for i in order[n_held:]]

    tok_dir = out / "tokenizer"
    if c.tokenizer_name_or_path:
        tokenizer = hf.load_tokenizer(c.tokenizer_name_or_path)
    elif (tok_dir / "tokenizer.json").exists():
        tokenizer = hf.load_tokenizer(tok_dir)
    else:
        from dpo_jax.bpe import train_byte_level_bpe
        tokenizer = train_byte_level_bpe(sft_texts, vocab_size=c.vocab_size, path=tok_dir)
    tokenizer.save_pretrained(str(tok_dir))

    lo, hi = c.prompt_tokens
    if not (out / "sft_train.jsonl").exists():
        rows = []
        for t in sft_texts:  # SFT rows: a short opening as prompt, the rest as the completion
            cut = word_prefix(tokenizer, t, rng, 1, hi)
            if cut and cut[1].strip():
                rows.append({"prompt": cut[0], "chosen": cut[1], "rejected": "."})
        n_eval = max(len(rows) // 20, 16)
        _write_jsonl(out / "sft_eval.jsonl", rows[:n_eval])
        _write_jsonl(out / "sft_train.jsonl", rows[n_eval:])

    prompts = []
    for t in held:  # prompts, as in the paper: review prefixes of 2-8 tokens
        cut = word_prefix(tokenizer, t, rng, lo, hi)
        if cut:
            prompts.append(cut[0])
        if len(prompts) == n_prompts:
            break
    if len(prompts) < n_prompts:
        raise ValueError(f"only {len(prompts)} of {n_prompts} prompts of {lo}-{hi} tokens could "
                         f"be cut from {len(held)} held-out reviews (config key reviews)")
    n_rows = sum(1 for _ in (out / "sft_train.jsonl").open())
    print(f"  {len(texts)} reviews: {n_rows} SFT rows, {c.train_prompts} train and "
          f"{c.eval_prompts} held-out prompts; tokenizer of {len(tokenizer)} tokens\n"
          f"  e.g. {sft_texts[0]!r}", flush=True)
    return tokenizer, prompts[:c.train_prompts], prompts[c.train_prompts:]


# =========================================================================== 2./4. training

def trainer_config(c, *, stage: str, tokenizer, dataset: Path, eval_dataset: Path,
                   model_name_or_path: str, beta: float = 0.1, seed: int = 0):
    """A config of the normal trainer (configs/default.py keys) for the SFT or a DPO run."""
    from configs import default
    t = default.get_config()
    t.model_name_or_path = model_name_or_path
    t.model.vocab_size = len(tokenizer)
    for k, v in c.model.items():
        t.model[k] = v
    t.tokenizer_name_or_path = str(dataset.parent / "tokenizer") if stage == "sft" else ""
    t.dataset_name, t.eval_dataset_name = str(dataset), str(eval_dataset)
    t.layout = "prefix_sharing"
    t.lr_scheduler_type = "cosine"
    t.weight_decay = 0.0
    t.max_grad_norm = 1.0
    t.seed = seed
    t.sample_prompts = 0
    t.logging_steps = 10
    t.eval_steps = 0
    t.save_steps = 100_000  # at the end only
    t.save_total_limit = 1
    t.max_prompt_length = c.prompt_tokens[1]
    if stage == "sft":
        t.loss_type = "sft"
        t.reference_free = True  # SFT reads no reference; skip computing one for its rewards
        t.max_completion_length = c.max_review_tokens
        t.learning_rate = c.sft_learning_rate
        t.train_batch_size = t.eval_batch_size = c.sft_batch_size
        t.num_train_epochs = c.sft_epochs
    else:
        t.loss_type = c.loss_type
        t.beta = beta
        t.max_completion_length = c.max_new_tokens + 1  # + EOS
        t.precompute_ref_log_probs = True
        t.learning_rate = c.dpo_learning_rate
        t.train_batch_size = t.eval_batch_size = c.dpo_batch_size
        t.num_train_epochs = c.dpo_epochs
    t.max_length = t.max_prompt_length + t.max_completion_length
    t.warmup_steps = 10
    return t


def run_trainer(t, workdir: Path) -> dict:
    """The normal trainer; a finished run (summary.json and hf/ present) is read back instead."""
    from dpo_jax.trainer import train_and_evaluate
    summary = workdir / "summary.json"
    if summary.exists() and (workdir / "hf" / "config.json").exists():
        print(f"  {workdir}: already trained", flush=True)
        return json.loads(summary.read_text())
    return train_and_evaluate(t, workdir)


# =========================================================================== sampling

class Sampler:
    """Batched sampling and completion scoring of one model, one compilation per shape.

    Prompts are left-padded to ``prompt_len``; every batch is padded to ``batch`` rows."""

    def __init__(self, model, tokenizer, prompt_len: int, max_new_tokens: int,
                 temperature: float, batch: int = 256):
        from dpo_jax import sampling
        self.model, self.tok = model, tokenizer
        self.prompt_len, self.batch = prompt_len, batch
        self.eos = tokenizer.eos_token_id
        self.cfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                           eos_id=self.eos)

    def _prompts(self, prompts: list[str]):
        from dpo_jax import sampling
        toks = [self.tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        return sampling.left_pad(toks, self.eos, self.prompt_len)

    def _batches(self, n):
        for i in range(0, n, self.batch):
            yield i, min(i + self.batch, n)

    def sample(self, prompts: list[str], seed: int) -> list[list[int]]:
        """One completion per prompt: token ids, up to and including EOS if it came."""
        from dpo_jax import sampling
        ids, mask = self._prompts(prompts)
        out = []
        for j, (i, e) in enumerate(self._batches(len(prompts))):
            pad = self.batch - (e - i)
            bi = np.pad(ids[i:e], ((0, pad), (0, 0)), constant_values=self.eos)
            bm = np.pad(mask[i:e], ((0, pad), (0, 0)), constant_values=1)
            new = sampling.generate(self.model, bi, bm, self.cfg, seed=seed * 100_003 + j)
            for row in new[: e - i].tolist():
                out.append(row[: row.index(self.eos) + 1] if self.eos in row else row)
        return out

    def logps(self, prompts: list[str], completions: list[list[int]]) -> np.ndarray:
        """log pi(completion | prompt) of each row, summed over the completion's tokens."""
        from dpo_jax.logprobs import sequence_logprobs
        ids, mask = self._prompts(prompts)
        n = self.cfg.max_new_tokens
        comp = np.full((len(prompts), n), self.eos, np.int32)
        cmask = np.zeros((len(prompts), n), np.int32)
        for r, c in enumerate(completions):
            comp[r, :len(c)], cmask[r, :len(c)] = c, 1
        full = np.concatenate([ids, comp], 1)
        attn = np.concatenate([mask, cmask], 1)
        loss = np.concatenate([np.zeros_like(mask), cmask], 1)
        out = []
        for i, e in self._batches(len(prompts)):
            pad = self.batch - (e - i)
            p = lambda a: np.pad(a[i:e], ((0, pad), (0, 0)))
            lp, _ = sequence_logprobs(self.model, p(full), p(attn), p(loss))
            out.append(np.asarray(lp)[: e - i])
        return np.concatenate(out)

    def text(self, completion: list[int]) -> str:
        return self.tok.decode([t for t in completion if t != self.eos])


# =========================================================================== 3. pairs

def stage_pairs(c, work: Path, sampler: Sampler, reward, train_prompts, eval_prompts) -> dict:
    out = work / "pairs"
    stats = {}
    for split, prompts, seed in (("train", train_prompts, 1), ("eval", eval_prompts, 2)):
        path = out / f"{split}.jsonl"
        if path.exists():
            stats[split] = len(_read_jsonl(path))
            continue
        a, b = sampler.sample(prompts, seed), sampler.sample(prompts, seed + 1000)
        ta, tb = [sampler.text(x) for x in a], [sampler.text(x) for x in b]
        ra, rb = reward([p + t for p, t in zip(prompts, ta)]), reward(
            [p + t for p, t in zip(prompts, tb)])
        rows, ties = [], 0
        for p, x, y, rx, ry in zip(prompts, ta, tb, ra, rb):
            if rx == ry or not x.strip() or not y.strip():
                ties += 1
                continue
            (ch, rc), (rj, rr) = ((x, rx), (y, ry)) if rx > ry else ((y, ry), (x, rx))
            rows.append({"prompt": p, "chosen": ch, "rejected": rj,
                         "chosen_reward": float(rc), "rejected_reward": float(rr)})
        _write_jsonl(path, rows)
        stats[split] = len(rows)
        print(f"  {split}: {len(rows)} pairs from {len(prompts)} prompts ({ties} ties or empty "
              f"samples dropped); pi_ref sample reward {np.mean(np.r_[ra, rb]):+.3f}", flush=True)
    ex = _read_jsonl(out / "train.jsonl")[0]
    print(f"  e.g. {ex['prompt']!r} -> chosen {ex['chosen']!r} ({ex['chosen_reward']:+.2f}), "
          f"rejected {ex['rejected']!r} ({ex['rejected_reward']:+.2f})", flush=True)
    return stats


# =========================================================================== 5. evaluation

def evaluate_model(c, sampler: Sampler, ref_sampler: Sampler, reward, prompts, seed: int):
    """(mean reward, KL estimate) of ``sampler``'s model on ``prompts`` x eval_samples."""
    ps = [p for p in prompts for _ in range(c.eval_samples)]
    ys = sampler.sample(ps, seed=10_000 + seed)
    r = reward([p + sampler.text(y) for p, y in zip(ps, ys)])
    if sampler is ref_sampler:
        kl = 0.0
    else:
        kl = float(np.mean(sampler.logps(ps, ys) - ref_sampler.logps(ps, ys)))
    return float(np.mean(r)), kl, ys


def _spread(xs) -> float:
    """Sample standard deviation (0 for one value)."""
    return float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


# =========================================================================== 6. report

def write_report(c, work: Path, rows: list[dict], samples: list[dict]) -> dict:
    fields = ["model", "beta", "seeds", "reward", "reward_spread", "kl", "kl_spread",
              "eval_reward_accuracy", "eval_loss"]
    with (work / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in fields} for r in rows)
    lines = ["| model | beta | reward (mean +- sd over seeds) | KL(pi_theta ‖ pi_ref) | "
             "eval reward accuracy | eval loss |", "|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{r['eval_reward_accuracy']:.3f}" if r["model"] != "pi_ref" else "-"
        loss = f"{r['eval_loss']:.3f}" if r["model"] != "pi_ref" else "-"
        beta = f"{r['beta']:g}" if r["model"] != "pi_ref" else "-"
        lines.append(f"| {r['model']} | {beta} | {r['reward']:+.3f} +- {r['reward_spread']:.3f} "
                     f"| {r['kl']:.2f} +- {r['kl_spread']:.2f} | {acc} | {loss} |")
    table = "\n".join(lines)
    (work / "results.md").write_text(table + "\n")

    md = ["# pi_ref | pi_theta on held-out prompts", "",
          f"One sample per model at temperature {c.temperature:g}. Every model draws with the same "
          "random numbers, so where the texts differ, the policy moved.", ""]
    for s in samples:
        md += [f"**{s['prompt']}**", "", f"- pi_ref: {s['pi_ref']}"]
        md += [f"- pi_theta (beta={b:g}): {t}" for b, t in s["policies"]]
        md.append("")
    (work / "samples.md").write_text("\n".join(md))
    plot(rows, work / "reward_vs_kl.png", c.reward)
    return {"table": table}


def plot(rows: list[dict], path: Path, reward_name: str):
    """Reward against KL, a point per beta (error bars: sd over seeds) and the reference."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("the plot needs matplotlib: pip install -e '.[demo]' (or matplotlib)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    ref = next(r for r in rows if r["model"] == "pi_ref")
    pol = sorted((r for r in rows if r["model"] != "pi_ref"), key=lambda r: r["kl"])
    ax.errorbar([r["kl"] for r in pol], [r["reward"] for r in pol],
                xerr=[r["kl_spread"] for r in pol], yerr=[r["reward_spread"] for r in pol],
                fmt="o-", color="tab:blue", capsize=3, label="DPO (pi_theta)")
    for r in pol:
        ax.annotate(f"β={r['beta']:g}", (r["kl"], r["reward"]), textcoords="offset points",
                    xytext=(6, -12), fontsize=8)
    ax.errorbar([0.0], [ref["reward"]], yerr=[ref["reward_spread"]], fmt="s", color="tab:gray",
                capsize=3, label="pi_ref (SFT)")
    ax.axhline(ref["reward"], color="tab:gray", lw=0.8, ls="--")
    ax.set_xlabel("sequence KL(pi_theta ‖ pi_ref), nats (held-out prompts)")
    ax.set_ylabel(f"mean reward ({reward_name})")
    ax.set_title("Controlled sentiment: reward vs KL (cf. DPO paper, Fig. 2 left)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def checks(rows: list[dict]) -> list[tuple[str, bool]]:
    """The demo's claims, each with whether this run bears it out."""
    ref = next(r for r in rows if r["model"] == "pi_ref")
    pol = sorted((r for r in rows if r["model"] != "pi_ref"), key=lambda r: r["beta"])
    out = []
    for r in pol:
        gain, spread = r["reward"] - ref["reward"], max(r["reward_spread"], ref["reward_spread"])
        out.append((f"beta={r['beta']:g}: reward {r['reward']:+.3f} vs pi_ref {ref['reward']:+.3f}"
                    f" (gain {gain:+.3f} > spread {spread:.3f})", gain > spread))
    kls = [r["kl"] for r in pol]
    out.append(("KL grows as beta shrinks: " + ", ".join(f"beta={r['beta']:g}: {r['kl']:.2f}"
                                                       for r in pol),
                all(a > b for a, b in zip(kls, kls[1:]))))
    for r in pol:
        out.append((f"beta={r['beta']:g}: eval reward accuracy {r['eval_reward_accuracy']:.3f} "
                    "> 0.5", r["eval_reward_accuracy"] > 0.5))
    return out


# =========================================================================== main

def run(c, workdir) -> dict:
    """All six stages; returns {"rows", "checks", "table", "paths"}."""
    import jax
    from dpo_jax import hf
    from examples.sentiment import reward as rewards

    work = Path(workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    # stages found done in the workdir are reused, so they must come from this very config
    record, cfg_json = work / "demo_config.json", c.to_json(sort_keys=True)
    if record.exists() and record.read_text() != cfg_json:
        raise ValueError(f"{work} holds a demo run of another config ({record}); use a new "
                         "--workdir, or delete that one")
    record.write_text(cfg_json)
    t0 = time.perf_counter()
    print(f"controlled-sentiment demo ({c.preset}) in {work} on {jax.devices()[0].platform}; "
          f"betas {tuple(c.betas)}, seeds {tuple(c.seeds)}", flush=True)
    reward = rewards.load(c.reward)

    with Stage(1, "corpus and tokenizer"):
        tokenizer, train_prompts, eval_prompts = stage_corpus(c, work)

    with Stage(2, "SFT (pi_ref)"):
        corpus = work / "corpus"
        sft = run_trainer(trainer_config(c, stage="sft", tokenizer=tokenizer,
                                         dataset=corpus / "sft_train.jsonl",
                                         eval_dataset=corpus / "sft_eval.jsonl",
                                         model_name_or_path=c.model_name_or_path),
                          work / "sft")
        ref_path = work / "sft" / "hf"
        print(f"  SFT: {sft['steps']} steps, eval NLL per token {sft['eval/loss']:.3f}",
              flush=True)
        ref_model = hf.load_pretrained(ref_path)
        ref_sampler = Sampler(ref_model, tokenizer, c.prompt_tokens[1], c.max_new_tokens,
                              c.temperature)
        for p, y in zip(eval_prompts[:3], ref_sampler.sample(eval_prompts[:3], seed=7)):
            print(f"  pi_ref sample: {p + ref_sampler.text(y)!r}", flush=True)

    with Stage(3, "preference pairs from pi_ref samples"):
        stage_pairs(c, work, ref_sampler, reward, train_prompts, eval_prompts)

    runs = {}
    with Stage(4, f"DPO x {len(c.betas)} betas x {len(c.seeds)} seeds"):
        for beta in c.betas:
            for seed in c.seeds:
                name = f"beta{beta:g}_seed{seed}"
                print(f"  DPO {name}", flush=True)
                t = trainer_config(c, stage="dpo", tokenizer=tokenizer,
                                   dataset=work / "pairs" / "train.jsonl",
                                   eval_dataset=work / "pairs" / "eval.jsonl",
                                   model_name_or_path=str(ref_path), beta=beta, seed=seed)
                s = run_trainer(t, work / "dpo" / name)
                runs[beta, seed] = s
                print(f"    eval reward accuracy {s['eval/rewards/accuracies']:.3f}, "
                      f"margin {s['eval/rewards/margins']:.3f}, loss {s['eval/loss']:.3f}",
                      flush=True)

    rows, samples_by_model = [], {}
    with Stage(5, "evaluation on held-out prompts (reward, KL)"):
        ref_r = [evaluate_model(c, ref_sampler, ref_sampler, reward, eval_prompts, s)
                 for s in c.seeds]
        rows.append({"model": "pi_ref", "beta": "", "seeds": len(c.seeds),
                     "reward": float(np.mean([r[0] for r in ref_r])),
                     "reward_spread": _spread([r[0] for r in ref_r]), "kl": 0.0, "kl_spread": 0.0,
                     "eval_reward_accuracy": "", "eval_loss": ""})
        samples_by_model["pi_ref"] = ref_r[0][2]
        print(f"  pi_ref: reward {rows[-1]['reward']:+.3f}", flush=True)
        for beta in c.betas:
            res = []
            for seed in c.seeds:
                model = hf.load_pretrained(work / "dpo" / f"beta{beta:g}_seed{seed}" / "hf")
                sampler = Sampler(model, tokenizer, c.prompt_tokens[1], c.max_new_tokens,
                                  c.temperature)
                res.append(evaluate_model(c, sampler, ref_sampler, reward, eval_prompts, seed))
                if seed == c.seeds[0]:
                    samples_by_model[beta] = (sampler, res[-1][2])
            acc = [runs[beta, s]["eval/rewards/accuracies"] for s in c.seeds]
            rows.append({"model": "pi_theta", "beta": beta, "seeds": len(c.seeds),
                         "reward": float(np.mean([r[0] for r in res])),
                         "reward_spread": _spread([r[0] for r in res]),
                         "kl": float(np.mean([r[1] for r in res])),
                         "kl_spread": _spread([r[1] for r in res]),
                         "eval_reward_accuracy": float(np.mean(acc)),
                         "eval_loss": float(np.mean([runs[beta, s]["eval/loss"]
                                                     for s in c.seeds]))})
            print(f"  beta={beta:g}: reward {rows[-1]['reward']:+.3f}, KL {rows[-1]['kl']:.2f}",
                  flush=True)

    with Stage(6, "report"):
        samples = []
        for i in range(min(c.side_by_side, len(eval_prompts))):
            k = i * c.eval_samples  # the first sample of prompt i
            samples.append({
                "prompt": eval_prompts[i],
                "pi_ref": ref_sampler.text(samples_by_model["pi_ref"][k]),
                "policies": [(b, s.text(ys[k])) for b, (s, ys) in
                             ((b, samples_by_model[b]) for b in c.betas)]})
        report = write_report(c, work, rows, samples)
        verdicts = checks(rows)

    print("\n" + report["table"] + "\n")
    for s in samples[:3]:
        print(f"{s['prompt']!r}\n  pi_ref:   {s['pi_ref']!r}")
        for b, t in s["policies"]:
            print(f"  beta={b:<5g} {t!r}")
    print()
    for text, ok in verdicts:
        print(f"  [{'ok' if ok else 'NOT MET'}] {text}")
    paths = {k: str(work / f) for k, f in (("csv", "results.csv"), ("md", "results.md"),
                                           ("plot", "reward_vs_kl.png"),
                                           ("samples", "samples.md"))}
    print(f"\nplot: {paths['plot']}\ntable: {paths['md']}, {paths['csv']}\nsamples: "
          f"{paths['samples']}\ntotal {time.perf_counter() - t0:.0f} s", flush=True)
    result = {"rows": rows, "checks": verdicts, "table": report["table"], "paths": paths}
    (work / "results.json").write_text(json.dumps(
        {"rows": rows, "checks": [{"claim": t, "met": ok} for t, ok in verdicts]}, indent=2))
    return result


def main(argv):
    from absl import flags
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # progress is the stage lines and bars
    logging.getLogger().setLevel(logging.WARNING)
    import jax
    # Runs of one beta differ only in their data order, so the second one compiles nothing; set
    # before the first compilation (JAX reads it once).
    jax.config.update("jax_compilation_cache_dir",
                      str(Path(flags.FLAGS.workdir).absolute() / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from dpo_jax.data import DataError
    from dpo_jax.hf import CheckpointError
    try:
        run(flags.FLAGS.config, flags.FLAGS.workdir)
    except (ValueError, RuntimeError, DataError, CheckpointError) as e:
        sys.exit(f"demo.py: {e}")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", str(Path(__file__).with_name("config.py")),
                                    "Demo config (examples/sentiment/config.py[:mini|full|tiny]).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", "runs/sentiment", "Where every stage writes.")
    app.run(main)
