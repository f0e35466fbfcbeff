"""How preference pairs become rows of tokens, and how their log-probs come back out.

A layout owns both directions: ``collate`` (numpy, on the host) lays the pairs of a batch out as
fixed-shape rows, and ``logps`` (inside the jitted step) runs the model over those rows with the
layout's positions and attention and returns, for the chosen and for the rejected completion of
each pair, sums over its tokens (``logprobs.columns``): log-probs, token count, the log-probs of
its verbose tail (the tokens past the shorter completion's length: LD-DPO) and, on request, the
per-token statistics of TRL's metrics and WPO. The step asks the layout; it never looks at
which keys a batch holds.

- ``pair``: two rows per pair, [prompt | chosen | pad] and [prompt | rejected | pad]; chosen rows
  first, then rejected rows, so one forward scores both.
- ``prefix_sharing``: one row per pair, [prompt | chosen | rejected | pad]: the prompt runs once.
  The rejected tokens continue the prompt's positions and attend to the prompt and themselves,
  never to the chosen tokens; the rejected completion's first token is scored from the prompt's
  last position (Wang & Hegde 2024, arXiv 2410.20305).

With a scoring window W > 0 (``max_completion_length``; prefix sharing needs one) a batch also
carries ``score_pos``, ``score_label``, ``score_mask`` of shape (rows, k, W): for each of the k
completions of a row, the positions whose hidden states score its tokens, so the LM head runs
only there (``logprobs.features_at``). Without one (pair only), the head runs over every
position and ``loss_mask`` selects the scored tokens. ``dpo_jax/packing.py`` puts several pairs'
units in a row (each layout says what its units are and how they attend: ``units``,
``packed_mask``).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from dpo_jax import keys as K
from dpo_jax.errors import DpoError
from dpo_jax.logprobs import columns, features_at, features_from_hidden
from dpo_jax.models.attention import Mask, Rule

# batch keys whose second axis is the sequence (padded when micro-batches differ in length),
# with the value that pads them
SEQUENCE_FILL = {"input_ids": None, "attention_mask": 0, "loss_mask": 0, "position_ids": 0,
                 "segment_ids": -1, "unit_ids": -1, "tail_mask": 0}


class LayoutError(DpoError, ValueError):
    """A layout that cannot hold the data or does not exist (names the config key)."""


def tail_start(c: int, r: int) -> int:
    """Where a completion's verbose tail starts: the shorter completion's length (LD-DPO)."""
    return min(c, r)


def by_column(f, stats: bool) -> dict:
    """{column name: f[..., i]} for the sums the logprobs reductions return."""
    return {name: f[..., i] for i, name in enumerate(columns(stats))}


def split_columns(f, stats: bool, pair_blocks: int = 1) -> tuple[dict, dict]:
    """(2B, F) per-row sums, rows in [chosen; rejected] blocks -> (chosen, rejected) dicts."""
    c, r = {}, {}
    for name, v in by_column(f, stats).items():
        c[name], r[name] = split_pairs(v, pair_blocks)
    return c, r


def split_pairs(x, pair_blocks: int = 1):
    """(2B,) per-row values -> (chosen (B,), rejected (B,)).

    Rows come in ``pair_blocks`` blocks of [chosen rows; rejected rows]: one block per process,
    whose block is the batch it loaded.
    """
    x = x.reshape(pair_blocks, 2, -1)
    return x[:, 0].reshape(-1), x[:, 1].reshape(-1)


class Layout:
    name = ""
    rows_per_pair = 1
    mask_form = "dense"  # the compact form of its attention mask a fused kernel takes

    def __init__(self, window: int = 0):
        self.window = int(window)  # the static completion window W; 0 = head on every position

    def __repr__(self):
        return f"{type(self).__name__}(window={self.window})"

    # ---- host side
    def pair_tokens(self, p: int, c: int, r: int) -> int:
        """Positions one pair of (prompt, chosen, rejected) lengths needs in a row."""
        raise NotImplementedError

    def row_length(self, max_length: int) -> int:
        """The longest row, given max_length (prompt + the longer completion)."""
        return max_length

    def real_tokens(self, p: int, c: int, r: int) -> int:
        """The non-padding positions a pair fills (for padding statistics)."""
        raise NotImplementedError

    def batch_rows(self, batch_size: int) -> int:
        """Rows of one batch of ``batch_size`` pairs."""
        return self.rows_per_pair * batch_size

    def collate(self, prompts, chosens, rejecteds, batch_size: int, length: int,
                pad_id: int) -> dict:
        """Numpy arrays of one batch of ``len(prompts) <= batch_size`` pairs, rows padded to
        ``length``; missing pairs (an eval batch's tail) leave empty rows."""
        raise NotImplementedError

    # ---- device side (inside jit)
    def logps(self, model, batch, *, chunk_size: int, pair_blocks: int = 1,
              stats: bool = False) -> tuple[dict, dict]:
        """(chosen, rejected): each {column: (B,)} of sums over the completion's tokens
        (``logprobs.columns(stats)``)."""
        raise NotImplementedError

    def _score_arrays(self, n_rows: int, k: int):
        w = self.window
        return tuple(np.zeros((n_rows, k, w), np.int32) for _ in range(4))


class Pair(Layout):
    name = "pair"
    rows_per_pair = 2
    mask_form = "lengths"
    packed_mask_form = "segments"  # packed, each unit is a causal segment

    def units(self, pair, p, c, r) -> list[tuple]:
        """A pair's packing units (``packing.Packed``): (pair, prompt, [(side, completion)]):
        here two sequences, prompt + chosen and prompt + rejected."""
        return [(pair, p, [(0, c)]), (pair, p, [(1, r)])]

    def packed_mask(self, batch) -> Mask:
        return Mask.segments(batch["unit_ids"], batch["attention_mask"])

    def pair_tokens(self, p, c, r):
        return p + max(c, r)

    def real_tokens(self, p, c, r):
        return 2 * p + c + r

    def collate(self, prompts, chosens, rejecteds, batch_size, length, pad_id):
        b = batch_size
        ids = np.full((2 * b, length), pad_id, np.int32)
        attn = np.zeros((2 * b, length), np.int32)
        loss = np.zeros((2 * b, length), np.int32)
        tail = np.zeros((2 * b, length), np.int32)
        if self.window:
            pos, label, mask, stail = self._score_arrays(2 * b, 1)
        for i, (p, c, r) in enumerate(zip(prompts, chosens, rejecteds)):
            shared = tail_start(len(c), len(r))
            for j, comp in ((i, c), (b + i, r)):
                n = len(p) + len(comp)
                ids[j, :len(p)] = p
                ids[j, len(p):n] = comp
                attn[j, :n] = 1
                loss[j, len(p):n] = 1
                tail[j, len(p) + shared:n] = 1
                if self.window:  # completion token t is scored by the hidden state at t - 1
                    pos[j, 0, :len(comp)] = np.arange(len(p) - 1, n - 1)
                    label[j, 0, :len(comp)] = comp
                    mask[j, 0, :len(comp)] = 1
                    stail[j, 0, shared:len(comp)] = 1
        batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}
        if self.window:
            batch.update(score_pos=pos, score_label=label, score_mask=mask, score_tail=stail)
        else:
            batch["tail_mask"] = tail
        return batch

    def logps(self, model, batch, *, chunk_size, pair_blocks=1, stats=False):
        mask = Mask.causal_padded(batch["attention_mask"])  # rows are right-padded
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], attn_mask=mask)
        if not self.window:  # the LM head over every position, masked
            f = features_from_hidden(hidden, model.logits_fn(), batch["input_ids"],
                                     batch["loss_mask"], batch["tail_mask"], chunk_size, stats)
        else:
            f = features_at(hidden, model.logits_fn(), batch["score_pos"],
                            batch["score_label"], batch["score_mask"], batch["score_tail"],
                            chunk_size, stats)[:, 0]
        return split_columns(f, stats, pair_blocks)


def prefix_sharing_mask(attention_mask, segment_ids, unit_ids=None) -> Mask:
    """Attention for rows of prompt (0) + chosen (1) + rejected (2) segments: causal,
    no padding, and rejected queries never see chosen keys (so each completion sees exactly the
    prompt and itself, as in its own sequence). With ``unit_ids`` (packed rows: which sequence
    or triple a token belongs to), attention also stays within its unit: block-diagonal."""
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))[None]
    keys = attention_mask.astype(bool)[:, None, :]
    crossing = (segment_ids[:, :, None] == 2) & (segment_ids[:, None, :] == 1)
    mask = causal & keys & ~crossing
    if unit_ids is not None:
        mask = mask & (unit_ids[:, :, None] == unit_ids[:, None, :])
    return Mask(mask, rule=Rule.of(attention_mask, unit=unit_ids, branch=segment_ids),
                causal=True)


class PrefixSharing(Layout):
    name = "prefix_sharing"
    rows_per_pair = 1
    packed_mask_form = "dense"

    def units(self, pair, p, c, r) -> list[tuple]:
        """One unit per pair: the prompt + chosen + rejected triple."""
        return [(pair, p, [(0, c), (1, r)])]

    def packed_mask(self, batch) -> Mask:
        return prefix_sharing_mask(batch["attention_mask"], batch["segment_ids"],
                                   batch["unit_ids"])

    def __init__(self, window: int = 0):
        if window <= 0:
            raise LayoutError("layout='prefix_sharing' needs max_completion_length > 0 (the "
                              "static window each completion is scored in)")
        super().__init__(window)

    def pair_tokens(self, p, c, r):
        return p + c + r

    def real_tokens(self, p, c, r):
        return p + c + r

    def row_length(self, max_length):
        # prompt + the longer completion <= max_length, and the other completion <= the window
        return max_length + self.window

    def collate(self, prompts, chosens, rejecteds, batch_size, length, pad_id):
        """Segment ids: 0 prompt, 1 chosen, 2 rejected, -1 pad."""
        b = batch_size
        ids = np.full((b, length), pad_id, np.int32)
        attn = np.zeros((b, length), np.int32)
        positions = np.zeros((b, length), np.int32)
        segments = np.full((b, length), -1, np.int32)
        pos, label, mask, tail = self._score_arrays(b, 2)
        for i, (p, c, rj) in enumerate(zip(prompts, chosens, rejecteds)):
            lp, lc, lr = len(p), len(c), len(rj)
            tail[i, 0, tail_start(lc, lr):lc] = 1
            tail[i, 1, tail_start(lc, lr):lr] = 1
            ids[i, :lp + lc + lr] = np.concatenate([p, c, rj])
            attn[i, :lp + lc + lr] = 1
            positions[i, :lp + lc] = np.arange(lp + lc)
            positions[i, lp + lc:lp + lc + lr] = np.arange(lp, lp + lr)
            segments[i, :lp], segments[i, lp:lp + lc], segments[i, lp + lc:lp + lc + lr] = 0, 1, 2
            pos[i, 0, :lc] = np.arange(lp - 1, lp + lc - 1)
            pos[i, 1, :lr] = np.concatenate([[lp - 1], np.arange(lp + lc, lp + lc + lr - 1)])
            label[i, 0, :lc], label[i, 1, :lr] = c, rj
            mask[i, 0, :lc], mask[i, 1, :lr] = 1, 1
        return {"input_ids": ids, "attention_mask": attn, "position_ids": positions,
                "segment_ids": segments, "score_pos": pos, "score_label": label,
                "score_mask": mask, "score_tail": tail}

    def logps(self, model, batch, *, chunk_size, pair_blocks=1, stats=False):
        attn_mask = prefix_sharing_mask(batch["attention_mask"], batch["segment_ids"])
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"],
                                     batch["position_ids"], attn_mask=attn_mask)
        f = features_at(hidden, model.logits_fn(), batch["score_pos"], batch["score_label"],
                        batch["score_mask"], batch["score_tail"], chunk_size, stats)
        return by_column(f[:, 0], stats), by_column(f[:, 1], stats)  # each row holds its pair


LAYOUTS = {cls.name: cls for cls in (Pair, PrefixSharing)}
PACKING = ("none", "exact", "balanced", "budget")


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
    """layout and log-probs (dpo_jax/layouts.py, dpo_jax/logprobs.py)"""

    logprob_chunk_size: int = K.key(-1, "positions per LM-head chunk; -1 = from the vocab (its "
                                    "float32 logits <= 256 MiB); 0 = whole batch at once",
                                    K.integer(-1))
    completion_only_head: bool = K.key(True, "LM head only where completions are scored (needs "
                                       "the cap)", K.flag)
    layout: str = K.key("pair", "\"pair\": 2 rows per pair; \"prefix_sharing\": 1 row, prompt "
                        "once", K.one_of(*LAYOUTS))
    packing: str = K.key("none", "pairs packed into rows (needs max_completion_length > 0): "
                         "none; exact (the unpacked run's batches); balanced (batches regrouped "
                         "to even token totals); budget (as many pairs as fill the rows, at most "
                         "2 x the batch size: the fastest, pairs per update vary)",
                         K.one_of(*PACKING), resume=True)
    pack_rows: int = K.key(0, "packed rows per micro-batch; 0 = sized from the data (the "
                           "fewest that fit every batch; budget: what a batch of mean-length "
                           "pairs fills)", K.integer(0), resume=True)

    def __post_init__(self):
        K.check_fields(self)


def make(name: str, window: int = 0) -> Layout:
    """The layout called ``name`` (config key ``layout``) with scoring window ``window``
    (``packing.make`` packs it)."""
    if name not in LAYOUTS:
        raise LayoutError(f"layout={name!r}: valid layouts are {', '.join(LAYOUTS)}")
    return LAYOUTS[name](window)
