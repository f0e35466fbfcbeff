"""The MoE family's side of the model contract: config.json <-> ``MoEConfig`` for the HF
model_types qwen3_moe, mixtral and olmoe, the HF tensor-name table (one HF tensor per expert, as
the checkpoints store them) and the sharding rules.

Qwen3-MoE's dense layers among the sparse ones (``mlp_only_layers``, ``decoder_sparse_step``) are
a second stack, ``dense_layers``, whose HF layer indices the name table carries. Not
implemented, and an error naming the field: shared experts, OLMoE's ``clip_qkv``, another
activation or rope type.
"""

from __future__ import annotations

from jax.sharding import PartitionSpec as P

from dpo_jax.models import Family, HFTensor, common, flatten
from dpo_jax.models.llama.params import _rope
from dpo_jax.models.moe.model import MoE, MoEConfig

ARCHITECTURES = {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
                 "olmoe": "OlmoeForCausalLM"}
# where each checkpoint keeps the router and the experts, and its names of the three matrices
SPARSE = {"qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
          "olmoe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
          "mixtral": ("block_sparse_moe", ("w1", "w3", "w2"))}

RULES = (  # "(dense_)?layers": the sparse layers' stack and the dense layers' one
    (r"embed_tokens\.weight", P(None, "fsdp")),
    (r"head\.weight", P(None, "fsdp")),
    (r"(dense_)?layers\.self_attn\.(q|k|v)_proj\.weight", P(None, "fsdp", "tensor")),
    (r"(dense_)?layers\.self_attn\.(q|k|v)_proj\.bias", P(None, "tensor")),
    (r"(dense_)?layers\.self_attn\.o_proj\.weight", P(None, "tensor", "fsdp")),
    (r"layers\.mlp\.gate\.weight", P(None, "fsdp", None)),
    (r"layers\.mlp\.experts\.(gate|up)_proj", P(None, "expert", "fsdp", "tensor")),
    (r"layers\.mlp\.experts\.down_proj", P(None, "expert", "tensor", "fsdp")),
    (r"dense_layers\.mlp\.(gate|up)_proj\.weight", P(None, "fsdp", "tensor")),
    (r"dense_layers\.mlp\.down_proj\.weight", P(None, "tensor", "fsdp")),
    (r"((dense_)?layers\.)?(input_layernorm|post_attention_layernorm|norm|"
     r"self_attn\.(q|k)_norm)\.weight|(dense_)?layers\.self_attn\.o_proj\.bias", P()),
)


def config_from_hf(hf: dict, **compute) -> MoEConfig:
    model_type = hf.get("model_type", "qwen3_moe")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (SwiGLU experts)")
    n_layers = hf.get("num_hidden_layers", 32)
    step = hf.get("decoder_sparse_step", 1) or 1
    dense = tuple(i for i in range(n_layers)
                  if i in (hf.get("mlp_only_layers") or ()) or (i + 1) % step)
    if dense and model_type != "qwen3_moe":
        raise ValueError(f"mlp_only_layers / decoder_sparse_step are Qwen3-MoE's, not "
                         f"{model_type}'s")
    if hf.get("shared_expert_intermediate_size"):
        raise ValueError("shared experts (shared_expert_intermediate_size) are not supported")
    if hf.get("clip_qkv") is not None:
        raise ValueError(f"clip_qkv={hf['clip_qkv']} is not supported")
    rope = _rope(hf)
    if "partial_rotary_factor" in rope or rope["rope_type"] not in ("default", "linear"):
        raise ValueError(f"rope_type={rope['rope_type']!r} / a partial rotary factor is not "
                         "supported for MoE models")
    heads = hf.get("num_attention_heads", 32)
    experts = hf.get("num_experts", hf.get("num_local_experts", 8))
    eos = hf.get("eos_token_id", 2)
    width = hf.get("moe_intermediate_size") if model_type == "qwen3_moe" else \
        hf.get("intermediate_size")
    return MoEConfig(
        model_type=model_type, vocab_size=hf.get("vocab_size", 32000),
        hidden_size=hf.get("hidden_size", 4096), moe_intermediate_size=width or 14336,
        num_experts=experts, num_experts_per_tok=hf.get("num_experts_per_tok", 2),
        norm_topk_prob=(True if model_type == "mixtral"
                        else bool(hf.get("norm_topk_prob", model_type == "qwen3_moe"))),
        dense_layers=dense, dense_intermediate_size=hf.get("intermediate_size", 0) if dense else 0,
        num_hidden_layers=n_layers, num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf.get("hidden_size", 4096) // heads,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope["rope_theta"], rope_type=rope["rope_type"],
        rope_factor=rope.get("rope_factor", 1.0),
        qk_norm={"qwen3_moe": True, "olmoe": "full"}.get(model_type, False),
        attention_bias=bool(hf.get("attention_bias", False)),
        sliding_window=hf.get("sliding_window") if model_type == "mixtral" else None,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 1,
        eos_token_id=tuple(eos) if isinstance(eos, list) else (eos if eos is not None else 2),
        **compute)


def config_to_hf(cfg: MoEConfig) -> dict:
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type == "linear":
        rope["factor"] = cfg.rope_factor
    out = {"architectures": [ARCHITECTURES[cfg.model_type]], "model_type": cfg.model_type,
           "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
           "num_experts_per_tok": cfg.num_experts_per_tok,
           "num_hidden_layers": cfg.num_hidden_layers,
           "num_attention_heads": cfg.num_attention_heads,
           "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
           "hidden_act": "silu", "max_position_embeddings": cfg.max_position_embeddings,
           "rms_norm_eps": cfg.rms_norm_eps, "rope_parameters": rope,
           "attention_bias": cfg.attention_bias,
           "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
           "eos_token_id": (list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple)
                            else cfg.eos_token_id)}
    if cfg.model_type == "mixtral":
        out.update(num_local_experts=cfg.num_experts, intermediate_size=cfg.moe_intermediate_size,
                   sliding_window=cfg.sliding_window)
    else:
        out.update(num_experts=cfg.num_experts, norm_topk_prob=cfg.norm_topk_prob)
        out["moe_intermediate_size" if cfg.model_type == "qwen3_moe"
            else "intermediate_size"] = cfg.moe_intermediate_size
    if cfg.model_type == "qwen3_moe":
        out.update(decoder_sparse_step=1, mlp_only_layers=list(cfg.dense_layers))
        if cfg.dense_layers:
            out["intermediate_size"] = cfg.dense_intermediate_size
    return out


def hf_tensors(cfg: MoEConfig) -> list[HFTensor]:
    where, names = SPARSE[cfg.model_type]
    dense = tuple(cfg.dense_layers) if cfg.dense_layers else None  # None: every layer sparse
    sparse = (tuple(i for i in range(cfg.num_hidden_layers) if i not in cfg.dense_layers)
              if dense else None)
    table = []
    for name in flatten(common.params_of(common.abstract(MoE, cfg))):
        if name == "head.weight":
            table.append(HFTensor(name, "lm_head.weight"))
        elif name == "layers.mlp.gate.weight":
            table.append(HFTensor(name, f"model.layers.{{i}}.{where}.gate.weight", transpose=True,
                                  layers=sparse))
        elif name.startswith("layers.mlp.experts."):
            hf = names[("gate_proj", "up_proj", "down_proj").index(name.rsplit(".", 1)[1])]
            table.append(HFTensor(name, f"model.layers.{{i}}.{where}.experts.{{j}}.{hf}.weight",
                                  transpose=True, experts=cfg.num_experts, layers=sparse))
        elif name.startswith(("layers.", "dense_layers.")):
            stack, rest = name.split(".", 1)
            table.append(HFTensor(name, f"model.layers.{{i}}.{rest}",
                                  transpose=name.endswith("_proj.weight"),
                                  layers=dense if stack == "dense_layers" else sparse))
        else:
            table.append(HFTensor(name, f"model.{name}"))
    return table


FAMILY = Family(
    name="moe", model_types=tuple(ARCHITECTURES), config_cls=MoEConfig, model_cls=MoE,
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, hf_tensors=hf_tensors,
    hf_ignored=(r"lm_head\.weight",), rules=RULES,
    lora_target=r"(dense_)?layers\.self_attn\.(q|k|v|o)_proj",
)
