"""Issue 30: QLoRA, a 4-bit frozen base. Our NF4 codec against bitsandbytes' own
``quantize_4bit`` (it runs on the CPU), the 8-bit one against its ``int8_vectorwise_quant``,
the FP8 one against transformers' fine-grained FP8 (and an adapter trained on it under PEFT on
the FP8 checkpoint transformers loads); the adapter a QLoRA run exports on the base
bitsandbytes loads in 4 bits, under PEFT, against our merged export; 1 device against 8; a
resume with another quantization refused. TRL's DPO step on a bnb base beside ours is
tests/test_trl_side_by_side.py's "qlora" case, SIGKILL + rerun test_train.py's "llama-qlora"."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is the numerical reference for parity tests")
bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the NF4 reference")
transformers = pytest.importorskip("transformers")
import bitsandbytes.functional as F  # noqa: E402

from parity import torch_logits  # noqa: E402
from test_tuning import lora_config, torch_base  # noqa: E402
from dpo_jax import checkpoint, models, quant, trainer  # noqa: E402
from dpo_jax.errors import ConfigError  # noqa: E402

VOCAB = 512


def bnb_nf4(w_in_out):
    """bitsandbytes' NF4 of one (in, out) matrix, stored as HF stores it, (out, in)."""
    q, state = F.quantize_4bit(torch.from_numpy(np.ascontiguousarray(w_in_out.T)), blocksize=64,
                               quant_type="nf4")
    return q.numpy().reshape(-1), state.absmax.numpy(), F.dequantize_4bit(q, state).numpy().T


@pytest.mark.parametrize("shape, dtype", [((64, 96), np.float32), ((3, 128, 40), np.float32),
                                          ((2, 256, 64), "bfloat16")])
def test_nf4_equals_bitsandbytes(shape, dtype):
    """Codes, scales and dequantized values as bitsandbytes' on the same matrices: random normal
    weights of several scales, a block of zeros, a lone outlier, values on a level's midpoint,
    bfloat16-rounded weights (a bf16 checkpoint); a stack quantized matrix by matrix."""
    rng = np.random.default_rng(0)
    w = (rng.normal(size=shape) * rng.choice([0.02, 1.0, 30.0], size=shape[-1])).astype(np.float32)
    w[..., :64, 0] = 0.0
    w[..., 3, 1] = 500.0
    w[..., 1:3, 2] = quant._BOUNDS[9] * np.abs(w[..., 3:64, 2]).max(-1, keepdims=True)
    if dtype == "bfloat16":
        w = np.asarray(torch.from_numpy(w).to(torch.bfloat16).float())
    q = quant.quantize_nf4(w)
    ours_dense = quant.dequantize_nf4(q)
    on_device = np.asarray(jax.jit(quant.dequantize_nf4)(
        quant.NF4(jax.numpy.asarray(q.codes), jax.numpy.asarray(q.absmax))))
    for i in np.ndindex(shape[:-2]):
        codes, absmax, dense = bnb_nf4(w[i])
        np.testing.assert_array_equal(q.codes[i].reshape(-1), codes)  # bit for bit
        np.testing.assert_array_equal(q.absmax[i].reshape(-1), absmax)
        np.testing.assert_allclose(ours_dense[i], dense, atol=1e-6, rtol=0)
        np.testing.assert_allclose(on_device[i], dense, atol=1e-6, rtol=0)
    assert q.shape == shape and q[...].shape == shape


def test_double_quantization_equals_bitsandbytes():
    """QLoRA's double quantization (``compress_statistics=True``): the dynamic map is
    bitsandbytes' own; its 8-bit blockwise codes and block scales are its CPU kernel's bit for
    bit (scales with a zero block, a short last block, six decades of magnitude); a matrix's
    4-bit codes are plain NF4's, its scales' codes and scales bnb's given bnb's offset, and the
    offset (bnb: torch's float32 sum) within 2 ulp of ours; the dequantized matrix, host and
    jitted, within 2e-6 of bnb's ``dequantize_4bit`` relative to its largest value (given bnb's
    offset; with ours, wherever the scale codes agree). A table
    (quantize_embeddings) dequantizes row by row to the same values."""
    np.testing.assert_array_equal(quant.DYNAMIC, F.create_dynamic_map().numpy())
    rng = np.random.default_rng(2)
    x = (rng.normal(size=1000) * 10.0 ** rng.integers(-6, 1, size=1000)).astype(np.float32)
    x[256:512] = 0.0
    codes, absmax = quant.quantize_blockwise(x)
    t, state = F.quantize_blockwise(torch.from_numpy(x), blocksize=256)
    np.testing.assert_array_equal(codes, t.numpy())
    np.testing.assert_array_equal(absmax, state.absmax.numpy())
    w = (rng.normal(size=(3, 512, 96)) * rng.choice([0.02, 1.0, 30.0], size=96)).astype(
        np.float32)
    q = quant.quantize_nf4(w, nested=True)
    assert q.nested and q.absmax.dtype == np.uint8 and q.absmax2.shape == (3, 3)
    plain = quant.quantize_nf4(w)
    np.testing.assert_array_equal(q.codes, plain.codes)
    on_device = np.asarray(jax.jit(quant.dequantize_nf4)(jax.tree.map(jax.numpy.asarray, q)))
    for i in range(3):
        t, state = F.quantize_4bit(torch.from_numpy(np.ascontiguousarray(w[i].T)), blocksize=64,
                                   quant_type="nf4", compress_statistics=True)
        offset = state.offset.numpy()
        assert abs(int(offset.view(np.int32)) - int(q.offset[i].view(np.int32))) <= 2
        scale_codes, absmax2, _ = quant.quantize_scales(plain.absmax[i], offset)
        np.testing.assert_array_equal(scale_codes.reshape(-1), state.absmax.numpy())
        np.testing.assert_array_equal(absmax2, state.state2.absmax.numpy())
        dense = F.dequantize_4bit(t, state).numpy().T
        tol = 2e-6 * np.abs(dense).max()
        with_theirs = quant.NF4(plain.codes[i], scale_codes, False, absmax2, offset)
        np.testing.assert_allclose(quant.dequantize_nf4(with_theirs), dense, atol=tol, rtol=0)
        # with our offset: the same wherever the scale codes agree (an ulp of offset flips
        # about one code in 30,000; none here on this machine, but bnb's offset is its CPU's)
        agree = q.absmax[i] == scale_codes
        assert agree.mean() > 0.999
        where = np.repeat(agree, quant.BLOCK, axis=-1).T  # (in, out), as the matrix
        np.testing.assert_allclose(quant.dequantize_nf4(q)[i][where], dense[where], atol=tol,
                                   rtol=0)
        np.testing.assert_allclose(on_device[i][where], dense[where], atol=tol, rtol=0)
    table = quant.quantize_nf4(w[0].T, rows=True, nested=True)
    ids = np.array([[3, 90], [95, 0]])
    np.testing.assert_allclose(np.asarray(jax.jit(lambda t: t.take(ids))(table)),
                               quant.dequantize_nf4(table)[ids], atol=1e-6 * np.abs(w).max())


def test_int8_equals_bitsandbytes():
    """Row-wise int8 (load_in_8bit's Int8Params): codes and row scales as bitsandbytes'
    ``int8_vectorwise_quant`` of the float16-cast matrix (random matrices at three scales, a
    zero row, an outlier; 64k values, where an ulp in the scale flips a few roundings), and the
    dequantized values as its CPU training matmul's, ``CB * (SCB / 127)``."""
    rng = np.random.default_rng(1)
    w = (rng.normal(size=(4, 256, 64)) * rng.choice([0.02, 1.0, 30.0], size=64)).astype(
        np.float32)
    w[0, :, 3] = 0.0
    w[1, 7, 5] = 900.0
    q = quant.quantize_int8(w)
    for i in range(4):
        cb, scb, _ = F.int8_vectorwise_quant(torch.from_numpy(np.ascontiguousarray(w[i].T)).half())
        np.testing.assert_array_equal(q.codes[i], cb.numpy())
        np.testing.assert_array_equal(q.absmax[i], scb.numpy())
        dense = cb.float().mul_(scb.unsqueeze(1).mul(1.0 / 127.0)).numpy().T
        np.testing.assert_array_equal(quant.dequantize_int8(q)[i], dense)
    assert q.shape == w.shape and q[...].shape == w.shape


def hf_fp8():
    """transformers' fine-grained FP8 quantizer (block 128 x 128, float scales), CPU-runnable."""
    import types
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    return Fp8Quantize(types.SimpleNamespace(
        quantization_config=transformers.FineGrainedFP8Config()))


def test_fp8_equals_transformers():
    """Codes and inverse scales as transformers' ``Fp8Quantize`` gives them (random matrices at
    three scales, a zero tile, an outlier; 12 tiles per matrix, a stack matrix by matrix), the
    dequantized values as its ``Fp8Dequantize``'s, host and jitted; a table's rows."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    rng = np.random.default_rng(3)
    w = (rng.normal(size=(2, 384, 512)) * rng.choice([0.02, 1.0, 30.0], size=512)).astype(
        np.float32)
    w[0, :128, :128] = 0.0
    w[1, 5, 7] = 900.0
    q = quant.quantize_fp8(w)
    assert q.shape == w.shape and q.absmax.shape == (2, 4, 3)
    on_device = np.asarray(jax.jit(quant.dequantize)(jax.tree.map(jax.numpy.asarray, q)))
    quantizer = hf_fp8()
    for i in range(2):
        out = quantizer._quantize_one("m.weight", torch.from_numpy(np.ascontiguousarray(w[i].T)))
        codes, inv = out["m.weight"], out["m.weight_scale_inv"]
        np.testing.assert_array_equal(q.codes[i].view(np.uint8), codes.view(torch.uint8).numpy())
        np.testing.assert_array_equal(q.absmax[i], inv.numpy())
        dense = Fp8Dequantize(quantizer.hf_quantizer)._dequantize_one(
            codes, inv, output_dtype=torch.float32).numpy().T
        np.testing.assert_array_equal(quant.dequantize(q)[i], dense)
        np.testing.assert_array_equal(on_device[i], dense)
    table = quant.quantize_fp8(w[0].T, rows=True)  # (512 rows, 384 wide)
    ids = np.array([[3, 300], [511, 0]])
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda t: t.take(ids))(table)),
                                  quant.dequantize(table)[ids])


def test_an_fp8_run_trains_what_peft_runs_on_the_fp8_checkpoint(tmp_path, monkeypatch):
    """transformers' FP8 checkpoint of a 128-wide Llama (every matrix in whole tiles; its own
    quantizer, weights and ``weight_scale_inv``, ``quant_method: fp8``): a LoRA run from it with
    ``quantize_base="fp8"`` holds its codes and scales as stored (bytes equal; no float32 copy,
    no second rounding), and PEFT with our adapter on the checkpoint as transformers loads it
    on a CPU (dequantized) gives our merged export's logits. Our quantizer gives the same
    matrices, and loaded without ``keep_fp8`` the checkpoint reads as transformers' values."""
    import peft
    from safetensors.torch import save_file
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, max_position_embeddings=128,
                                   tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    quantizer, tensors = hf_fp8(), {}
    for k, v in model.state_dict().items():
        tensors.update(quantizer._quantize_one(k, v) if k.endswith("proj.weight")
                       else {k: v.contiguous()})
    (tmp_path / "fp8").mkdir()
    save_file(tensors, str(tmp_path / "fp8" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(dict(
        cfg.to_dict(), architectures=["LlamaForCausalLM"], quantization_config=dict(
            quant_method="fp8", weight_block_size=[128, 128], activation_scheme="dynamic"))))
    run_cfg = lora_config(tmp_path, tmp_path / "fp8", quantize_base="fp8", learning_rate=3e-2)
    with monkeypatch.context() as m:  # every matrix is the checkpoint's: none quantized again
        m.setattr(quant, "quantize_fp8", lambda *a, **k: pytest.fail("quantized again"))
        run = trainer.setup(run_cfg, tmp_path / "setup")
    frozen = models.flatten(jax.device_get(run.frozen))
    run.ckpt.close()
    for name in ("layers.mlp.down_proj.weight", "layers.self_attn.q_proj.weight"):
        key = "model.layers.1." + name.split(".", 1)[1]
        kept = frozen[name]
        assert isinstance(kept, quant.FP8) and kept.codes.shape == (2, *tensors[key].shape)
        np.testing.assert_array_equal(np.asarray(kept.codes[1]).view(np.uint8),
                                      tensors[key].view(torch.uint8).numpy())
        np.testing.assert_array_equal(kept.absmax[1], tensors[f"{key}_scale_inv"].numpy())
    assert not quant.is_quantized(frozen["embed_tokens.weight"])
    trainer.train_and_evaluate(run_cfg, tmp_path / "wd")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8",
                                                             dtype=torch.float32)
    w = model.model.layers[1].mlp.down_proj.weight.detach().numpy()
    theirs = base.model.layers[1].mlp.down_proj.weight.detach().numpy()
    np.testing.assert_array_equal(theirs, quant.dequantize(quant.quantize_fp8(w.T)).T)
    # the FP8 checkpoint itself loads here as transformers loads it on a CPU (dequantized), and
    # quantizes back to its own codes, its scales within an ulp
    from dpo_jax import hf
    _, params = hf.load_pretrained_params(tmp_path / "fp8")
    loaded = params["layers"]["mlp"]["down_proj"]["weight"][1]
    np.testing.assert_array_equal(loaded, theirs.T)
    again = quant.quantize_fp8(loaded)
    key = "model.layers.1.mlp.down_proj.weight"
    np.testing.assert_array_equal(again.codes.view(np.uint8),
                                  tensors[key].view(torch.uint8).numpy())
    np.testing.assert_allclose(again.absmax, tensors[f"{key}_scale_inv"].numpy(), rtol=2e-7)
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "wd" / "adapter").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "wd" / "hf", attn_implementation="eager").eval()
    ids = np.random.default_rng(0).integers(0, VOCAB, (3, 20))
    mask = np.ones_like(ids)
    mask[1, 14:] = 0
    a, b = torch_logits(merged, ids, mask), torch_logits(with_adapter, ids, mask)
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
    with with_adapter.disable_adapter():  # the adapters moved the model off the FP8 base
        assert np.abs(torch_logits(with_adapter, ids, mask) - a).max() > 1e-3


# Adam's epsilon for the runs compared across meshes: at 1e-8 its update divides tiny
# gradients (lora_A's are zero at step 0, B being zero) by their own size, so float
# reassociation across devices (~1e-7) moved one adapter entry by 1.3e-5 on one CPU; at 1e-3 the
# update is smooth in the gradient (tests/test_sharding.py's optimizer does the same)
SMOOTH = dict(adam_epsilon=1e-3)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def qlora_run(request, tmp_path_factory):
    """A 4-step QLoRA run (adapters on the family's targets, every Linear of the base in NF4;
    the Llama's with its scales double quantized)."""
    tmp = tmp_path_factory.mktemp(f"qlora_{request.param}")
    torch_base(request.param).save_pretrained(tmp / "base")
    trainer.train_and_evaluate(lora_config(tmp, tmp / "base", quantize_base="nf4",
                                           double_quant=request.param == "llama", **SMOOTH),
                               tmp / "wd")
    return request.param, tmp


def test_the_adapter_runs_on_the_base_bitsandbytes_loads(qlora_run):
    """PEFT's model of our adapter on ``from_pretrained(base, quantization_config=NF4)`` gives
    the logits of our merged export (the adapters merged into the dequantized base, as PEFT's
    merge does); every Linear bitsandbytes quantized is one we quantized. The Llama's base is
    double quantized on both sides (``bnb_4bit_use_double_quant``)."""
    import peft
    family, tmp = qlora_run
    wd = tmp / "wd"
    base = transformers.AutoModelForCausalLM.from_pretrained(
        tmp / "base", dtype=torch.float32, quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=family == "llama"))
    quantized = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == (4 if family == "gpt2" else 7) * 2
    assert all(m.weight.quant_state.nested == (family == "llama") for m in quantized)
    for m in quantized:  # bitsandbytes' CPU inference kernel computes in bfloat16 (on
        # machines with AVX512-BF16; its training path, TRL's, dequantizes to float32): the
        # float32 path, the one the reference of the numbers is
        m.support_avx512bf16_for_cpu = False
    with_adapter = peft.PeftModel.from_pretrained(base, wd / "adapter").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        wd / "hf", attn_implementation="eager").eval()
    ids = np.random.default_rng(0).integers(0, VOCAB, (3, 20))
    mask = np.ones_like(ids)
    mask[1, 14:] = 0
    a, b = torch_logits(merged, ids, mask), torch_logits(with_adapter, ids, mask)
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
    with with_adapter.disable_adapter():  # the reference: the 4-bit base, adapters off
        assert np.abs(torch_logits(with_adapter, ids, mask) - a).max() > 1e-3


def test_one_device_and_eight_give_the_same_steps(qlora_run, tmp_path):
    """The codes and scales split with their matrix (fsdp 4 x tensor 2; the 64-wide matrices'
    single scale block per output kept whole along fsdp; double quantized, the scales' codes
    split as the scales, their own scales and offsets whole): losses and adapters within 1e-5
    (the Llama: GPT-2's matrices split by the same rules)."""
    family, tmp = qlora_run
    if family != "llama":
        pytest.skip("one family is enough for the mesh (suite time)")
    one = tmp / "wd"
    run = trainer.setup(lora_config(tmp_path, tmp / "base", quantize_base="nf4",
                                    double_quant=True, mesh_data=1,
                                    mesh_fsdp=4, mesh_tensor=2), tmp_path / "eight")
    q = [a for a in models.flatten(run.frozen).values() if quant.is_nf4(a)][0]
    assert q.nested and q.absmax.dtype == np.uint8
    assert len({str(s.index) for s in q.codes.addressable_shards}) == 8  # split, not replicated
    run.ckpt.close()
    eight = tmp_path / "eight2"
    trainer.train_and_evaluate(lora_config(tmp_path, tmp / "base", quantize_base="nf4",
                                           double_quant=True, mesh_data=1, mesh_fsdp=4,
                                           mesh_tensor=2, **SMOOTH), eight)
    rows = lambda wd: [json.loads(r) for r in (wd / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows(one), rows(eight), strict=True):
        np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=1e-5)
    from safetensors.numpy import load_file
    x, y = (load_file(str(wd / "adapter" / "adapter_model.safetensors")) for wd in (one, eight))
    for k in x:
        np.testing.assert_allclose(x[k], y[k], atol=1e-5, rtol=0, err_msg=k)


def test_a_checkpoint_resumes_only_on_its_quantization(qlora_run, tmp_path):
    """An NF4 run's checkpoint refuses an unquantized base; a double-quantized one (the
    Llama's) refuses plain NF4 scales."""
    family, tmp = qlora_run
    if family == "llama":
        with pytest.raises(checkpoint.CheckpointMismatch,
                           match=r"another lora setting \(saved vs this config: "
                                 r"\{'double_quant': \(True, None\)\}\)"):
            trainer.setup(lora_config(tmp_path, tmp / "base", max_steps=6,
                                      quantize_base="nf4", **SMOOTH), tmp / "wd")
        return
    with pytest.raises(checkpoint.CheckpointMismatch,
                       match=r"another lora setting \(saved vs this config: \{'quantize': "
                             r"\('nf4', None\)\}\)"):
        trainer.setup(lora_config(tmp_path, tmp / "base", max_steps=6, **SMOOTH), tmp / "wd")


def test_quantize_base_errors_are_one_line(tmp_path):
    torch_base("llama", width=96).save_pretrained(tmp_path / "odd")
    with pytest.raises(ConfigError, match=r"quantize_base='nf4' quantizes the frozen base of "
                                          r"LoRA or DoRA, and lora_rank=0"):
        trainer.setup(lora_config(tmp_path, tmp_path / "odd", lora_rank=0,
                                  quantize_base="nf4"), tmp_path / "wd")
    with pytest.raises(ConfigError, match=r"quantize_base"):
        trainer.setup(lora_config(tmp_path, tmp_path / "odd", quantize_base="int4"),
                      tmp_path / "wd")
    with pytest.raises(ConfigError, match=r"quantize_base='nf4': layers\.\S+ has 96 inputs, "
                                          r"not a multiple of NF4's block of 64"):
        trainer.setup(lora_config(tmp_path, tmp_path / "odd", quantize_base="nf4"),
                      tmp_path / "wd")
    with pytest.raises(ConfigError, match=r"quantize_base='fp8': layers\.\S+ has 192 inputs, "
                                          r"not a multiple of FP8's tile of 128"):
        trainer.setup(lora_config(tmp_path, tmp_path / "odd", quantize_base="fp8"),
                      tmp_path / "wd")
    with pytest.raises(ConfigError, match=r"double_quant=True quantizes NF4's block scales"):
        trainer.setup(lora_config(tmp_path, tmp_path / "odd", quantize_base="fp8",
                                  double_quant=True), tmp_path / "wd")
