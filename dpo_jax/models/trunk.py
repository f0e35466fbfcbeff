"""The model contract as code: ``CausalLM``, the trunk every family shares.

A family's module subclasses ``CausalLM`` and supplies only what is its own:

- ``embed(input_ids, position_ids)``: the token (and position) embedding, (B, T, C) in the
  compute dtype;
- ``stack``: its blocks, stacked (``common.stacked``); a block is called
  ``block(x, mask, context, per_layer, kv=None, index=None) -> (x, kv)``; a family with two
  kinds of block (a mixture of experts with dense layers among the sparse ones) keeps a stack
  of each and says in which order they run (``segments``);
- ``block_context(position_ids)``: what every block gets (RoPE's cos / sin), and
  ``layer_inputs()``: arrays with a leading layer axis scanned with the blocks (a layer index);
- ``final_norm(x)`` and ``head_weight()`` (the (V, C) LM head, tied or not);
- on its config: ``n_layers``, ``n_heads``, ``n_kv_heads``, ``head_size``, and optionally
  ``final_logit_softcap`` (Gemma 2's ``final_logit_softcapping``: logits = cap * tanh(z / cap)).

The trunk here runs them: positions from the mask, the scanned stack with remat, the KV cache and
``decode``, and the output hook ``logits_fn()``, used by ``lm_head``, the chunked log-probs, the
completion-only head and sampling alike, so a family changes its logits in one place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpo_jax.models import attention as attention_lib
from dpo_jax.models import common


class CausalLM(nnx.Module):
    """A causal LM over a scanned stack of blocks (see the module docstring)."""

    config: object

    # ---- what a family supplies
    @property
    def stack(self):
        raise NotImplementedError

    def embed(self, input_ids, position_ids):
        raise NotImplementedError

    def block_context(self, position_ids) -> tuple:
        return ()

    def layer_inputs(self) -> tuple:
        return ()

    def final_norm(self, x):
        raise NotImplementedError

    def segments(self) -> tuple:
        """The layers in order as runs of one stack: ((stack, (start, stop) in it), ...), the
        runs' lengths summing to ``n_layers``. One stack by default."""
        return ((self.stack, None),)

    def layer_masks(self, mask, query_positions, key_positions):
        """What each block gets as its mask, from the sequence's mask and the positions of its
        queries (B, T) and keys (B, S): the mask itself, unless the family has local layers
        (Gemma's sliding windows: (mask, its windowed form), the block picks per layer)."""
        return mask

    def head_weight(self):
        """The LM head's (V, C) matrix."""
        raise NotImplementedError

    # ---- the trunk
    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, *, attn_mask=None):
        """Final (post-norm) hidden states, (B, T, C) in the compute dtype.

        attention_mask: (B, T), 1 for real tokens, 0 for padding (left or right). Position ids are
          derived from it unless given, so a left-padded row gives the logits of the unpadded one.
        attn_mask: optional ``attention.Mask`` (lengths, segments or a dense (B, T, T) boolean,
          True where query t may attend to key s). It replaces the causal-and-padding mask
          (layouts such as prefix sharing and packing pass their own).
        """
        position_ids, attn_mask = common.trunk_inputs(input_ids, attention_mask, position_ids,
                                                      attn_mask)
        return self._trunk(input_ids, position_ids, attn_mask)[0]

    def _trunk(self, input_ids, position_ids, mask, cache=None, index=None, key_positions=None):
        c = self.config
        mask = self.layer_masks(mask, position_ids,
                                position_ids if key_positions is None else key_positions)
        order = None if cache is not None else common.context_order(mask, input_ids.shape[1],
                                                                     c.mesh_axes)
        if cache is None:
            mask = common.context_masks(mask, c.mesh_axes, c.attention)
        if order is not None:  # the layers see the row in zig-zag order, the head in its own
            input_ids, position_ids = input_ids[:, order], position_ids[:, order]
            mask = jax.tree.map(lambda m: m.reordered(order, c.mesh_size(common.POSITIONS)),
                                mask, is_leaf=lambda m: isinstance(m, attention_lib.Mask))
        x = self.embed(input_ids, position_ids)
        context, per_layer = self.block_context(position_ids), self.layer_inputs()
        n = len(per_layer)
        extras, kvs, at = [], [], 0
        # the layers as traced for the mesh: with a context axis, no flattening of rows and
        # positions into tokens (common.apply_2d)
        with common.positions_split(c.mesh_axes if cache is None else ()):
            for stack, part in self.segments():
                size = c.n_layers if part is None else part[1] - part[0]
                mine = lambda xs: tuple(xs if part is None else (a[at:at + size] for a in xs))
                if cache is None:
                    x, ys = common.scan_stack(
                        stack, x,
                        lambda blk, x, *xs: (blk(common.split_positions(x, c.mesh_axes), mask,
                                                 context, xs)[0],
                                             self.layer_extras(blk)),
                        mine(per_layer), remat=c.remat, remat_policy=c.remat_policy, layers=part)
                    extras += [ys] if ys is not None else []
                else:
                    x, kv = common.scan_stack(
                        stack, x, lambda blk, x, *xs: blk(x, mask, context, xs[:n], xs[n:], index),
                        mine((*per_layer, *cache)), layers=part)
                    kvs.append(kv)
                at += size
        if cache is None:
            self.keep_extras(extras[0] if len(extras) == 1 else
                             jax.tree.map(lambda *a: jnp.concatenate(a), *extras)
                             if extras else None, mask)
            if order is not None:
                x = x[:, np.argsort(order)]
            return self.final_norm(x), None
        kv = kvs[0] if len(kvs) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a), *kvs)
        return self.final_norm(x), kv

    # ---- what a family may add to a training pass (a mixture of experts' router)
    def layer_extras(self, block):
        """What a block hands out of the scanned stack besides its output (stacked over the
        layers), or None."""
        return None

    def keep_extras(self, extras, mask):
        """Keeps the stack's extras of this pass for ``aux_loss`` (a no-op by default)."""

    def aux_loss(self):
        """The family's auxiliary training loss over the passes since the model was built (a
        float32 scalar), or None: a mixture of experts' load-balancing loss."""
        return None

    def init_cache(self, batch: int, length: int):
        """An empty KV cache: (k, v), each (layers, B, S, KV heads, head size), compute dtype."""
        c = self.config
        shape = (c.n_layers, batch, length, c.n_kv_heads, c.head_size)
        return jnp.zeros(shape, c.compute_dtype), jnp.zeros(shape, c.compute_dtype)

    def decode(self, input_ids, position_ids, key_mask, cache, index):
        """New tokens (B, T) at cache positions [index, index + T) against a KV cache.

        key_mask: (B, S) which cache positions hold real tokens (False for left padding).
        Returns (hidden (B, T, C), updated cache).
        """
        mask = common.decode_mask(key_mask, input_ids.shape[1], index)
        key_positions = jnp.maximum(jnp.cumsum(key_mask.astype(jnp.int32), -1) - 1, 0)
        return self._trunk(input_ids, position_ids, mask, cache, index, key_positions)

    # ---- the output hook
    def logits_fn(self):
        """A pure function hidden (..., C) -> float32 logits (..., V): the head matmul in the
        compute dtype with float32 accumulation (a following log-softmax sees full-precision
        logits), then the family's soft-cap if it has one. Every consumer of logits calls it."""
        w = self.head_weight()
        cap = getattr(self.config, "final_logit_softcap", None)

        def logits(hidden):
            z = jnp.einsum("...c,vc->...v", hidden, w.astype(hidden.dtype),
                           preferred_element_type=jnp.float32)
            return z if not cap else cap * jnp.tanh(z / cap)
        return logits

    def lm_head(self, hidden):
        """Logits in float32 from hidden states (..., C)."""
        return self.logits_fn()(hidden)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, *, attn_mask=None):
        """Logits (B, T, V), float32."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids,
                                               attn_mask=attn_mask))
