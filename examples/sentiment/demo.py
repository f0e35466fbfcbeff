"""The DPO paper's controlled-sentiment experiment (Section 6.1, Figure 2 left), in miniature.

    python examples/sentiment/demo.py --workdir runs/sentiment        # offline, ~12 min on 2 CPUs

Stages, each reported as it runs (a stage whose output is already in the workdir is not redone):
  1. corpus: seeded synthetic movie reviews (corpus.py) and a byte-level BPE tokenizer on them
  2. SFT: a small GPT-2 learns to write reviews (loss_type="sft", the normal trainer): pi_ref
  3. pairs: two pi_ref samples per review prefix (2-8 tokens), scored by the reward (reward.py:
     a classifier's log-odds, graded), chosen = the higher; ties are dropped. Train prompts and
     held-out prompts are disjoint.
  4. DPO and the baselines, the normal trainer from pi_ref on the same pairs, once per (method,
     swept value, seed): DPO over beta; IPO, SimPO, ORPO (the package's losses); Unlikelihood
     (Welleck et al., as the DPO paper's baseline); Preferred-FT (SFT on the chosen completions);
     on-policy DPO (dpo_jax/online.py): from DPO runs, rounds that sample the current policy,
     score, pair and train again, pi_ref still the reference
  5. evaluation on the held-out prompts: mean reward of samples (temperature 1) and the sequence
     KL(pi_theta || pi_ref) = E_{y ~ pi_theta}[log pi_theta(y|x) - log pi_ref(y|x)], estimated
     from the same samples; the eval pairs' reward accuracy from the trainer. Best-of-N from
     pi_ref (N = 1..16), whose KL is log N - (N - 1) / N: the reference frontier
  6. report: results.csv / results.md (with the ranking at matched KL), reward_vs_kl.png,
     samples.md (pi_ref | each policy)

PPO, the paper's other baseline, is not run: it needs a value model and sampling inside every
update, which this package does not have (its on-policy rounds sample between trainings;
best-of-N stands in as the reward-model-using reference).

``--config examples/sentiment/config.py:full`` runs the paper's own setting (GPT-2, IMDb, a
sentiment classifier) with the same code where the hub is reachable.
"""

from __future__ import annotations

import csv
import dataclasses
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
    ds = data.load_rows(data.Source(source=c.dataset_name, split=c.dataset_split))
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

    prompts_path = out / "prompts.json"  # kept: a rerun evaluates on the very same prompts
    if prompts_path.exists():
        prompts = json.loads(prompts_path.read_text())
    else:
        prompts = []
        for t in held:  # prompts, as in the paper: review prefixes of 2-8 tokens
            cut = word_prefix(tokenizer, t, rng, lo, hi)
            if cut:
                prompts.append(cut[0])
            if len(prompts) == n_prompts:
                break
        if len(prompts) < n_prompts:
            raise ValueError(f"only {len(prompts)} of {n_prompts} prompts of {lo}-{hi} tokens "
                             f"could be cut from {len(held)} held-out reviews (config key reviews)")
        prompts_path.write_text(json.dumps(prompts))
    n_rows = sum(1 for _ in (out / "sft_train.jsonl").open())
    print(f"  {len(texts)} reviews: {n_rows} SFT rows, {c.train_prompts} train and "
          f"{c.eval_prompts} held-out prompts; tokenizer of {len(tokenizer)} tokens\n"
          f"  e.g. {sft_texts[0]!r}", flush=True)
    return tokenizer, prompts[:c.train_prompts], prompts[c.train_prompts:]


# =========================================================================== 2./4. training

@dataclasses.dataclass(frozen=True)
class Method:
    """One curve of the plot: a loss of the package, a config key swept over values, and fixed
    keys (config key ``methods.<name>`` = "loss_type:key=v1,v2;other_key=value")."""

    name: str
    loss_type: str
    key: str
    values: tuple[float, ...]
    fixed: tuple[tuple[str, float], ...] = ()

    LABELS = {"dpo": "DPO", "ipo": "IPO", "simpo": "SimPO", "orpo": "ORPO",
              "unlikelihood": "Unlikelihood", "preferred_ft": "Preferred-FT"}

    @property
    def label(self) -> str:
        return self.LABELS.get(self.name, self.name)

    def run_name(self, value: float, seed: int) -> str:
        return f"{self.name}_{self.key}{value:g}_seed{seed}"


def methods(c) -> list[Method]:
    """The config's methods, parsed; a malformed one is a ValueError naming its config key."""
    from configs import default
    keys = default.get_config()
    out = []
    for name, spec in c.methods.items():
        where = f"config key methods.{name}={spec!r}"
        try:
            head, *rest = [part.strip() for part in spec.split(";")]
            loss_type, swept = head.split(":")
            key, values = swept.split("=")
            fixed = tuple((k.strip(), float(v)) for k, v in (r.split("=") for r in rest if r))
            m = Method(name, loss_type.strip(), key.strip(),
                       tuple(float(v) for v in values.split(",")), fixed)
        except ValueError:
            raise ValueError(f"{where}: write 'loss_type:key=v1,v2[;key=value]'") from None
        for k in (m.key, *(k for k, _ in m.fixed)):
            if k not in keys:
                raise ValueError(f"{where}: {k!r} is not a trainer config key")
        out.append(m)
    return out


def trainer_config(c, *, stage: str, tokenizer, dataset: Path, eval_dataset: Path,
                   model_name_or_path: str, method: Method | None = None, value: float = 0.0,
                   seed: int = 0):
    """A config of the normal trainer (configs/default.py keys) for the SFT or a method's run
    (``method.key`` = ``value``)."""
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
        t.loss_type = method.loss_type
        t.max_completion_length = c.max_new_tokens + 1  # + EOS
        t.precompute_ref_log_probs = True
        t.learning_rate = c.dpo_learning_rate
        t.train_batch_size = t.eval_batch_size = c.dpo_batch_size
        t.num_train_epochs = c.dpo_epochs
        for k, v in (*method.fixed, (method.key, value)):
            t[k] = type(t[k])(v)
    t.max_length = t.max_prompt_length + t.max_completion_length
    if stage != "sft":  # rows of 1/2, 3/4 and all of max_length: less padding
        t.length_buckets = tuple(t.max_length * k // 4 for k in (2, 3))
    t.token_metrics = False  # the demo reads rewards and losses only: a faster step
    t.warmup_steps = 10
    return t


def run_trainer(t, workdir: Path) -> dict:
    """The normal trainer; a finished run (summary.json and hf/ present) is read back instead.
    On-policy rounds' summaries give their last round's."""
    from dpo_jax.trainer import train_and_evaluate
    summary = workdir / "summary.json"
    if summary.exists() and (workdir / "hf" / "config.json").exists():
        print(f"  {workdir}: already trained", flush=True)
        s = json.loads(summary.read_text())
    else:
        s = train_and_evaluate(t, workdir)
    return dict(s["final"], rounds=s["rounds"]) if "rounds" in s else s


def online_runs(c) -> list[tuple[float, int]]:
    """(beta, seed) of the on-policy DPO runs: config key online.betas that DPO sweeps too (each
    starts from that offline run), with a reward the rounds can call."""
    if c.reward not in ("classifier", "lexicon"):
        return []
    dpo = next((m for m in methods(c) if m.name == "dpo"), None)
    return [(b, s) for b in c.online.betas if dpo and b in dpo.values for s in c.seeds]


def online_config(c, work: Path, tokenizer, beta: float, seed: int):
    """The trainer config of one on-policy run: DPO at ``beta`` from the offline DPO run of that
    beta and seed, c.online.rounds rounds on fresh samples of the current policy, pi_ref the
    reference throughout (dpo_jax/online.py)."""
    dpo = next(m for m in methods(c) if m.name == "dpo")
    t = trainer_config(c, stage="dpo", tokenizer=tokenizer, dataset=work / "pairs" / "train.jsonl",
                       eval_dataset=work / "pairs" / "eval.jsonl",
                       model_name_or_path=str(work / "runs" / dpo.run_name(beta, seed) / "hf"),
                       method=dpo, value=beta, seed=seed)
    t.ref_model_name_or_path = str(work / "sft" / "hf")
    t.online_rounds = c.online.rounds
    t.online_prompts = str(work / "pairs" / "online_prompts.jsonl")
    t.online_reward = f"examples.sentiment.reward:online_{c.reward}"
    t.online_samples_per_prompt = 2  # as the offline pairs: two samples, the better chosen
    t.online_temperature = c.temperature
    t.online_max_new_tokens = c.max_new_tokens
    t.online_batch_size = 128
    t.num_train_epochs = c.online.epochs
    t.warmup_steps = 0  # each round goes on from a trained policy
    return t


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


def best_of_n(c, ref_sampler: Sampler, reward, prompts, seed: int) -> dict[int, float]:
    """Mean over ``prompts`` of the best reward among the first N of max(best_of_n) pi_ref
    samples, for each N of the config."""
    n_max = max(c.best_of_n)
    ps = [p for p in prompts for _ in range(n_max)]
    ys = ref_sampler.sample(ps, seed=20_000 + seed)
    r = reward([p + ref_sampler.text(y) for p, y in zip(ps, ys)]).reshape(len(prompts), n_max)
    return {n: float(np.mean(r[:, :n].max(1))) for n in c.best_of_n}


def best_of_n_kl(n: int) -> float:
    """KL(best-of-N || pi_ref) = log N - (N - 1) / N (the classic closed form, exact for
    continuous rewards without ties; an upper bound otherwise)."""
    return float(np.log(n) - (n - 1) / n)


def _spread(xs) -> float:
    """Sample standard deviation (0 for one value)."""
    return float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def _point(method: str, key: str, value, results: list[tuple[float, float]], **extra) -> dict:
    """A row of the table from one (reward, KL) per seed."""
    rs, kls = [r for r, _ in results], [k for _, k in results]
    return {"method": method, "key": key, "value": value, "seeds": len(results),
            "reward": float(np.mean(rs)), "reward_spread": _spread(rs),
            "kl": float(np.mean(kls)), "kl_spread": _spread(kls), **extra}


# =========================================================================== 6. report

def curves(rows: list[dict]) -> dict[str, list[dict]]:
    """Each method's points sorted by KL (pi_ref excluded)."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] != "pi_ref":
            out.setdefault(r["method"], []).append(r)
    return {m: sorted(pts, key=lambda r: r["kl"]) for m, pts in out.items()}


def at_kl(points: list[dict], ref: dict, kl: float):
    """(reward, spread) of a curve at ``kl``, linearly interpolated between its points (and
    pi_ref at KL 0, where every curve starts); None beyond the curve's largest KL."""
    pts = [ref] + points
    xs = [p["kl"] for p in pts]
    if kl > max(xs):
        return None
    order = np.argsort(xs)
    x = np.asarray(xs)[order]
    y = np.asarray([p["reward"] for p in pts])[order]
    sd = np.asarray([p["reward_spread"] for p in pts])[order]
    return float(np.interp(kl, x, y)), float(np.interp(kl, x, sd))


def matched_kl(rows: list[dict], kls) -> list[tuple[float, list, list]]:
    """At each KL of ``kls`` up to DPO's largest: (kl, [(method, (reward, sd))] best first,
    [methods whose curves end before that KL])."""
    ref = next(r for r in rows if r["method"] == "pi_ref")
    cs = curves(rows)
    top = max((p["kl"] for p in cs.get("DPO", [])), default=0.0)
    out = []
    for kl in (k for k in kls if k <= top):
        scores = {m: at_kl(pts, ref, kl) for m, pts in cs.items()}
        ranked = sorted(((m, v) for m, v in scores.items() if v is not None),
                        key=lambda mv: -mv[1][0])
        out.append((kl, ranked, [m for m, v in scores.items() if v is None]))
    return out


def write_report(c, work: Path, rows: list[dict], samples: list[dict]) -> dict:
    fields = ["method", "key", "value", "seeds", "reward", "reward_spread", "kl", "kl_spread",
              "eval_reward_accuracy", "eval_loss"]
    with (work / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in fields} for r in rows)
    fmt = lambda v, f: "-" if v in ("", None) else format(v, f)
    lines = ["| method | swept key = value | reward (mean ± sd over seeds) | "
             "KL(π ‖ π_ref) nats | eval reward accuracy | eval loss |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        setting = "-" if r["method"] == "pi_ref" else f"{r['key']} = {r['value']:g}"
        kl_sd = "(closed form)" if r["method"] == "best-of-N" else f"± {r['kl_spread']:.2f}"
        lines.append(f"| {r['method']} | {setting} | {r['reward']:+.3f} ± "
                     f"{r['reward_spread']:.3f} | {r['kl']:.2f} {kl_sd} | "
                     f"{fmt(r.get('eval_reward_accuracy'), '.3f')} | "
                     f"{fmt(r.get('eval_loss'), '.3f')} |")
    table = "\n".join(lines)
    ranking = ["| KL (nats) | reward at that KL, best first (± seed sd) | curve ends before |",
               "|---|---|---|"]
    for kl, ranked, missing in matched_kl(rows, c.matched_kl):
        cells = ", ".join(f"{'**' + m + '**' if m == 'DPO' else m} {v[0]:+.2f} ± {v[1]:.2f}"
                          for m, v in ranked)
        ranking.append(f"| {kl:g} | {cells} | {', '.join(missing) or '-'} |")
    ranking = "\n".join(ranking)
    (work / "results.md").write_text(
        table + "\n\nRanking at matched KL (curves interpolated linearly between their points "
        "and pi_ref at KL 0):\n\n" + ranking + "\n")

    md = ["# pi_ref | the policies, on held-out prompts", "",
          f"One sample per model at temperature {c.temperature:g} (seed 0 of each run). Every "
          "model draws with the same random numbers, so where the texts differ, the policy "
          "moved.", ""]
    for s in samples:
        md += [f"**{s['prompt']}**", "", f"- pi_ref: {s['pi_ref']}"]
        md += [f"- {name}: {t}" for name, t in s["policies"]]
        md.append("")
    (work / "samples.md").write_text("\n".join(md))
    plot(rows, work / "reward_vs_kl.png", c.reward)
    return {"table": table, "ranking": ranking}


ONLINE = "On-policy DPO"
COLORS = {"DPO": "tab:blue", "IPO": "tab:orange", "SimPO": "tab:green", "ORPO": "tab:red",
          "Unlikelihood": "tab:purple", "Preferred-FT": "tab:brown", ONLINE: "tab:cyan"}


def plot(rows: list[dict], path: Path, reward_name: str):
    """Reward against KL: a curve per method (error bars: sd over seeds, both axes), the
    best-of-N frontier from pi_ref, and pi_ref itself."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("the plot needs matplotlib: pip install -e '.[demo]' (or matplotlib)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=120)
    ref = next(r for r in rows if r["method"] == "pi_ref")
    offsets = [(5, -11), (5, 4), (-34, 4), (-34, -11)]  # label positions, one per method in turn
    for i, (method, pts) in enumerate(curves(rows).items()):
        if method == "best-of-N":
            ax.plot([p["kl"] for p in pts], [p["reward"] for p in pts], "k--", marker="^", ms=5,
                    lw=1.2, label="best-of-N from pi_ref (KL closed form)")
            ax.errorbar([p["kl"] for p in pts], [p["reward"] for p in pts],
                        yerr=[p["reward_spread"] for p in pts], fmt="none", ecolor="k", capsize=2)
            for p in pts:
                ax.annotate(f"N={p['value']:g}", (p["kl"], p["reward"]), fontsize=7,
                            textcoords="offset points", xytext=(-8, 7))
            continue
        ax.errorbar([p["kl"] for p in pts], [p["reward"] for p in pts],
                    xerr=[p["kl_spread"] for p in pts], yerr=[p["reward_spread"] for p in pts],
                    fmt="o-", color=COLORS.get(method), capsize=3, ms=5, lw=1.5 if method ==
                    "DPO" else 1.0, label=f"{method} ({pts[0]['key']} sweep)")
        for p in pts:
            sym = {"beta": "β", "learning_rate": "lr"}.get(p["key"], p["key"])
            ax.annotate(f"{sym}={p['value']:g}", (p["kl"], p["reward"]), fontsize=7,
                        color=COLORS.get(method), textcoords="offset points",
                        xytext=offsets[i % len(offsets)])
    ax.errorbar([0.0], [ref["reward"]], yerr=[ref["reward_spread"]], fmt="s", color="tab:gray",
                capsize=3, label="pi_ref (SFT)")
    ax.set_xlabel("sequence KL(π ‖ π_ref), nats, on held-out prompts")
    ax.set_ylabel(f"mean reward ({reward_name})")
    ax.set_title("Controlled sentiment: reward vs KL frontier (cf. DPO paper, Fig. 2 left)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def checks(c, rows: list[dict]) -> list[tuple[str, bool]]:
    """The demo's claims, each with whether this run bears it out."""
    ref = next(r for r in rows if r["method"] == "pi_ref")
    dpo = curves(rows).get("DPO", [])
    out = []
    for r in dpo:
        gain, spread = r["reward"] - ref["reward"], max(r["reward_spread"], ref["reward_spread"])
        out.append((f"DPO beta={r['value']:g}: reward {r['reward']:+.3f} vs pi_ref "
                    f"{ref['reward']:+.3f} (gain {gain:+.3f} > spread {spread:.3f})", gain > spread))
    if len(dpo) > 1:
        by_beta = sorted(dpo, key=lambda r: r["value"])
        kls = [r["kl"] for r in by_beta]
        out.append(("DPO: KL grows as beta shrinks: " + ", ".join(
            f"beta={r['value']:g}: {r['kl']:.2f}" for r in by_beta),
            all(a > b for a, b in zip(kls, kls[1:]))))
        lo, hi = dpo[0], dpo[-1]
        rise = hi["reward"] - lo["reward"]
        spread = lo["reward_spread"] + hi["reward_spread"]
        out.append((f"DPO: reward rises with KL, {lo['reward']:+.3f} at KL {lo['kl']:.2f} to "
                    f"{hi['reward']:+.3f} at KL {hi['kl']:.2f} (rise {rise:+.3f} > the two "
                    f"points' seed sds {spread:.3f})", rise > spread))
    for kl, ranked, _ in matched_kl(rows, c.matched_kl):
        d = dict(ranked)["DPO"]
        above = lambda keep: [f"{m} {v[0]:+.3f}" for m, v in ranked if keep(m) and m != "DPO"
                              and v[0] - d[0] > d[1] + v[1]]
        trained = above(lambda m: m not in ("best-of-N", ONLINE))  # on-policy is DPO too
        out.append((f"at KL {kl:g}: no trained method above DPO ({d[0]:+.3f} ± {d[1]:.3f}) "
                    "beyond the seed spread" + (f"; above: {', '.join(trained)}" if trained
                                                else ""), not trained))
        if "best-of-N" in dict(ranked):  # sampling N from pi_ref and keeping the best
            bon = dict(ranked)["best-of-N"]
            out.append((f"at KL {kl:g}: DPO on or above best-of-N ({bon[0]:+.3f} ± "
                        f"{bon[1]:.3f}) within the seed spread",
                        not above(lambda m: m == "best-of-N")))
    if ONLINE in curves(rows):  # on-policy rounds against offline DPO, and best-of-N
        for kl, ranked, _ in matched_kl(rows, [k for k in (0.5, 1.0, 1.5)]):
            got = dict(ranked)
            if ONLINE not in got:
                out.append((f"at KL {kl:g}: {ONLINE}'s curve does not reach this KL", False))
                continue
            (o, so), (d, sd) = got[ONLINE], got["DPO"]
            gap = "" if "best-of-N" not in got else (
                f"; best-of-N {got['best-of-N'][0]:+.3f}, {o - got['best-of-N'][0]:+.3f} from it")
            out.append((f"at KL {kl:g}: {ONLINE} {o:+.3f} ± {so:.3f} above offline DPO "
                        f"{d:+.3f} ± {sd:.3f} by more than the seed spread" + gap,
                        o - d > so + sd))
    for r in dpo:
        out.append((f"DPO beta={r['value']:g}: eval reward accuracy "
                    f"{r['eval_reward_accuracy']:.3f} > 0.5", r["eval_reward_accuracy"] > 0.5))
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
          f"methods {', '.join(m.label for m in methods(c))}, seeds {tuple(c.seeds)}",
          flush=True)
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

    ms = methods(c)
    n_runs = sum(len(m.values) for m in ms) * len(c.seeds)
    runs = {}
    with Stage(4, f"DPO and baselines: {n_runs} runs ({', '.join(m.label for m in ms)}; "
                  f"seeds {tuple(c.seeds)})"):
        k, spent, timed = 0, 0.0, 0  # seconds and count of the runs trained here (the ETA)
        for m in ms:
            for value in m.values:
                for seed in c.seeds:
                    name = m.run_name(value, seed)
                    k += 1
                    eta = ("" if not timed else
                           f", about {spent / timed * (n_runs - k + 1):.0f} s left")
                    print(f"  run {k} of {n_runs}{eta}: {m.label} ({m.loss_type}) "
                          f"{m.key}={value:g} seed {seed}", flush=True)
                    t = trainer_config(c, stage="dpo", tokenizer=tokenizer,
                                       dataset=work / "pairs" / "train.jsonl",
                                       eval_dataset=work / "pairs" / "eval.jsonl",
                                       model_name_or_path=str(ref_path), method=m, value=value,
                                       seed=seed)
                    trained = not (work / "runs" / name / "summary.json").exists()
                    started = time.perf_counter()
                    s = run_trainer(t, work / "runs" / name)
                    runs[name] = s
                    if trained:  # a run finished before is no sample of this machine's pace
                        spent, timed = spent + time.perf_counter() - started, timed + 1
                    print(f"    eval reward accuracy {s['eval/rewards/accuracies']:.3f}, "
                          f"margin {s['eval/rewards/margins']:.3f}, loss {s['eval/loss']:.3f}",
                          flush=True)
        if online_runs(c):
            prompts_file = work / "pairs" / "online_prompts.jsonl"
            if not prompts_file.exists():
                _write_jsonl(prompts_file, ({"prompt": p}
                                            for p in train_prompts[:c.online.prompts]))
        for beta, seed in online_runs(c):
            name = f"online_dpo_beta{beta:g}_seed{seed}"
            print(f"  {ONLINE} beta={beta:g} seed {seed}: {c.online.rounds} rounds from the "
                  f"offline DPO run, {min(c.online.prompts, len(train_prompts))} prompts",
                  flush=True)
            s = runs[name] = run_trainer(online_config(c, work, tokenizer, beta, seed),
                                         work / "runs" / name)
            print("    " + "; ".join(f"round {r['round']}: {r['pairs']} pairs, sample reward "
                                     f"{r['reward_mean']:+.3f}" for r in s["rounds"]) +
                  f"; eval reward accuracy {s['eval/rewards/accuracies']:.3f}", flush=True)

    rows, first_samples = [], {}
    with Stage(5, "evaluation on held-out prompts (reward, KL; best-of-N from pi_ref)"):
        ref_r = [evaluate_model(c, ref_sampler, ref_sampler, reward, eval_prompts, s)
                 for s in c.seeds]
        rows.append(_point("pi_ref", "", "", [(r, kl) for r, kl, _ in ref_r]))
        first_samples["pi_ref"] = (ref_sampler, ref_r[0][2])
        print(f"  pi_ref: reward {rows[-1]['reward']:+.3f}", flush=True)
        bon = [best_of_n(c, ref_sampler, reward, eval_prompts, s) for s in c.seeds]
        for n in c.best_of_n:
            rows.append(_point("best-of-N", "N", n, [(b[n], best_of_n_kl(n)) for b in bon]))
        print("  best-of-N from pi_ref: " + ", ".join(
            f"N={n}: {np.mean([b[n] for b in bon]):+.3f} (KL {best_of_n_kl(n):.2f})"
            for n in c.best_of_n), flush=True)
        for m in ms:
            for value in m.values:
                res, names = [], [m.run_name(value, s) for s in c.seeds]
                for seed, name in zip(c.seeds, names):
                    sampler = Sampler(hf.load_pretrained(work / "runs" / name / "hf"), tokenizer,
                                      c.prompt_tokens[1], c.max_new_tokens, c.temperature)
                    res.append(evaluate_model(c, sampler, ref_sampler, reward, eval_prompts,
                                              seed))
                    if seed == c.seeds[0]:
                        first_samples[f"{m.label} {m.key}={value:g}"] = (sampler, res[-1][2])
                rows.append(_point(
                    m.label, m.key, value, [(r, kl) for r, kl, _ in res],
                    eval_reward_accuracy=float(np.mean(
                        [runs[n]["eval/rewards/accuracies"] for n in names])),
                    eval_loss=float(np.mean([runs[n]["eval/loss"] for n in names]))))
                print(f"  {m.label} {m.key}={value:g}: reward {rows[-1]['reward']:+.3f}, "
                      f"KL {rows[-1]['kl']:.2f}", flush=True)
        for beta in dict.fromkeys(b for b, _ in online_runs(c)):
            res, names = [], [f"online_dpo_beta{beta:g}_seed{s}" for s in c.seeds]
            for seed, name in zip(c.seeds, names):
                sampler = Sampler(hf.load_pretrained(work / "runs" / name / "hf"), tokenizer,
                                  c.prompt_tokens[1], c.max_new_tokens, c.temperature)
                res.append(evaluate_model(c, sampler, ref_sampler, reward, eval_prompts, seed))
                if seed == c.seeds[0]:
                    first_samples[f"{ONLINE} beta={beta:g}"] = (sampler, res[-1][2])
            rows.append(_point(
                ONLINE, "beta", beta, [(r, kl) for r, kl, _ in res],
                eval_reward_accuracy=float(np.mean(
                    [runs[n]["eval/rewards/accuracies"] for n in names])),
                eval_loss=float(np.mean([runs[n]["eval/loss"] for n in names]))))
            print(f"  {ONLINE} beta={beta:g}: reward {rows[-1]['reward']:+.3f}, "
                  f"KL {rows[-1]['kl']:.2f}", flush=True)

    with Stage(6, "report"):
        samples = []
        for i in range(min(c.side_by_side, len(eval_prompts))):
            k = i * c.eval_samples  # the first sample of prompt i
            samples.append({"prompt": eval_prompts[i],
                            "pi_ref": ref_sampler.text(first_samples["pi_ref"][1][k]),
                            "policies": [(name, s.text(ys[k])) for name, (s, ys) in
                                         first_samples.items() if name != "pi_ref"]})
        report = write_report(c, work, rows, samples)
        verdicts = checks(c, rows)

    print("\n" + report["table"] + "\n\n" + report["ranking"] + "\n")
    for s in samples[:3]:
        print(f"{s['prompt']!r}\n  pi_ref:   {s['pi_ref']!r}")
        for name, t in s["policies"]:
            if name.startswith("DPO"):
                print(f"  {name:<14} {t!r}")
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
    for handler in logging.getLogger().handlers:  # each run's train.log keeps its INFO lines
        handler.setLevel(logging.WARNING)
    import jax
    # Runs that differ only in their data order or seed compile nothing the second time; set
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
    from dpo_jax import cli
    default_config = str(Path(__file__).with_name("config.py"))
    cli.check_overrides(sys.argv, "demo.py", default_config)  # one line, not a traceback
    config_flags.DEFINE_config_file("config", default_config,
                                    "Demo config (examples/sentiment/config.py[:mini|full|tiny]).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", "runs/sentiment", "Where every stage writes.")
    app.run(main)
