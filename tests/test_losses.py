"""Issue 4: every loss against an independent float64 numpy computation of its formula."""

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import losses as L


def logsig(z):  # float64 numpy, stable
    return -np.logaddexp(0.0, -z)


def sig(z):
    return np.exp(logsig(z))


def smoothed(z, e):
    return -(1 - e) * logsig(z) - e * logsig(-z)


def log_odds(m):
    return m - np.log(-np.expm1(m))


def reference(name, pc, pr, rc, rr, nc, nr, beta, e, gamma=0.5, tau=0.05, ul=None):
    dc, dr = pc - rc, pr - rr
    h = dc - dr
    nll = -pc / nc.mean()
    return {
        "sigmoid": lambda: smoothed(beta * h, e),
        "sigmoid_norm": lambda: -logsig(beta * (dc / nc - dr / nr)),
        "robust": lambda: (-(1 - e) * logsig(beta * h) + e * logsig(-beta * h)) / (1 - 2 * e),
        "hinge": lambda: np.maximum(0, 1 - beta * h),
        "ipo": lambda: (dc / nc - dr / nr - 1 / (2 * beta)) ** 2,
        "exo_pair": lambda: (sig(beta * h) * (logsig(beta * h) - np.log(1 - e))
                             + sig(-beta * h) * (logsig(-beta * h) - np.log(e))),
        "nca_pair": lambda: -logsig(beta * dc) - 0.5 * logsig(-beta * dc) - 0.5 * logsig(-beta * dr),
        "bco_pair": lambda: -logsig(beta * dc) - logsig(-beta * dr),
        "sppo_hard": lambda: (dc - 1 / (2 * beta)) ** 2 + (dr + 1 / (2 * beta)) ** 2,
        "aot": lambda: smoothed(beta * (np.sort(pc - pr) - np.sort(rc - rr)), e),
        "aot_unpaired": lambda: smoothed(beta * (np.sort(dc) - np.sort(dr)), e),
        "apo_zero": lambda: 1 - sig(beta * dc) + sig(beta * dr),
        "apo_down": lambda: sig(beta * dc) + 1 - sig(beta * h),
        # sigma(z/tau) * exp(-z) written as exp(log sigma(z/tau) - z) here too, else inf * 0
        "discopop": lambda: ((1 - sig(beta * h / tau)) * -logsig(beta * h)
                             + np.exp(logsig(beta * h / tau) - beta * h)),
        "simpo": lambda: smoothed(beta * (pc / nc - pr / nr) - gamma, e),
        "orpo": lambda: nll - beta * logsig(log_odds(pc / nc) - log_odds(pr / nr)),
        "sft": lambda: nll,
        "unlikelihood": lambda: nll - beta * ul / nr.mean(),
    }[name]()


def unlikely_sums(nr, seed=5):
    """Sums of log(1 - p) over each rejected completion's tokens (each term < 0)."""
    return -nr * np.random.default_rng(seed).uniform(0.01, 3.0, len(nr))


def extra(name, nr) -> dict:
    """The inputs a loss needs beyond the summed log-probs."""
    return {"rejected_unlikely": unlikely_sums(nr)} if name == "unlikelihood" else {}


SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1, "sigmoid": 0.1, "aot": 0.1, "aot_unpaired": 0.1,
             "simpo": 0.1}


def random_inputs(rng, b=16, scale=1.0):
    nc = rng.integers(1, 40, b).astype(np.float64)
    nr = rng.integers(1, 40, b).astype(np.float64)
    pc = -nc * rng.uniform(0.5, 4, b) * scale
    pr = -nr * rng.uniform(0.5, 4, b) * scale
    rc = pc + rng.normal(0, 3, b) * scale
    rr = pr + rng.normal(0, 3, b) * scale
    return pc, pr, rc, rr, nc, nr


def test_every_registered_loss_has_a_reference():
    assert set(L.LOSSES) == {"sigmoid", "sigmoid_norm", "robust", "hinge", "ipo", "exo_pair", "nca_pair",
                             "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
                             "apo_down", "discopop", "simpo", "orpo", "sft",
                             "unlikelihood"}


@pytest.mark.parametrize("name", sorted(L.LOSSES))
@pytest.mark.parametrize("scale", [1.0, 300.0])  # 300: |beta * h| in the hundreds
def test_loss_matches_float64_formula(name, scale):
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # fixed per loss
    pc, pr, rc, rr, nc, nr = random_inputs(rng, scale=scale)
    beta, e = 0.5, SMOOTHING.get(name, 0.0)
    want = reference(name, pc, pr, rc, rr, nc, nr, beta, e, ul=unlikely_sums(nr))
    assert np.isfinite(want).all()
    with jax.enable_x64(True):
        got, cr, rj = L.compute(name, pc, pr, rc, rr, chosen_tokens=nc, rejected_tokens=nr,
                                beta=beta, label_smoothing=e, **extra(name, nr))
        got = np.asarray(got)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    # rewards: beta x the log-ratio (TRL's DPOTrainer), or for SimPO / ORPO beta x the policy's
    # per-token mean (TRL's CPO / ORPO trainers)
    want_cr = beta * pc / nc if name in ("simpo", "orpo") else beta * (pc - rc)
    np.testing.assert_allclose(np.asarray(cr), want_cr, rtol=1e-12)
    # and in float32, no overflow or NaN at large margins
    got32, _, _ = L.compute(name, *(np.float32(a) for a in (pc, pr, rc, rr)),
                            chosen_tokens=np.float32(nc), rejected_tokens=np.float32(nr),
                            beta=beta, label_smoothing=e, **extra(name, nr))
    assert np.isfinite(np.asarray(got32)).all()
    if scale == 1.0:
        np.testing.assert_allclose(np.asarray(got32), want, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_gradient_matches_central_differences(name):
    rng = np.random.default_rng(1)
    pc, pr, rc, rr, nc, nr = random_inputs(rng, b=6)
    beta, e = 0.5, SMOOTHING.get(name, 0.0)
    with jax.enable_x64(True):
        def total(p):
            return L.compute(name, p[0], p[1], rc, rr, chosen_tokens=nc, rejected_tokens=nr,
                             beta=beta, label_smoothing=e, **extra(name, nr))[0].mean()
        p = jnp.asarray(np.stack([pc, pr]))
        g = np.asarray(jax.grad(total)(p))
        eps = 1e-6
        fd = np.zeros_like(g)
        for idx in np.ndindex(*g.shape):
            d = np.zeros_like(g)
            d[idx] = eps
            fd[idx] = (float(total(p + d)) - float(total(p - d))) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-8)
    assert np.abs(g).max() > 0


def test_policy_equal_to_reference_gives_ln2_and_zero_accuracy():
    pc, pr = np.array([-10.0, -3.0, -7.5]), np.array([-4.0, -9.0, -7.5])
    kw = dict(chosen_tokens=[3, 2, 5], rejected_tokens=[2, 4, 5], beta=0.1)
    losses, cr, rj = L.compute("sigmoid", pc, pr, pc, pr, **kw)
    m = L.compute_metrics("sigmoid", pc, pr, pc, pr, **kw)
    # exactly ln 2 (as float32 rounds it) for every pair
    np.testing.assert_array_equal(np.asarray(losses), np.float32(math.log(2)))
    assert float(m["loss"]) == pytest.approx(math.log(2), rel=1e-7)
    assert float(m["rewards/accuracies"]) == 0.0
    assert float(m["rewards/margins"]) == 0.0


def test_metrics_names_and_meanings():
    pc, pr, rc, rr = map(np.asarray, ([-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0], [-2.0, -2.0]))
    m = {k: float(v) for k, v in L.compute_metrics("sigmoid", pc, pr, rc, rr, chosen_tokens=[1, 1],
                                                   rejected_tokens=[1, 1], beta=0.5).items()}
    assert m["rewards/chosen"] == pytest.approx(0.5 * np.mean(pc - rc))
    assert m["rewards/rejected"] == pytest.approx(0.5 * np.mean(pr - rr))
    assert m["rewards/margins"] == pytest.approx(m["rewards/chosen"] - m["rewards/rejected"])
    assert m["rewards/accuracies"] == 0.5  # pair 0: 0.5 > -0.5; pair 1: 0 > 0.5 is false
    assert m["logps/chosen"] == pytest.approx(-1.5) and m["logps/rejected"] == pytest.approx(-2.0)


def test_options_reference_free_rpo_and_weighted_combination():
    rng = np.random.default_rng(3)
    pc, pr, rc, rr, nc, nr = random_inputs(rng)
    kw = dict(chosen_tokens=nc, rejected_tokens=nr, beta=0.2)
    with jax.enable_x64(True):
        free = np.asarray(L.compute("sigmoid", pc, pr, rc, rr, reference_free=True, **kw)[0])
        np.testing.assert_allclose(free, smoothed(0.2 * (pc - pr), 0), rtol=1e-9)
        rpo = np.asarray(L.compute("sigmoid", pc, pr, rc, rr, rpo_alpha=0.7, **kw)[0])
        np.testing.assert_allclose(rpo, smoothed(0.2 * ((pc - rc) - (pr - rr)), 0)
                                   + 0.7 * -pc / nc.mean(), rtol=1e-9)
        combo = np.asarray(L.compute(("sigmoid", "sft"), pc, pr, rc, rr, loss_weights=(1.0, 0.3),
                                     **kw)[0])
        np.testing.assert_allclose(combo, smoothed(0.2 * ((pc - rc) - (pr - rr)), 0)
                                   + 0.3 * -pc / nc.mean(), rtol=1e-9)
    # sft's batch mean is the token-weighted NLL
    sft = L.compute("sft", pc, pr, rc, rr, **kw)[0]
    assert float(sft.mean()) == pytest.approx(-pc.sum() / nc.sum(), rel=1e-5)


def test_padding_pairs_do_not_change_batch_statistics():
    rng = np.random.default_rng(4)
    pc, pr, rc, rr, nc, nr = random_inputs(rng, b=6)
    pad = lambda a, v: np.concatenate([a, np.full(2, v)])
    for name in ("aot", "aot_unpaired", "sft", "orpo", "sigmoid"):
        m_full = L.compute_metrics(name, pc, pr, rc, rr, chosen_tokens=nc, rejected_tokens=nr,
                                   beta=0.3)
        m_pad = L.compute_metrics(name, pad(pc, 0), pad(pr, 0), pad(rc, 0), pad(rr, 0),
                                  chosen_tokens=pad(nc, 0), rejected_tokens=pad(nr, 0), beta=0.3,
                                  valid=pad(np.ones(6), 0))
        for k in m_full:
            np.testing.assert_allclose(float(m_pad[k]), float(m_full[k]), rtol=1e-5, err_msg=k)


def test_metrics_follow_trl():
    """sft logs rewards against the real reference (TRL's DPOTrainer): 0 when the policy is the
    reference; SimPO and ORPO log TRL's CPO / ORPO per-token means; ORPO its log-odds."""
    rng = np.random.default_rng(5)
    pc, pr, rc, rr, nc, nr = random_inputs(rng)
    kw = dict(chosen_tokens=nc, rejected_tokens=nr, beta=0.2)
    m = L.compute_metrics("sft", pc, pr, pc, pr, **kw)
    assert float(m["rewards/chosen"]) == 0 and float(m["rewards/margins"]) == 0
    assert L.LossConfig(loss_type="sft").needs_reference  # the reference is computed for it
    assert not L.LossConfig(loss_type="sft", reference_free=True).needs_reference
    for loss in ("simpo", "orpo"):
        assert not L.LossConfig(loss_type=loss).needs_reference
        m = {k: float(v) for k, v in L.compute_metrics(loss, pc, pr, rc, rr, **kw).items()}
        np.testing.assert_allclose(m["logps/chosen"], np.mean(pc / nc), rtol=1e-5)
        np.testing.assert_allclose(m["logps/rejected"], np.mean(pr / nr), rtol=1e-5)
        np.testing.assert_allclose(m["rewards/chosen"], 0.2 * np.mean(pc / nc), rtol=1e-5)
        np.testing.assert_allclose(m["rewards/margins"], 0.2 * np.mean(pc / nc - pr / nr),
                                   rtol=1e-5)
    lor = log_odds(pc / nc) - log_odds(pr / nr)
    np.testing.assert_allclose(m["log_odds_chosen"], lor.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["log_odds_ratio"], logsig(lor).mean(), rtol=1e-5)
    np.testing.assert_allclose(m["nll_loss"], -pc.sum() / nc.sum(), rtol=1e-5)


@pytest.mark.parametrize("kw, msg", [
    (dict(loss_type="dpo"), r"'dpo' is not a known loss; valid: aot, aot_unpaired, .*sigmoid"),
    (dict(loss_type="exo_pair"), r"exo_pair.*needs label_smoothing > 0"),
    (dict(loss_type="robust", label_smoothing=0.5), r"robust.*0 <= label_smoothing < 0.5"),
    (dict(label_smoothing=0.7), r"label_smoothing must lie in \[0, 0.5\]"),
    (dict(beta=0.0), r"beta must be > 0"),
    (dict(beta=-1.0), r"beta must be > 0"),
    (dict(loss_type=("sigmoid", "sft"), loss_weights=(1.0,)), r"one weight per loss_type"),
])
def test_bad_options_fail_when_read(kw, msg):
    with pytest.raises(ValueError, match=msg):
        L.LossConfig(**kw)


def test_a_combined_loss_logs_each_term():
    """loss/<name> for each configured loss (weighted) and nll_loss for RPO's term: they add up
    to the loss; a single loss logs none of them; a loss named twice is refused."""
    kw = dict(chosen_tokens=[3, 4], rejected_tokens=[2, 5], beta=0.2)
    args = ([-3.0, -5.0], [-4.0, -2.0], [-3.5, -4.5], [-3.8, -2.5])
    m = L.compute_metrics("sigmoid,sft", *args, loss_weights=(1.0, 0.5), rpo_alpha=0.3, **kw)
    parts = m["loss/sigmoid"] + m["loss/sft"] + m["nll_loss"]
    np.testing.assert_allclose(float(m["loss"]), float(parts), rtol=1e-6)
    np.testing.assert_allclose(float(m["loss/sft"]), 0.5 * 8.0 / 7.0, rtol=1e-6)  # NLL / token
    assert not any(k.startswith("loss/") for k in L.compute_metrics("sigmoid", *args, **kw))
    with pytest.raises(ValueError, match="names a loss twice"):
        L.LossConfig(loss_type="sigmoid,sigmoid")
