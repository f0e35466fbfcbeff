"""The inputs and options of a loss: ``PairLogps`` (per-pair log-probs and token counts),
the loss registry (``register``, ``LOSSES``) and ``LossConfig``, the validated loss options a
jitted step takes as a static argument. ``dpo_jax.losses`` holds the losses themselves and
re-exports these names."""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax

from dpo_jax import defaults

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# the losses f-DPO generalizes (TRL 1.16's list): the rest read the log-ratios themselves
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust",
                       "discopop", "sft")


class PairLogps(NamedTuple):
    """Per-pair inputs of a loss, each (B,)."""

    policy_chosen: jax.Array
    policy_rejected: jax.Array
    ref_chosen: jax.Array
    ref_rejected: jax.Array
    chosen_tokens: jax.Array
    rejected_tokens: jax.Array
    valid: jax.Array  # 1 for real pairs, 0 for padding pairs (eval); batch statistics ignore 0s
    weight: jax.Array | None = None  # WPO's per-pair weight (``use_weighting``); None = 1
    rejected_unlikely: jax.Array | None = None  # sum of log(1 - p) over rejected tokens
    # The policy's plain sums over each completion's tokens, where ``policy_*`` carry LD-DPO's
    # weighting (``ld_alpha`` < 1): the NLL terms and the reference-free losses read these, as
    # TRL's sft term reads the plain per-token log-probs. None = the same as ``policy_*``.
    plain_chosen: jax.Array | None = None
    plain_rejected: jax.Array | None = None

    def plain(self) -> "PairLogps":
        """These inputs with the policy's log-probs unweighted by LD-DPO."""
        if self.plain_chosen is None:
            return self
        return self._replace(policy_chosen=self.plain_chosen,
                             policy_rejected=self.plain_rejected)

    @property
    def dc(self):
        return self.policy_chosen - self.ref_chosen

    @property
    def dr(self):
        return self.policy_rejected - self.ref_rejected

    @property
    def h(self):
        return self.dc - self.dr


@dataclasses.dataclass(frozen=True)
class LossSpec:
    fn: Callable
    check: Callable | None  # LossConfig -> error message or None
    reference_free: bool    # the loss never reads the reference log-probs
    rewards: str = "ratio"  # metrics: "ratio" (vs the reference) or "policy_mean" (per token)
    metrics: Callable | None = None  # (x, o) -> {name: (B,) values}: the loss's own metrics


LOSSES: dict[str, LossSpec] = {}


def register(name: str, *, check=None, reference_free: bool = False, rewards: str = "ratio",
             metrics=None):
    """Decorator: ``@register("name")`` adds a loss ``fn(x: PairLogps, o: LossConfig) -> (B,)``.

    check(o) returns an error message when the options do not suit the loss (e.g. a smoothing
    outside its range), so bad settings fail when the config is read, not as a NaN inside jit.
    reference_free: the loss reads no reference log-probs. rewards: how rewards/* and logps/*
    are logged (see the module docstring). metrics(x, o): extra per-pair metrics of the loss.
    """
    if rewards not in ("ratio", "policy_mean"):
        raise ValueError(f"rewards={rewards!r}: 'ratio' or 'policy_mean'")

    def wrap(fn):
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = LossSpec(fn, check, reference_free, rewards, metrics)
        return fn
    return wrap


_D = defaults.config()


def _split_names(value) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(t.strip() for t in value.split(",") if t.strip())
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Validated loss options (hashable, so a jitted step can take it as a static argument).
    Defaults are configs/default.py's; the meanings are in its comments and the README."""

    loss_type: tuple[str, ...] = _split_names(_D.loss_type)
    loss_weights: tuple[float, ...] | None = None  # one weight per loss_type; None = all 1.0
    beta: float = _D.beta
    label_smoothing: float = _D.label_smoothing
    reference_free: bool = _D.reference_free  # take the reference log-ratios as 0
    rpo_alpha: float = _D.rpo_alpha           # > 0: add alpha * per-token NLL of chosen (RPO)
    simpo_gamma: float = _D.simpo_gamma       # SimPO's target reward margin
    discopop_tau: float = _D.discopop_tau     # DiscoPOP's temperature
    ld_alpha: float = _D.ld_alpha             # LD-DPO: weight of the verbose tail; 1 = off
    use_weighting: bool = _D.use_weighting    # WPO: weight pairs by the policy's probability
    f_divergence_type: str = _D.f_divergence_type  # f-DPO's divergence; reverse_kl = DPO's
    f_alpha_divergence_coef: float = _D.f_alpha_divergence_coef  # alpha of alpha_divergence
    token_metrics: bool = _D.token_metrics    # TRL's per-token metrics (logprobs.STATS)

    @classmethod
    def from_config(cls, config) -> "LossConfig":
        """The loss options of a run config; a bad value is an error naming its key."""
        weights = None
        if str(config.loss_weights).strip():
            try:
                weights = tuple(float(w) for w in str(config.loss_weights).split(","))
            except ValueError:
                raise ValueError(f"config key loss_weights={config.loss_weights!r}: expected "
                                 "comma-separated numbers, one per loss_type") from None
        return cls(loss_type=_split_names(config.loss_type), loss_weights=weights,
                   beta=config.beta, label_smoothing=config.label_smoothing,
                   reference_free=config.reference_free, rpo_alpha=config.rpo_alpha,
                   simpo_gamma=config.simpo_gamma, discopop_tau=config.discopop_tau,
                   ld_alpha=config.ld_alpha, use_weighting=config.use_weighting,
                   f_divergence_type=config.f_divergence_type,
                   f_alpha_divergence_coef=config.f_alpha_divergence_coef,
                   token_metrics=config.token_metrics)

    def __post_init__(self):
        import dpo_jax.losses  # noqa: F401 (registers the built-in losses)
        lt = _split_names(self.loss_type)
        object.__setattr__(self, "loss_type", lt)
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", tuple(float(w) for w in self.loss_weights))
        for name in lt:
            if name not in LOSSES:
                raise ValueError(f"loss_type {name!r} is not a known loss; valid: "
                                 f"{', '.join(sorted(LOSSES))}")
        if not lt:
            raise ValueError("loss_type is empty")
        if self.loss_weights is not None and len(self.loss_weights) != len(lt):
            raise ValueError(f"loss_weights {self.loss_weights} needs one weight per loss_type {lt}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing <= 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5], got {self.label_smoothing}")
        if self.rpo_alpha is None:
            object.__setattr__(self, "rpo_alpha", 0.0)
        if self.rpo_alpha < 0:
            raise ValueError(f"rpo_alpha must be >= 0, got {self.rpo_alpha}")
        for name in lt:
            msg = LOSSES[name].check and LOSSES[name].check(self)
            if msg:
                raise ValueError(f"loss_type {name!r}: {msg}")
        if not 0 <= self.ld_alpha <= 1:
            raise ValueError(f"ld_alpha must lie in [0, 1] (1 = no LD-DPO weighting), got "
                             f"{self.ld_alpha}")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"f_divergence_type {self.f_divergence_type!r}: valid values are "
                             f"{', '.join(F_DIVERGENCES)}")
        odd = [n for n in lt if n not in F_DIVERGENCE_LOSSES]
        if self.f_divergence_type != "reverse_kl" and odd:
            raise ValueError(f"f_divergence_type={self.f_divergence_type!r} applies to the losses "
                             f"built on the reward difference ({', '.join(F_DIVERGENCE_LOSSES)}), "
                             f"not {odd}")
        if self.use_weighting and {"aot", "aot_unpaired"} & set(lt):
            raise ValueError("use_weighting (WPO) does not apply to aot / aot_unpaired: they "
                             "sort the batch, which would misalign the per-pair weights")

    @property
    def needs_stats(self) -> bool:
        """Whether the policy's pass computes the per-token statistics (``logprobs.STATS``):
        for TRL's metrics, WPO's weights, or the unlikelihood loss."""
        return self.token_metrics or self.use_weighting or "unlikelihood" in self.loss_type

    @property
    def weights(self) -> tuple[float, ...]:
        return self.loss_weights or (1.0,) * len(self.loss_type)

    @property
    def rewards(self) -> str:
        """How rewards are logged: "policy_mean" only when every loss logs so (CPO / ORPO)."""
        return ("policy_mean" if all(LOSSES[n].rewards == "policy_mean" for n in self.loss_type)
                else "ratio")

    @property
    def needs_reference(self) -> bool:
        """Whether the step computes reference log-probs: for a loss that reads them, or for
        rewards logged against them (TRL computes the reference for ``sft`` too)."""
        if self.reference_free:
            return False
        return self.rewards == "ratio" or not all(LOSSES[n].reference_free
                                                 for n in self.loss_type)
