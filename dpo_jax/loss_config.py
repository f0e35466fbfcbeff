"""The inputs and options of a loss: ``PairLogps`` (per-pair log-probs and token counts),
the loss registry (``register``, ``LOSSES``) and ``LossConfig``, the validated loss options a
jitted step takes as a static argument. ``dpo_jax.losses`` holds the losses themselves and
re-exports these names."""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax

from dpo_jax import keys as K

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
class Option:
    """A config key a loss adds (``register(..., options={"name": Option(...)})``)."""

    default: object
    doc: str
    check: Callable | None = None  # (key, value): raises ConfigError naming the key


@dataclasses.dataclass(frozen=True)
class LossSpec:
    fn: Callable
    check: Callable | None  # LossConfig -> error message or None
    reference_free: bool    # the loss never reads the reference log-probs
    rewards: str = "ratio"  # metrics: "ratio" (vs the reference) or "policy_mean" (per token)
    metrics: Callable | None = None  # (x, o) -> {name: (B,) values}: the loss's own metrics
    options: dict = dataclasses.field(default_factory=dict)  # its own config keys: {name: Option}


LOSSES: dict[str, LossSpec] = {}


def registered_options() -> dict[str, Option]:
    """Every option the registered losses add, by key."""
    return {k: v for spec in LOSSES.values() for k, v in spec.options.items()}


def option_keys() -> tuple[str, ...]:
    return tuple(registered_options())


def register(name: str, *, check=None, reference_free: bool = False, rewards: str = "ratio",
             metrics=None, options: dict | None = None):
    """Decorator: ``@register("name")`` adds a loss ``fn(x: PairLogps, o: LossConfig) -> (B,)``.

    check(o) returns an error message when the options do not suit the loss (e.g. a smoothing
    outside its range), so bad settings fail when the config is read, not as a NaN inside jit.
    reference_free: the loss reads no reference log-probs. rewards: how rewards/* and logps/*
    are logged (see the module docstring). metrics(x, o): extra per-pair metrics of the loss.
    options: config keys of the loss's own, {name: Option}: ``--config.name=...`` sets one and
    the loss reads it as ``o.name``; a resume must keep it.
    """
    if rewards not in ("ratio", "policy_mean"):
        raise ValueError(f"rewards={rewards!r}: 'ratio' or 'policy_mean'")

    def wrap(fn):
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        taken = set(registered_options()) | {f.name for f in dataclasses.fields(LossConfig)}
        clash = sorted(set(options or {}) & taken)
        if clash:
            raise ValueError(f"loss {name!r}: options {clash} are config keys already")
        LOSSES[name] = LossSpec(fn, check, reference_free, rewards, metrics, dict(options or {}))
        return fn
    return wrap


def _split_names(value) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(t.strip() for t in value.split(",") if t.strip())
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """loss (dpo_jax/losses.py)

    Validated loss options (hashable, so a jitted step can take it as a static argument). A loss
    may register options of its own (``register(..., options=...)``): they are config keys too,
    and read as attributes (``o.my_option``) from ``options``."""

    loss_type: tuple[str, ...] = K.key(("sigmoid",), "a registered loss, or several: "
                                       "\"sigmoid,sft\"", resume=True, cli="sigmoid")
    loss_weights: tuple[float, ...] | None = K.key(
        None, "comma-separated weights for several losses; \"\" = all 1", resume=True, cli="")
    beta: float = K.key(0.1, "the KL strength beta (ORPO's lambda)", resume=True)
    label_smoothing: float = K.key(0.0, "e: label-noise rate (cDPO for sigmoid, unlike TRL "
                                   "1.16; rDPO, EXO)", resume=True)
    reference_free: bool = K.key(False, "take the reference log-ratios as 0", K.flag,
                                 resume=True)
    rpo_alpha: float = K.key(0.0, "> 0 adds alpha * per-token NLL of chosen (RPO); 0 = off",
                             resume=True)
    simpo_gamma: float = K.key(0.5, "SimPO's target margin", K.number(), resume=True)
    discopop_tau: float = K.key(0.05, "DiscoPOP's temperature", K.number(0, open_low=True),
                                resume=True)
    ld_alpha: float = K.key(1.0, "LD-DPO: weight of each completion's tokens past the shorter's "
                            "length (TRL's ld_alpha; 1 = no weighting, TRL's None)", resume=True)
    use_weighting: bool = K.key(False, "WPO: weight each pair by the policy's per-token "
                                "probability", K.flag, resume=True)
    f_divergence_type: str = K.key("reverse_kl", "f-DPO: reverse_kl (DPO) / forward_kl / "
                                   "js_divergence / alpha_divergence", resume=True)
    f_alpha_divergence_coef: float = K.key(0.5, "alpha of alpha_divergence", K.number(),
                                           resume=True)
    token_metrics: bool = K.key(True, "log TRL's entropy, logits/*, mean_token_accuracy (about "
                                "5% of a CPU step at GPT-2 small; False skips them where no loss "
                                "option needs the pass)", K.flag, resume=True)
    router_aux_loss_coef: float = K.key(0.0, "mixture-of-experts: adds this x the router's "
                                        "load-balancing loss of the policy (logged aux_loss); "
                                        "0 = off", K.number(0.0), resume=True)
    options: tuple = ()  # (name, value) of the options the losses registered

    @classmethod
    def from_config(cls, config) -> "LossConfig":
        """The loss options of a run config (a mapping of config keys, as a config file spells
        them); a bad value is an error naming its key."""
        weights = None
        if str(config["loss_weights"]).strip():
            try:
                weights = tuple(float(w) for w in str(config["loss_weights"]).split(","))
            except ValueError:
                raise ValueError(f"config key loss_weights={config['loss_weights']!r}: expected "
                                 "comma-separated numbers, one per loss_type") from None
        names = [f.name for f in K.fields(cls) if f.name not in ("loss_type", "loss_weights")]
        options = tuple((n, config[n]) for n in option_keys() if n in config)
        return cls(loss_type=_split_names(config["loss_type"]), loss_weights=weights,
                   options=options, **{n: config[n] for n in names})

    def __getattr__(self, name):
        for k, v in object.__getattribute__(self, "options"):
            if k == name:
                return v
        spec = registered_options().get(name)
        if spec is not None:  # an option left at its default
            return spec.default
        raise AttributeError(name)

    def __post_init__(self):
        K.check_fields(self)
        for key_name, value in self.options:
            spec = registered_options().get(key_name)
            if spec is not None and spec.check is not None:
                spec.check(key_name, value)
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
        if len(set(lt)) < len(lt):
            raise ValueError(f"loss_type {','.join(lt)!r} names a loss twice (weigh it with "
                             "loss_weights instead)")
        if self.loss_weights is not None and len(self.loss_weights) != len(lt):
            raise ValueError(f"loss_weights {self.loss_weights} needs one weight per loss_type {lt}")
        if self.loss_weights is not None and any(not w >= 0 for w in self.loss_weights):
            raise ValueError(f"loss_weights {self.loss_weights}: a weight must be >= 0 (a "
                             "negative one trains toward the rejected completions)")
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
