"""The Gemma family's side of the model contract: config.json <-> ``GemmaConfig`` for the HF
model_types gemma2 and gemma3_text, and the multimodal gemma3's language model (its
``text_config`` and language-model tensors; the vision tower is not loaded, and the export is a
text-only Gemma3ForCausalLM), the HF tensor-name table and the sharding rules.

A config field the module does not implement is an error naming the field (another activation,
bidirectional attention, a rope type other than default / linear / llama3), never ignored.
"""

from __future__ import annotations

import logging
import re

from jax.sharding import PartitionSpec as P

from dpo_jax.models import Family, HFTensor, common, flatten
from dpo_jax.models.gemma.model import Gemma, GemmaConfig
from dpo_jax.models.llama.params import RULES as LLAMA_RULES, _rope

log = logging.getLogger(__name__)

ARCHITECTURES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
# Gemma 2's defaults in transformers (Gemma2Config); Gemma 3's (Gemma3TextConfig)
DEFAULTS = {
    "gemma2": dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0, pattern=2,
                   sliding_window=4096, rope_theta=10000.0, local_theta=None,
                   vocab_size=256000, max_position_embeddings=8192),
    "gemma3_text": dict(attn_logit_softcapping=None, final_logit_softcapping=None, pattern=6,
                        sliding_window=4096, rope_theta=1_000_000.0, local_theta=10_000.0,
                        vocab_size=262208, max_position_embeddings=131072),
}
# the multimodal Gemma 3 (model_type gemma3): its language model's keys, under either spelling
# (the hub's checkpoints, and transformers 5's), read as the text model's; the vision tower and
# projector are left out
_LANGUAGE_MODEL = re.compile(r"^(?:language_model\.model\.|model\.language_model\.)")

# Llama's rules, with Gemma's two extra norms replicated as the others are
RULES = LLAMA_RULES[:-1] + (
    (r"(layers\.)?(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|"
     r"post_feedforward_layernorm|norm|self_attn\.(q|k)_norm)\.weight|"
     r"layers\.self_attn\.o_proj\.bias", P()),
)


def _layer_types(hf: dict, n: int, pattern: int) -> tuple[bool, ...]:
    kinds = hf.get("layer_types")
    if kinds is None:  # older configs: every pattern-th layer global
        pattern = hf.get("sliding_window_pattern", pattern)
        return tuple(bool((i + 1) % pattern) for i in range(n))
    bad = sorted(set(kinds) - {"sliding_attention", "full_attention"})
    if bad:
        raise ValueError(f"layer_types holds {bad}; supported: sliding_attention, full_attention")
    return tuple(k == "sliding_attention" for k in kinds)


def _ropes(hf: dict, model_type: str) -> dict:
    """The global layers' rope fields (as the Llama family's) and the local layers' base."""
    d = DEFAULTS[model_type]
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:  # transformers 5, Gemma 3
        glob = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:
        glob, local = dict(params), {}
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters.sliding_attention.rope_type="
                         f"{local['rope_type']!r} is not supported (default only)")
    glob.setdefault("rope_theta", hf.get("rope_theta", d["rope_theta"]))
    out = _rope({"rope_parameters": glob, "rope_scaling": hf.get("rope_scaling")})
    if "partial_rotary_factor" in out or out["rope_type"] == "longrope":
        raise ValueError("partial_rotary_factor and longrope are not supported for Gemma")
    local_theta = local.get("rope_theta", hf.get("rope_local_base_freq", d["local_theta"]))
    out["rope_local_theta"] = float(local_theta if local_theta is not None else
                                    out["rope_theta"])
    return out


def hf_key(key: str) -> str:
    """A multimodal Gemma 3's language-model key as the text model spells it."""
    key = _LANGUAGE_MODEL.sub("model.", key)
    return "lm_head.weight" if key == "language_model.lm_head.weight" else key


def config_from_hf(hf: dict, **compute) -> GemmaConfig:
    model_type = hf.get("model_type", "gemma2")
    if model_type == "gemma3":  # the multimodal checkpoint: its language model
        log.info("model_type gemma3 (vision + text): training its language model; the vision "
                 "tower is not loaded, and the export is a text-only Gemma3ForCausalLM")
        text = dict(hf.get("text_config") or {})
        for k in ("bos_token_id", "eos_token_id", "tie_word_embeddings"):
            if k not in text and k in hf:
                text[k] = hf[k]
        hf, model_type = dict(text, model_type="gemma3_text"), "gemma3_text"
    d = DEFAULTS[model_type]
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"hidden_activation={act!r} is not supported (GeGLU with "
                         "gelu_pytorch_tanh)")
    if hf.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=True is not supported (causal LMs only)")
    n = hf.get("num_hidden_layers", 26)
    heads = hf.get("num_attention_heads", 8)
    eos = hf.get("eos_token_id", 1)
    return GemmaConfig(
        model_type=model_type, vocab_size=hf.get("vocab_size", d["vocab_size"]),
        hidden_size=hf.get("hidden_size", 2304),
        intermediate_size=hf.get("intermediate_size", 9216), num_hidden_layers=n,
        num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf.get("hidden_size", 2304) // heads,
        max_position_embeddings=hf.get("max_position_embeddings",
                                       d["max_position_embeddings"]),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
        sliding_window=hf.get("sliding_window", d["sliding_window"]),
        local_layers=_layer_types(hf, n, d["pattern"]),
        attn_logit_softcapping=hf.get("attn_logit_softcapping", d["attn_logit_softcapping"]),
        final_logit_softcapping=hf.get("final_logit_softcapping", d["final_logit_softcapping"]),
        qk_norm=model_type == "gemma3_text",
        attention_bias=bool(hf.get("attention_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_token_id=hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 2,
        eos_token_id=tuple(eos) if isinstance(eos, list) else (eos if eos is not None else 1),
        **_ropes(hf, model_type), **compute)


def config_to_hf(cfg: GemmaConfig) -> dict:
    glob = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type in ("linear", "llama3"):
        glob["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        glob.update(low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_position_embeddings)
    if cfg.model_type == "gemma3_text":
        rope = {"full_attention": glob,
                "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta}}
    else:
        rope = glob
    return {
        "architectures": [ARCHITECTURES[cfg.model_type]], "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "query_pre_attn_scalar": (int(cfg.query_pre_attn_scalar)  # transformers wants an int
                                  if float(cfg.query_pre_attn_scalar).is_integer()
                                  else cfg.query_pre_attn_scalar),
        "sliding_window": cfg.sliding_window,
        "layer_types": ["sliding_attention" if x else "full_attention"
                        for x in cfg.local_layers],
        "attn_logit_softcapping": cfg.attn_logit_softcapping,
        "final_logit_softcapping": cfg.final_logit_softcapping,
        "attention_bias": cfg.attention_bias, "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": (list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple)
                         else cfg.eos_token_id)}


def hf_tensors(cfg: GemmaConfig) -> list[HFTensor]:
    table = []
    for name in flatten(common.params_of(common.abstract(Gemma, cfg))):
        if name == "head.weight":
            table.append(HFTensor(name, "lm_head.weight"))
        elif name.startswith("layers."):
            table.append(HFTensor(name, f"model.layers.{{i}}.{name[7:]}",
                                  transpose=name.endswith("_proj.weight")))
        else:
            table.append(HFTensor(name, f"model.{name}"))
    return table


FAMILY = Family(
    name="gemma", model_types=(*ARCHITECTURES, "gemma3"), config_cls=GemmaConfig,
    model_cls=Gemma, config_from_hf=config_from_hf, config_to_hf=config_to_hf,
    hf_tensors=hf_tensors, hf_key=hf_key,
    # a tied head some checkpoints store anyway; a multimodal checkpoint's vision side
    hf_ignored=(r"lm_head\.weight",
                r"(model\.)?(vision_tower|multi_modal_projector)\..*"),
    rules=RULES,
    lora_target=r"layers\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
)
