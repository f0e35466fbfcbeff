"""A 4-bit frozen base (QLoRA, Dettmers et al. 2023): bitsandbytes' NF4, bit for bit.

``quantize_nf4`` turns one (in, out) matrix, or a stack of them with the layer axis in front,
into an ``NF4``: the matrix as bitsandbytes stores it, HF's (out, in) row-major cut into blocks
of 64 consecutive values, each block scaled by its largest magnitude (``absmax``, float32) and
every value replaced by the index of the nearest of the 16 NF4 levels (ties to the lower
level), two indices per byte, the first in the high nibble. Codes and scales are what
``bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")`` gives for the same
matrix (the tests check it with the bitsandbytes pip serves, on the CPU), so a PEFT adapter
trained here runs on the base that ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4")`` loads, and the reference a QLoRA run scores against is that base.

An ``NF4`` is a pytree (its codes and scales are the leaves, laid out (..., out, in / 2) and
(..., out, in / 64) so the sharding rules split them with their matrix) that reads as its
dequantized matrix: ``weight[...]`` gives the (..., in, out) float32 matrix, as an array
variable does, so every layer and tuning wrapper that reads ``self.weight[...]`` runs on a
quantized base unchanged. Inside the jitted step each use dequantizes its matrix (one fused
elementwise pass: the level lookup and the scale) before the matmul. Quantization runs once,
on the host, in numpy.

``quantize_int8`` is bitsandbytes' 8-bit base (``load_in_8bit``, ``Int8Params``): each output
row of HF's (out, in) matrix, cast to float16 first as bitsandbytes does, scaled by its largest
magnitude to int8 (``round(w * 127 / absmax)``); an ``Int8`` reads as ``codes * absmax / 127``,
the weight-only dequantize-and-matmul bitsandbytes trains with on a CPU (``MatMul8bitFp``).
Its GPU kernel (LLM.int8) also quantizes the activations; that is not what runs here.

Double quantization (QLoRA's, ``bnb_4bit_use_double_quant``; config key ``double_quant``)
stores NF4's scales in 8 bits too: a matrix's float32 scales, flattened in bitsandbytes' order,
less their mean (``offset``), cut into blocks of 256, each scaled by its largest magnitude
(``absmax2``) and replaced by the nearest of the 256 values of bitsandbytes' signed dynamic map
(``create_dynamic_map()``), found as its CPU kernel finds it: through a 65536-entry table
indexed by the value scaled to [0, 65535] in float32. The 4-bit codes are those of plain NF4 (bnb
quantizes with the exact scales, then compresses them). Scales cost 8.125 bits per 64 weights
instead of 32. The scales' codes and ``absmax2`` are bitsandbytes' bit for bit given the same
offset; the offset is the float32 mean (computed in float64 and rounded once), where bnb's is
torch's float32 sum, whose last bit depends on the CPU's vector width and thread count.

``quantize_fp8`` is transformers' fine-grained FP8 (``FineGrainedFP8Config``, the format of
DeepSeek-V3's and Qwen3's FP8 checkpoints): HF's (out, in) matrix cut into 128 x 128 tiles,
each scaled by 448 / its largest magnitude and cast to float8_e4m3fn (round to nearest even,
clamped to +-448), the tile's inverse scale (``weight_scale_inv``) kept in float32. An ``FP8``
reads as ``codes * weight_scale_inv``. Codes and scales are what transformers' ``Fp8Quantize``
gives on the CPU, the dequantized matrix its ``Fp8Dequantize``'s (the tests check both). 8 bits
per weight and 32 per 16384; the matmul runs in the compute dtype after the dequantization (an
fp8 matmul is an accelerator's, not measured here).

``quantize(w, method)``, ``is_quantized``, ``dequantize``, ``zeros``, ``abstract`` and ``rules``
take any method by name (config key ``quantize_base``: "nf4", "int8" or "fp8"), and ``nested``
for the double quantization of NF4's scales.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.errors import ConfigError

BLOCK = 64
# bitsandbytes' NF4 levels (functional.get_4bit_type("nf4")): the quantiles of a standard
# normal, normalized to [-1, 1], with an exact zero
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
_BOUNDS = (NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / np.float32(2)  # float32 midpoints, as bnb's

METHODS = ("", "nf4", "int8", "fp8")
FP8_TILE = 128  # fp8: the side of a tile with one scale
FP8_MAX = np.float32(448.0)  # float8_e4m3fn's largest finite value
SCALE_BLOCK = 256  # double quantization: scales per block of the scales' own scale


def _linspace(start: float, stop: float, n: int):
    """torch.linspace(start, stop, n) in float32, as torch's CPU kernel computes it: the step
    from float32 ends in double, the first half counted from the start, the rest from the end."""
    a, b = np.float32(start), np.float32(stop)
    step = np.float64(b - a) / (n - 1)
    i = np.arange(n)
    return np.where(i < n // 2, a + step * i, b - step * (n - 1 - i)).astype(np.float32)


def _dynamic_map():
    """bitsandbytes' ``create_dynamic_map()`` (signed, 7 exponent bits, 8 bits): for each
    exponent 10^-6 .. 10^0, the midpoints of 2^i + 1 linear steps over [0.1, 1], both signs;
    and 0 and 1; sorted, float32."""
    data = []
    for i in range(7):
        bounds = _linspace(0.1, 1.0, 2 ** i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        scale = np.float32(10.0 ** (i - 6))
        data += [scale * means, -scale * means]
    return np.sort(np.concatenate([*data, np.float32([0.0, 1.0])]))


DYNAMIC = _dynamic_map()  # 256 levels in [-1, 1]


def _dynamic_table():
    """bitsandbytes' CPU lookup: for each of 65536 points evenly over [-1, 1] (float32), the
    index of the first level whose midpoint with the next is not below the point."""
    mid = np.float32(0.5) * (DYNAMIC[:-1] + DYNAMIC[1:])
    points = np.float32(-1) + (np.float32(2) * np.arange(65536, dtype=np.float32)) / np.float32(
        65535)
    return np.searchsorted(mid, points, side="left").astype(np.uint8)


_TABLE = []  # built on first use


def quantize_blockwise(x, block: int = SCALE_BLOCK):
    """bitsandbytes' ``quantize_blockwise(x, blocksize=block)`` (the dynamic map, its CPU
    kernel) of each row of ``x`` (..., n) float32, the last block short where ``block`` does not
    divide n: (codes (..., n) uint8, absmax (..., ceil(n / block)) float32)."""
    if not _TABLE:
        _TABLE.append(_dynamic_table())
    x = np.asarray(x, np.float32)
    *lead, n = x.shape
    nb = -(-n // block)
    padded = np.zeros((*lead, nb * block), np.float32)
    padded[..., :n] = x
    blocks = padded.reshape(*lead, nb, block)
    absmax = np.abs(blocks).max(-1)
    inv = np.float32(1) / np.where(absmax == 0, np.float32(1), absmax)
    v = np.clip(blocks * inv[..., None], np.float32(-1), np.float32(1))
    # ((v + 1) * 0.5) * 65535 + 0.5, one float32 rounding per step, truncated (the kernel's)
    point = ((v + np.float32(1)) * np.float32(0.5)) * np.float32(65535) + np.float32(0.5)
    codes = np.where(absmax[..., None] == 0, np.uint8(0), _TABLE[0][point.astype(np.int64)])
    return codes.reshape(*lead, nb * block)[..., :n], absmax


@dataclasses.dataclass(frozen=True)
class Quantized:
    """A quantized matrix (or a stack, or a table): ``codes`` and their scales ``absmax``, laid
    out by the subclass. It reads as its float32 matrix, ``weight[...]``, (..., in, out) as a
    ``Linear`` stores it; ``rows``: a table (an embedding, (rows, width)), stored as it is, not
    swapped, whose rows dequantize one by one (``take``)."""

    codes: jax.Array
    absmax: jax.Array
    rows: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def dense(self):
        """The float32 matrix (jnp inside a trace, numpy on host arrays)."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple:
        """The matrix's shape as a ``Linear`` stores it, (..., in, out); a table's (rows,
        width). Codes laid out as HF's (..., out, in) matrix, as Int8's and FP8's are."""
        *lead, n_out, n_in = self.codes.shape
        return (*lead, n_out, n_in) if self.rows else (*lead, n_in, n_out)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index):
        return self.dense()[index]

    def take(self, ids):
        """Rows ``ids`` of a table, (*ids.shape, width) float32: only those rows dequantized."""
        return type(self)(jnp.take(self.codes, ids, axis=0), jnp.take(self.absmax, ids, axis=0),
                          rows=True).dense()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NF4(Quantized):
    """A matrix (or a stack) in bitsandbytes' NF4: ``codes`` (..., out, in / 2) uint8, two
    4-bit level indices per byte (high nibble first, along ``in``); ``absmax`` (..., out,
    in / 64) float32, each block's scale. Double quantized (``nested``), ``absmax`` is uint8,
    the scales' codes in the dynamic map, ``absmax2`` (..., ceil(out * in / 64 / 256)) float32
    their blocks' scales and ``offset`` (...,) float32 their mean."""

    absmax2: jax.Array | None = None
    offset: jax.Array | None = None

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    def scales(self, rows=None):
        """The float32 scales (..., out, in / 64); with ``rows`` (ids of a table's rows), those
        rows' (*rows.shape, width / 64). Double quantized: ``DYNAMIC[code] * absmax2 +
        offset``, each code's ``absmax2`` the one of its block of 256 in the matrix's flat
        order (bitsandbytes' ``dequantize_blockwise``, then ``+= offset``)."""
        xp = np if isinstance(self.codes, np.ndarray) else jnp
        absmax = self.absmax if rows is None else xp.take(self.absmax, rows, axis=0)
        if not self.nested:
            return absmax.astype(xp.float32)
        n_blocks = self.absmax.shape[-1]
        row = (xp.arange(self.absmax.shape[-2]) if rows is None else rows)[..., None]
        which = (row * n_blocks + xp.arange(n_blocks)) // SCALE_BLOCK
        return (xp.asarray(DYNAMIC)[absmax.astype(xp.int32)] * self.absmax2[..., which]
                + xp.asarray(self.offset)[..., None, None])

    def take(self, ids):
        return _nf4_dense(jnp.take(self.codes, ids, axis=0), self.scales(ids), rows=True)

    @property
    def shape(self) -> tuple:
        *lead, n_out, half = self.codes.shape
        return (*lead, n_out, 2 * half) if self.rows else (*lead, 2 * half, n_out)

    def dense(self):
        return dequantize_nf4(self)


def is_nf4(x) -> bool:
    return isinstance(x, NF4)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8(Quantized):
    """A matrix (or a stack) in bitsandbytes' row-wise int8: ``codes`` (..., out, in) int8 and
    ``absmax`` (..., out) float32, each output row's scale (a table: a scale per row)."""

    def dense(self):
        return dequantize_int8(self)


def quantize_int8(w, *, rows: bool = False) -> Int8:
    """bitsandbytes' ``int8_vectorwise_quant(w.T.half())`` of an (in, out) matrix, per matrix of
    a stack; with ``rows``, of a (rows, width) table as it is; numpy, on the host."""
    w = np.asarray(w, np.float32)
    hf = (w if rows else np.swapaxes(w, -1, -2)).astype(np.float16).astype(np.float32)
    absmax = np.abs(hf).max(-1)
    with np.errstate(divide="ignore", invalid="ignore"):  # an all-zero row: codes 0, as bnb's
        # torch evaluates bnb's 127.0 / absmax as reciprocal(absmax) * 127: two roundings
        scale = (np.float32(1) / absmax) * np.float32(127)
        codes = np.nan_to_num(np.round(hf * scale[..., None]))
    return Int8(codes.astype(np.int8), absmax.astype(np.float32), rows=rows)


def dequantize_int8(q: Int8):
    """codes * (absmax / 127), in float32, as bitsandbytes' ``MatMul8bitFp``."""
    xp = np if isinstance(q.codes, np.ndarray) else jnp
    w = q.codes.astype(xp.float32) * (q.absmax.astype(xp.float32)
                                      * xp.float32(1.0 / 127.0))[..., None]
    return w if q.rows else xp.swapaxes(w, -1, -2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FP8(Quantized):
    """A matrix (or a stack) in transformers' fine-grained FP8: ``codes`` (..., out, in)
    float8_e4m3fn, ``absmax`` (..., out / 128, in / 128) float32, each tile's inverse scale
    (``weight_scale_inv``: the tile's largest magnitude / 448)."""

    def dense(self):
        return _fp8_dense(self.codes, self.absmax, rows=self.rows)

    def take(self, ids):
        scales = jnp.take(self.absmax, ids // FP8_TILE, axis=0)  # (*ids, width / 128)
        return _fp8_dense(jnp.take(self.codes, ids, axis=0)[..., None, :],
                          scales[..., None, :], rows=True)[..., 0, :]


def quantize_fp8(w, *, rows: bool = False) -> FP8:
    """transformers' ``Fp8Quantize`` (block 128 x 128, float scales) of an (in, out) matrix, per
    matrix of a stack; with ``rows``, of a (rows, width) table as it is; numpy, on the host."""
    import ml_dtypes
    w = np.asarray(w, np.float32)
    hf = w if rows else np.swapaxes(w, -1, -2)
    *lead, n_out, n_in = hf.shape
    if n_out % FP8_TILE or n_in % FP8_TILE:
        raise ConfigError(f"config key quantize_base='fp8': a ({n_out}, {n_in}) matrix does not "
                          f"cut into FP8 tiles of {FP8_TILE} x {FP8_TILE}")
    tiles = hf.reshape(*lead, n_out // FP8_TILE, FP8_TILE, n_in // FP8_TILE, FP8_TILE)
    max_abs = np.abs(tiles).max(axis=(-3, -1))
    # torch evaluates transformers' 448 / max_abs as reciprocal(max_abs) * 448: two roundings
    safe = np.where(max_abs > 0, max_abs, np.float32(1))
    scale = np.where(max_abs > 0, (np.float32(1) / safe) * FP8_MAX, np.float32(1))
    inv = (np.float32(1) / scale).astype(np.float32)
    scaled = np.clip(tiles * scale[..., :, None, :, None], -FP8_MAX, FP8_MAX)
    codes = scaled.astype(ml_dtypes.float8_e4m3fn).reshape(hf.shape)
    return FP8(codes, inv, rows=rows)


def _fp8_dense(codes, inv, *, rows: bool):
    """codes * their tile's inverse scale, float32 (transformers' ``Fp8Dequantize``)."""
    xp = np if isinstance(codes, np.ndarray) else jnp
    *lead, n_out, n_in = codes.shape
    tiles = codes.astype(xp.float32).reshape(*lead, inv.shape[-2], n_out // inv.shape[-2],
                                             inv.shape[-1], n_in // inv.shape[-1])
    w = (tiles * inv.astype(xp.float32)[..., :, None, :, None]).reshape(*lead, n_out, n_in)
    return w if rows else xp.swapaxes(w, -1, -2)


def is_quantized(x) -> bool:
    return isinstance(x, Quantized)


def quantize(w, method: str, *, rows: bool = False, nested: bool = False):
    if method == "nf4":
        return quantize_nf4(w, rows=rows, nested=nested)
    return {"int8": quantize_int8, "fp8": quantize_fp8}[method](w, rows=rows)


def dequantize(q):
    return q.dense()


def block(method: str) -> tuple[int, int]:
    """What a matrix's (inputs, outputs) must be multiples of (a table's (width, rows))."""
    return {"nf4": (BLOCK, 1), "fp8": (FP8_TILE, FP8_TILE)}.get(method, (1, 1))


def quantize_nf4(w, *, rows: bool = False, nested: bool = False) -> NF4:
    """bitsandbytes' ``quantize_4bit(w.T, blocksize=64, quant_type="nf4")`` of an (in, out)
    matrix, per matrix of a stack (..., in, out); with ``rows``, of a (rows, width) table as
    it is; ``nested``: its scales double quantized (``compress_statistics=True``,
    ``quantize_scales``); numpy, on the host."""
    w = np.asarray(w, np.float32)
    hf = w if rows else np.swapaxes(w, -1, -2)  # (..., out, in): HF's layout, bnb's order
    *lead, n_out, n_in = hf.shape
    if n_in % BLOCK:
        raise ConfigError(f"config key quantize_base: a matrix with {n_in} inputs does not cut "
                          f"into NF4 blocks of {BLOCK}")
    blocks = hf.reshape(*lead, n_out, n_in // BLOCK, BLOCK)
    absmax = np.abs(blocks).max(-1)
    scaled = np.clip(blocks * (np.float32(1) / np.maximum(absmax, np.float32(1e-38)))[..., None],
                     -1, 1)
    idx = np.searchsorted(_BOUNDS, scaled, side="left").astype(np.uint8)  # torch.bucketize
    idx = idx.reshape(*lead, n_out, n_in)
    codes = (idx[..., 0::2] << 4) | idx[..., 1::2]
    absmax = absmax.astype(np.float32)
    if not nested:
        return NF4(codes, absmax, rows=rows)
    scale_codes, absmax2, offset = quantize_scales(absmax)
    return NF4(codes, scale_codes, rows, absmax2, offset)


def quantize_scales(absmax, offset=None):
    """Double quantization of NF4 scales (..., out, in / 64): (their codes, uint8 in the same
    layout; ``absmax2`` (..., blocks of 256); ``offset`` (...,)), as bitsandbytes'
    ``quantize_blockwise(absmax - offset, blocksize=256)`` of each matrix's flattened scales.
    ``offset``: each matrix's mean, float32 (default: computed in float64, rounded once)."""
    absmax = np.asarray(absmax, np.float32)
    *lead, n_out, n_blocks = absmax.shape
    flat = absmax.reshape(*lead, n_out * n_blocks)
    if offset is None:
        offset = flat.astype(np.float64).mean(-1).astype(np.float32)
    offset = np.asarray(offset, np.float32)
    codes, absmax2 = quantize_blockwise(flat - offset[..., None])
    return codes.reshape(absmax.shape), absmax2, offset


def dequantize_nf4(q: NF4):
    """The (..., in, out) float32 matrix of an NF4 (jnp inside a trace, numpy on host arrays):
    level times its block's absmax, as bitsandbytes' ``dequantize_4bit``."""
    return _nf4_dense(q.codes, q.scales(), rows=q.rows)


def _nf4_dense(codes, scales, *, rows: bool):
    xp = np if isinstance(codes, np.ndarray) else jnp
    *lead, n_out, half = codes.shape
    codes = codes.astype(xp.int32)
    idx = xp.stack([codes >> 4, codes & 0xF], axis=-1)  # (..., out, in / 2, 2)
    levels = xp.asarray(NF4_LEVELS)[idx].reshape(*lead, n_out, 2 * half // BLOCK, BLOCK)
    w = (levels * scales[..., None]).reshape(*lead, n_out, 2 * half)
    return w if rows else xp.swapaxes(w, -1, -2)


def _stored(shape, rows: bool, nested: bool = False):
    *lead, a, b = shape
    n_out, n_in = (a, b) if rows else (b, a)
    scales = (*lead, n_out, n_in // BLOCK)
    if not nested:
        return ((*lead, n_out, n_in // 2), jnp.uint8), (scales, jnp.float32)
    return (((*lead, n_out, n_in // 2), jnp.uint8), (scales, jnp.uint8),
            ((*lead, -(-n_out * (n_in // BLOCK) // SCALE_BLOCK)), jnp.float32),
            (tuple(lead), jnp.float32))


def _stored_int8(shape, rows: bool):
    *lead, a, b = shape
    n_out, n_in = (a, b) if rows else (b, a)
    return ((*lead, n_out, n_in), jnp.int8), ((*lead, n_out), jnp.float32)


def _stored_fp8(shape, rows: bool):
    import ml_dtypes
    *lead, a, b = shape
    n_out, n_in = (a, b) if rows else (b, a)
    return (((*lead, n_out, n_in), jnp.dtype(ml_dtypes.float8_e4m3fn)),
            ((*lead, n_out // FP8_TILE, n_in // FP8_TILE), jnp.float32))


def _build(make, shape, method, rows, nested):
    if method == "nf4":
        codes, absmax, *more = (make(*s) for s in _stored(shape, rows, nested))
        return NF4(codes, absmax, rows, *more)
    cls, stored = (FP8, _stored_fp8) if method == "fp8" else (Int8, _stored_int8)
    return cls(*(make(*s) for s in stored(shape, rows)), rows=rows)


def zeros(shape, method: str = "nf4", *, rows: bool = False, nested: bool = False):
    """An all-zero quantized (..., in, out) matrix or table (a structure to load into)."""
    return _build(jnp.zeros, shape, method, rows, nested)


def abstract(shape, method: str = "nf4", *, rows: bool = False, nested: bool = False):
    """A quantized (..., in, out) matrix or table as ShapeDtypeStructs (memory benches)."""
    return _build(jax.ShapeDtypeStruct, shape, method, rows, nested)


def dense(tree):
    """A params tree with every quantized matrix dequantized (host numpy or traced)."""
    return jax.tree.map(lambda a: dequantize(a) if is_quantized(a) else a, tree,
                        is_leaf=is_quantized)


def fit_scales(mesh, params, specs):
    """``specs`` with each NF4's scales kept whole along ``in`` where their in / 64 blocks do
    not split over that axis (a 576-wide matrix has 9 blocks per output, fsdp 8 does not
    divide them), each FP8's along either axis its tiles do not split over; the codes split as
    their matrix. Scales are 1/8 of NF4's codes' bytes, 1/4096 of FP8's."""
    from jax.sharding import PartitionSpec as P

    def size(entry):
        names = entry if isinstance(entry, tuple) else (entry,) if entry else ()
        return int(np.prod([mesh.shape[a] for a in names]))

    def fit(q, s):
        if not isinstance(q, (NF4, FP8)):
            return s
        entries = list(s.absmax) + [None] * (q.absmax.ndim - len(s.absmax))
        for axis in ([-1] if is_nf4(q) else [-2, -1]):  # FP8: tiles along both
            if q.absmax.shape[axis] % size(entries[axis]):
                entries[axis] = None
        return dataclasses.replace(s, absmax=P(*entries))
    return jax.tree.map(fit, params, specs, is_leaf=is_quantized)


def rules(paths, spec_of, tables=(), method: str = "nf4", nested: bool = False) -> list:
    """Sharding rules of the quantized leaves of the matrices ``paths``, from each matrix's spec
    (layer, in, out) (``spec_of(name)``): codes and NF4's and FP8's scales (layer, out, in),
    int8's scales (layer, out); of the tables ``tables``, as the table's own (rows, width). Double
    quantized, the scales' scales and offset (a float per 16384 weights) split only as the
    layers are."""
    import re
    from jax.sharding import PartitionSpec as P
    out = []
    for path in (*paths, *tables):
        spec = tuple(spec_of(f"{path}.weight"))
        if path in tables:
            spec = tuple(spec)[:2]
        else:
            *lead, n_in, n_out = spec
            spec = (*lead, n_out, n_in)
        out.append((re.escape(f"{path}.weight.codes"), P(*spec)))
        out.append((re.escape(f"{path}.weight.absmax"),
                    P(*spec[:-1]) if method == "int8" else P(*spec)))
        if nested:
            lead = spec[:-2]
            out.append((re.escape(f"{path}.weight.absmax2"), P(*lead, None)))
            out.append((re.escape(f"{path}.weight.offset"), P(*lead)))
    return out
