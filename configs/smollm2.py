"""SmolLM2-135M-Instruct on UltraFeedback (binarized) with TRL 1.16's DPO defaults: the model
that fits a laptop. A Llama-architecture model (30 layers, width 576, 9 query / 3 KV heads, a tied
head, vocab 49152); its chat template is ChatML, replies end with <|im_end|>.

    python train.py --config configs/smollm2.py --workdir runs/smollm2

Needs the Hugging Face Hub (model, tokenizer and data); offline, point model_name_or_path and
dataset_name at local copies.
"""

from configs import qwen3


def get_config():
    c = qwen3.get_config()
    c.model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    c.remat = False                         # 135M: activations fit without recomputation
    return c
