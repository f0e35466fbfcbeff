"""On-policy DPO rounds: sample from the current policy, score, pair, train, again.

Offline DPO learns from pairs some other model wrote. Iterative ("online", "on-policy") DPO, as in
Xu et al. 2023 (arXiv 2312.16682), Llama 3's post-training rounds and TRL's online DPO, draws new
pairs from the policy being trained: with ``online_rounds`` = R > 0 a run is R rounds of

1. **sample**: ``online_samples_per_prompt`` completions of every prompt of ``online_prompts``
   from the current policy (round 1: the initial model), with the jitted KV-cache sampler (its
   rows split over the local devices) at
   ``online_temperature`` / ``online_top_p``, ``online_max_new_tokens`` new tokens, a fixed
   seed per round and batch;
2. **score**: every completion by ``online_reward``: a ``module:function`` called as TRL's
   reward functions are, ``fn(prompts=[...], completions=[...])`` -> one float each, or an HF
   sequence-classification folder (one output: its logit of prompt + completion);
3. **pair**: per prompt, by ``online_pairing``: ``best_worst`` (the highest against the lowest
   reward), ``random_pair`` (two drawn at random, ordered by reward) or ``all_pairs`` (every two
   with different rewards); ties, and pairs with an empty completion, are dropped and counted;
4. **train**: the normal DPO trainer on the round's pairs (any loss, layout, tuning, mesh):
   ``max_steps`` / ``num_train_epochs`` per round. The policy starts from the previous round's.
   The reference (``online_reference``) is ``initial``, round 1's (``ref_model_name_or_path``,
   or else the model round 1 started from), or ``previous_round``, the policy the round's
   samples came from. Full tuning: the previous
   round's export is the model and ``ref_model_name_or_path`` the initial one. LoRA / DoRA with
   ``initial``: the base stays the initial model (the reference) and the adapters continue from
   the previous round's (``lora_init``); with ``previous_round`` the previous round's merged
   model is the base and the adapters start fresh.

Everything a round makes is written to ``workdir/online/round_NNN/`` once, atomically (a rerun
with other settings, ``online/settings.json``, is refused):
``samples.jsonl``, ``rewards.jsonl``, ``pairs.jsonl``, ``round.json`` (counts, reward means) and
the round's trainer workdir ``train/``. A rerun (after a SIGKILL in any phase) reuses what a round
finished and redoes only what it did not, with the same seeds, so it ends with the same pairs and
bitwise the same weights. The last round's export is the run's: ``workdir/hf`` (and ``adapter``);
``workdir/summary.json`` holds every round's counts and the last round's summary.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path

import jax
import numpy as np

from dpo_jax import keys as K
from dpo_jax.errors import ConfigError

log = logging.getLogger(__name__)

PAIRINGS = ("best_worst", "random_pair", "all_pairs")
REFERENCES = ("initial", "previous_round")


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
    """on-policy DPO rounds (dpo_jax/online.py): sample, score, pair, train, again"""

    online_rounds: int = K.key(0, "rounds of sample -> score -> pair -> train; 0 = offline DPO "
                               "on dataset_name", K.integer(0), resume=True)
    online_prompts: str = K.key("", "the prompts: a .json/.jsonl file with a prompt column "
                                "(prompt_column), or a save_to_disk folder", K.text, resume=True)
    online_samples_per_prompt: int = K.key(4, "completions sampled per prompt and round",
                                           K.integer(2, "two are needed for a pair"),
                                           resume=True)
    online_temperature: float = K.key(1.0, "sampling temperature (0 = greedy: identical samples)",
                                      K.number(0, open_low=True), resume=True)
    online_top_p: float = K.key(1.0, "nucleus sampling's mass; 1 = off",
                                K.number(0, 1, open_low=True), resume=True)
    online_max_new_tokens: int = K.key(64, "new tokens per completion at most", K.integer(1),
                                       resume=True)
    online_pairing: str = K.key("best_worst", "best_worst | random_pair | all_pairs",
                                K.one_of(*PAIRINGS), resume=True)
    online_reference: str = K.key("initial", "the reference each round: initial | "
                                  "previous_round", K.one_of(*REFERENCES), resume=True)
    online_reward: str = K.key("", "module:function(prompts, completions) -> rewards, or an HF "
                               "sequence-classification folder", K.text, resume=True)
    online_batch_size: int = K.key(16, "prompts per sampling batch (x samples_per_prompt rows)",
                                   K.integer(1))

    def __post_init__(self):
        K.check_fields(self)
        if self.online_rounds:
            missing = [k for k in ("online_prompts", "online_reward") if not getattr(self, k)]
            if missing:
                raise ConfigError(f"config key online_rounds={self.online_rounds} needs "
                                  f"{' and '.join(missing)}")


# =========================================================================== the phases

def load_prompts(cfg, column: str = "prompt") -> list[str]:
    """The prompt texts of ``cfg.online_prompts`` (errors name the file and row)."""
    where = cfg.online_prompts
    path = Path(where).expanduser()
    if path.is_dir():
        import datasets
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        rows = list(ds)
    elif path.suffix in (".json", ".jsonl") and path.is_file():
        text = path.read_text()
        if path.suffix == ".jsonl":
            rows = []
            for i, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"{path}, line {i}: not JSON ({e.msg})") from None
        else:
            rows = json.loads(text)
    else:
        raise ConfigError(f"config key online_prompts={where!r}: not a .json/.jsonl file or a "
                          "save_to_disk folder")
    prompts = []
    for i, row in enumerate(rows, 1):
        p = row.get(column) if isinstance(row, dict) else None
        if not isinstance(p, str) or not p:
            raise ConfigError(f"{path}, row {i}: no text in column {column!r} (config key "
                              "prompt_column)")
        prompts.append(p)
    if not prompts:
        raise ConfigError(f"{path}: no prompts")
    return prompts


def sample(model, tokenizer, prompts, cfg, *, seed: int, max_prompt_tokens: int) -> list[list[str]]:
    """``cfg.online_samples_per_prompt`` completions (texts) of each prompt from ``model``:
    fixed-shape batches of ``online_batch_size`` prompts x samples (one compilation), each
    batch's key from (seed, batch index), its rows split over the local devices."""
    from dpo_jax import sampling
    k, per = cfg.online_samples_per_prompt, cfg.online_batch_size
    sc = sampling.SamplingConfig(max_new_tokens=cfg.online_max_new_tokens,
                                 temperature=cfg.online_temperature, top_p=cfg.online_top_p,
                                 eos_id=sampling.stop_ids(model.config, tokenizer))
    start = (tokenizer.bos_token_id if tokenizer.bos_token_id is not None
             else tokenizer.eos_token_id)
    toks = [tokenizer(p, add_special_tokens=False)["input_ids"][-max_prompt_tokens:] or [start]
            for p in prompts]
    length = max(len(t) for t in toks)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        tokenizer.eos_token_id or 0)
    devices = jax.local_devices()  # the rows split over them where they divide evenly
    devices = devices if (per * k) % len(devices) == 0 else devices[:1]
    out = []
    for b in range(math.ceil(len(toks) / per)):
        chunk = toks[b * per:(b + 1) * per]
        rows = [t for t in chunk for _ in range(k)]
        rows += [[start]] * (per * k - len(rows))  # the last batch filled up to its shape
        ids, mask = sampling.left_pad(rows, pad, length)
        new = sampling.generate(model, ids, mask, sc, seed=int(jax.random.randint(
            jax.random.fold_in(jax.random.key(seed), b), (), 0, 2**31 - 1)), devices=devices)
        for i in range(len(chunk)):
            texts = []
            for row in new[i * k:(i + 1) * k]:
                row = list(row)
                ends = [row.index(t) for t in sc.stops if t in row]
                texts.append(tokenizer.decode(row[:min(ends)] if ends else row,
                                              skip_special_tokens=True))
            out.append(texts)
    return out


def reward_function(spec: str):
    """The scorer ``online_reward`` names: ``fn(prompts, completions) -> rewards``."""
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return _classifier(path)
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"config key online_reward={spec!r}: neither module:function nor an "
                          "HF sequence-classification folder")
    if os.getcwd() not in sys.path:  # a module next to where the run starts
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"config key online_reward={spec!r}: {e}") from None
    return fn


def _classifier(path: Path):
    import torch
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # batches of texts are padded; the model finds each one's end
        tok.pad_token = tok.eos_token
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    if model.config.num_labels != 1:
        raise ConfigError(f"config key online_reward={str(path)!r}: a reward model has one "
                          f"output (num_labels=1), this one {model.config.num_labels}")

    def score(prompts, completions, **_):
        texts = [p + c for p, c in zip(prompts, completions)]
        with torch.no_grad():
            enc = tok(texts, return_tensors="pt", padding=True, truncation=True)
            return model(**enc).logits[:, 0].float().numpy()
    return score


def score(fn, spec: str, prompts, samples, round_: int) -> list[list[float]]:
    """Every completion's reward, checked: one finite float per completion, else one line
    naming the round, the reward and the first bad row."""
    flat_p = [p for p, s in zip(prompts, samples) for _ in s]
    flat_c = [c for s in samples for c in s]
    got = fn(prompts=flat_p, completions=flat_c)
    try:
        r = np.asarray(got, np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"round {round_}: online_reward={spec!r} returned "
                          f"{type(got).__name__}, not numbers") from None
    if r.shape != (len(flat_c),):
        raise ConfigError(f"round {round_}: online_reward={spec!r} returned shape {r.shape} for "
                          f"{len(flat_c)} completions; one float per completion is needed")
    bad = np.flatnonzero(~np.isfinite(r))
    if bad.size:
        i = int(bad[0])
        raise ConfigError(f"round {round_}: online_reward={spec!r} returned {r[i]} for "
                          f"completion {i} (prompt {i // len(samples[0])}: {flat_p[i][:60]!r}); "
                          f"{bad.size} of {r.size} are not finite")
    k = len(samples[0])
    return [r[i * k:(i + 1) * k].tolist() for i in range(len(samples))]


def make_pairs(prompts, samples, rewards, pairing: str, seed: int) -> tuple[list[dict], dict]:
    """(pairs, {"ties": n, "empty": m}): per prompt, by ``pairing`` (see the module docstring);
    pairs of equal rewards, and pairs with an empty completion (EOS first: no text to train
    on), dropped and counted."""
    rng = np.random.default_rng(seed)
    pairs, dropped = [], {"ties": 0, "empty": 0}

    def add(p, s, r, i, j):
        if r[i] == r[j]:
            dropped["ties"] += 1
            return
        if not s[i].strip() or not s[j].strip():
            dropped["empty"] += 1
            return
        hi, lo = (i, j) if r[i] > r[j] else (j, i)
        pairs.append({"prompt": p, "chosen": s[hi], "rejected": s[lo],
                      "chosen_reward": r[hi], "rejected_reward": r[lo]})

    for p, s, r in zip(prompts, samples, rewards):
        if pairing == "best_worst":
            add(p, s, r, int(np.argmax(r)), int(np.argmin(r)))
        elif pairing == "random_pair":
            i, j = rng.choice(len(s), 2, replace=False)
            add(p, s, r, int(i), int(j))
        else:
            for i in range(len(s)):
                for j in range(i + 1, len(s)):
                    add(p, s, r, i, j)
    return pairs, dropped


# =========================================================================== the rounds

def _write_once(path: Path, rows) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _round_config(cfg, r: int, rdir: Path, online_dir: Path, initial: str):
    """The flat keys of round r's DPO run."""
    flat = cfg.flat.to_dict() if hasattr(cfg.flat, "to_dict") else dict(cfg.flat)
    o = cfg.online
    prev = online_dir / f"round_{r - 1:03d}" / "train"
    flat.update(online_rounds=0, dataset_name=str(rdir / "pairs.jsonl"),
                prompt_column="prompt", chosen_column="chosen", rejected_column="rejected")
    if not cfg.data.eval_dataset_name:  # the pairs file has no test split: no evaluation
        flat.update(dataset_test_split="")
    if cfg.tuning.lora_rank:
        if r > 1 and o.online_reference == "initial":  # the base stays: adapters continue
            flat.update(model_name_or_path=initial, lora_init=str(prev / "adapter"))
        elif r > 1:
            flat.update(model_name_or_path=str(prev / "hf"), lora_init="")
    elif r > 1:
        flat.update(model_name_or_path=str(prev / "hf"))
        if o.online_reference == "initial":  # the run's reference: its own, or round 1's model
            flat.update(ref_model_name_or_path=cfg.reference.ref_model_name_or_path or initial)
        else:
            flat.update(ref_model_name_or_path="")
    return flat


def _check_settings(cfg, path: Path) -> None:
    """A rerun reuses the rounds' files only under the settings that made them: the keys a
    resume must keep, recorded at the start and checked as a checkpoint's are
    (``workdir.check_resume``: a difference is refused, unless ``allow_resume_changes``)."""
    from dpo_jax import config as configs, workdir as workdirs
    now = workdirs.run_settings(cfg.flat, configs.resume_keys(), train_data="")
    if path.exists():
        workdirs.check_resume({"run": json.loads(path.read_text())}, now,
                              cfg.run.allow_resume_changes, path.parent)
    else:
        _write_json(path, now)


def _write_json(path: Path, obj) -> None:
    """``obj`` as JSON at ``path``, atomically (a temporary file, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def run_rounds(cfg, workdir) -> dict:
    """Trains ``cfg.online.online_rounds`` rounds into ``workdir`` (see the module docstring);
    returns the summary."""
    from dpo_jax import hf, hub, storage, trainer, workdir as workdirs
    o = cfg.online
    if storage.is_url(str(workdir)):
        raise ConfigError(f"--workdir {workdir}: online rounds run in a local workdir (the "
                          "rounds' own runs would mirror it; not offered yet)")
    if jax.process_count() > 1:
        raise ConfigError("config key online_rounds: rounds run on one process (the sampler and "
                          "the reward are not split over hosts yet)")
    workdir = Path(workdir)
    online_dir = workdir / "online"
    online_dir.mkdir(parents=True, exist_ok=True)
    _check_settings(cfg, online_dir / "settings.json")
    tokenizer = hub.load_tokenizer(cfg.model.tokenizer_name_or_path
                                   or cfg.model.model_name_or_path)
    if cfg.model.model_name_or_path:
        initial = cfg.model.model_name_or_path
    else:  # a random initial model: saved once, so later rounds can name it
        initial = str(online_dir / "initial")
        if not (online_dir / "initial" / "config.json").exists():
            model_cfg, params = hf.initial_model(cfg.model, tokenizer, seed=cfg.run.seed)
            tmp = online_dir / "initial.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            hf.save_params(model_cfg, jax.tree.map(np.asarray, params), tmp)
            tmp.replace(online_dir / "initial")
    if not cfg.model.tokenizer_name_or_path:
        tokenizer.save_pretrained(str(online_dir / "tokenizer"))
    prompts = load_prompts(o, cfg.data.prompt_column)
    reward_fn = reward_function(o.online_reward)
    rounds, last = [], None
    for r in range(1, o.online_rounds + 1):
        rdir = online_dir / f"round_{r:03d}"
        rdir.mkdir(exist_ok=True)
        seed = cfg.run.seed * 1000 + r
        if not (rdir / "samples.jsonl").exists():
            source = initial if r == 1 else str(online_dir / f"round_{r - 1:03d}" / "train" / "hf")
            model = hf.load_pretrained(source, dtype=cfg.model.dtype)
            log.info("round %d: sampling %d x %d completions from %s", r, len(prompts),
                     o.online_samples_per_prompt, source)
            samples = sample(model, tokenizer, prompts, o, seed=seed,
                             max_prompt_tokens=cfg.data.max_length)
            del model
            _write_once(rdir / "samples.jsonl", ({"prompt": p, "completions": s}
                                                 for p, s in zip(prompts, samples)))
        samples = [row["completions"] for row in workdirs.read_jsonl(rdir / "samples.jsonl")]
        if not (rdir / "rewards.jsonl").exists():
            rewards = score(reward_fn, o.online_reward, prompts, samples, r)
            _write_once(rdir / "rewards.jsonl", ({"rewards": x} for x in rewards))
        rewards = [row["rewards"] for row in workdirs.read_jsonl(rdir / "rewards.jsonl")]
        if not (rdir / "round.json").exists():
            pairs, dropped = make_pairs(prompts, samples, rewards, o.online_pairing, seed)
            if not pairs:
                raise ConfigError(f"round {r}: no pair to train on ({dropped['ties']} ties, "
                                  f"{dropped['empty']} with an empty completion); raise "
                                  "online_temperature, or use another online_reward")
            _write_once(rdir / "pairs.jsonl", pairs)
            flat_r = np.asarray(rewards, np.float64)
            info = {"round": r, "prompts": len(prompts), "samples": int(flat_r.size),
                    "pairs": len(pairs), "ties_dropped": dropped["ties"],
                    "empty_dropped": dropped["empty"],
                    "reward_mean": float(flat_r.mean()),
                    "reward_best_of_k_mean": float(flat_r.max(-1).mean())}
            _write_json(rdir / "round.json", info)
        info = json.loads((rdir / "round.json").read_text())
        log.info("round %d: %d pairs (%d ties dropped), mean reward %.4f", r, info["pairs"],
                 info["ties_dropped"], info["reward_mean"])
        flat = _round_config(cfg, r, rdir, online_dir, initial)
        if not cfg.model.tokenizer_name_or_path:
            flat["tokenizer_name_or_path"] = str(online_dir / "tokenizer")
        done = rdir / "train" / "summary.json"  # written last by a finished run
        last = (json.loads(done.read_text()) if done.exists()
                else trainer.train_and_evaluate(flat, rdir / "train"))
        rounds.append(dict(info, train_loss=last.get("train/loss")))
    final = online_dir / f"round_{o.online_rounds:03d}" / "train"
    for name in ("hf", "adapter"):
        if (final / name).exists():
            tmp = workdir / f"{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(final / name, tmp)
            shutil.rmtree(workdir / name, ignore_errors=True)
            tmp.replace(workdir / name)
    summary = {"rounds": rounds, "final": last, "hf_export": str(workdir / "hf")}
    _write_json(workdir / "summary.json", summary)
    return summary
