"""Issue 6: the same numbers on 1 or 8 (simulated CPU) devices, really split, resumable across
meshes; remat; clear errors for meshes that do not fit."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from trainutil import tiny_config
from dpo_jax import checkpoint, data, layouts, optim, sharding, steps
from dpo_jax.losses import LossConfig
from dpo_jax import models
from dpo_jax.models import common, gpt2
from dpo_jax.models.gpt2 import GPT2, GPT2Config
from dpo_jax.models.gemma import GemmaConfig
from dpo_jax.models.moe import MoEConfig
from dpo_jax.models.llama import LlamaConfig
from dpo_jax.tuning.full import FullTuning

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")

CFG = GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=4)
RULES = gpt2.FAMILY.rules
MESHES = [(8, 1, 1), (2, 4, 1), (1, 4, 2), (2, 2, 2)]


# Llama family with grouped-query attention: 4 query heads on 2 KV heads, an untied head
LLAMA = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    max_position_embeddings=32)


# Gemma 2: a sliding window shorter than the rows, both soft-caps, GQA over the tensor axis
GEMMA = GemmaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    max_position_embeddings=32, query_pre_attn_scalar=16.0, sliding_window=5,
                    local_layers=(True, False), attn_logit_softcapping=5.0,
                    final_logit_softcapping=3.0)


# a mixture of experts: 4 experts, top-2, dropless; the experts' matrices over fsdp / tensor
MOE = MoEConfig(vocab_size=96, hidden_size=64, moe_intermediate_size=32, num_experts=4,
                num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=32, qk_norm=True)


def host_params(cfg=CFG, seed=0):
    cls = models.family_of(cfg).model_cls
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(cls(cfg, rngs=nnx.Rngs(seed)),
                                                               nnx.Param)))


def pair_batch(pairs=8, seed=0):
    rng = np.random.default_rng(seed)
    mk = lambda lo, hi: [rng.integers(1, 90, rng.integers(lo, hi)).astype(np.int32)
                         for _ in range(pairs)]
    tp = data.TokenizedPairs(mk(2, 8), mk(2, 10), mk(2, 10), {})
    b = data.PairBatches(tp, batch_size=pairs, max_length=24, pad_id=0, shuffle=False)
    return data.stack_batches([b.collate(np.arange(pairs))])


def optimizer():
    c = tiny_config.__globals__["tiny"].get_config()
    # eps 1e-3 keeps Adam's update smooth in the gradient, so float reassociation across
    # devices (~1e-7) cannot flip the sign-like first step of near-zero gradients.
    c.learning_rate, c.warmup_steps, c.lr_scheduler_type, c.adam_epsilon = 1e-2, 0, "constant", 1e-3
    c.weight_decay = 0.01
    return optim.build(c, 10)


def run_steps(mesh, params, batches, state=None, n_steps=1, cfg=CFG, layout=None, first=None):
    """``n_steps`` train steps from ``params`` (or ``state``): (state, metrics per step); the
    params after the first step appended to ``first`` (host) where it is a list."""
    family = models.family_of(cfg)
    cfg = dataclasses.replace(cfg, mesh_axes=sharding.mesh_axes(mesh))  # as the trainer does
    opt, lr = optimizer()
    if state is None:
        state, state_sh = sharding.init_state(mesh, params, opt, family.rules)
    else:
        state_sh = jax.tree.map(lambda a: a.sharding, state)
    # the reference is always the initial model
    ref = sharding.place(host_params(cfg), state_sh["params"])
    sharding.check_model_fits(mesh, cfg, 8)
    graphdef = nnx.graphdef(common.abstract(family.model_cls, cfg))
    batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batches[0].items()}
    replicated = jax.sharding.NamedSharding(mesh, P())
    train_step = steps.make_train_step(FullTuning(graphdef), layout or layouts.make("pair"),
                                       LossConfig(beta=0.5), opt, lr, chunk_size=16,
                                       in_shardings=(state_sh, state_sh["params"], batch_sh),
                                       out_shardings=(state_sh, replicated))
    ms = []
    for b in batches[:n_steps]:
        state, m = train_step(state, ref, sharding.shard_batch(mesh, b))
        ms.append({k: float(v) for k, v in m.items()})
        if first is not None and len(ms) == 1:
            first.append(jax.device_get(state["params"]))
    return state, ms


@pytest.fixture(scope="module")
def single_device():
    """One device, two steps: (params after step 1, state after step 2, metrics of both)."""
    mesh = sharding.make_mesh(1, 1, 1)
    state, ms1 = run_steps(mesh, host_params(), [pair_batch(seed=0)])
    after_one = jax.device_get(state["params"])
    state, ms2 = run_steps(mesh, None, [pair_batch(seed=1)], state=state)
    return after_one, jax.device_get(state), ms1 + ms2


def opt_leaf(opt_state, suffix):
    found = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
             if sharding._path_name(path).endswith(suffix)]
    assert len(found) == 1, suffix
    return found[0]


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("shape", MESHES)
def test_one_step_matches_one_device_and_is_really_split(shape, single_device):
    mesh = sharding.make_mesh(*shape)
    state, ms = run_steps(mesh, host_params(), [pair_batch(seed=0)])
    after_one, _, ref_ms = single_device
    np.testing.assert_allclose(ms[0]["loss"], ref_ms[0]["loss"], rtol=1e-5)
    np.testing.assert_allclose(ms[0]["grad_norm"], ref_ms[0]["grad_norm"], rtol=1e-5)
    for a, b in zip(leaves(state["params"]), leaves(after_one)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)

    data_, fsdp, tensor = shape
    w = state["params"]["h"]["attn"]["c_attn"]["weight"]  # (2 layers, 64, 192)
    assert w.sharding.spec == P(None, "fsdp", "tensor")
    assert {s.data.shape for s in w.addressable_shards} == {(2, 64 // fsdp, 192 // tensor)}
    mu = opt_leaf(state["opt_state"], "mu.h.mlp.c_proj.weight")  # Adam's moment, (2, 256, 64)
    assert mu.sharding.spec == P(None, "tensor", "fsdp")
    assert {s.data.shape for s in mu.addressable_shards} == {(2, 256 // tensor, 64 // fsdp)}
    assert state["params"]["ln_f"]["weight"].sharding.spec == P()


def test_resume_on_another_mesh_continues_with_the_same_numbers(tmp_path, single_device):
    batches = [pair_batch(seed=0), pair_batch(seed=1)]
    state, _ = run_steps(sharding.make_mesh(8, 1, 1), host_params(), batches)
    ck = checkpoint.Checkpointer(tmp_path / "ckpt", async_save=False)
    ck.save(1, state, {"step": 1})
    ck.wait()
    # restore onto (2, 2, 2): build the target layout there, then continue one step
    mesh = sharding.make_mesh(2, 2, 2)
    opt, _ = optimizer()
    target, _ = sharding.init_state(mesh, host_params(seed=9), opt, RULES)
    restored, _ = ck.restore(1, checkpoint.abstract_like(target))
    w = restored["params"]["h"]["mlp"]["c_fc"]["weight"]
    assert {s.data.shape for s in w.addressable_shards} == {(2, 32, 128)}
    for a, b in zip(leaves(restored), leaves(state)):
        np.testing.assert_array_equal(a, b)
    cont, ms = run_steps(mesh, None, batches[1:], state=restored)
    _, ref_state, ref_ms = single_device
    np.testing.assert_allclose(ms[0]["loss"], ref_ms[1]["loss"], rtol=1e-5)
    for a, b in zip(leaves(cont["params"]), leaves(ref_state["params"])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_saveable"])
@pytest.mark.parametrize("base", [CFG, LLAMA], ids=["gpt2", "llama"])
def test_remat_gives_the_same_gradients(policy, base):
    from dpo_jax.logprobs import model_sequence_logprobs
    b = {k: v[0] for k, v in pair_batch().items()}
    params = jax.tree.map(jnp.asarray, host_params(base))
    model_cls = models.family_of(base).model_cls

    def grads(cfg):
        gd = nnx.graphdef(common.abstract(model_cls, cfg))
        f = lambda p: model_sequence_logprobs(nnx.merge(gd, p), b["input_ids"],
                                              b["attention_mask"], b["loss_mask"])[0].sum()
        return jax.jit(jax.grad(f))(params)

    import dataclasses
    plain = grads(base)
    remat = grads(dataclasses.replace(base, remat=True, remat_policy=policy))
    for a, r in zip(leaves(plain), leaves(remat)):
        # float32 sums reassociate: 1e-6 of the leaf's scale (Llama's untied head and embedding
        # gradients reach ~2.5; GPT-2's bound is the absolute 1e-6 it always was)
        scale = max(1.0, float(np.abs(a).max())) if base is LLAMA else 1.0
        np.testing.assert_allclose(r, a, atol=1e-6 * scale, rtol=0)


def test_bfloat16_reference_params():
    """The reference may be held in bf16 (never updated): the loss stays close to float32's."""
    params = jax.tree.map(jnp.asarray, host_params())
    graphdef = nnx.graphdef(common.abstract(GPT2, CFG))
    b = {k: v[0] for k, v in pair_batch().items()}
    loss_fn = steps.make_loss_fn(FullTuning(graphdef), layouts.make("pair"),
                                 LossConfig(beta=0.5), 0)
    f32 = loss_fn(params, params, b)[1]
    bf16 = loss_fn(params, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params), b)[1]
    np.testing.assert_allclose(float(bf16["loss"]), float(f32["loss"]), atol=5e-3)
    assert float(f32["rewards/margins"]) == 0.0 and abs(float(bf16["rewards/margins"])) > 0


def test_meshes_that_do_not_fit_fail_before_compiling():
    with pytest.raises(sharding.ShardingError, match="n_head=4 does not divide over the tensor "
                                                     "axis of size 8"):
        sharding.check_model_fits(sharding.make_mesh(1, 1, 8), CFG, 8)
    with pytest.raises(sharding.ShardingError, match=r"a batch of 6 pairs does not divide over "
                                                     r"the data x fsdp x expert axes \(4 x 2 x "
                                                     r"1 = 8\)"):
        sharding.check_model_fits(sharding.make_mesh(4, 2, 1), CFG, 6)
    with pytest.raises(sharding.ShardingError, match="needs 16 devices; there are 8"):
        sharding.make_mesh(4, 4, 1)
    with pytest.raises(sharding.ShardingError, match="at most one -1"):
        sharding.make_mesh(-1, -1, 1)
    odd = GPT2Config(vocab_size=96, n_positions=32, n_embd=36, n_layer=1, n_head=4)
    with pytest.raises(sharding.ShardingError, match=r"parameter h\.attn\.c_attn\.weight "
                                                     r"\(1, 36, 108\): dimension 1 \(36\) does "
                                                     r"not divide over mesh axis fsdp of size 8"):
        sharding.init_params(sharding.make_mesh(1, 8, 1), lambda: nnx.to_pure_dict(
            nnx.state(GPT2(odd, rngs=nnx.Rngs(0)), nnx.Param)), RULES)


def test_a_parameter_no_rule_matches_is_an_error():
    rules = RULES[:-1]  # without the last rule, for the replicated vectors
    with pytest.raises(sharding.ShardingError, match=r"no sharding rule matches parameter "
                                                     r"'h\.attn\.c_proj\.bias'"):
        sharding.param_specs(host_params(), rules)
    extra = dict(host_params(), lora={"weight": np.zeros((64, 4))})  # a fork's new matrix
    with pytest.raises(sharding.ShardingError, match="'lora.weight'"):
        sharding.param_specs(extra, RULES)


@pytest.mark.parametrize("base, shapes", [(LLAMA, [(1, 4, 2), (2, 2, 2)]),
                                          (GEMMA, [(2, 2, 2)])],
                         ids=["llama", "gemma2"])  # MoE: below
def test_gqa_families_give_the_same_step_on_every_mesh(base, shapes):
    """Query and KV heads split over the tensor axis (2 KV heads on a tensor axis of 2), the
    head and the embeddings over fsdp: the same loss and params as on one device (Gemma: its
    windowed and soft-capped attention too). Data parallelism alone is GPT-2's test above;
    Gemma takes the mesh with every axis (suite time)."""
    params = host_params(base)
    one, ms_one = run_steps(sharding.make_mesh(1, 1, 1), params, [pair_batch()], cfg=base)
    one = jax.device_get(one["params"])
    for shape in shapes:
        state, ms = run_steps(sharding.make_mesh(*shape), params, [pair_batch()], cfg=base)
        np.testing.assert_allclose(ms[0]["loss"], ms_one[0]["loss"], rtol=1e-5)
        np.testing.assert_allclose(ms[0]["grad_norm"], ms_one[0]["grad_norm"], rtol=1e-5)
        for a, b in zip(leaves(state["params"]), leaves(one)):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
        k = state["params"]["layers"]["self_attn"]["k_proj"]["weight"]  # (2, 64, 2 heads x 16)
        assert {sh.data.shape for sh in k.addressable_shards} == {(2, 64 // shape[1],
                                                                 32 // shape[2])}


def test_experts_split_over_the_expert_axis_give_the_same_steps(monkeypatch):
    """Issue 28: 8 experts over meshes (expert 8) and (expert 2 x fsdp 2 x tensor 2), the
    tokens exchanged by ``shard_map``: the same loss as one device and the same params after 12
    AdamW steps; each device holds only its experts. (Expert 4 x data 2 was a third mesh,
    dropped for suite time: the batch is split over expert x fsdp here already, and data
    differs from fsdp only in replicating the params.)"""
    from dpo_jax.models.moe import model as moe_model
    traced = []
    exchange = moe_model.expert_parallel
    monkeypatch.setattr(moe_model, "expert_parallel",
                        lambda mesh_axes, *a: traced.append(mesh_axes) or exchange(mesh_axes, *a))
    cfg = dataclasses.replace(MOE, num_experts=8)
    params = host_params(cfg)
    batches = [pair_batch(seed=i) for i in range(12)]
    one, ms_one = run_steps(sharding.make_mesh(1, 1, 1), params, batches, n_steps=12, cfg=cfg)
    one = jax.device_get(one["params"])
    assert not traced  # one device: no exchange
    for data_, fsdp, tensor, expert in [(1, 1, 1, 8), (1, 2, 2, 2)]:
        mesh = sharding.make_mesh(data_, fsdp, tensor, expert=expert)
        state, ms = run_steps(mesh, params, batches, n_steps=12, cfg=cfg)
        np.testing.assert_allclose(ms[0]["loss"], ms_one[0]["loss"], rtol=1e-5)
        np.testing.assert_allclose([m["loss"] for m in ms], [m["loss"] for m in ms_one],
                                   rtol=1e-4)
        for a, b in zip(leaves(state["params"]), leaves(one)):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
        assert dict(traced[-1])["expert"] == expert  # the exchange ran, over this mesh
        up = state["params"]["layers"]["mlp"]["experts"]["up_proj"]  # (2, 8, 64, 32)
        assert {sh.data.shape for sh in up.addressable_shards} == {
            (2, 8 // expert, 64 // fsdp, 32 // tensor)}


def test_tiled_attention_on_a_mesh_equals_xla_on_one_device(monkeypatch):
    """``attention="tiled"`` over data 2 x fsdp 2 x tensor 2 (no context axis: each device's
    rows and heads in tiles of 8 x 8, a shard_map with no collectives), with the MLP in tiles
    of 5 positions too (rows of 24: 5 tiles, the last padded; its hidden units over tensor),
    on Gemma 2 (windows, soft-caps, grouped-query heads over tensor): one device's XLA loss
    and grad norm (untiled MLP) and params within 1e-5."""
    from dpo_jax.models import attention
    monkeypatch.setattr(attention, "RING_TILE", 8)
    monkeypatch.setattr(attention, "RING_KEY_TILE", 8)
    params, batch = host_params(GEMMA), [pair_batch(seed=0)]
    one, ms_one = run_steps(sharding.make_mesh(1, 1, 1), params, batch, cfg=GEMMA)
    tiled = dataclasses.replace(GEMMA, attention="tiled", mlp_tile=5)
    state, ms = run_steps(sharding.make_mesh(2, 2, 2), params, batch, cfg=tiled)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(ms[0][key], ms_one[0][key], rtol=1e-5)
    for a, b in zip(leaves(state["params"]), leaves(one["params"])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


CONTEXT_MESHES = [dict(context=2), dict(context=4), dict(context=8),
                  dict(context=2, fsdp=2, tensor=2)]
# the MLP in tiles of 4 positions of each device's share of a row (common.feed_forward)
TILED_MLP = [dict(context=2, mlp_tile=4)]


@pytest.mark.parametrize("base, layout, packed, meshes, n_steps, zigzag", [
    (CFG, "pair", False, CONTEXT_MESHES, 12, True),
    (LLAMA, "prefix_sharing", True, CONTEXT_MESHES[2:], 1, True),
    (GEMMA, "prefix_sharing", False, TILED_MLP, 1, True),
    (LLAMA, "pair", True, CONTEXT_MESHES[2:3], 1, False),
    (MOE, "prefix_sharing", False, [dict(context=4), dict(context=2, expert=2, tensor=2)], 1,
     True)],
    ids=["gpt2-pair", "llama-shared-packed", "gemma2-shared", "llama-pair-packed-index-order",
         "moe-shared-experts"])
def test_context_parallel_steps_equal_one_device(base, layout, packed, meshes, n_steps, zigzag,
                                                 monkeypatch):
    """Issue 29: each row's positions split over a context axis of 2, 4 and 8 (and context 2 x
    fsdp 2 x tensor 2): rows of 21 positions padded to the axis (to 2n: the layers take them in
    zig-zag order; to n only: in index order), packed segments and prefix sharing's mask
    travelling with them; the loss, grad norm and updated params of one device (within 1e-5;
    after 12 AdamW steps, on context 2 x fsdp 2 x tensor 2, within 1e-4); a mixture of experts
    over context alone (each device routing its own tokens) and with its expert axis beside
    the context axis; Gemma with its MLP in tiles of each device's positions."""
    from dpo_jax import packing
    from dpo_jax.models import common as common_
    split, orders = [], []
    pin, order_of = common_.split_positions, common_.context_order
    monkeypatch.setattr(common_, "split_positions",
                        lambda x, mesh_axes, **kw: split.append(dict(mesh_axes)["context"])
                        or pin(x, mesh_axes, **kw))
    monkeypatch.setattr(common_, "context_order",
                        lambda *a: orders.append(order_of(*a)) or orders[-1])

    def batch(context=1, rows_split=1, seed=0):
        rng = np.random.default_rng(seed)
        mk = lambda lo, hi: [rng.integers(1, 90, rng.integers(lo, hi)).astype(np.int32)
                             for _ in range(8)]
        tp = data.TokenizedPairs(mk(2, 8), mk(2, 10), mk(2, 10), {})
        b = data.PairBatches(tp, batch_size=8, max_length=21, pad_id=0, shuffle=False,
                             layout=packing.make(layout, 10, packed=packed), epochs=None,
                             length_multiple=context * (2 if zigzag and context > 1 else 1))
        if packed:
            b.fit_packing(1, multiple=rows_split)
        return b.layout, data.stack_batches([b.collate(np.arange(8))])

    params = host_params(base)
    steps_ = [batch(seed=i) for i in range(n_steps)]
    after_one = []
    one, ms_one = run_steps(sharding.make_mesh(1, 1, 1), params, [b for _, b in steps_],
                            cfg=base, layout=steps_[0][0], n_steps=n_steps, first=after_one)
    one = jax.device_get(one["params"])
    for sizes in meshes:
        # the last mesh (every axis, where several are run) takes all the steps, the others one
        n = n_steps if sizes is meshes[-1] else 1
        fsdp, context = sizes.get("fsdp", 1), sizes["context"]
        mesh = sharding.make_mesh(1, fsdp, sizes.get("tensor", 1), context=context,
                                  expert=sizes.get("expert", 1))
        steps_ = [batch(context, fsdp * sizes.get("expert", 1), seed=i) for i in range(n)]
        assert steps_[0][1]["input_ids"].shape[-1] % context == 0  # padded to the axis
        split.clear(), orders.clear()
        state, ms = run_steps(mesh, params, [b for _, b in steps_],
                              cfg=dataclasses.replace(base, mlp_tile=sizes.get("mlp_tile", 0)),
                              layout=steps_[0][0], n_steps=n)
        assert split and set(split) == {context}  # the positions were pinned to the axis
        assert orders and {o is not None for o in orders} == {zigzag}, sizes
        np.testing.assert_allclose(ms[0]["loss"], ms_one[0]["loss"], rtol=1e-5, err_msg=sizes)
        np.testing.assert_allclose(ms[0]["grad_norm"], ms_one[0]["grad_norm"], rtol=1e-5)
        np.testing.assert_allclose([m["loss"] for m in ms], [m["loss"] for m in ms_one[:n]],
                                   rtol=1e-4)
        for a, b_ in zip(leaves(state["params"]), leaves(one if n == n_steps else after_one[0])):
            np.testing.assert_allclose(a, b_, atol=1e-5 if n == 1 else 1e-4, rtol=0)


@pytest.mark.parametrize("base, width, tile", [(LLAMA, LLAMA.intermediate_size, 0),
                                               (LLAMA, LLAMA.intermediate_size, 2),
                                               (MOE, MOE.num_experts, 0)],
                         ids=["llama", "llama-mlp-tiles", "moe"])
def test_each_context_device_computes_only_its_positions(base, width, tile):
    """Issue 29: with the positions split over a context axis of 4, no program of the compiled
    train step holds the batch's (rows x positions) as one axis of tokens: each device's
    projections and MLP (a mixture of experts: its router and experts) take its quarter of the
    positions. (Flattening rows with split positions has no sharding of its own: XLA gathered
    every token onto every device there, and computed every token's matmuls on each.) With
    the MLP in tiles of 2 positions, each device's hidden units are a tile of its own
    positions: (rows, 2, hidden) for one step of the tiles' loop, never a quarter's."""
    import re
    mesh = sharding.make_mesh(1, 1, 1, context=4)
    cfg = dataclasses.replace(base, mesh_axes=sharding.mesh_axes(mesh), mlp_tile=tile)
    family = models.family_of(cfg)
    opt, lr = optimizer()
    state, state_sh = sharding.init_state(mesh, host_params(base), opt, family.rules)
    batch = pair_batch()
    rows, length = batch["input_ids"].shape[1:]
    step = steps.make_train_step(
        FullTuning(nnx.graphdef(common.abstract(family.model_cls, cfg))), layouts.make("pair"),
        LossConfig(beta=0.5), opt, lr, chunk_size=16,
        in_shardings=(state_sh, state_sh["params"],
                      {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}),
        out_shardings=(state_sh, jax.sharding.NamedSharding(mesh, P())))
    hlo = step.lower(state, state["params"], sharding.shard_batch(mesh, batch)).compile().as_text()
    assert not re.findall(rf"\w+\[{rows * length},\d+\]", hlo)  # no whole rows as tokens
    if not tile:
        assert re.search(rf"\[{rows},{length // 4},{width}\]", hlo)  # a quarter of the positions
        return
    assert re.search(rf"\[{rows},{tile},{width}\]", hlo)  # a tile, on each device
    assert not re.search(rf"\[{rows},{length // 4},{width}\]", hlo)


@pytest.mark.parametrize("softcap, zigzag, tile, form", [
    (None, False, None, "rule"), (5.0, False, (2, 4), "rule"), (None, True, None, "rule"),
    (5.0, True, (2, 2), "rule"), (None, False, (2, 4), "dense"), (5.0, True, (4, 2), "dense")])
def test_ring_attention_equals_attention_over_the_whole_row(softcap, zigzag, tile, form,
                                                            monkeypatch):
    """attention.ring over a context axis of 4 (x data 2): grouped-query heads, a causal mask
    with a sliding window (row 0), left padding (row 1), packed units (row 2) and prefix
    sharing's rejected-skips-chosen rule (row 3), Gemma 2's soft-cap; the row in index order or
    in zig-zag order (the causally hidden half blocks skipped); values and gradients (the
    custom VJP's ring backward pass) equal XLA attention over the whole row wherever a query
    attends to something. ``tile``: (queries, keys) per tile within a step, so that a step's
    piece is cut both ways (row order, a device's 6 positions: 3 query tiles of 2, 2 key tiles
    of 3; zig-zag, a chunk of 3: 2 tiles, the second padded with a query or a key that nothing
    sees). ``form``: the ring computes each tile's mask from the mask's ``Rule`` (what training
    passes), or takes its rows of the dense mask (a mask without a rule)."""
    from dpo_jax.models import attention
    if tile:
        monkeypatch.setattr(attention, "RING_TILE", tile[0])
        monkeypatch.setattr(attention, "RING_KEY_TILE", tile[1])
    rng = np.random.default_rng(0)
    b, t, h, kh, d = 4, 24, 4, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) for n in (h, kh, kh))
    real = np.ones((b, t), bool)
    real[1, :5] = False  # left padding: queries that attend to nothing
    causal = np.tril(np.ones((t, t), bool))[None] & real[:, None, :]
    idx = np.arange(t)
    causal[0] &= idx[:, None] - idx[None, :] < 6  # a window of 6 positions
    seg = np.repeat(np.arange(3), 8)
    causal[2] &= seg[:, None] == seg[None, :]  # three packed units in row 2
    causal[3] &= ~((seg[:, None] == 2) & (seg[None, :] == 1))  # prompt, chosen, rejected
    mask = jnp.asarray(causal)
    units = np.zeros((b, t), np.int32)
    units[2] = seg
    branch = np.zeros((b, t), np.int32)
    branch[3] = seg
    rule = attention.Rule.of(jnp.asarray(real), unit=jnp.asarray(units),
                             branch=jnp.asarray(branch))
    reach = np.full((b, t), attention.NO_REACH, np.int32)
    reach[0] = idx - 6
    rule = dataclasses.replace(rule, positions=jnp.asarray(np.broadcast_to(idx, (b, t))),
                               reach=jnp.asarray(reach))
    np.testing.assert_array_equal(np.asarray(rule.sees(rule)), causal)
    mesh = sharding.make_mesh(2, 1, 1, context=4)
    axes = sharding.mesh_axes(mesh)
    place = lambda a: jax.device_put(a, jax.sharding.NamedSharding(mesh, P("data", "context")))
    order = attention.zigzag(t, 4) if zigzag else np.arange(t)
    back = np.argsort(order)
    ring_mask = attention.Mask(mask, rule=rule, causal=True)
    ring_mask = ring_mask.reordered(order, 4) if zigzag else ring_mask
    ring_mask = ring_mask.rule_only() if form == "rule" else attention.Mask(
        ring_mask.dense, causal=True, order=ring_mask.order)
    ring = jax.jit(lambda q, k, v: attention.ring(
        *(a[:, order] for a in (q, k, v)), ring_mask, scale=0.3, mesh_axes=axes,
        softcap=softcap)[:, back])
    if softcap:
        whole = lambda q, k, v: attention.attend(q, k, v, mask, scale=0.3, softcap=softcap)
    else:
        whole = lambda q, k, v: attention.attend(q, k, v, mask, scale=0.3)
    attends = np.asarray(causal.any(-1))
    np.testing.assert_allclose(np.asarray(ring(*map(place, (q, k, v))))[attends],
                               np.asarray(whole(q, k, v))[attends], atol=1e-5)
    cot = jnp.asarray(rng.normal(size=(b, t, h, d)) * attends[..., None, None], jnp.float32)
    g_ring = jax.jit(jax.grad(lambda *a: jnp.sum(ring(*a) * cot), argnums=(0, 1, 2)))(
        *map(place, (q, k, v)))
    g_whole = jax.grad(lambda *a: jnp.sum(whole(*a) * cot), argnums=(0, 1, 2))(q, k, v)
    for a, b_ in zip(g_ring, g_whole):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-5)


def test_a_mesh_that_does_not_fit_the_experts_is_a_clear_error():
    with pytest.raises(sharding.ShardingError, match=r"num_experts=4 does not divide over the "
                                                     r"expert axis of size 8 \(config key "
                                                     r"mesh_expert\)"):
        sharding.check_model_fits(sharding.make_mesh(1, 1, 1, expert=8), MOE, 8)
    with pytest.raises(sharding.ShardingError, match=r"mesh_expert=2 splits experts, and this "
                                                     r"model \(LlamaConfig\) has none"):
        sharding.check_model_fits(sharding.make_mesh(1, 1, 1, expert=2), LLAMA, 8)


def test_kv_heads_that_do_not_divide_the_tensor_axis_are_a_clear_error():
    with pytest.raises(sharding.ShardingError, match=r"num_key_value_heads=2 does not divide "
                                                     r"over the tensor axis of size 4 \(config "
                                                     r"key mesh_tensor\)"):
        sharding.check_model_fits(sharding.make_mesh(2, 1, 4), LLAMA, 8)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lora_gives_the_same_step_on_every_mesh(tmp_path, dora):
    """LoRA's adapters (sharded as their base matrices: A by its input, B by its output; DoRA's
    magnitudes by the output) and the frozen base: the same loss and adapters on one device and
    on (2, 2, 2) (LoRA) / (1, 4, 2) (DoRA) (one mesh each: suite time)."""
    from trainutil import tiny_config
    from dpo_jax import trainer

    def two_steps(mesh):
        c = tiny_config(tmp_path, **{"model.model_type": "llama"})
        c.model = __import__("configs.tiny_llama", fromlist=["x"]).get_config().model
        c.lora_rank, c.lora_dropout, c.learning_rate, c.warmup_steps = 4, 0.1, 1e-2, 0
        c.use_dora = dora
        c.mesh_data, c.mesh_fsdp, c.mesh_tensor = mesh
        run = trainer.setup(c, tmp_path / f"wd{mesh}")
        ms = []
        for _ in range(2):
            run.state, m = run.train_step(run.state, run.frozen,
                                          sharding.shard_batch(run.mesh, run.batch))
            run.batch = run.next_update()
            ms.append(float(m["loss"]))
        run.ckpt.close()
        return ms, jax.device_get(run.state["params"])

    ms_one, one = two_steps((1, 1, 1))
    for mesh in [(1, 4, 2)] if dora else [(2, 2, 2)]:
        ms, params = two_steps(mesh)
        np.testing.assert_allclose(ms, ms_one, rtol=1e-5)
        for a, b in zip(leaves(params), leaves(one)):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
