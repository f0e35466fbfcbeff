"""The fused attention kernels against XLA's, on this machine's accelerator (issue 17).

    python bench/attention_check.py            # on a GPU: cuDNN; on a TPU: splash; CPU: splash, interpreted

For each mask form a layout produces (plain pair rows: lengths; packed pair rows: segments;
prefix sharing: the dense mask, which cuDNN takes as a bias), random bfloat16 q, k, v of
GPT-2-medium-like (16 heads of 64) and Qwen3-like (16 query / 8 KV heads of 128) attention at 512
positions: the largest difference of the outputs at real queries and of the gradients of their
sum, fused kernel against XLA, both in bfloat16, and XLA in bfloat16 against XLA in float32 (the
rounding scale the kernel's difference should be compared with). Then one tiny GPT-2 and one tiny
Llama (2 layers) with packed rows: per-pair log-probs, fused against XLA.
"""

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dpo_jax import data, layouts, packing, steps  # noqa: E402
from dpo_jax.tuning.full import FullTuning  # noqa: E402
from dpo_jax.models import attention, common  # noqa: E402
from dpo_jax.models.attention import Mask  # noqa: E402


def mask_forms(b, t):
    rng = np.random.default_rng(0)
    n = rng.integers(t // 4, t + 1, b)
    attn = (np.arange(t)[None] < n[:, None]).astype(np.int32)
    seg = np.full((b, t), -1, np.int32)
    for i in range(b):
        at, s = 0, 0
        while at < n[i]:
            k = int(min(rng.integers(16, t // 2), n[i] - at))
            seg[i, at:at + k], at, s = s, at + k, s + 1
    parts = np.where(np.arange(t)[None] < n[:, None] // 3, 0,
                     np.where(np.arange(t)[None] < 2 * n[:, None] // 3, 1, 2))
    parts = np.where(attn.astype(bool), parts, -1)
    attn, seg, parts = map(jnp.asarray, (attn, seg, parts))
    return {"lengths": (Mask.causal_padded(attn), attn),
            "segments": (Mask.segments(seg, (seg >= 0).astype(jnp.int32)), seg >= 0),
            "prefix sharing (bias)": (layouts.prefix_sharing_mask(attn, parts), attn)}


def compare(impl, heads, kv_heads, d, b=4, t=512):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (b, t, heads, d))
    k = jax.random.normal(ks[1], (b, t, kv_heads, d))
    v = jax.random.normal(ks[2], (b, t, kv_heads, d))
    out = {}
    for name, (mask, real) in mask_forms(b, t).items():
        real = real.astype(jnp.float32)[:, :, None, None]

        def f(q, k, v, implementation):
            y = attention.attend(q, k, v, mask, scale=d ** -0.5, implementation=implementation)
            return (y.astype(jnp.float32) * real).sum(), y.astype(jnp.float32) * real
        run = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True),
                      static_argnums=3)
        cast = lambda dt: [x.astype(dt) for x in (q, k, v)]
        (_, y32), g32 = run(*cast(jnp.float32), "xla")
        (_, yx), gx = run(*cast(jnp.bfloat16), "xla")
        try:
            (_, yf), gf = run(*cast(jnp.bfloat16), impl)
        except Exception as e:  # noqa: BLE001 (report, go on)
            out[name] = f"{impl} failed: {type(e).__name__}: {str(e)[:200]}"
            continue
        diff = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
        out[name] = {f"out {impl} vs xla (bf16)": diff(yf, yx),
                     "out xla bf16 vs f32": diff(yx, y32),
                     f"grad {impl} vs xla (bf16)": max(diff(a, c) for a, c in zip(gf, gx)),
                     "grad xla bf16 vs f32": max(diff(a, c) for a, c in zip(gx, g32)),
                     "|grad| max": max(float(jnp.abs(a).max()) for a in g32)}
    return out


def model_logps(impl):
    from flax import nnx
    from dpo_jax.models.gpt2 import GPT2, GPT2Config
    from dpo_jax.models.llama import Llama, LlamaConfig
    rng = np.random.default_rng(1)
    mk = lambda lo, hi: [rng.integers(1, 1000, rng.integers(lo, hi)).astype(np.int32)
                         for _ in range(16)]
    tp = data.TokenizedPairs(mk(8, 200), mk(4, 120), mk(4, 120), {})
    res = {}
    for name, cls, cfg in [
            ("gpt2", GPT2, GPT2Config(vocab_size=1024, n_positions=1024, n_embd=256, n_layer=2,
                                      n_head=4, dtype="bfloat16")),
            ("llama", Llama, LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=64,
                                         max_position_embeddings=1024, dtype="bfloat16"))]:
        params = nnx.to_pure_dict(nnx.state(cls(cfg, rngs=nnx.Rngs(0)), nnx.Param))
        for layout_name in ("pair", "prefix_sharing"):
            b = data.PairBatches(tp, batch_size=16, max_length=384, pad_id=0, shuffle=False,
                                 layout=packing.make(layout_name, 128, packed=True))
            batch = b.collate(np.arange(16))
            got = {}
            for im in ("xla", impl):
                c = dataclasses.replace(cfg, attention=im)
                fn = steps.make_ref_logps_fn(
                    FullTuning(nnx.graphdef(common.abstract(cls, c))), b.layout,
                    chunk_size=0)
                got[im] = np.asarray(fn(None, params, batch)[0])
            res[f"{name} packed {layout_name}"] = {
                "max |logp|": float(np.abs(got["xla"]).max()),
                f"max |logp {impl} - logp xla|": float(np.abs(got[impl] - got["xla"]).max())}
    return res


def main():
    backend = jax.default_backend()
    impl = {"gpu": "cudnn", "tpu": "splash"}.get(backend, "splash")
    print(f"{jax.devices()[0].device_kind} ({backend}), jax {jax.__version__}: {impl} vs xla")
    report = {"gpt2-medium-like 16x64": compare(impl, 16, 16, 64),
              "qwen3-like 16/8x128": compare(impl, 16, 8, 128)}
    if backend != "cpu":
        report["models"] = model_logps(impl)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
