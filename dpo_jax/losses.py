"""The preference-loss family: one small pure function per variant, registered by name.

Inputs are the summed completion log-probs from ``logprobs.sequence_logprobs`` and the token
counts. Notation used in the docstrings:

    pc, pr  policy log-prob of the chosen / rejected completion (summed over its tokens)
    rc, rr  reference log-probs of the same (0 when ``reference_free``)
    Dc = pc - rc,  Dr = pr - rr,  h = Dc - Dr,  e = label_smoothing,  |y| = token count,
    s = sigmoid,  log s = log-sigmoid (computed stably: no overflow at any margin)

A loss is ``fn(x: PairLogps, o: LossConfig) -> (B,) per-pair losses``. Rewards and metrics are
computed once, for every loss, in ``compute`` and ``metrics``, with TRL's names and meanings:
by default (``rewards="ratio"``, TRL's DPOTrainer) rewards are beta times the log-ratio against
the reference and ``logps/*`` summed log-probs, the reference being computed for them even when
the loss needs none (``sft``); reference-free preference losses (``rewards="policy_mean"``,
SimPO and ORPO, TRL's CPO/ORPO trainers) log beta times the policy's per-token mean log-prob and
per-token means as ``logps/*``. A loss may add its own metrics (ORPO's log-odds). To add a loss::

    @register("my_loss")
    def my_loss(x, o):
        return -jax.nn.log_sigmoid(o.beta * x.h) ** 2

after which ``--config.loss_type=my_loss`` uses it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dpo_jax.loss_config import (  # noqa: F401 (re-exported: losses.LossConfig, ...)
    F_DIVERGENCE_LOSSES, F_DIVERGENCES, LOSSES, LossConfig, LossSpec, Option, PairLogps,
    register)

log_sigmoid = jax.nn.log_sigmoid
sigmoid = jax.nn.sigmoid


# ============================================================================== helpers

def f_divergence_scores(d, o):
    """f'(pi/pi_ref) as a function of the log-ratio d (f-DPO, Wang et al. 2023, arXiv
    2309.16240; TRL's forms): reverse KL: d; forward KL: 1 - exp(-d); Jensen-Shannon:
    log 2 + log s(d); alpha-divergence: (exp((a - 1) d) - 1) / (a - 1), its exponent clamped
    at 80 as TRL does, and d itself at a = 1."""
    kind, a = o.f_divergence_type, o.f_alpha_divergence_coef
    if kind == "forward_kl":
        return 1 - jnp.exp(-d)
    if kind == "js_divergence":
        return math.log(2) + log_sigmoid(d)
    if kind == "alpha_divergence" and abs(a - 1.0) >= 1e-6:
        return (jnp.exp(jnp.minimum((a - 1.0) * d, 80.0)) - 1.0) / (a - 1.0)
    return d


def _smoothed(z, e):
    """-(1-e) log s(z) - e log s(-z): the conservative-DPO form of a logistic loss."""
    return -(1 - e) * log_sigmoid(z) - e * log_sigmoid(-z)


def _chosen_nll(x: PairLogps):
    """Per-pair values whose valid-weighted batch mean is the token-weighted NLL of the chosen
    completions, sum(-pc) / sum(|yc|), as a language-model loss over those tokens would be."""
    v = x.valid
    mean_tokens = jnp.sum(x.chosen_tokens * v) / jnp.maximum(jnp.sum(v), 1)
    return -x.policy_chosen / jnp.maximum(mean_tokens, 1)


def _sort_valid(a, valid):
    """Batch sort with padding pairs sent to the end (as +inf would be) so they pair only with each
    other in AOT's sorted matching."""
    big = jnp.finfo(a.dtype).max
    return jnp.sort(jnp.where(valid > 0, a, big))


# ============================================================================== losses

@register("sigmoid")
def sigmoid_loss(x, o):
    """DPO (Rafailov et al. 2023, arXiv 2305.18290): -(1-e) log s(beta h) - e log s(-beta h).
    e > 0 is conservative DPO (cDPO, Mitchell 2023), robust to flipped labels with rate e."""
    return _smoothed(o.beta * x.h, o.label_smoothing)


@register("sigmoid_norm")
def sigmoid_norm(x, o):
    """Length-normalized DPO (TRL's sigmoid_norm; the per-token log-ratios of SimPO with DPO's
    reference, cf. LN-DPO in Meng et al. 2024, arXiv 2405.14734): -log s(beta (Dc/|yc| - Dr/|yr|))."""
    return -log_sigmoid(o.beta * (x.dc / x.chosen_tokens - x.dr / x.rejected_tokens))


@register("robust", check=lambda o: None if o.label_smoothing < 0.5 else
          "needs 0 <= label_smoothing < 0.5")
def robust(x, o):
    """rDPO (Chowdhury et al. 2024, arXiv 2403.00409): an unbiased loss under label noise e,
    [-(1-e) log s(beta h) + e log s(-beta h)] / (1 - 2e)."""
    e, z = o.label_smoothing, o.beta * x.h
    return (-(1 - e) * log_sigmoid(z) + e * log_sigmoid(-z)) / (1 - 2 * e)


@register("hinge")
def hinge(x, o):
    """SLiC-HF (Zhao et al. 2023, arXiv 2305.10425): relu(1 - beta h)."""
    return jax.nn.relu(1 - o.beta * x.h)


@register("ipo")
def ipo(x, o):
    """IPO (Azar et al. 2023, arXiv 2310.12036): (Dc/|yc| - Dr/|yr| - 1/(2 beta))^2, with the
    log-ratios averaged over tokens as the IPO authors specify."""
    h = x.dc / x.chosen_tokens - x.dr / x.rejected_tokens
    return (h - 1 / (2 * o.beta)) ** 2


@register("exo_pair", check=lambda o: None if 0 < o.label_smoothing < 1 else
          "needs label_smoothing > 0 (it is the e of log e; the EXO paper uses 1e-3)")
def exo_pair(x, o):
    """EXO (Ji et al. 2024, arXiv 2402.00856), pairwise: the reverse KL from the policy's
    preference distribution to the smoothed label:
    s(beta h)[log s(beta h) - log(1-e)] + s(-beta h)[log s(-beta h) - log e]."""
    z, e = o.beta * x.h, o.label_smoothing
    return (sigmoid(z) * (log_sigmoid(z) - math.log1p(-e))
            + sigmoid(-z) * (log_sigmoid(-z) - math.log(e)))


@register("nca_pair")
def nca_pair(x, o):
    """NCA (Chen et al. 2024, arXiv 2402.05369), pairwise:
    -log s(beta Dc) - 1/2 log s(-beta Dc) - 1/2 log s(-beta Dr)."""
    zc, zr = o.beta * x.dc, o.beta * x.dr
    return -log_sigmoid(zc) - 0.5 * log_sigmoid(-zc) - 0.5 * log_sigmoid(-zr)


@register("bco_pair")
def bco_pair(x, o):
    """BCO (Jung et al. 2024, arXiv 2404.04656), pairwise, without the running reward shift:
    -log s(beta Dc) - log s(-beta Dr)."""
    return -log_sigmoid(o.beta * x.dc) - log_sigmoid(-o.beta * x.dr)


@register("sppo_hard")
def sppo_hard(x, o):
    """SPPO (Wu et al. 2024, arXiv 2405.00675) with hard win-probabilities 1 and 0:
    (Dc - 1/(2 beta))^2 + (Dr + 1/(2 beta))^2."""
    return (x.dc - 0.5 / o.beta) ** 2 + (x.dr + 0.5 / o.beta) ** 2


@register("aot")
def aot(x, o):
    """AOT (Melnyk et al. 2024, arXiv 2406.05882), paired: distributional dominance through sorted
    batch statistics. d = sort_batch(pc - pr) - sort_batch(rc - rr);
    -(1-e) log s(beta d) - e log s(-beta d)."""
    d = (_sort_valid(x.policy_chosen - x.policy_rejected, x.valid)
         - _sort_valid(x.ref_chosen - x.ref_rejected, x.valid))
    return _smoothed(o.beta * d, o.label_smoothing) * (jnp.sort(x.valid)[::-1] > 0)


@register("aot_unpaired")
def aot_unpaired(x, o):
    """AOT, unpaired: d = sort_batch(Dc) - sort_batch(Dr); same form as ``aot``."""
    d = _sort_valid(x.dc, x.valid) - _sort_valid(x.dr, x.valid)
    return _smoothed(o.beta * d, o.label_smoothing) * (jnp.sort(x.valid)[::-1] > 0)


@register("apo_zero")
def apo_zero(x, o):
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266), for chosen better than the model:
    1 - s(beta Dc) + s(beta Dr)."""
    return 1 - sigmoid(o.beta * x.dc) + sigmoid(o.beta * x.dr)


@register("apo_down")
def apo_down(x, o):
    """APO-down (arXiv 2408.06266), for chosen worse than the model: s(beta Dc) + 1 - s(beta h)."""
    return sigmoid(o.beta * x.dc) + 1 - sigmoid(o.beta * x.h)


@register("discopop")
def discopop(x, o):
    """DiscoPOP (Chris Lu et al. 2024, arXiv 2406.08414), the log-ratio modulated loss:
    z = beta h: (1 - s(z/tau)) (-log s(z)) + s(z/tau) exp(-z).
    The second term is computed as exp(log s(z/tau) - z), finite at any z."""
    z = o.beta * x.h
    tau = o.discopop_tau
    return (1 - sigmoid(z / tau)) * -log_sigmoid(z) + jnp.exp(log_sigmoid(z / tau) - z)


@register("simpo", reference_free=True, rewards="policy_mean")
def simpo(x, o):
    """SimPO (Meng et al. 2024, arXiv 2405.14734), reference-free, length-normalized:
    -log s(beta (pc/|yc| - pr/|yr|) - gamma) (with e > 0, the smoothed form)."""
    z = o.beta * (x.policy_chosen / x.chosen_tokens - x.policy_rejected / x.rejected_tokens)
    return _smoothed(z - o.simpo_gamma, o.label_smoothing)


def _log_odds(mean_logp):
    """log(p / (1 - p)) for p = exp(mean_logp) <= 1, stably: mean_logp - log(-expm1(mean_logp))."""
    m = jnp.minimum(mean_logp, -1e-6)  # p = 1 exactly would be infinite odds
    return m - jnp.log(-jnp.expm1(m))


def _orpo_metrics(x, o):
    """TRL's ORPOTrainer extras: nll_loss, log_odds_ratio = log s(lor), log_odds_chosen = lor."""
    lor = _orpo_log_odds(x)
    return {"nll_loss": _chosen_nll(x), "log_odds_ratio": log_sigmoid(lor), "log_odds_chosen": lor}


def _orpo_log_odds(x):
    return (_log_odds(x.policy_chosen / x.chosen_tokens)
            - _log_odds(x.policy_rejected / x.rejected_tokens))


@register("orpo", reference_free=True, rewards="policy_mean", metrics=_orpo_metrics)
def orpo(x, o):
    """ORPO (Hong et al. 2024, arXiv 2403.07691), reference-free: NLL(chosen, per token)
    - lambda log s(log odds(yc) - log odds(yr)), odds from per-token mean log-probs.
    lambda is beta, as in TRL's ORPOConfig."""
    return _chosen_nll(x) - o.beta * log_sigmoid(_orpo_log_odds(x))


@register("unlikelihood", reference_free=True)
def unlikelihood(x, o):
    """Unlikelihood training (Welleck et al. 2019, arXiv 1908.04319), the DPO paper's baseline:
    raise the chosen completion's likelihood and push each rejected token's probability down,
    NLL(chosen) - alpha sum_t log(1 - p(yr_t)), both token-weighted over the batch; alpha is
    beta. Needs the per-token sums of the trainer's pass (``logprobs.STATS``: ``unlikely``)."""
    if x.rejected_unlikely is None:
        raise ValueError("loss_type 'unlikelihood' needs rejected_unlikely, the sums of "
                         "log(1 - p) over rejected tokens (the trainer's pass computes them)")
    v = x.valid
    mean_tokens = jnp.sum(x.rejected_tokens * v) / jnp.maximum(jnp.sum(v), 1)
    return _chosen_nll(x) - o.beta * x.rejected_unlikely / jnp.maximum(mean_tokens, 1)


@register("sft", reference_free=True)
def sft(x, o):
    """Supervised fine-tuning on the chosen completions: their NLL, token-weighted over the batch."""
    return _chosen_nll(x)


# ============================================================================== entry points

def _prepared(x: PairLogps, o: LossConfig):
    """(x, scored, plain): the inputs with token counts clamped and the reference zeroed where
    reference-free; the log-ratios as f-DPO scores; the policy's log-probs without LD-DPO's
    weighting."""
    # Padding pairs have 0 tokens; a 0/0 there would be a NaN that no weight of 0 removes.
    x = x._replace(chosen_tokens=jnp.maximum(x.chosen_tokens, 1),
                   rejected_tokens=jnp.maximum(x.rejected_tokens, 1))
    if o.reference_free:
        x = x._replace(ref_chosen=jnp.zeros_like(x.ref_chosen),
                       ref_rejected=jnp.zeros_like(x.ref_rejected))
    scored = x
    if o.f_divergence_type != "reverse_kl":  # the log-ratios become f'(ratio) scores
        scored = x._replace(policy_chosen=f_divergence_scores(x.dc, o),
                            policy_rejected=f_divergence_scores(x.dr, o),
                            ref_chosen=jnp.zeros_like(x.dc), ref_rejected=jnp.zeros_like(x.dr))
    # LD-DPO weighs the log-ratios only: the NLL terms (sft, RPO) and the reference-free losses
    # (SimPO, ORPO: TRL's CPO / ORPO trainers have no ld_alpha) see the plain log-probs
    return x, scored, x.plain()


def loss_terms(x: PairLogps, o: LossConfig) -> dict:
    """{loss name: its weighted per-pair values (B,)} of the configured losses, and RPO's NLL
    term under ``nll_loss`` (ORPO's name for it in TRL)."""
    return _terms(*_prepared(x, o), o)


def _terms(x, scored, plain, o) -> dict:
    terms = {name: w * LOSSES[name].fn(plain if LOSSES[name].reference_free else scored, o)
             for name, w in zip(o.loss_type, o.weights)}
    if o.rpo_alpha:
        terms["nll_loss"] = o.rpo_alpha * _chosen_nll(plain)
    return terms


def pair_losses(x: PairLogps, o: LossConfig):
    """(losses, chosen_rewards, rejected_rewards), each (B,): the weighted sum of the configured
    losses (+ RPO's NLL term), and the rewards: the implicit rewards beta * Dc, beta * Dr, or for
    CPO / ORPO-style losses beta times the policy's per-token mean log-probs."""
    x, scored, plain = _prepared(x, o)
    terms = _terms(x, scored, plain, o)
    losses = sum(terms[name] for name in o.loss_type)
    if o.use_weighting and x.weight is not None:  # WPO (Zhou et al. 2024, arXiv 2406.11827)
        losses = losses * x.weight
    if o.rpo_alpha:
        losses = losses + terms["nll_loss"]
    if o.rewards == "policy_mean":  # TRL's CPO / ORPO trainers
        return (losses, o.beta * plain.policy_chosen / x.chosen_tokens,
                o.beta * plain.policy_rejected / x.rejected_tokens)
    return losses, o.beta * x.dc, o.beta * x.dr


def _inputs(loss_type, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
            ref_rejected_logps, *, chosen_tokens, rejected_tokens, beta, label_smoothing=0.0,
            valid=None, weight=None, rejected_unlikely=None, **options):
    o = LossConfig(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, **options)
    pc = jnp.asarray(policy_chosen_logps)
    x = PairLogps(pc, jnp.asarray(policy_rejected_logps), jnp.asarray(ref_chosen_logps),
                  jnp.asarray(ref_rejected_logps), jnp.asarray(chosen_tokens, pc.dtype),
                  jnp.asarray(rejected_tokens, pc.dtype),
                  jnp.ones_like(pc) if valid is None else jnp.asarray(valid, pc.dtype),
                  None if weight is None else jnp.asarray(weight, pc.dtype),
                  None if rejected_unlikely is None else jnp.asarray(rejected_unlikely, pc.dtype))
    return x, o


def compute(loss_type, *args, **kwargs):
    """(losses, chosen_rewards, rejected_rewards), each (B,), from the per-pair log-probs
    (policy chosen, policy rejected, reference chosen, reference rejected) and token counts.
    Keywords: chosen_tokens, rejected_tokens, beta, label_smoothing, valid, weight (WPO's
    per-pair weight, applied when ``use_weighting``), rejected_unlikely (the unlikelihood loss's
    sums of log(1 - p) over rejected tokens), and the other
    LossConfig fields (loss_weights, reference_free, rpo_alpha, simpo_gamma, discopop_tau)."""
    return pair_losses(*_inputs(loss_type, *args, **kwargs))


def compute_metrics(loss_type, *args, **kwargs) -> dict:
    """The metrics the trainer logs for these inputs (the arguments of ``compute``)."""
    x, o = _inputs(loss_type, *args, **kwargs)
    return metrics(x, o, *pair_losses(x, o))


def token_metrics(chosen: dict, rejected: dict, valid) -> dict:
    """TRL's per-token metrics from the policy's per-completion sums (``logprobs.STATS``),
    token-weighted over the valid pairs: the mean entropy of the next-token distribution over
    all completion tokens, the mean logit over the vocabulary on chosen and on rejected tokens,
    and the share of chosen tokens that are the argmax (``mean_token_accuracy``)."""
    tot = lambda d, k: jnp.sum(d[k] * valid)
    per = lambda num, den: num / jnp.maximum(den, 1)
    nc, nr = tot(chosen, "tokens"), tot(rejected, "tokens")
    return {"entropy": per(tot(chosen, "entropy") + tot(rejected, "entropy"), nc + nr),
            "logits/chosen": per(tot(chosen, "mean_logits"), nc),
            "logits/rejected": per(tot(rejected, "mean_logits"), nr),
            "mean_token_accuracy": per(tot(chosen, "top1"), nc)}


def metrics(x: PairLogps, o: LossConfig, losses, chosen_rewards, rejected_rewards) -> dict:
    """TRL's names and meanings, means over the valid pairs. Accuracy is strict (0 at step 0).
    ``logps/*`` are summed log-probs, or per-token means where TRL's CPO / ORPO log those."""
    v, given = x.valid, x
    mean = lambda a: jnp.sum(a * v) / jnp.maximum(jnp.sum(v), 1)
    lc, lr = x.policy_chosen, x.policy_rejected  # LD-weighted, as TRL's DPOTrainer logs them
    if o.rewards == "policy_mean":
        lc, lr = x.plain().policy_chosen, x.plain().policy_rejected
        lc, lr = lc / jnp.maximum(x.chosen_tokens, 1), lr / jnp.maximum(x.rejected_tokens, 1)
    out = {
        "loss": mean(losses),
        "rewards/chosen": mean(chosen_rewards),
        "rewards/rejected": mean(rejected_rewards),
        "rewards/margins": mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": mean((chosen_rewards > rejected_rewards).astype(losses.dtype)),
        "logps/chosen": mean(lc),
        "logps/rejected": mean(lr),
    }
    x = x.plain()._replace(chosen_tokens=jnp.maximum(x.chosen_tokens, 1),
                           rejected_tokens=jnp.maximum(x.rejected_tokens, 1))
    for name in o.loss_type:
        if LOSSES[name].metrics is not None:
            out.update({k: mean(val) for k, val in LOSSES[name].metrics(x, o).items()})
    if len(o.loss_type) > 1 or o.rpo_alpha:  # each term of a combined loss, weighted
        out.update({(k if k == "nll_loss" else f"loss/{k}"): mean(v)
                    for k, v in loss_terms(given, o).items()})
    return out
