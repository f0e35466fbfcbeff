"""Issues 7, 15 and 27: every saving gives the plain step's loss and gradients (1e-5) on a tiny
model of each family (GPT-2; Llama with GQA and an untied head, where prefix sharing's continued
positions go through RoPE; Gemma with a sliding window shorter than the rows): completion-only LM head, prefix sharing, precomputed reference
log-probs. Rows include chosen and rejected of different lengths, and left-padded rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpo_jax import data, layouts, optim, packing, steps
from dpo_jax.losses import LossConfig
from dpo_jax.models import common
from dpo_jax.models.gpt2 import GPT2, GPT2Config
from dpo_jax.models.gemma import Gemma, GemmaConfig
from dpo_jax.models.llama import Llama, LlamaConfig
from dpo_jax.models.moe import MoE, MoEConfig
from dpo_jax.tuning.full import FullTuning

# Gemma with a window (4) shorter than the rows (up to 20 tokens), so prefix sharing's rejected
# tokens and packed segments are windowed on their own positions; one local and one global layer
GEMMA = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
             query_pre_attn_scalar=8.0, sliding_window=4, local_layers=(True, False))

FAMILIES = {
    "gpt2": (GPT2, GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)),
    "llama": (Llama, LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=8, max_position_embeddings=64)),
    # every Gemma switch at once (one tiny model keeps the suite short): Gemma 2's soft-caps,
    # Gemma 3's q/k norms and separate global / local RoPE
    "gemma": (Gemma, GemmaConfig(model_type="gemma3_text", attn_logit_softcapping=5.0,
                                 final_logit_softcapping=3.0, qk_norm=True, rope_theta=1e6,
                                 rope_type="linear", rope_factor=2.0, **GEMMA)),
    # dropless top-2 of 4 experts (Qwen3-MoE's routing): the token groups differ by layout
    "moe": (MoE, MoEConfig(vocab_size=97, hidden_size=32, moe_intermediate_size=24,
                           num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           max_position_embeddings=64, qk_norm=True)),
}
W = 9  # max completion length


def pairs(n=6, seed=0):
    rng = np.random.default_rng(seed)
    mk = lambda lo, hi: [rng.integers(1, 96, rng.integers(lo, hi)).astype(np.int32)
                         for _ in range(n)]
    p, c, r = mk(1, 7), mk(1, W + 1), mk(1, W + 1)
    c[0], r[0] = c[0][:2], rng.integers(1, 96, W).astype(np.int32)  # very different lengths
    return data.TokenizedPairs(p, c, r, {})


def batch(tp, layout="pair", window=0):
    """(layout object, the batch of every pair in tp)."""
    b = data.PairBatches(tp, batch_size=len(tp), max_length=20, pad_id=0, shuffle=False,
                         layout=layout, completion_window=window)
    return b.layout, b.collate(np.arange(len(tp)))


def left_pad(b, k=3):
    """The same batch with k padding positions in front of every row."""
    out = dict(b)
    for key, fill in (("input_ids", 0), ("attention_mask", 0), ("loss_mask", 0),
                      ("position_ids", 0), ("segment_ids", -1), ("tail_mask", 0)):
        if key in b:
            out[key] = np.pad(b[key], ((0, 0), (k, 0)), constant_values=fill)
    if "score_pos" in b:
        out["score_pos"] = b["score_pos"] + k
    return out


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def models(request):
    cls, cfg = FAMILIES[request.param]
    graphdef = nnx.graphdef(common.abstract(cls, cfg))
    ref = nnx.to_pure_dict(nnx.state(cls(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    # a policy that differs from the reference, so the loss is not a constant ln 2
    noise = jax.tree.map(lambda a: 0.02 * jax.random.normal(jax.random.key(1), a.shape), ref)
    policy = jax.tree.map(jnp.add, ref, noise)
    return graphdef, policy, ref


def loss_and_grads(models, layout_batch, loss_type="sigmoid"):
    graphdef, policy, ref = models
    layout, b = layout_batch
    fn = steps.make_loss_fn(FullTuning(graphdef), layout,
                            LossConfig(loss_type=loss_type, beta=0.3), 5)
    (loss, m), g = jax.jit(jax.value_and_grad(fn, has_aux=True))(policy, ref, b)
    return float(loss), m, g


def assert_same(a, b):
    (la, ma, ga), (lb, mb, gb) = a, b
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    for k in ("logps/chosen", "logps/rejected", "rewards/margins"):
        np.testing.assert_allclose(float(mb[k]), float(ma[k]), rtol=1e-5, atol=1e-6)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5,
                                   atol=1e-5 * np.abs(np.asarray(x)).max())


def only_for(request, families, why):
    """Runs a check on these families only (the suite's time: what it checks does not depend
    on the other families' modules, which the other tests here cover)."""
    name = request.node.callspec.params["models"]
    if name not in families:
        pytest.skip(f"{why}: checked on {', '.join(families)}")


@pytest.mark.parametrize("pad, loss_type", [(0, "sigmoid"), (3, "ipo")])  # ipo: token counts
def test_savings_match_the_plain_step(models, pad, loss_type, request):
    if pad:  # left padding: a family's positions (RoPE) and (Gemma) windows under it
        only_for(request, ("llama", "gemma"), "left padding moves no router, and GPT-2's "
                 "learned positions read the position ids RoPE reads")
    tp = pairs()
    shift = (lambda lb: (lb[0], left_pad(lb[1], pad))) if pad else (lambda lb: lb)
    plain = loss_and_grads(models, shift(batch(tp)), loss_type)
    assert plain[0] != pytest.approx(np.log(2))
    head_only = loss_and_grads(models, shift(batch(tp, window=W)), loss_type)
    shared = loss_and_grads(models, shift(batch(tp, "prefix_sharing", window=W)), loss_type)
    assert_same(plain, head_only)
    assert_same(plain, shared)


def test_precomputed_reference_matches(models, request):
    only_for(request, ("gpt2", "llama"), "the reference's log-probs are a layout's")
    graphdef, policy, ref = models
    tp = pairs(seed=3)
    plain = loss_and_grads(models, batch(tp))
    layout, b = batch(tp, "prefix_sharing", window=W)  # computed in the fast layout
    ref_fn = steps.make_ref_logps_fn(FullTuning(graphdef), layout, chunk_size=0)
    c, r = ref_fn(None, ref, b)
    batches = data.PairBatches(tp, batch_size=len(tp), max_length=20, pad_id=0, shuffle=False,
                               layout="prefix_sharing", completion_window=W)
    batches.set_reference(c, r)  # the data pipeline's own way in
    b = batches.layout, batches.collate(np.arange(len(tp)))
    assert "ref_chosen_logps" in b[1]
    assert_same(plain, loss_and_grads(models, b))


def test_prefix_sharing_attention_mask():
    seg = np.array([[0, 0, 1, 1, 2, 2, 2, -1]])
    attn = (seg >= 0).astype(np.int32)
    m = np.asarray(layouts.prefix_sharing_mask(jnp.asarray(attn), jnp.asarray(seg)).dense)[0]
    assert m[5].tolist() == [1, 1, 0, 0, 1, 1, 0, 0]   # rejected: prompt + itself, causal
    assert m[3].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]   # chosen: prompt + itself
    assert not m[:, 7].any()                           # padding is never a key


def test_completions_longer_than_the_window_are_refused():
    with pytest.raises(data.DataError, match="scoring window 4"):
        batch(pairs(), window=4)
    with pytest.raises(layouts.LayoutError, match="prefix_sharing' needs max_completion_length"):
        batch(pairs(), "prefix_sharing")


def packed(tp, layout):
    """(packed layout sized for tp, the batch of every pair in tp packed into its rows)."""
    b = data.PairBatches(tp, batch_size=len(tp), max_length=20, pad_id=0, shuffle=False,
                         layout=packing.make(layout, W, packed=True))
    assert b.layout.rows < b.layout.base.batch_rows(len(tp))  # really packed: fewer rows
    return b.layout, b.collate(np.arange(len(tp)))


@pytest.mark.parametrize("layout", ["pair", "prefix_sharing"])
def test_budget_batches_accumulate_to_the_plain_step(models, layout, request):
    """packing='budget': micro-batches holding different numbers of pairs, accumulated as a
    train step accumulates them (each weighted by its pair count), give the loss, metrics and
    gradients of one plain batch of all those pairs, within 1e-5."""
    only_for(request, ("gpt2", "llama"), "accumulating budget batches is the step's")
    tp = pairs(n=11, seed=7)
    b = data.PairBatches(tp, batch_size=3, max_length=20, pad_id=0, shuffle=False,
                         layout=packing.make(layout, W, packed=True), budget=True, pack_rows=2)
    plan = b._plan(0, drop_remainder=False, shuffle=False)
    assert len({len(rows) for rows in plan}) > 1  # uneven pair counts
    micro = data.stack_batches([b.collate(rows) for rows in plan])
    graphdef, policy, ref = models
    fn = steps.make_loss_fn(FullTuning(graphdef), b.layout,
                            LossConfig(loss_type="sigmoid", beta=0.3), 5)
    grad_fn = jax.value_and_grad(lambda p, mb, i: fn(p, ref, mb), has_aux=True)
    (loss, m), g = jax.jit(lambda p, mb: optim.accumulate_gradients(
        grad_fn, p, mb, mb["valid"].sum(axis=-1)))(policy, micro)
    assert_same(loss_and_grads(models, batch(tp)), (float(loss), m, g))


@pytest.mark.parametrize("layout", ["pair", "prefix_sharing"])
def test_packed_rows_match_the_plain_step(models, layout, request):
    """Several pairs per row (units of unequal length, positions restarting, attention within
    each unit): the per-pair log-probs, loss and gradients of the plain step, within 1e-5."""
    if layout == "pair":  # (Gemma's windows and MoE's routing meet packing in prefix sharing)
        only_for(request, ("llama",), "packed pair rows are prefix sharing's segments")
    tp = pairs(n=8, seed=5)
    plain = loss_and_grads(models, batch(tp))
    pk = loss_and_grads(models, packed(tp, layout))
    assert_same(plain, pk)
    graphdef, policy, _ = models
    fn = steps.make_ref_logps_fn(FullTuning(graphdef), *packed(tp, layout)[:1],
                                 chunk_size=0)
    per_pair = [np.asarray(x) for x in fn(None, policy, packed(tp, layout)[1])]
    plain_fn = steps.make_ref_logps_fn(FullTuning(graphdef), batch(tp)[0], chunk_size=0)
    for a, b in zip(per_pair, plain_fn(None, policy, batch(tp)[1])):
        np.testing.assert_allclose(a, np.asarray(b), rtol=1e-5)  # each pair's log-probs
