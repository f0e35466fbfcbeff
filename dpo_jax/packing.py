"""Packed rows: several pairs' units in one row, for either layout (``layouts.py``).

``Packed(base)`` asks its base layout what a pair's units are (pair: prompt + chosen and
prompt + rejected sequences; prefix sharing: one triple) and how they attend
(``base.packed_mask``), packs the units first-fit-decreasing into a fixed number of rows, and
scores them on one flat list of completion tokens per row. The sizes (rows, completion slots,
scored positions) are static, fitted once to the batches a run will see
(``data.PairBatches.fit_packing``), and the run's layout is decided once (``plan.layout``) and
handed down.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dpo_jax.layouts import Layout, LayoutError, by_column, make as make_layout, tail_start
from dpo_jax.logprobs import features_by_slot


class Packed(Layout):
    """Several pairs per row: the units of ``base`` (pair: prompt + chosen and prompt + rejected
    sequences; prefix sharing: prompt + chosen + rejected triples) packed first-fit-decreasing
    into ``rows`` rows, positions restarting in each unit, attention within its unit (plus the
    prefix-sharing rule). A batch holds the pairs it is given (``batch_size`` slots; fewer
    leave slots empty): the same pairs as unpacked, or, with a token budget, as many as fill
    the rows (``PairBatches``). The LM head runs on one flat list of ``scored`` positions per
    row (the completion tokens the row holds, each tagged with its completion's slot), not on a
    window per completion. ``rows``, ``slots`` (the most completions a row holds) and ``scored`` are
    static, sized from the batches a run will see (``PairBatches.fit_packing``)."""

    name = "packed"

    def __init__(self, base: Layout, rows: int = 0, slots: int = 0, scored: int = 0):
        if not base.window:
            raise LayoutError("packing needs max_completion_length > 0 (the longest completion "
                              "a row's scored positions must hold)")
        super().__init__(base.window)
        self.base, self.rows, self.slots, self.scored = base, int(rows), int(slots), int(scored)
        self.name = f"{base.name}+packed"
        self.mask_form = base.packed_mask_form

    def __repr__(self):
        return (f"Packed({self.base!r}, rows={self.rows}, slots={self.slots}, "
                f"scored={self.scored})")

    def units(self, p: int, c: int, r: int) -> list[tuple[int, int]]:
        """(length, completion tokens) of the units one pair packs as."""
        return [(p + sum(n for _, n in comps), sum(n for _, n in comps))
                for _, p, comps in self.base.units(0, p, c, r)]

    def pair_tokens(self, p, c, r):
        return max(u for u, _ in self.units(p, c, r))

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

    def sizes(self, pairs: list[tuple[int, int, int]], length: int) -> tuple[int, int, int]:
        """(rows, completion slots per row, scored positions per row) these pairs need."""
        units = [u for p, c, r in pairs for u in self.units(p, c, r)]
        rows = self.plan([n for n, _ in units], length)
        per_unit = len(self.base.units(0, 0, 0, 0)[0][2])  # completions a unit holds
        return (len(rows), per_unit * max(len(r) for r in rows),
                max(sum(units[u][1] for u in r) for r in rows))

    def collate(self, prompts, chosens, rejecteds, batch_size, length, pad_id):
        n_rows, k, s = self.rows, self.slots, self.scored
        units = []  # (pair, prompt, [(side, completion)])
        shared = []  # per pair: where the verbose tails start
        for i, (p, c, r) in enumerate(zip(prompts, chosens, rejecteds)):
            units += self.base.units(i, p, c, r)
            shared.append(tail_start(len(c), len(r)))
        plan = self.plan([len(p) + sum(len(x) for _, x in cs) for _, p, cs in units], length)
        need = self.sizes([(len(p), len(c), len(r)) for p, c, r in
                           zip(prompts, chosens, rejecteds)], length)
        if any(a > b for a, b in zip(need, (n_rows, k, s))):
            raise LayoutError(f"a batch needs {need[0]} packed rows of {length} positions "
                              f"({need[1]} completions, {need[2]} scored tokens per row); "
                              f"{n_rows}, {k}, {s} were sized (config key pack_rows)")
        ids = np.full((n_rows, length), pad_id, np.int32)
        attn, positions = np.zeros((n_rows, length), np.int32), np.zeros((n_rows, length),
                                                                          np.int32)
        unit_ids, parts = np.full((n_rows, length), -1, np.int32), np.full((n_rows, length), -1,
                                                                            np.int32)
        pos, label = np.zeros((n_rows, s), np.int32), np.zeros((n_rows, s), np.int32)
        slot_of = np.full((n_rows, s), -1, np.int32)
        tail = np.zeros((n_rows, s), np.int32)
        index = np.full((n_rows, k), -1, np.int32)  # side * batch_size + pair
        for row, members in enumerate(plan):
            at, slot, scored = 0, 0, 0
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
                    pos[row, scored:scored + lc] = np.concatenate(  # is scored from the prompt
                        [[prev], np.arange(end, end + lc - 1)])
                    label[row, scored:scored + lc], slot_of[row, scored:scored + lc] = comp, slot
                    tail[row, scored + shared[pair]:scored + lc] = 1
                    index[row, slot] = side * batch_size + pair
                    slot, end, scored = slot + 1, end + lc, scored + lc
                attn[row, at:end], unit_ids[row, at:end] = 1, u_id
                at = end
        return {"input_ids": ids, "attention_mask": attn, "position_ids": positions,
                "segment_ids": parts, "unit_ids": unit_ids, "score_pos": pos,
                "score_label": label, "score_slot": slot_of, "score_tail": tail,
                "score_index": index}

    def logps(self, model, batch, *, chunk_size, pair_blocks=1, stats=False):
        attn_mask = self.base.packed_mask(batch)
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"],
                                     batch["position_ids"], attn_mask=attn_mask)
        index = batch["score_index"]
        f = features_by_slot(hidden, model.logits_fn(), batch["score_pos"],
                             batch["score_label"], batch["score_slot"], index.shape[1],
                             batch["score_tail"], chunk_size, stats)  # (rows, k, F)
        # scatter each row's completions to their pairs: (blocks, 2 sides, pairs per block)
        rows = index.shape[0]
        per_block = batch["valid"].shape[0] // pair_blocks
        block = (jnp.arange(rows) // (rows // pair_blocks))[:, None]
        flat = jnp.where(index >= 0, block * 2 * per_block + index, 2 * per_block * pair_blocks)
        size = 2 * per_block * pair_blocks + 1  # the last slot collects the unused ones
        out = (jnp.zeros((size, f.shape[-1]), f.dtype).at[flat.reshape(-1)]
               .add(f.reshape(-1, f.shape[-1]))[:-1].reshape(pair_blocks, 2, per_block, -1))
        return (by_column(out[:, 0].reshape(-1, f.shape[-1]), stats),
                by_column(out[:, 1].reshape(-1, f.shape[-1]), stats))


def make(name: str, window: int = 0, *, packed: bool = False, rows: int = 0,
         slots: int = 0, scored: int = 0) -> Layout:
    """The layout called ``name`` (config key ``layout``) with scoring window ``window``;
    ``packed`` packs its units into ``rows`` rows of up to ``slots`` completions and ``scored``
    completion tokens each."""
    base = make_layout(name, window)
    return Packed(base, rows, slots, scored) if packed else base
