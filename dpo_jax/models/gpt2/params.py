"""GPT-2's side of the model contract: HF config <-> ``GPT2Config``, the HF tensor-name table and
the sharding rules.

Our parameter names are HF's own, so the table is the identity on names with one twist: our blocks
are stacked, so HF key ``transformer.h.3.attn.c_attn.weight`` (or ``h.3.attn.c_attn.weight`` in
the original ``gpt2`` repository, which stores a bare ``GPT2Model``) is slice 3 of our
``h.attn.c_attn.weight`` (n_layer, C, 3C). HF's ``Conv1D`` stores (in, out) as ours does: nothing
is transposed.
"""

from __future__ import annotations

from jax.sharding import PartitionSpec as P

from dpo_jax.models import Family, HFTensor, common, flatten
from dpo_jax.models.gpt2.model import GPT2, GPT2Config

# The fields of HF's GPT2Config that we read; the rest (dropouts, summary_*, task params) do not
# change the forward pass at inference and training-without-dropout.
ARCH_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
               "activation_function", "layer_norm_epsilon", "scale_attn_weights",
               "scale_attn_by_inverse_layer_idx", "bos_token_id", "eos_token_id")

# Megatron style: c_attn / c_fc split their outputs over `tensor` (column parallel), the
# c_proj's split their inputs (row parallel), so each block needs one all-reduce per sub-layer;
# the other matrix dimension is split over `fsdp`. GPT-2's vocabulary (50257) divides by nothing
# useful, so the embeddings are split along the width only. The blocks are stacked: a leading
# layer axis, never split. The table ends with the vectors that stay replicated, by name.
RULES = (
    (r"wte\.weight", P(None, "fsdp")),
    (r"wpe\.weight", P(None, "fsdp")),
    (r"h\.attn\.c_attn\.weight", P(None, "fsdp", "tensor")),
    (r"h\.attn\.c_attn\.bias", P(None, "tensor")),
    (r"h\.attn\.c_proj\.weight", P(None, "tensor", "fsdp")),
    (r"h\.mlp\.c_fc\.weight", P(None, "fsdp", "tensor")),
    (r"h\.mlp\.c_fc\.bias", P(None, "tensor")),
    (r"h\.mlp\.c_proj\.weight", P(None, "tensor", "fsdp")),
    (r"(h\.)?ln_(1|2|f)\.(weight|bias)|h\.(attn|mlp)\.c_proj\.bias", P()),
)


def config_from_hf(hf: dict, **compute) -> GPT2Config:
    if hf.get("add_cross_attention"):
        raise ValueError("add_cross_attention=True is not supported")
    if hf.get("tie_word_embeddings") is False:
        raise ValueError("tie_word_embeddings=False is not supported (GPT-2's LM head is wte)")
    kwargs = {k: hf[k] for k in ARCH_FIELDS if hf.get(k) is not None}
    return GPT2Config(**kwargs, **compute)


def config_to_hf(cfg: GPT2Config) -> dict:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            **{k: getattr(cfg, k) for k in ARCH_FIELDS}, "n_ctx": cfg.n_positions,
            "tie_word_embeddings": True}


def hf_tensors(cfg: GPT2Config) -> list[HFTensor]:
    names = flatten(common.params_of(common.abstract(GPT2, cfg)))
    return [HFTensor(n, "transformer." + (f"h.{{i}}.{n[2:]}" if n.startswith("h.") else n))
            for n in names]


def hf_key(key: str) -> str:
    """A checkpoint key in GPT2LMHeadModel's spelling (a bare GPT2Model's keys lack the prefix)."""
    return key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key


FAMILY = Family(
    name="gpt2", model_types=("gpt2",), config_cls=GPT2Config, model_cls=GPT2,
    config_from_hf=config_from_hf, config_to_hf=config_to_hf, hf_tensors=hf_tensors,
    hf_key=hf_key,
    # non-persistent buffers older transformers saved, and the head (tied to wte)
    hf_ignored=(r".*\.attn\.(bias|masked_bias)", r"lm_head\.weight"),
    rules=RULES,
    lora_target=r"h\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)",
)
