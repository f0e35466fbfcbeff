"""Issue 18: f-divergences, WPO, LD-DPO, TRL's per-token metrics, TR-DPO, trackers and samples.

The loss options are checked against TRL 1.16's formulas written out in float64 torch (autograd
for the gradients); the per-token quantities against a direct numpy computation from the full
logits of a tiny model, in every layout.
"""

import json
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trainutil import tiny_config
from dpo_jax import data, layouts, losses as L, optim, packing, steps
from dpo_jax.errors import ConfigError
from dpo_jax.models import common
from dpo_jax.models.gpt2 import GPT2, GPT2Config
from dpo_jax import config as configs
from dpo_jax.tuning.full import FullTuning

torch = pytest.importorskip("torch")
F = torch.nn.functional


# ------------------------------------------------------------------ TRL's formulas, float64 torch

def trl_scores(d, kind, a):
    """dpo_trainer.py (TRL 1.16) _compute_loss: chosen_scores / rejected_scores."""
    if kind == "reverse_kl":
        return d
    if kind == "forward_kl":
        return 1 - torch.exp(-d)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(d)
    if abs(a - 1.0) < 1e-6:
        return d
    return (torch.exp(torch.clamp((a - 1.0) * d, max=80.0)) - 1.0) / (a - 1.0)


def trl_loss(name, pc, pr, rc, rr, nc, nr, beta, e, kind, a, wc=None, wr=None):
    """The per-pair loss of TRL's loop for one loss_type (wc, wr: WPO's mean aligned log-probs)."""
    cs, rs = trl_scores(pc - rc, kind, a), trl_scores(pr - rr, kind, a)
    delta = cs - rs
    out = {
        "sigmoid": lambda: -F.logsigmoid(beta * delta),
        "hinge": lambda: torch.relu(1 - beta * delta),
        "ipo": lambda: (cs / nc - rs / nr - 1 / (2 * beta)) ** 2,
        "exo_pair": lambda: (torch.sigmoid(beta * delta) * (F.logsigmoid(beta * delta)
                                                            - math.log1p(-e))
                             + torch.sigmoid(-beta * delta) * (F.logsigmoid(-beta * delta)
                                                               - math.log(e))),
        "robust": lambda: (-(1 - e) * F.logsigmoid(beta * delta)
                           + e * F.logsigmoid(-beta * delta)) / (1 - 2 * e),
        "discopop": lambda: ((1 - torch.sigmoid(beta * delta / 0.05)) * -F.logsigmoid(beta * delta)
                             + torch.sigmoid(beta * delta / 0.05) * torch.exp(-beta * delta)),
        "sigmoid_norm": lambda: -F.logsigmoid(beta * (cs / nc - rs / nr)),
    }[name]()
    if wc is not None:
        out = out * torch.exp(wc / nc) * torch.exp(wr / nr)
    return out


def inputs(rng, b=12, scale=1.0):
    nc = rng.integers(1, 30, b).astype(np.float64)
    nr = rng.integers(1, 30, b).astype(np.float64)
    pc = -nc * rng.uniform(0.5, 3, b) * scale
    pr = -nr * rng.uniform(0.5, 3, b) * scale
    rc = pc + rng.normal(0, 2, b) * scale
    rr = pr + rng.normal(0, 2, b) * scale
    return pc, pr, rc, rr, nc, nr


CASES = [(loss, kind, a) for loss in ("sigmoid", "hinge", "ipo", "exo_pair", "robust",
                                      "discopop", "sigmoid_norm")
         for kind, a in (("reverse_kl", 0.5), ("forward_kl", 0.5), ("js_divergence", 0.5),
                         ("alpha_divergence", 0.5), ("alpha_divergence", 1.0),
                         ("alpha_divergence", 3.0))]


@pytest.mark.parametrize("name, kind, a", CASES)
@pytest.mark.parametrize("scale", [1.0, 40.0])  # 40: |log-ratios| near 100, the clamps engaged
def test_f_divergences_match_trl(name, kind, a, scale):
    rng = np.random.default_rng(zlib.crc32(f"{name} {kind} {a}".encode()))  # fixed per case
    pc, pr, rc, rr, nc, nr = inputs(rng, scale=scale)
    beta = 0.1
    e = {"exo_pair": 1e-3, "robust": 0.1}.get(name, 0.0)
    t = [torch.tensor(v, dtype=torch.float64, requires_grad=i < 2)
         for i, v in enumerate((pc, pr, rc, rr, nc, nr))]
    want = trl_loss(name, *t, beta, e, kind, a)
    want.mean().backward()
    opts = dict(chosen_tokens=nc, rejected_tokens=nr, beta=beta, label_smoothing=e,
                f_divergence_type=kind, f_alpha_divergence_coef=a)
    with jax.enable_x64(True):
        f = lambda pc, pr: L.compute(name, pc, pr, rc, rr, **opts)[0]
        got = np.asarray(f(pc, pr))
        grads = jax.grad(lambda pc, pr: f(pc, pr).mean(), argnums=(0, 1))(pc, pr)
    ok = np.isfinite(want.detach().numpy())
    assert ok.mean() > 0.5  # most pairs are finite even where exp(80) is reached
    np.testing.assert_allclose(got[ok], want.detach().numpy()[ok], rtol=1e-6, atol=1e-9)
    for g, tt in zip(grads, t[:2]):
        want_g = tt.grad.numpy()
        fine = np.isfinite(want_g)
        np.testing.assert_allclose(np.asarray(g)[fine], want_g[fine], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "sigmoid_norm"])
def test_wpo_weights_match_trl(name):
    rng = np.random.default_rng(7)
    pc, pr, rc, rr, nc, nr = inputs(rng)
    wc, wr = -nc * rng.uniform(0.1, 2, nc.shape), -nr * rng.uniform(0.1, 2, nr.shape)
    t = [torch.tensor(v, dtype=torch.float64, requires_grad=i < 2)
         for i, v in enumerate((pc, pr, rc, rr, nc, nr))]
    want = trl_loss(name, *t, 0.2, 0.0, "reverse_kl", 0.5, torch.tensor(wc), torch.tensor(wr))
    want.mean().backward()
    weight = np.exp(wc / nc) * np.exp(wr / nr)
    with jax.enable_x64(True):
        f = lambda pc, pr: L.compute(name, pc, pr, rc, rr, chosen_tokens=nc, rejected_tokens=nr,
                                     beta=0.2, use_weighting=True, weight=weight)[0]
        got = np.asarray(f(pc, pr))
        grads = jax.grad(lambda pc, pr: f(pc, pr).mean(), argnums=(0, 1))(pc, pr)
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-6)
    for g, tt in zip(grads, t[:2]):
        np.testing.assert_allclose(np.asarray(g), tt.grad.numpy(), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("kw, msg", [
    (dict(loss_type="nca_pair", f_divergence_type="js_divergence"), "built on the reward"),
    (dict(f_divergence_type="kl"), "f_divergence_type 'kl'"),
    (dict(ld_alpha=1.5), "ld_alpha must lie in"),
    (dict(loss_type="aot", use_weighting=True), "misalign"),
])
def test_bad_research_options_fail_when_read(kw, msg):
    with pytest.raises(ValueError, match=msg):
        L.LossConfig(**kw)


def test_sync_and_tracker_settings_are_checked(tmp_path):
    for kw, msg in [(dict(sync_ref_model=True, precompute_ref_log_probs=True), "precompute"),
                    (dict(sync_ref_model=True, lora_rank=4), "LoRA's reference"),
                    (dict(sync_ref_model=True, reference_free=True), "without a reference"),
                    (dict(report_to="mlflow"), "report_to='mlflow'"),
                    (dict(report_to="none,wandb"), "report_to='none,wandb'")]:
        with pytest.raises(ConfigError, match=msg):
            configs.build(tiny_config(tmp_path, **kw))


# ------------------------------------------------------------------ per-token quantities

CFG = GPT2Config(vocab_size=97, n_positions=128, n_embd=32, n_layer=2, n_head=4)
# pairs(n, seed): random pairs of unequal lengths, completions up to W tokens (one pair's far apart)
from test_savings import W, pairs  # noqa: E402


def direct(model, prompt, comp, other_len):
    """From the full (T, V) logits of [prompt | comp] in float64 numpy: the completion's sums."""
    ids = np.concatenate([prompt, comp])[None]
    logits = np.asarray(model(jnp.asarray(ids)), np.float64)[0]
    rows = logits[len(prompt) - 1:len(ids[0]) - 1]
    lse = np.log(np.exp(rows - rows.max(-1, keepdims=True)).sum(-1)) + rows.max(-1)
    logp = rows - lse[:, None]
    lp = logp[np.arange(len(comp)), comp]
    p = np.exp(logp)
    tail = np.arange(len(comp)) >= min(len(comp), other_len)
    return {"logps": lp.sum(), "tokens": len(comp), "tail_logps": lp[tail].sum(),
            "entropy": -(p * logp).sum(-1).sum(),
            "wpo": (lp - np.log((p ** 2).sum(-1))).sum(),
            "mean_logits": rows.mean(-1).sum(),
            "top1": (rows.argmax(-1) == comp).sum(),
            "unlikely": np.log1p(-np.exp(lp)).sum()}


def test_unlikelihood_loss_closed_form():
    """NLL(chosen) - alpha sum log(1 - p(yr_t)), each token-weighted over the valid pairs (the
    padding pair counts nowhere); refused without the per-token sums."""
    pc, pr = np.array([-3.0, -8.0, -1.0]), np.array([-2.0, -5.0, -4.0])
    nc, nr, valid = np.array([3.0, 4.0, 2.0]), np.array([2.0, 5.0, 1.0]), np.array([1, 1, 0.0])
    ul = np.array([-0.4, -2.5, -9.0])
    got = L.compute("unlikelihood", pc, pr, pc, pr, chosen_tokens=nc, rejected_tokens=nr,
                    beta=0.5, valid=valid, rejected_unlikely=ul)[0]
    want = -pc / 3.5 - 0.5 * ul / 3.5  # mean tokens over the valid pairs: (3+4)/2, (2+5)/2
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    with pytest.raises(ValueError, match="rejected_unlikely"):
        L.compute("unlikelihood", pc, pr, pc, pr, chosen_tokens=nc, rejected_tokens=nr, beta=0.5)


LAYOUTS = [("pair", 0, False), ("pair", W, False), ("prefix_sharing", W, False),
           ("pair", W, True), ("prefix_sharing", W, True)]


@pytest.mark.parametrize("name, window, packed", LAYOUTS,
                         ids=["pair", "pair-window", "prefix-sharing", "pair-packed",
                              "prefix-sharing-packed"])
def test_per_token_sums_equal_the_full_logits(name, window, packed):
    """Log-probs, verbose tails (LD-DPO), entropy, WPO's aligned log-probs, mean logits and
    argmax hits of each completion, from the chunked pass of every layout (rows padded,
    completions of unequal length), against the full logits: 1e-5."""
    tp = pairs(n=8)
    model = GPT2(CFG, rngs=nnx.Rngs(0))
    b = data.PairBatches(tp, batch_size=8, max_length=20, pad_id=0, shuffle=False,
                         layout=packing.make(name, window, packed=packed))
    batch = b.collate(np.arange(6))  # 6 pairs in 8 slots: two empty
    c, r = b.layout.logps(model, {k: jnp.asarray(v) for k, v in batch.items()}, chunk_size=5,
                          stats=True)
    for i in range(6):
        for got, comp, other in ((c, tp.chosen[i], tp.rejected[i]),
                                 (r, tp.rejected[i], tp.chosen[i])):
            want = direct(model, tp.prompt[i], comp, len(other))
            for k, v in want.items():
                np.testing.assert_allclose(float(got[k][i]), v, rtol=1e-5, atol=1e-5,
                                           err_msg=f"{k} of pair {i}")


def test_trl_metrics_and_ld_alpha_in_the_loss():
    """The loss function's per-token metrics are TRL's token-weighted means, and ld_alpha
    weighs the verbose tail in the policy's and the reference's log-probs alike."""
    tp = pairs(seed=2)
    model = GPT2(CFG, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    ref = jax.tree.map(lambda a: a * 0.9, nnx.to_pure_dict(params))
    params = nnx.to_pure_dict(params)
    b = data.PairBatches(tp, batch_size=6, max_length=20, pad_id=0, shuffle=False,
                         layout=layouts.make("pair", W))
    batch = {k: jnp.asarray(v) for k, v in b.collate(np.arange(6)).items()}
    cfg = L.LossConfig(beta=0.2, ld_alpha=0.3)
    _, m = steps.make_loss_fn(FullTuning(graphdef), b.layout, cfg, 0)(params, ref, batch)
    pol, refm = nnx.merge(graphdef, nnx.state(model)), GPT2(CFG, rngs=nnx.Rngs(0))
    nnx.update(refm, nnx.State(ref))  # the reference's weights
    wc = [direct(pol, tp.prompt[i], tp.chosen[i], len(tp.rejected[i])) for i in range(6)]
    wr = [direct(pol, tp.prompt[i], tp.rejected[i], len(tp.chosen[i])) for i in range(6)]
    rc = [direct(refm, tp.prompt[i], tp.chosen[i], len(tp.rejected[i])) for i in range(6)]
    rr = [direct(refm, tp.prompt[i], tp.rejected[i], len(tp.chosen[i])) for i in range(6)]
    tot = lambda ds, k: sum(d[k] for d in ds)
    ld = lambda d: d["logps"] - 0.7 * d["tail_logps"]
    np.testing.assert_allclose(float(m["entropy"]), (tot(wc, "entropy") + tot(wr, "entropy")) /
                               (tot(wc, "tokens") + tot(wr, "tokens")), rtol=1e-5)
    np.testing.assert_allclose(float(m["logits/chosen"]),
                               tot(wc, "mean_logits") / tot(wc, "tokens"), rtol=1e-5)
    np.testing.assert_allclose(float(m["logits/rejected"]),
                               tot(wr, "mean_logits") / tot(wr, "tokens"), rtol=1e-5)
    np.testing.assert_allclose(float(m["mean_token_accuracy"]),
                               tot(wc, "top1") / tot(wc, "tokens"), rtol=1e-5)
    margins = [0.2 * ((ld(a) - ld(c)) - (ld(bb) - ld(d))) for a, bb, c, d in zip(wc, wr, rc, rr)]
    np.testing.assert_allclose(float(m["rewards/margins"]), np.mean(margins), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(float(m["logps/chosen"]), np.mean([ld(a) for a in wc]),
                               rtol=1e-5)
    # with an NLL term (TRL's loss_type=["sigmoid", "sft"]; RPO): the log-ratios are LD-weighted,
    # the chosen NLL is not (TRL's sft term reads the plain per-token log-probs)
    h = [(ld(a) - ld(c)) - (ld(bb) - ld(d)) for a, bb, c, d in zip(wc, wr, rc, rr)]
    dpo = np.mean([np.log1p(np.exp(-0.2 * x)) for x in h])
    nll = -tot(wc, "logps") / tot(wc, "tokens")
    for kw, want in ((dict(loss_type="sigmoid,sft"), dpo + nll),
                     (dict(rpo_alpha=0.5), dpo + 0.5 * nll)):
        cfg = L.LossConfig(beta=0.2, ld_alpha=0.3, **kw)
        _, m = steps.make_loss_fn(FullTuning(graphdef), b.layout, cfg, 0)(params, ref, batch)
        np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)
    # reference-free losses (TRL's CPO / ORPO trainers have no ld_alpha) see plain log-probs
    for name in ("simpo", "orpo"):
        got = [steps.make_loss_fn(FullTuning(graphdef), b.layout,
                                  L.LossConfig(loss_type=name, beta=0.2, ld_alpha=a), 0)(
            params, ref, batch)[1] for a in (0.3, 1.0)]
        for k in got[1]:
            np.testing.assert_allclose(float(got[0][k]), float(got[1][k]), rtol=1e-6,
                                       err_msg=f"{name}: {k}")


def test_token_metrics_off_skips_the_statistics_only():
    """token_metrics=False: no entropy / logits / accuracy metrics, the same loss and rewards;
    WPO still gets its weights from the pass."""
    tp = pairs(seed=4)
    model = GPT2(CFG, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    ref = jax.tree.map(lambda a: a * 0.9, params)
    b = data.PairBatches(tp, batch_size=6, max_length=20, pad_id=0, shuffle=False,
                         layout=layouts.make("pair", W))
    batch = {k: jnp.asarray(v) for k, v in b.collate(np.arange(6)).items()}
    run = lambda **kw: steps.make_loss_fn(FullTuning(graphdef), b.layout,
                                          L.LossConfig(beta=0.2, **kw), 0)(params, ref, batch)[1]
    on, off = run(), run(token_metrics=False)
    assert "entropy" in on and not {"entropy", "logits/chosen", "mean_token_accuracy"} & set(off)
    for k in off:
        np.testing.assert_allclose(float(off[k]), float(on[k]), rtol=1e-6, err_msg=k)
    wpo_on, wpo_off = run(use_weighting=True), run(use_weighting=True, token_metrics=False)
    np.testing.assert_allclose(float(wpo_off["loss"]), float(wpo_on["loss"]), rtol=1e-6)
    assert float(wpo_on["loss"]) != pytest.approx(float(on["loss"]), rel=1e-3)


# ------------------------------------------------------------------ TR-DPO

def test_synced_reference_is_the_closed_form_mixture():
    """Ten updates, the reference mixed every 3 (alpha 0.6): after syncs at steps 3, 6 and 9
    it is sum_k alpha (1 - alpha)^(3 - k) theta_k + (1 - alpha)^3 theta_0, within 1e-6."""
    tp = pairs(n=8, seed=4)
    model = GPT2(CFG, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    b = data.PairBatches(tp, batch_size=4, max_length=20, pad_id=0, layout=layouts.make("pair"))
    opt = optim.optax.adam(1e-2)
    state = steps.init_state(params, opt)
    state["ref"] = jax.tree.map(jnp.array, params)
    alpha, every = 0.6, 3
    step = steps.make_train_step(FullTuning(graphdef), b.layout, L.LossConfig(), opt,
                                 lambda s: 1e-2, chunk_size=0, sync=(alpha, every))
    snapshots = [jax.tree.map(np.asarray, params)]
    for s in range(1, 11):
        state, _ = step(state, {}, data.stack_batches([next(b)]))
        if s % every == 0:
            snapshots.append(jax.tree.map(lambda a: np.asarray(a, np.float64), state["params"]))
    n = len(snapshots) - 1
    want = jax.tree.map(lambda *xs: (1 - alpha) ** n * xs[0] + sum(
        alpha * (1 - alpha) ** (n - k) * xs[k] for k in range(1, n + 1)), *snapshots)
    for a, w in zip(jax.tree.leaves(state["ref"]), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a, np.float64), w, atol=1e-6)
    assert not all(np.allclose(a, p) for a, p in zip(jax.tree.leaves(state["ref"]),
                                                     jax.tree.leaves(state["params"])))


# ------------------------------------------------------------------ trackers and samples

def wandb_records(blob: bytes):
    """The records of a .wandb transaction log: a 7-byte header (":W&B", magic, version) then
    LevelDB-log blocks of 32 KiB, each record a 7-byte header (crc32, length, type 1 full /
    2 first / 3 middle / 4 last). wandb 0.31 reads them in Go only, so the test reads them."""
    assert blob[:4] == b":W&B", blob[:8]
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(blob):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(blob[pos + 4:pos + 6], "little"), blob[pos + 6]
        data, pos = blob[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        parts = data if kind in (1, 2) else parts + data
        if kind in (1, 4):
            yield parts
            parts = b""


def test_wandb_offline_run_and_samples_per_eval(tmp_path, monkeypatch):
    """report_to tensorboard + wandb, offline: the wandb run holds the logged metric names,
    the config, and the samples table; samples.jsonl holds one entry per eval step."""
    pytest.importorskip("wandb")
    from dpo_jax.trainer import train_and_evaluate
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wd = tmp_path / "wd"
    train_and_evaluate(tiny_config(tmp_path, max_steps=8, eval_steps=4, save_steps=4,
                                   logging_steps=4, report_to="tensorboard,wandb",
                                   sample_prompts=2, sample_max_new_tokens=4,
                                   sample_temperature=0.7, sample_top_k=20), wd)
    lines = [json.loads(l) for l in (wd / "samples.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines] == [4, 8]
    assert all(len(row["samples"]) == 2 and {"prompt", "pi_ref", "pi_theta"} <= set(
        row["samples"][0]) for row in lines)
    metrics = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
    for key in ("train/entropy", "train/logits/chosen", "train/mean_token_accuracy",
                "train/num_tokens", "eval/entropy", "eval/logits/rejected"):
        assert key in metrics[-1], key
    assert metrics[0]["train/num_tokens"] < metrics[1]["train/num_tokens"]

    from wandb.proto import wandb_internal_pb2
    files = list((wd / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    keys, config_keys = set(), set()
    for raw in wandb_records(files[0].read_bytes()):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            keys |= {item.key or item.nested_key[0] for item in rec.history.item}
        elif rec.WhichOneof("record_type") in ("run", "config"):  # the config rides on run
            update = rec.run.config.update if rec.HasField("run") else rec.config.update
            config_keys |= {item.key for item in update}
    for key in ("train/loss", "train/rewards/accuracies", "eval/rewards/margins",
                "train/entropy", "train/num_tokens", "samples"):
        assert key in keys, (key, sorted(keys))
    assert {"beta", "loss_type", "learning_rate"} <= config_keys


def test_a_loss_with_an_option_of_its_own_is_registered_from_outside(tmp_path):
    """A research fork's loss and its new config key, with no edit to the package: the key
    joins the defaults (so --config.KEY works), is checked when read, reaches the loss as
    ``o.KEY``, is a resume key, and trains through train_and_evaluate."""
    from dpo_jax import keys as K
    from dpo_jax.trainer import train_and_evaluate

    @L.register("toy_margin", options={"toy_margin": L.Option(0.5, "the margin", K.number(0))})
    def toy_margin(x, o):
        return jax.nn.relu(o.toy_margin - o.beta * x.h)

    try:
        assert configs.defaults().toy_margin == 0.5 and "toy_margin" in configs.resume_keys()
        with pytest.raises(ConfigError, match=r"config key toy_margin=-1.0: must lie in"):
            configs.build(tiny_config(tmp_path, loss_type="toy_margin", toy_margin=-1.0))
        cfg = configs.build(tiny_config(tmp_path, loss_type="toy_margin", toy_margin=2.0))
        assert cfg.loss.toy_margin == 2.0
        losses, _, _ = L.compute("toy_margin", [0.0], [0.0], [0.0], [0.0], chosen_tokens=[1],
                                 rejected_tokens=[1], beta=0.1, options=(("toy_margin", 2.0),))
        np.testing.assert_allclose(np.asarray(losses), [2.0])  # step 0: h = 0
        summary = train_and_evaluate(tiny_config(tmp_path, loss_type="toy_margin",
                                                 toy_margin=2.0, max_steps=2, eval_steps=0,
                                                 warmup_steps=0, logging_steps=1,
                                                 sample_prompts=0), tmp_path / "wd")
        rows = [json.loads(r) for r in (tmp_path / "wd" / "metrics.jsonl").read_text()
                .splitlines()]
        assert abs(rows[0]["train/loss"] - 2.0) < 1e-4  # step 1: the policy is the reference
        assert summary["train/loss"] < rows[0]["train/loss"]  # and it trains
        with pytest.raises(ValueError, match="options .* are config keys already"):
            L.register("toy_clash", options={"beta": L.Option(1.0, "")})(toy_margin)
    finally:
        L.LOSSES.pop("toy_margin", None)
        L.LOSSES.pop("toy_clash", None)
    assert "toy_margin" not in configs.defaults()
