"""The Llama family's side of the model contract: config.json <-> ``LlamaConfig`` for the HF
model_types llama, mistral, qwen2, qwen3 and phi3, the HF tensor-name table and the sharding
rules.

A config field the module does not implement is an error naming the field (another rope type,
``mlp_bias``, an activation other than SiLU), never silently ignored. A sliding window is kept in
the config and enforced as a length limit: within it attention is plainly causal, so a run whose
sequences never exceed it is exact. Phi-3 / Phi-4-mini: the checkpoint's fused ``qkv_proj`` and
``gate_up_proj`` are split on import and fused again on export; a partial rotary factor rotates
the first part of each head; ``longrope`` (``su``) uses its short factors and attention factor,
with ``original_max_position_embeddings`` as a length limit (past it transformers switches to the
long factors for the whole sequence).
"""

from __future__ import annotations

import math

from jax.sharding import PartitionSpec as P

from dpo_jax.models import Family, HFTensor, common, flatten
from dpo_jax.models.llama.model import ROPE_TYPES, Llama, LlamaConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "phi3": "Phi3ForCausalLM"}
# Phi-3 / Phi-4-mini fuse q, k, v and gate, up in their checkpoints: split on import, fused again
# on export (our modules keep them apart, so LoRA targets and sharding rules are the Llama ones)
FUSED = {"self_attn.q_proj.weight": ("self_attn.qkv_proj.weight",
                                     ("q_proj", "k_proj", "v_proj")),
         "mlp.gate_proj.weight": ("mlp.gate_up_proj.weight", ("gate_proj", "up_proj"))}

# Megatron style, as GPT-2's: q/k/v, gate and up split their outputs over `tensor` (query and KV
# heads, MLP units), o and down their inputs; the other matrix dimension over `fsdp`. The layer
# axis is never split. Embedding and untied head: (V, C), split along the width.
RULES = (
    (r"embed_tokens\.weight", P(None, "fsdp")),
    (r"head\.weight", P(None, "fsdp")),
    (r"layers\.self_attn\.(q|k|v)_proj\.weight", P(None, "fsdp", "tensor")),
    (r"layers\.self_attn\.(q|k|v)_proj\.bias", P(None, "tensor")),
    (r"layers\.self_attn\.o_proj\.weight", P(None, "tensor", "fsdp")),
    (r"layers\.mlp\.(gate|up)_proj\.weight", P(None, "fsdp", "tensor")),
    (r"layers\.mlp\.down_proj\.weight", P(None, "tensor", "fsdp")),
    # the vectors, replicated: norm scales, q/k norms, o_proj's bias
    (r"(layers\.)?(input_layernorm|post_attention_layernorm|norm|self_attn\.(q|k)_norm)"
     r"\.weight|layers\.self_attn\.o_proj\.bias", P()),
)


def _rope(hf: dict) -> dict:
    """The rope fields of LlamaConfig from transformers 5's ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    kinds = {k: d.get("rope_type", d.get("type")) for k, d in (("rope_parameters", params),
                                                               ("rope_scaling", legacy)) if d}
    if len(kinds) == 2 and len(set(kinds.values())) > 1:
        raise ValueError(f"rope_parameters says rope_type={kinds['rope_parameters']!r} and the "
                         f"legacy rope_scaling says {kinds['rope_scaling']!r} (transformers 5 "
                         "reads the legacy one): keep one of the two fields")
    kind = params.get("rope_type", params.get("type", legacy.get("rope_type",
                                                                  legacy.get("type", "default"))))
    kind = "longrope" if kind == "su" else kind  # Phi-3's first name for it
    merged = {**legacy, **params}
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_type={kind!r} (in rope_parameters / rope_scaling) is not "
                         f"supported; supported: {', '.join(ROPE_TYPES)}")
    out = {"rope_type": kind,
           "rope_theta": float(merged.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    partial = merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        out["partial_rotary_factor"] = float(partial)
    if kind == "longrope":
        original = int(merged.get("original_max_position_embeddings",
                                  hf.get("original_max_position_embeddings")))
        factor = merged.get("factor") or hf.get("max_position_embeddings", original) / original
        attention = merged.get("attention_factor")
        if attention is None:
            attention = (1.0 if factor <= 1.0 else
                         math.sqrt(1 + math.log(factor) / math.log(original)))
        out.update(rope_short_factor=tuple(float(x) for x in merged["short_factor"]),
                   rope_long_factor=tuple(float(x) for x in merged["long_factor"]),
                   rope_attention_factor=float(attention),
                   rope_original_max_position_embeddings=original)
    if kind in ("linear", "llama3"):
        out["rope_factor"] = float(merged["factor"])
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(merged["low_freq_factor"]),
                   rope_high_freq_factor=float(merged["high_freq_factor"]),
                   rope_original_max_position_embeddings=int(
                       merged.get("original_max_position_embeddings",
                                  hf.get("max_position_embeddings"))))
    return out


def _sliding_window(hf: dict, model_type: str):
    if model_type in ("mistral", "phi3"):
        return hf.get("sliding_window", 4096)
    if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        return hf.get("sliding_window")
    if "sliding_attention" in (hf.get("layer_types") or []):
        return hf.get("sliding_window")
    return None


def config_from_hf(hf: dict, **compute) -> LlamaConfig:
    model_type = hf.get("model_type", "llama")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (SwiGLU with silu)")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported")
    heads = hf.get("num_attention_heads", 32)
    eos = hf.get("eos_token_id", 2)
    rope = _rope(hf)
    if "partial_rotary_factor" in rope and model_type != "phi3":
        raise ValueError(f"partial_rotary_factor is not supported for {model_type} (RoPE on "
                         "the whole head; Phi-3's rotates a part)")
    return LlamaConfig(
        model_type=model_type, vocab_size=hf.get("vocab_size", 32000),
        hidden_size=hf.get("hidden_size", 4096),
        intermediate_size=hf.get("intermediate_size", 11008),
        num_hidden_layers=hf.get("num_hidden_layers", 32), num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf.get("hidden_size", 4096) // heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        attention_bias=bool(hf.get("attention_bias", False)) and model_type != "qwen2",
        qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
        sliding_window=_sliding_window(hf, model_type),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 1,
        eos_token_id=tuple(eos) if isinstance(eos, list) else (eos if eos is not None else 2),
        **rope, **compute)


def config_to_hf(cfg: LlamaConfig) -> dict:
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type in ("linear", "llama3"):
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_position_embeddings)
    if cfg.rope_type == "longrope":
        rope.update(short_factor=list(cfg.rope_short_factor),
                    long_factor=list(cfg.rope_long_factor),
                    attention_factor=cfg.rope_attention_factor,
                    original_max_position_embeddings=cfg.rope_original_max_position_embeddings)
    if cfg.partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = cfg.partial_rotary_factor
    out = {"architectures": [ARCHITECTURES[cfg.model_type]], "model_type": cfg.model_type,
           "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
           "intermediate_size": cfg.intermediate_size,
           "num_hidden_layers": cfg.num_hidden_layers,
           "num_attention_heads": cfg.num_attention_heads,
           "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
           "hidden_act": "silu", "max_position_embeddings": cfg.max_position_embeddings,
           "rms_norm_eps": cfg.rms_norm_eps, "rope_parameters": rope,
           "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
           "eos_token_id": (list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple)
                            else cfg.eos_token_id)}
    if cfg.model_type in ("llama", "qwen3"):
        out["attention_bias"] = cfg.attention_bias
    if cfg.model_type == "llama":
        out["mlp_bias"] = False
    if cfg.model_type in ("mistral", "phi3"):
        out["sliding_window"] = cfg.sliding_window
    if cfg.model_type == "phi3":  # (Phi3Config's default pad id, 32000, may lie past a vocab)
        out.update(original_max_position_embeddings=cfg.rope_original_max_position_embeddings,
                   pad_token_id=None)
        if cfg.partial_rotary_factor != 1.0:
            out["partial_rotary_factor"] = cfg.partial_rotary_factor
    if cfg.model_type in ("qwen2", "qwen3"):
        out.update(use_sliding_window=cfg.sliding_window is not None,
                   sliding_window=cfg.sliding_window)
    return out


def hf_tensors(cfg: LlamaConfig) -> list[HFTensor]:
    table = []
    fused_parts = {f"layers.{a.rsplit('.', 2)[0]}.{p}.weight" for a, (_, ps) in FUSED.items()
                   for p in ps}
    for name in flatten(common.params_of(common.abstract(Llama, cfg))):
        if cfg.model_type == "phi3" and name in fused_parts:
            first = name[7:]
            if first in FUSED:
                hf_name, parts = FUSED[first]
                prefix = "layers." + first.rsplit(".", 2)[0]
                table.append(HFTensor(tuple(f"{prefix}.{p}.weight" for p in parts),
                                      f"model.layers.{{i}}.{hf_name}", transpose=True, axis=0))
            continue
        if name == "head.weight":
            table.append(HFTensor(name, "lm_head.weight"))
        elif name.startswith("layers."):
            # nn.Linear stores (out, in); ours is (in, out)
            table.append(HFTensor(name, f"model.layers.{{i}}.{name[7:]}",
                                  transpose=name.endswith("_proj.weight")))
        else:
            table.append(HFTensor(name, f"model.{name}"))
    return table


FAMILY = Family(
    name="llama", model_types=tuple(ARCHITECTURES), config_cls=LlamaConfig, model_cls=Llama,
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, hf_tensors=hf_tensors,
    # buffers older checkpoints saved, and a tied head some checkpoints store anyway
    hf_ignored=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"lm_head\.weight"),
    rules=RULES,
    lora_target=r"layers\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
)
