"""Goodput: how much of a run's wall time trains, and how fast the step runs against the
accelerator's peak.

- ``step_flops``: the model FLOPs of one update from the model contract and the shapes the step
  really computes (MaxText's and the bench's convention: matmuls only, full causal attention
  counted as full, the LM head over the positions the layout scores): 3x the policy forward
  (forward, backward to activations and to weights; 2x for LoRA / DoRA, whose frozen matrices
  get no weight gradient) + 1x the reference forward unless it is precomputed or not needed.
  Remat's recomputation is not model FLOPs and is not counted (so MFU falls with remat, as it
  should). ``bench/step_speed.py`` counts the same way (tests/test_goodput.py checks it).
- ``peak_flops``: the device's dense bfloat16 peak from ``PEAK_TFLOPS`` by its device kind, or
  config key ``peak_tflops``; none for a CPU (MFU is then not logged unless it is set).
- ``Clock``: seconds per phase of a run (compile, data, eval, checkpoint; the rest is the
  step); each logged step gets their shares since the last log, the summary the whole run's.
  "data" is the host's time drawing the next batch, which overlaps the device's step while
  the host keeps up.
"""

from __future__ import annotations

import contextlib
import time

import jax
import numpy as np
from flax import nnx

from dpo_jax import models

# dense bfloat16 TFLOP/s per device, by jax's device_kind (vendors' figures, without sparsity)
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.0, "NVIDIA H200": 989.4,
    "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100-SXM4-40GB": 312.0, "NVIDIA L4": 121.0,
    "NVIDIA B200": 2250.0, "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0,
    "TPU v5": 459.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0,
}


def matrix_params(model_cfg) -> tuple[int, int]:
    """(the blocks' matrix parameters a token runs through, the LM head's V x C), from the
    model's abstract shapes (nothing allocated): every stacked weight of two or more dims
    ((layers, in, out)), a mixture of experts' (layers, experts, in, out) counted for the
    ``num_experts_per_tok`` of its ``num_experts`` that each token uses."""
    family = models.family_of(model_cfg)

    def shapes():
        m = family.model_cls(model_cfg, rngs=nnx.Rngs(0))
        return nnx.to_pure_dict(nnx.state(m, nnx.Param)), m.head_weight()

    params, head = jax.eval_shape(shapes)
    active = (model_cfg.num_experts_per_tok / model_cfg.num_experts
              if getattr(model_cfg, "num_experts", 0) else 1.0)
    blocks = sum(int(np.prod(x.shape)) * (active if len(x.shape) == 4 else 1)
                 for x in jax.tree.leaves(params) if len(x.shape) >= 3)
    return int(blocks), int(np.prod(head.shape))


def forward_flops(model_cfg, rows: int, seq: int, head_positions: int) -> float:
    """Model FLOPs of one forward over rows x seq tokens, the LM head at ``head_positions``."""
    blocks, head = matrix_params(model_cfg)
    q = model_cfg.n_heads * model_cfg.head_size
    attention = 2 * 2 * rows * seq * seq * q * model_cfg.n_layers  # q.k and p.v
    return 2.0 * rows * seq * blocks + attention + 2.0 * head_positions * head


def step_flops(model_cfg, batch: dict, *, adapters: bool, reference: bool,
               processes: int = 1) -> float:
    """Model FLOPs of one update over ``batch`` (this process's micro-batches; times
    ``processes``): see the module docstring."""
    ids = batch["input_ids"]
    seq = ids.shape[-1]
    rows = ids.size // seq
    heads = batch["score_pos"].size if "score_pos" in batch else ids.size
    fwd = forward_flops(model_cfg, rows, seq, heads)
    passes = (2 if adapters else 3) + (1 if reference else 0)
    return passes * fwd * processes


def peak_flops(peak_tflops: float = 0.0) -> float | None:
    """The devices' summed peak FLOP/s: ``peak_tflops`` per device when set, else the table's
    figure for this device kind; None when unknown (a CPU)."""
    per = peak_tflops or PEAK_TFLOPS.get(jax.devices()[0].device_kind)
    return per * 1e12 * jax.device_count() if per else None


class Clock:
    """Wall seconds per loop phase, since the last ``shares()`` and over the whole run."""

    PHASES = ("compile", "data", "eval", "checkpoint")

    def __init__(self):
        self.start = self.mark = time.perf_counter()
        self.since = dict.fromkeys(self.PHASES, 0.0)
        self.total = dict.fromkeys(self.PHASES, 0.0)

    @contextlib.contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t
            self.since[name] += dt
            self.total[name] += dt

    def shares(self) -> dict:
        """Each phase's share of the wall time since the last call; the step's is the rest."""
        now = time.perf_counter()
        wall, self.mark = max(now - self.mark, 1e-9), now
        out = {f"goodput/{k}_share": v / wall for k, v in self.since.items()}
        out["goodput/step_share"] = max(0.0, 1.0 - sum(self.since.values()) / wall)
        self.since = dict.fromkeys(self.PHASES, 0.0)
        return out

    def summary(self) -> dict:
        wall = max(time.perf_counter() - self.start, 1e-9)
        out = {f"{k}_s": round(v, 3) for k, v in self.total.items()}
        out.update(wall_s=round(wall, 3),
                   step_share=round(max(0.0, 1 - sum(self.total.values()) / wall), 4))
        return out
