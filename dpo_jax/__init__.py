"""dpo_jax: Direct Preference Optimization in pure JAX/Flax."""

__version__ = "0.1.0"
