"""Issue 29: the LM head never costs (tokens x vocab) memory. Its chunk of positions is chosen
from the vocab when not set; the chunked head's gradients are the unchunked head's, and its
compiled temporaries at Gemma 3's 262k vocab and 8k tokens are below 1/8 of the unchunked."""

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import logprobs


def test_the_chunk_is_chosen_from_the_vocab():
    sizes = {v: logprobs.chunk_positions(-1, v) for v in (512, 50257, 128256, 151936, 262144)}
    assert sizes == {512: 1024, 50257: 1024, 128256: 512, 151936: 256, 262144: 256}
    assert logprobs.chunk_positions(0, 262144) == 0 and logprobs.chunk_positions(96, 7) == 96


def test_chunked_gradients_equal_the_unchunked_head():
    rng = np.random.default_rng(0)
    n, c, v = 300, 16, 1000  # 300 positions: chunks of 64 with a ragged last one
    h = jnp.asarray(rng.normal(size=(n, c)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(v, c)) * 0.3, jnp.float32)
    y = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    grads = [jax.grad(lambda h, w: logprobs.token_logprobs(h, w, y, chunk).sum(),
                      argnums=(0, 1))(h, w) for chunk in (0, 64)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-6)


def test_chunked_temporaries_at_262k_vocab_and_8k_tokens_are_below_an_eighth():
    n, c, v = 8192, 1152, 262144  # gemma-3-1b's head at 8k positions (compiled, not run)
    args = (jax.ShapeDtypeStruct((n, c), jnp.float32), jax.ShapeDtypeStruct((v, c), jnp.float32),
            jax.ShapeDtypeStruct((n,), jnp.int32))

    def temp(chunk):
        f = jax.grad(lambda h, w, y: logprobs.token_logprobs(h, w, y, chunk).sum(), argnums=(0, 1))
        return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes

    whole, chunked = temp(0), temp(logprobs.chunk_positions(-1, v))
    assert whole > 2 * n * v * 4 * 0.9  # the logits and their gradient, float32
    assert chunked < whole / 8, (chunked, whole)
