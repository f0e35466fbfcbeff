"""Fixed-shape batches of preference pairs in a deterministic, resumable order.

The layout (``dpo_jax.layouts``) decides how a batch's pairs become rows; this module decides
which pairs go together and in what order: epoch e is a permutation drawn from (seed, e),
training iterates epochs forever and drops each epoch's incomplete batches, and the cursor
(epoch, batch index within the epoch) is ``state()``: ``PairBatches(..., state=s)`` resumes
exactly there. Rows are padded to ``max_length`` or, with length buckets, to the smallest bucket
that fits every pair of the batch (pairs are grouped by bucket, so there are at most
len(buckets) shapes and compilations). With a packed layout a batch is a few rows that hold
``batch_size`` pairs, or, with ``budget``, as many pairs as fill its rows (a token budget).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

import numpy as np

from dpo_jax import layouts, packing
from dpo_jax.data.sources import DataError
from dpo_jax.data.tokenize import TokenizedPairs

BUDGET_WINDOW = 64  # budget packing fills micro-batches from windows of 64 x batch_size pairs
PLANS_KEPT = 8  # epoch plans kept: setup reads epoch 0 several times, a budget plan is Python


def bucket_lengths(max_length: int, buckets=()) -> tuple[int, ...]:
    """The padded lengths batches may have: the given buckets (each <= max_length) + max_length."""
    bs = sorted({int(b) for b in buckets} | {max_length})
    if bs[0] <= 1 or bs[-1] > max_length:
        raise DataError(f"length_buckets {tuple(buckets)} must lie in (1, max_length={max_length}]")
    return tuple(bs)


class PairBatches:
    """Batches of ``batch_size`` pairs as dicts of numpy arrays laid out by ``layout`` (a
    ``layouts.Layout``, or its name with ``completion_window``). ``valid`` (B,) is 1 for real
    pairs and 0 for the empty slots that fill an eval batch's tail; precomputed reference
    log-probs (``set_reference``) ride along as ``ref_chosen_logps`` / ``ref_rejected_logps``
    (B,)."""

    def __init__(self, pairs: TokenizedPairs, *, batch_size: int, max_length: int, pad_id: int,
                 seed: int = 0, shuffle: bool = True, buckets=(), state: dict | None = None,
                 layout: str | layouts.Layout = "pair", completion_window: int = 0,
                 source: str = "the data", batch_key: str = "batch_size",
                 epochs: int | None = 1, pack_rows: int = 0, balance: int = 0,
                 budget: bool = False, length_multiple: int = 1):
        """``source`` and ``batch_key`` only name the data and the config key in errors. A
        packed layout is sized here for the first ``epochs`` epochs (see ``fit_packing``; None
        leaves that to the caller). ``balance`` > 0 regroups each window of that many shuffled
        batches so that their token totals are even (``balanced``). ``budget`` (packed layouts)
        fills each batch's ``pack_rows`` rows with as many pairs as fit, at most 2 x
        ``batch_size`` (see ``fit_budget``). Row lengths are rounded up to ``length_multiple``
        (the context axis a row's positions are split over), with padding."""
        self.source, self.batch_key = source, batch_key
        if isinstance(layout, str):
            layout = layouts.make(layout, completion_window)
        self.pairs, self.batch_size, self.pad_id = pairs, batch_size, pad_id
        self.seed, self.shuffle, self.layout, self.balance = seed, shuffle, layout, balance
        self.budget = budget
        window = layout.window
        longest = max(max(len(c), len(r)) for c, r in zip(pairs.chosen, pairs.rejected))
        if window and longest > window:
            raise DataError(f"{source}: a completion has {longest} tokens > the scoring window "
                            f"{window} (config key max_completion_length)")
        max_length = layout.row_length(max_length)
        self.lengths = np.array([layout.pair_tokens(len(p), len(c), len(r)) for p, c, r in
                                 zip(pairs.prompt, pairs.chosen, pairs.rejected)], np.int64)
        m = length_multiple
        self.buckets = tuple(sorted({-(-b // m) * m for b in bucket_lengths(max_length, buckets)}))
        if self.lengths.max() > max_length:
            raise DataError(f"{source}: a pair needs {self.lengths.max()} tokens > the row length "
                            f"{max_length} (config key max_length)")
        self.bucket_of = np.searchsorted(self.buckets, self.lengths)
        self.tokens = np.array([layout.real_tokens(len(p), len(c), len(r)) for p, c, r in
                                zip(pairs.prompt, pairs.chosen, pairs.rejected)], np.int64)
        self.dims = [(len(p), len(c), len(r)) for p, c, r in
                     zip(pairs.prompt, pairs.chosen, pairs.rejected)]
        self.epoch, self.index = 0, 0
        self.reference = None  # (chosen, rejected) reference log-probs per pair, precomputed
        self._plans = OrderedDict()  # (epoch, drop_remainder, shuffle) -> plan, newest last
        if state is not None:
            self.restore(state)
        if budget:
            if not isinstance(layout, packing.Packed):
                raise DataError("a token budget per batch needs a packed layout")
            self.fit_budget(pack_rows)
        if self.steps_per_epoch == 0:
            raise DataError(f"{source}: {len(pairs)} usable pairs make no full batch of "
                            f"{batch_key}={batch_size} (lower that config key, or add data)")
        if isinstance(layout, packing.Packed):
            if buckets:
                raise DataError("length_buckets and packing exclude each other (packed rows "
                                "have one length)")
            if epochs is not None:
                self.fit_packing(epochs, pack_rows=pack_rows)

    # ---- order
    def _plan(self, epoch: int, *, drop_remainder: bool = True,
              shuffle: bool | None = None) -> list[np.ndarray]:
        """The batches (arrays of pair indices) of one epoch, in order (kept: do not modify)."""
        shuffle = self.shuffle if shuffle is None else shuffle
        key = (epoch, drop_remainder, shuffle)
        if key not in self._plans:
            self._plans[key] = self._make_plan(epoch, drop_remainder, shuffle)
            if len(self._plans) > PLANS_KEPT:
                self._plans.popitem(last=False)
        self._plans.move_to_end(key)
        return self._plans[key]

    def _make_plan(self, epoch: int, drop_remainder: bool, shuffle: bool) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths)) if shuffle else np.arange(len(self.lengths))
        if self.budget:
            return self._budget_plan(order, rng if shuffle else None)
        batches = []
        for b in range(len(self.buckets)):
            rows = order[self.bucket_of[order] == b]
            n_full = len(rows) // self.batch_size
            batches += [rows[i * self.batch_size:(i + 1) * self.batch_size] for i in range(n_full)]
            if not drop_remainder and len(rows) % self.batch_size:
                batches.append(rows[n_full * self.batch_size:])
        if shuffle and len(self.buckets) > 1:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if shuffle and self.balance:
            batches = [b for w in range(0, len(batches), self.balance)
                       for b in self.balanced(batches[w:w + self.balance])]
        return batches

    def balanced(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """The same pairs regrouped into as many batches of as many pairs, their token totals
        even: longest pair first, each to the lightest batch with room (ties: the first). A
        packed batch then needs about the mean number of rows, not the unluckiest batch's."""
        pairs = np.concatenate(batches)
        pairs = pairs[np.argsort(-self.tokens[pairs], kind="stable")]
        out, load = [[] for _ in batches], np.zeros(len(batches), np.int64)
        for i in pairs:
            room = [j for j in range(len(out)) if len(out[j]) < len(batches[j])]
            j = min(room, key=lambda j: load[j])
            out[j].append(i)
            load[j] += self.tokens[i]
        return [np.sort(np.asarray(b, pairs.dtype)) for b in out]

    def _budget_plan(self, order: np.ndarray, rng) -> list[np.ndarray]:
        """Batches of as many pairs as fit the packed rows: each window of BUDGET_WINDOW x
        batch_size pairs of ``order``, longest first, each pair to the first batch of the
        window whose rows it fits (as ``collate`` will plan them) with fewer than
        ``pair_slots`` pairs, else to a new batch; the window's batches in a random order
        (``rng``) or as made. Every pair is in one batch; only a window's last batches are
        left part-full."""
        rows, length, layout = self.layout.rows, self.buckets[-1], self.layout
        room = rows * length
        units = [[n for n, _ in layout.units(*d)] for d in self.dims]
        out = []
        step = BUDGET_WINDOW * self.batch_size
        for start in range(0, len(order), step):
            window = order[start:start + step]
            window = window[np.argsort(-self.tokens[window], kind="stable")]
            smallest = int(self.tokens[window].min())
            batches, load, lengths, open_ = [], [], [], []  # open_: batches with room left
            for i in window:
                for j in open_:
                    if (load[j] + self.tokens[i] <= room
                            and len(layout.plan(lengths[j] + units[i], length)) <= rows):
                        batches[j].append(i)
                        lengths[j] += units[i]
                        load[j] += self.tokens[i]
                        if len(batches[j]) == self.pair_slots or room - load[j] < smallest:
                            open_.remove(j)
                        break
                else:
                    open_.append(len(batches))
                    batches.append([i])
                    lengths.append(list(units[i]))
                    load.append(self.tokens[i])
            if rng is not None:
                batches = [batches[k] for k in rng.permutation(len(batches))]
            out += [np.asarray(b, order.dtype) for b in batches]
        return out

    def fit_budget(self, pack_rows: int = 0, multiple: int = 1):
        """The rows of a budget batch: ``pack_rows``, or 0: the rows ``batch_size`` pairs of
        this data's mean size fill, rounded up to ``multiple`` (the devices rows split over)
        and to what its largest pair needs on its own."""
        length = self.buckets[-1]
        rows = pack_rows or -(-int(np.ceil(self.batch_size * self.tokens.mean())) // length)
        need = self.layout.sizes([self.dims[int(np.argmax(self.tokens))]], length)[0]
        if pack_rows and pack_rows < need:
            raise DataError(f"{self.source}: a pair needs {need} packed rows of {length} "
                            f"positions; config key pack_rows={pack_rows} is too few (0 sizes "
                            "it automatically)")
        if pack_rows and pack_rows % multiple:
            raise DataError(f"config key pack_rows={pack_rows} does not divide over the "
                            f"{multiple} devices a process's rows are split over")
        rows = -(-max(rows, need) // multiple) * multiple
        self.layout = packing.Packed(self.layout.base, rows, 1, 1)  # fit_packing sizes the rest
        self._plans.clear()  # budget plans depend on the rows

    def packed_sizes(self, epochs: int, *, ordered: bool = False) -> tuple[int, int, int]:
        """(rows, completion slots per row, scored positions per row) the packed layout needs for every batch of the
        first ``epochs`` training epochs, and of the ordered pass (``eval_batches``) when
        ``ordered`` or the batches are not shuffled."""
        p = self.pairs
        plans = [self._plan(e) for e in range(epochs)] if self.shuffle else []
        if ordered or not self.shuffle:
            plans.append(self._plan(0, drop_remainder=False, shuffle=False))
        sizes = (1, 1, 1)
        for plan in plans:
            for batch in plan:
                need = self.layout.sizes([(len(p.prompt[i]), len(p.chosen[i]),
                                           len(p.rejected[i])) for i in batch], self.buckets[-1])
                sizes = tuple(map(max, sizes, need))
        return sizes

    def fit_packing(self, epochs: int, *, ordered: bool = False, pack_rows: int = 0,
                    multiple: int = 1, agree=None):
        """Sizes the packed layout: the fewest rows (rounded up to ``multiple``, the devices a
        process's rows split over), completion slots and scored positions per row that hold
        every batch of the first ``epochs`` epochs (see ``packed_sizes``), or ``pack_rows``
        rows when they suffice. ``agree`` maps the sizes to the values all processes use
        (their maximum). A budget layout keeps its rows (``fit_budget``)."""
        rows, slots, scored = self.packed_sizes(epochs, ordered=ordered)
        if self.budget:
            rows = pack_rows = self.layout.rows
        rows = -(-rows // multiple) * multiple
        if agree is not None:
            rows, slots, scored = agree(rows, slots, scored)
        if pack_rows and pack_rows < rows:
            raise DataError(f"{self.source}: a batch of {self.batch_key}={self.batch_size} "
                            f"pairs needs {rows} packed rows of {self.buckets[-1]} positions; "
                            f"config key pack_rows={pack_rows} is too few (0 sizes it "
                            "automatically)")
        if pack_rows and pack_rows % multiple:
            raise DataError(f"config key pack_rows={pack_rows} does not divide over the "
                            f"{multiple} devices a process's rows are split over")
        self.layout = packing.Packed(self.layout.base, pack_rows or rows, slots, scored)

    @property
    def pair_slots(self) -> int:
        """The most pairs a batch holds (its per-pair arrays' length)."""
        return 2 * self.batch_size if self.budget else self.batch_size

    def mean_pairs(self) -> float:
        """Pairs per training batch, on average over epoch 0."""
        return sum(len(b) for b in self._plan(0)) / max(self.steps_per_epoch, 1)

    @property
    def steps_per_epoch(self) -> int:
        return len(self._plan(0))

    def state(self) -> dict:
        return {"epoch": int(self.epoch), "index": int(self.index), "seed": int(self.seed)}

    def restore(self, state: dict):
        if int(state["seed"]) != self.seed:
            raise DataError(f"data cursor was saved with seed {state['seed']}, this run has "
                            f"seed {self.seed}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        plan = self._plan(self.epoch)
        rows = plan[self.index]
        self.index += 1
        if self.index == len(plan):
            self.epoch, self.index = self.epoch + 1, 0
        return self.collate(rows)

    def eval_batches(self) -> Iterator[dict]:
        """Every pair once, in order; the last batch of each bucket padded with invalid pairs."""
        for _, batch in self.eval_batches_with_rows():
            yield batch

    def eval_batches_with_rows(self) -> Iterator[tuple[np.ndarray, dict]]:
        """As ``eval_batches``, with the pair indices of each batch's valid rows."""
        for rows in self._plan(0, drop_remainder=False, shuffle=False):
            yield rows, self.collate(rows)

    def set_reference(self, chosen: np.ndarray, rejected: np.ndarray):
        """Precomputed reference log-probs, (N,) each in the order of the pairs: every batch
        from now on carries them (``ref_chosen_logps`` / ``ref_rejected_logps``)."""
        if len(chosen) != len(self.pairs) or len(rejected) != len(self.pairs):
            raise DataError(f"{self.source}: reference log-probs for {len(chosen)} pairs, and "
                            f"the data has {len(self.pairs)}")
        self.reference = (np.asarray(chosen, np.float32), np.asarray(rejected, np.float32))

    # ---- shapes
    def collate(self, rows: np.ndarray) -> dict:
        p = self.pairs
        length = self.buckets[int(self.bucket_of[rows].max())]
        b = self.pair_slots
        batch = self.layout.collate([p.prompt[r] for r in rows], [p.chosen[r] for r in rows],
                                    [p.rejected[r] for r in rows], b, length, self.pad_id)
        valid = np.zeros((b,), np.float32)
        valid[:len(rows)] = 1
        batch["valid"] = valid
        # TRL's num_tokens counts: the prompt + completion tokens of both sequences of each pair
        batch["num_tokens"] = np.zeros((b,), np.int32)
        batch["num_tokens"][:len(rows)] = [2 * len(p.prompt[r]) + len(p.chosen[r]) +
                                           len(p.rejected[r]) for r in rows]
        if self.reference is not None:
            for key, values in zip(("ref_chosen_logps", "ref_rejected_logps"), self.reference):
                batch[key] = np.zeros((b,), np.float32)
                batch[key][:len(rows)] = values[rows]
        return batch

    def padding_fraction(self) -> float:
        """Share of token positions in one epoch's batches that are padding."""
        real = total = 0
        for rows in self._plan(0):
            total += self.layout.batch_rows(self.batch_size) * \
                self.buckets[int(self.bucket_of[rows].max())]
            real += int(self.tokens[rows].sum())
        return 1.0 - real / max(total, 1)


def stack_batches(batches: list[dict]) -> dict:
    """Micro-batches stacked on a new leading axis (gradient accumulation), right-padded to the
    longest of them when length buckets gave them different lengths."""
    length = max(b["input_ids"].shape[1] for b in batches)
    fills = dict(layouts.SEQUENCE_FILL, input_ids=batches[0]["input_ids"][0, -1])

    def pad(key, a):
        if key not in fills or a.shape[1] == length:
            return a
        return np.pad(a, ((0, 0), (0, length - a.shape[1])), constant_values=fills[key])

    return {k: np.stack([pad(k, b[k]) for b in batches]) for k in batches[0]}
