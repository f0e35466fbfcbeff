"""Issue 17: packed runs against unpacked ones, the fused-attention paths against XLA's, and the
choice between them. (The step-level exactness of packed rows, per pair, for both families and
both layouts, is in test_savings.py.)"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from trainutil import tiny_config
from dpo_jax import config, data, layouts, packing, plan
from dpo_jax.errors import ConfigError
from dpo_jax.models import attention, common
from dpo_jax.models.attention import Mask
from dpo_jax.trainer import train_and_evaluate


def qkv(b=3, t=128, h=4, k=2, d=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (b, t, h, d)), jax.random.normal(ks[1], (b, t, k, d)),
            jax.random.normal(ks[2], (b, t, k, d)))


def masks(t=128):
    """The three mask forms on rows of unequal content: (name, Mask, real-query (B, T))."""
    attn = (jnp.arange(t)[None] < jnp.array([t, 73, 5])[:, None]).astype(jnp.int32)
    seg = jnp.array([[0] * 37 + [1] * 59 + [-1] * (t - 96), [0] * t,
                     [0] * 3 + [1] * 3 + [2] * 100 + [-1] * (t - 106)])
    parts = jnp.where(jnp.arange(t)[None] < 40, 0, jnp.where(jnp.arange(t)[None] < 90, 1, 2))
    parts = jnp.where(attn.astype(bool), parts, -1)
    return [("lengths", Mask.causal_padded(attn), attn),
            ("segments", Mask.segments(seg, (seg >= 0).astype(jnp.int32)), seg >= 0),
            ("prefix sharing", layouts.prefix_sharing_mask(attn, parts), attn)]


def outputs(impl, q, k, v, mask, real, **kw):
    """Attention outputs at real queries, and the gradient of their sum w.r.t. q, k, v."""
    def f(q, k, v):
        out = impl(q, k, v, mask, **kw)
        return (out * real[:, :, None, None]).sum(), out * real[:, :, None, None]
    (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def test_every_mask_equals_its_rule():
    """Ring attention builds each block's mask from a mask's ``Rule``: for every layout's mask
    (right and left padding, packed segments, prefix sharing unpacked and packed) and Gemma's
    sliding-window form of each, the rule gives the dense mask exactly, and a reordering keeps
    them equal."""
    from dpo_jax.models.gemma.model import Gemma
    t = 128
    left = (jnp.arange(t)[None] >= jnp.array([0, 9, 100])[:, None]).astype(jnp.int32)
    units = jnp.where(jnp.arange(t)[None] < 64, 0, 1) * jnp.ones((3, 1), jnp.int32)
    _, prefix, attn = masks(t)[2]
    parts = jnp.where(jnp.arange(t)[None] < 40, 0, jnp.where(jnp.arange(t)[None] < 90, 1, 2))
    packed = layouts.prefix_sharing_mask(attn, jnp.where(attn.astype(bool), parts, -1), units)
    cases = [m for _, m, _ in masks(t)] + [Mask.causal_padded(left).dense_only(), packed]
    gemma = type("G", (), {"config": type("C", (), {"windowed": True, "sliding_window": 7})})
    order = attention.zigzag(t, 4)
    for mask in cases:
        np.testing.assert_array_equal(mask.rule.sees(mask.rule), mask.dense)
        positions = jnp.cumsum(jnp.ones((3, t), jnp.int32), 1) * 2  # not the index: a window
        _, windowed = Gemma.layer_masks(gemma, mask, positions, positions)  # on positions
        np.testing.assert_array_equal(windowed.rule.sees(windowed.rule), windowed.dense)
        for local in (True, False):
            layer = Mask.per_layer(mask, windowed, jnp.asarray(local))
            np.testing.assert_array_equal(layer.rule.sees(layer.rule), layer.dense)
        moved = mask.reordered(order, 4)
        np.testing.assert_array_equal(moved.rule.sees(moved.rule), moved.dense)
        np.testing.assert_array_equal(moved.rule_only().sees_itself(), moved.sees_itself())


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_tiled_attention_matches_xla(softcap, monkeypatch):
    """``tiled`` attention (``attention.ring`` over no context axis: 4 tiles of 32 queries x 3
    of 43 keys, the last padded; each tile's mask from the rule, no dense mask; the tiles the
    mask hides skipped) on each mask form, with and without a logit cap: XLA's outputs at real
    queries and gradients within 1e-5."""
    monkeypatch.setattr(attention, "RING_TILE", 32)
    monkeypatch.setattr(attention, "RING_KEY_TILE", 43)
    q, k, v = qkv()
    for name, mask, real in masks():
        tiled = jax.jit(lambda q, k, v, mask: common.attention(
            q, k, v, mask, scale=0.35, implementation="tiled", softcap=softcap)[0])
        ref = outputs(attention.attend, q, k, v, mask, real, scale=0.35, softcap=softcap)
        got = outputs(tiled, q, k, v, mask.rule_only(), real)
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, err_msg=name)


@pytest.mark.parametrize("form", [0, 1])  # lengths, segments: the forms splash takes
def test_splash_kernel_matches_xla(form):
    """The TPU kernel itself (Pallas, interpreted on the CPU) against XLA: 1e-5 (float32;
    measured 5e-7), forward and gradients, GQA heads."""
    q, k, v = qkv()
    _, mask, real = masks()[form]
    ref = outputs(attention.attend, q, k, v, mask, real, scale=0.35, implementation="xla")
    got = outputs(attention.attend, q, k, v, mask, real, scale=0.35, implementation="splash")
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)


@pytest.mark.parametrize("form", [0, 1, 2])
def test_cudnn_arguments_mean_the_same_mask(form):
    """What cuDNN receives (padding-causal lengths, or the mask as a bias with the causal flag),
    run through XLA's reference of the same arguments, equals the dense mask: 1e-6."""
    q, k, v = qkv(seed=1)
    _, mask, real = masks()[form]

    def through_cudnn_arguments(q, k, v, mask, scale):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla",
                                            **attention.cudnn_arguments(mask))
    ref = outputs(attention.attend, q, k, v, mask, real, scale=0.35)
    got = outputs(through_cudnn_arguments, q, k, v, mask, real, scale=0.35)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)


def test_auto_picks_the_kernel_and_says_why():
    kw = dict(dtype="bfloat16", head_dim=64, mask_forms={"lengths"}, lengths=(512,))
    assert attention.resolve("auto", platform="cpu", **kw)[0] == "xla"
    assert attention.resolve("auto", platform="gpu", **kw)[0] == "cudnn"
    impl, why = attention.resolve("auto", platform="gpu", **dict(kw, dtype="float32"))
    assert impl == "xla" and "bfloat16 or float16" in why
    impl, why = attention.resolve("auto", platform="gpu", **dict(kw, mask_forms={"dense"}))
    assert impl == "cudnn" and "bias" in why
    assert attention.resolve("auto", platform="tpu", **kw)[0] == "splash"
    impl, why = attention.resolve("auto", platform="tpu", **dict(kw, mask_forms={"dense"}))
    assert impl == "xla" and "prefix sharing" in why
    impl, why = attention.resolve("auto", platform="tpu", **dict(kw, lengths=(500,)))
    assert impl == "xla" and "multiples of 128" in why
    assert attention.resolve("xla", platform="gpu", **kw)[0] == "xla"
    long = dict(kw, lengths=(512, attention.TILED_FROM))  # no (T x T) logits where no kernel
    impl, why = attention.resolve("auto", platform="cpu", **long)
    assert impl == "tiled" and f"rows of {attention.TILED_FROM} tokens" in why
    impl, why = attention.resolve("auto", platform="gpu", **dict(long, head_dim=256))
    assert impl == "tiled" and "up to 128" in why  # Gemma 3's heads
    assert attention.resolve("auto", platform="gpu", **long)[0] == "cudnn"
    assert attention.resolve("tiled", platform="gpu", **kw)[0] == "tiled"
    with pytest.raises(ValueError, match="cudnn needs a GPU"):
        attention.resolve("cudnn", platform="cpu", **kw)
    with pytest.raises(ValueError, match="no segment form"):
        attention.resolve("splash", platform="tpu", **dict(kw, mask_forms={"dense"}))
    with pytest.raises(ValueError, match=r"attention='splash': splash needs a TPU \(platform "
                                         r"cpu\)"):  # the first reason, whatever the layout
        attention.resolve("splash", platform="cpu", **dict(kw, mask_forms={"dense"}))


def test_auto_tiles_the_mlp_of_long_rows_and_says_so():
    assert plan.mlp_tile("auto", attention.TILED_FROM - 1) == (
        0, f"whole rows (config key mlp='auto'; rows of {attention.TILED_FROM - 1} tokens)")
    tile, why = plan.mlp_tile("auto", attention.TILED_FROM, experts=True)
    assert tile == common.MLP_TILE and why.endswith("the experts' layers over whole rows)")
    assert plan.mlp_tile("tiled", 64)[0] == common.MLP_TILE
    assert plan.mlp_tile("full", 1 << 17)[0] == 0


def test_packing_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="packing='exact' needs max_completion_length > 0"):
        config.build(tiny_config(tmp_path, packing="exact", max_completion_length=0,
                                          layout="pair"))
    with pytest.raises(ConfigError, match="packing='balanced' and length_buckets exclude"):
        config.build(tiny_config(tmp_path, packing="balanced", length_buckets=(32,)))
    with pytest.raises(ConfigError, match="cudnn needs a GPU"):
        train_and_evaluate(tiny_config(tmp_path, attention="cudnn"), tmp_path / "wd")
    rng = np.random.default_rng(0)
    tp = data.TokenizedPairs(*[[rng.integers(1, 50, 9).astype(np.int32) for _ in range(8)]
                               for _ in range(3)], {})
    with pytest.raises(data.DataError, match="pack_rows=1 is too few"):
        data.PairBatches(tp, batch_size=8, max_length=30, pad_id=0,
                         layout=packing.make("pair", 9, packed=True), pack_rows=1)


def test_balanced_batches_hold_the_same_pairs_in_fewer_rows():
    """packing='balanced' regroups each window of shuffled batches by token totals: every
    pair once per epoch, the same number per batch, and fewer packed rows than 'exact' on a
    long-tailed length distribution."""
    rng = np.random.default_rng(0)
    n = 512
    lens = np.minimum(np.exp(rng.normal(3.0, 0.9, (3, n))).astype(int) + 1, 40)
    tp = data.TokenizedPairs(*[[rng.integers(1, 50, k).astype(np.int32) for k in lens[i]]
                               for i in range(3)], {})
    kw = dict(batch_size=8, max_length=80, pad_id=0, seed=3)
    exact = data.PairBatches(tp, layout=packing.make("pair", 40, packed=True), **kw)
    balanced = data.PairBatches(tp, layout=packing.make("pair", 40, packed=True), balance=16,
                                **kw)
    plan, plain = balanced._plan(0), exact._plan(0)
    assert [len(b) for b in plan] == [len(b) for b in plain]
    assert sorted(np.concatenate(plan)) == sorted(np.concatenate(plain))
    assert balanced.layout.rows < exact.layout.rows
    assert balanced.padding_fraction() < exact.padding_fraction()


def run_weights(tmp_path, name, **kw):
    wd = tmp_path / name
    train_and_evaluate(tiny_config(tmp_path, max_steps=8, eval_steps=4, save_steps=4,
                                   sample_prompts=0, **kw), wd)
    return load_file(wd / "hf" / "model.safetensors")


@pytest.mark.parametrize("layout", ["pair", "prefix_sharing"])
def test_packed_run_ends_where_the_unpacked_run_ends(tmp_path, layout):
    """Eight updates of 2 accumulated micro-batches, reference precomputed (the ordered pass is
    packed too), eval packed: the weights equal the unpacked run's within float tolerance, and
    so do a packed run's with ``attention="tiled"`` (tiles of 8 x 16: every pass in tiles,
    from the masks' rules) and ``mlp="tiled"`` (tiles of 8 positions)."""
    kw = dict(layout=layout, gradient_accumulation_steps=2, precompute_ref_log_probs=True)
    plain = run_weights(tmp_path, "plain", **kw)
    packed = run_weights(tmp_path, "packed", packing="exact", **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention, "RING_TILE", 8)
        mp.setattr(attention, "RING_KEY_TILE", 16)
        mp.setattr(common, "MLP_TILE", 8)
        tiled = run_weights(tmp_path, "tiled", packing="exact", attention="tiled", mlp="tiled",
                            **kw)
    for name in plain:
        np.testing.assert_allclose(packed[name], plain[name], atol=2e-5, err_msg=name)
        np.testing.assert_allclose(tiled[name], plain[name], atol=2e-5, err_msg=name)


@pytest.mark.parametrize("base", ["pair", "prefix_sharing"])
def test_budget_batches_fill_their_rows(base):
    """packing='budget': every pair once per epoch, as many per batch as fill the rows (at
    most 2 x batch_size, so the count varies), each batch within the rows collate plans, far
    less padding than packing a fixed count; a saved cursor gives the same batches again."""
    rng = np.random.default_rng(1)
    n = 512
    lens = np.minimum(np.exp(rng.normal(3.0, 0.9, (3, n))).astype(int) + 1, 40)
    tp = data.TokenizedPairs(*[[rng.integers(1, 50, k).astype(np.int32) for k in lens[i]]
                               for i in range(3)], {})
    kw = dict(batch_size=8, max_length=80, pad_id=0, seed=3, epochs=2)
    layout = lambda: packing.make(base, 40, packed=True)
    budget = data.PairBatches(tp, layout=layout(), budget=True, **kw)
    balanced = data.PairBatches(tp, layout=layout(), balance=16, **kw)
    plans = [budget._plan(e) for e in (0, 1)]
    for plan in plans:
        assert sorted(np.concatenate(plan).tolist()) == list(range(n))
        counts = [len(b) for b in plan]
        assert max(counts) <= 16 and min(counts) < max(counts)
        for rows in plan:
            b = budget.collate(rows)  # fits: collate raises if it does not
            assert b["valid"].sum() == len(rows) and b["valid"].shape == (16,)
    assert [b.tolist() for b in plans[0]] != [b.tolist() for b in plans[1]]
    assert budget.padding_fraction() < 0.1 < balanced.padding_fraction()
    assert budget.layout.rows == -(-8 * budget.tokens.mean() // budget.buckets[-1])
    for _ in range(5):
        next(budget)
    state, expected = budget.state(), next(budget)
    again = data.PairBatches(tp, layout=layout(), budget=True, state=state, **kw)
    got = next(again)
    assert set(got) == set(expected)
    for key in got:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    with pytest.raises(data.DataError, match="pack_rows=1 is too few") if base == "pair" \
            else contextlib.nullcontext():  # a pair of two 40-token sequences needs 2 rows of 80
        data.PairBatches(tp, layout=layout(), budget=True, pack_rows=1, **kw)


def test_budget_run_resumes_exactly(tmp_path, monkeypatch, caplog):
    """A budget run stopped after 4 updates and resumed to 8 ends bitwise where a straight
    8-update run ends (the plan is a function of seed and epoch; the cursor counts batches).
    Several processes are refused: they would hold different pair counts in one step."""
    caplog.set_level("INFO")
    kw = dict(packing="budget", layout="prefix_sharing", gradient_accumulation_steps=2,
              lr_scheduler_type="constant", warmup_steps=0)
    straight = run_weights(tmp_path, "straight", **kw)
    wd = tmp_path / "resumed"
    for steps in (4, 8):
        train_and_evaluate(tiny_config(tmp_path, max_steps=steps, eval_steps=4, save_steps=4,
                                       sample_prompts=0, **kw), wd)
    assert f"resumed from {wd / 'checkpoints' / '4'} at step 4" in caplog.text  # (a fresh
    # second run would match the straight one too)
    resumed = load_file(wd / "hf" / "model.safetensors")
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name], err_msg=name)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ConfigError, match="packing='budget' needs one process"):
        train_and_evaluate(tiny_config(tmp_path, **kw), tmp_path / "two")
