"""The device mesh as a model sees it: ``mesh_axes``, ((axis, size), ...), the mesh a model is
traced for (``sharding.mesh_axes`` of the trainer's mesh), enough for ``shard_map`` and sharding
constraints inside a jitted step without the devices themselves."""

from __future__ import annotations

import jax

# the mesh axes a batch's rows are split over (sharding.BATCH), and then its positions
ROWS, POSITIONS = ("data", "fsdp", "expert"), "context"


def size(mesh_axes: tuple, axis: str) -> int:
    """The size of a mesh axis (1 without one)."""
    return dict(mesh_axes).get(axis, 1)


def abstract(mesh_axes: tuple) -> jax.sharding.AbstractMesh:
    """The mesh without its devices."""
    axes = dict(mesh_axes)
    return jax.sharding.AbstractMesh(tuple(axes.values()), tuple(axes))
