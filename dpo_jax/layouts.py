"""How preference pairs become rows of tokens, and how their log-probs come back out.

A layout owns both directions: ``collate`` (numpy, on the host) lays the pairs of a batch out as
fixed-shape rows, and ``logps`` (inside the jitted step) runs the model over those rows with the
layout's positions and attention and returns each pair's (chosen, rejected) log-probs and token
counts. The step asks the layout; it never looks at which keys a batch holds.

- ``pair``: two rows per pair, [prompt | chosen | pad] and [prompt | rejected | pad]; chosen rows
  first, then rejected rows, so one forward scores both.
- ``prefix_sharing``: one row per pair, [prompt | chosen | rejected | pad]: the prompt runs once.
  The rejected tokens continue the prompt's positions and attend to the prompt and themselves,
  never to the chosen tokens; the rejected completion's first token is scored from the prompt's
  last position (Wang & Hegde 2024, arXiv 2410.20305).

With a scoring window W > 0 (``max_completion_length``; prefix sharing needs one) a batch also
carries ``score_pos``, ``score_label``, ``score_mask`` of shape (rows, k, W): for each of the k
completions of a row, the positions whose hidden states score its tokens, so the LM head runs
only there (``logprobs.sequence_logprobs_at``). Without one (pair only), the head runs over every
position and ``loss_mask`` selects the scored tokens.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dpo_jax.errors import DpoError
from dpo_jax.logprobs import model_sequence_logprobs, sequence_logprobs_at

# batch keys whose second axis is the sequence (padded when micro-batches differ in length),
# with the value that pads them
SEQUENCE_FILL = {"input_ids": None, "attention_mask": 0, "loss_mask": 0, "position_ids": 0,
                 "segment_ids": -1, "unit_ids": -1}


class LayoutError(DpoError, ValueError):
    """A layout that cannot hold the data or does not exist (names the config key)."""


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
    def logps(self, model, batch, *, chunk_size: int, pair_blocks: int = 1):
        """(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens), each (B,)."""
        raise NotImplementedError

    def _score_arrays(self, n_rows: int, k: int):
        w = self.window
        return tuple(np.zeros((n_rows, k, w), np.int32) for _ in range(3))


class Pair(Layout):
    name = "pair"
    rows_per_pair = 2

    def pair_tokens(self, p, c, r):
        return p + max(c, r)

    def real_tokens(self, p, c, r):
        return 2 * p + c + r

    def collate(self, prompts, chosens, rejecteds, batch_size, length, pad_id):
        b = batch_size
        ids = np.full((2 * b, length), pad_id, np.int32)
        attn = np.zeros((2 * b, length), np.int32)
        loss = np.zeros((2 * b, length), np.int32)
        if self.window:
            pos, label, mask = self._score_arrays(2 * b, 1)
        for i, (p, c, r) in enumerate(zip(prompts, chosens, rejecteds)):
            for j, comp in ((i, c), (b + i, r)):
                n = len(p) + len(comp)
                ids[j, :len(p)] = p
                ids[j, len(p):n] = comp
                attn[j, :n] = 1
                loss[j, len(p):n] = 1
                if self.window:  # completion token t is scored by the hidden state at t - 1
                    pos[j, 0, :len(comp)] = np.arange(len(p) - 1, n - 1)
                    label[j, 0, :len(comp)] = comp
                    mask[j, 0, :len(comp)] = 1
        batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}
        if self.window:
            batch.update(score_pos=pos, score_label=label, score_mask=mask)
        return batch

    def logps(self, model, batch, *, chunk_size, pair_blocks=1):
        if not self.window:  # the LM head over every position, masked
            logps, n = model_sequence_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                               batch["loss_mask"], chunk_size=chunk_size)
        else:
            hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])
            logps, n = sequence_logprobs_at(hidden, model.head_weight(), batch["score_pos"],
                                            batch["score_label"], batch["score_mask"],
                                            chunk_size)
            logps, n = logps[:, 0], n[:, 0]
        return (*split_pairs(logps, pair_blocks), *split_pairs(n, pair_blocks))


def prefix_sharing_mask(attention_mask, segment_ids, unit_ids=None):
    """(B, T, T) attention for rows of prompt (0) + chosen (1) + rejected (2) segments: causal,
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
    return mask


class PrefixSharing(Layout):
    name = "prefix_sharing"
    rows_per_pair = 1

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
        pos, label, mask = self._score_arrays(b, 2)
        for i, (p, c, rj) in enumerate(zip(prompts, chosens, rejecteds)):
            lp, lc, lr = len(p), len(c), len(rj)
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
                "score_mask": mask}

    def logps(self, model, batch, *, chunk_size, pair_blocks=1):
        attn_mask = prefix_sharing_mask(batch["attention_mask"], batch["segment_ids"])
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"],
                                     batch["position_ids"], attn_mask=attn_mask)
        logps, n = sequence_logprobs_at(hidden, model.head_weight(), batch["score_pos"],
                                        batch["score_label"], batch["score_mask"], chunk_size)
        return logps[:, 0], logps[:, 1], n[:, 0], n[:, 1]  # each row holds its pair


class Packed(Layout):
    """Several pairs per row: the units of ``base`` (pair: prompt + chosen and prompt + rejected
    sequences; prefix sharing: prompt + chosen + rejected triples) packed first-fit-decreasing
    into ``rows`` rows, positions restarting in each unit, attention within its unit (plus the
    prefix-sharing rule), each completion scored in its window. A batch still holds the same
    ``batch_size`` pairs as unpacked: only the rows change. ``rows`` and ``slots`` (the most
    completions a row holds) are static, sized from the batches a run will see
    (``PairBatches.packed_sizes``)."""

    name = "packed"

    def __init__(self, base: Layout, rows: int = 0, slots: int = 0):
        if not base.window:
            raise LayoutError("packing needs max_completion_length > 0 (the static window each "
                              "completion is scored in)")
        super().__init__(base.window)
        self.base, self.rows, self.slots = base, int(rows), int(slots)
        self.name = f"{base.name}+packed"

    def __repr__(self):
        return f"Packed({self.base!r}, rows={self.rows}, slots={self.slots})"

    def units(self, p: int, c: int, r: int) -> list[int]:
        """The lengths of the units one pair packs as."""
        return [p + c, p + r] if isinstance(self.base, Pair) else [p + c + r]

    def pair_tokens(self, p, c, r):
        return max(self.units(p, c, r))

    def real_tokens(self, p, c, r):
        return self.base.real_tokens(p, c, r)

    def row_length(self, max_length):
        return self.base.row_length(max_length)

    def batch_rows(self, batch_size):
        return self.rows

    def plan(self, lengths: list[int], length: int) -> list[list[int]]:
        """Unit indices per row, first fit after sorting by length (longest first; ties in
        order, so the plan is deterministic)."""
        rows, room = [], []
        for u in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            for j, free in enumerate(room):
                if lengths[u] <= free:
                    rows[j].append(u)
                    room[j] -= lengths[u]
                    break
            else:
                rows.append([u])
                room.append(length - lengths[u])
        return rows

    def sizes(self, pairs: list[tuple[int, int, int]], length: int) -> tuple[int, int]:
        """(rows, completion slots per row) that packing these pairs needs."""
        lengths = [u for p, c, r in pairs for u in self.units(p, c, r)]
        rows = self.plan(lengths, length)
        per_unit = 1 if isinstance(self.base, Pair) else 2
        return len(rows), per_unit * max(len(r) for r in rows)

    def collate(self, prompts, chosens, rejecteds, batch_size, length, pad_id):
        n_rows, k, w = self.rows, self.slots, self.window
        units = []  # (pair, prompt, [(side, completion)])
        for i, (p, c, r) in enumerate(zip(prompts, chosens, rejecteds)):
            units += ([(i, p, [(0, c)]), (i, p, [(1, r)])] if isinstance(self.base, Pair)
                      else [(i, p, [(0, c), (1, r)])])
        plan = self.plan([len(p) + sum(len(x) for _, x in cs) for _, p, cs in units], length)
        if len(plan) > n_rows or any(len(row) * len(units[0][2]) > k for row in plan):
            raise LayoutError(f"a batch needs {len(plan)} packed rows of {length} positions; "
                              f"{n_rows} were sized (config key pack_rows)")
        ids = np.full((n_rows, length), pad_id, np.int32)
        attn, positions = np.zeros((n_rows, length), np.int32), np.zeros((n_rows, length),
                                                                          np.int32)
        unit_ids, parts = np.full((n_rows, length), -1, np.int32), np.full((n_rows, length), -1,
                                                                            np.int32)
        pos, label, mask = self._score_arrays(n_rows, k)
        index = np.full((n_rows, k), -1, np.int32)  # side * batch_size + pair
        for row, members in enumerate(plan):
            at, slot = 0, 0
            for u_id, u in enumerate(members):
                pair, p, comps = units[u]
                lp = len(p)
                ids[row, at:at + lp], parts[row, at:at + lp] = p, 0
                positions[row, at:at + lp] = np.arange(lp)
                end = at + lp
                for n, (side, comp) in enumerate(comps):
                    lc = len(comp)
                    ids[row, end:end + lc] = comp
                    parts[row, end:end + lc] = 1 + n  # a triple's rejected part is 2
                    positions[row, end:end + lc] = np.arange(lp, lp + lc)
                    prev = end - 1 if n == 0 else at + lp - 1  # the rejected's first token
                    pos[row, slot, :lc] = np.concatenate(         # is scored from the prompt
                        [[prev], np.arange(end, end + lc - 1)])
                    label[row, slot, :lc], mask[row, slot, :lc] = comp, 1
                    index[row, slot] = side * batch_size + pair
                    slot, end = slot + 1, end + lc
                attn[row, at:end], unit_ids[row, at:end] = 1, u_id
                at = end
        return {"input_ids": ids, "attention_mask": attn, "position_ids": positions,
                "segment_ids": parts, "unit_ids": unit_ids, "score_pos": pos,
                "score_label": label, "score_mask": mask, "score_index": index}

    def logps(self, model, batch, *, chunk_size, pair_blocks=1):
        attn_mask = prefix_sharing_mask(batch["attention_mask"], batch["segment_ids"],
                                        batch["unit_ids"])
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"],
                                     batch["position_ids"], attn_mask=attn_mask)
        logps, n = sequence_logprobs_at(hidden, model.head_weight(), batch["score_pos"],
                                        batch["score_label"], batch["score_mask"], chunk_size)
        # scatter each row's completions to their pairs: (blocks, 2 sides, pairs per block)
        index = batch["score_index"]
        rows = index.shape[0]
        per_block = batch["valid"].shape[0] // pair_blocks
        block = (jnp.arange(rows) // (rows // pair_blocks))[:, None]
        flat = jnp.where(index >= 0, block * 2 * per_block + index, 2 * per_block * pair_blocks)
        size = 2 * per_block * pair_blocks + 1  # the last slot collects the unused ones
        out = [jnp.zeros(size, x.dtype).at[flat.reshape(-1)].add(x.reshape(-1))[:-1]
               .reshape(pair_blocks, 2, per_block) for x in (logps, n)]
        return (out[0][:, 0].reshape(-1), out[0][:, 1].reshape(-1), out[1][:, 0].reshape(-1),
                out[1][:, 1].reshape(-1))


LAYOUTS = {cls.name: cls for cls in (Pair, PrefixSharing)}


def make(name: str, window: int = 0, *, packed: bool = False, rows: int = 0,
         slots: int = 0) -> Layout:
    """The layout called ``name`` (config key ``layout``) with scoring window ``window``;
    ``packed`` packs its units into ``rows`` rows of up to ``slots`` completions each."""
    if name not in LAYOUTS:
        raise LayoutError(f"layout={name!r}: valid layouts are {', '.join(LAYOUTS)}")
    base = LAYOUTS[name](window)
    return Packed(base, rows, slots) if packed else base
