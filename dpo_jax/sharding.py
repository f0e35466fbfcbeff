"""Device mesh, parameter sharding rules and batch sharding: what ``pjit`` did, with ``jax.jit``.

The mesh has five axes:
  data    pure data parallelism: params replicated, batch split
  fsdp    data parallelism with params (and optimizer state) split too, gathered per use
  expert  expert parallelism (a mixture of experts): each device holds its share of the experts;
          for everything else it is one more data-parallel axis (the batch is split over it)
  context context parallelism: each row's positions split (long pairs); params replicated
  tensor  Megatron tensor parallelism: attention heads and the MLP's hidden units split

Parameters are placed by one ordered table of (regex on the parameter path, PartitionSpec) that
each model family provides (``models/*/params.py``, ``Family.rules``); the first match wins and
must match the whole path. Layers carry no annotations. The tables end with the vectors that stay
replicated, by name, rather than a ``.*``: a parameter that no rule matches is an error, so a new
matrix in a research fork is given a rule, not silently replicated.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dpo_jax import keys as K
from dpo_jax.errors import ConfigError, DpoError
from dpo_jax.models import mesh as model_mesh
from dpo_jax.steps import init_state as make_state

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "expert", "context", "tensor")
BATCH = model_mesh.ROWS  # the batch axis is split over the data-parallel axes
KEYS = "mesh_data, mesh_fsdp, mesh_expert, mesh_context, mesh_tensor"  # their config keys

@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """devices (dpo_jax/sharding.py)"""

    mesh_data: int = K.key(-1, "data-parallel axis size; -1 = the devices left over",
                           K.mesh_axis)
    mesh_fsdp: int = K.key(1, "fully sharded data-parallel axis (params + optimizer split)",
                           K.mesh_axis)
    mesh_tensor: int = K.key(1, "tensor-parallel axis (heads and MLP units split)", K.mesh_axis)
    mesh_expert: int = K.key(1, "expert-parallel axis (a mixture of experts' experts split; "
                             "the batch too)", K.mesh_axis)
    mesh_context: int = K.key(1, "context-parallel axis (each row's positions split: long "
                              "pairs)", K.mesh_axis)
    distributed: bool = K.key(False, "multi-host: call jax.distributed.initialize() first",
                              K.flag)
    coordinator_address: str = K.key("", "host:port of process 0; \"\" = auto-detect (SLURM, "
                                     "TPU, MPI)", K.text)
    num_processes: int = K.key(0, "processes in the job; 0 = auto-detect", K.integer(0))
    process_id: int = K.key(-1, "this process's index; -1 = auto-detect", K.integer(-1))

    def __post_init__(self):
        K.check_fields(self)
        if [self.mesh_data, self.mesh_fsdp, self.mesh_tensor, self.mesh_expert,
                self.mesh_context].count(-1) > 1:
            raise ConfigError("config keys mesh_data, mesh_fsdp, mesh_tensor, mesh_expert, "
                              "mesh_context: at most one may be -1")


class ShardingError(DpoError, ValueError):
    """A mesh or rule that does not fit the model or the batch (raised before compiling)."""


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None, *,
              expert: int = 1, context: int = 1) -> Mesh:
    """A (data, fsdp, expert, context, tensor) mesh; one size may be -1: the devices left over.
    Sizes whose product is below the device count use the first devices (one device for
    debugging)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, expert, context, tensor]
    if sizes.count(-1) > 1:
        raise ShardingError(f"mesh {AXES}={tuple(sizes)}: at most one -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ShardingError(f"mesh {AXES}={tuple(sizes)}: {len(devices)} devices do not "
                                f"divide by {known} (config keys {KEYS})")
        sizes[sizes.index(-1)] = len(devices) // known
    n = int(np.prod(sizes))
    if any(s < 1 for s in sizes) or n > len(devices):
        raise ShardingError(f"mesh {AXES}={tuple(sizes)} needs {n} devices; there are "
                            f"{len(devices)} (config keys {KEYS})")
    if n < len(devices):
        log.info("mesh %s uses %d of the %d devices", tuple(sizes), n, len(devices))
    return Mesh(np.asarray(devices[:n]).reshape(sizes), AXES)


def mesh_axes(mesh: Mesh) -> tuple:
    """The mesh's ((axis, size), ...): what a model config carries (``mesh_axes``) to run its
    own collectives (``shard_map``) over the mesh it is traced for."""
    return tuple((name, int(size)) for name, size in mesh.shape.items())


def _path_name(path) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return ".".join(parts)


def param_specs(params, rules):
    """PartitionSpec of every leaf of a params pytree (arrays or ShapeDtypeStructs)."""
    def spec(path, leaf):
        name = _path_name(path)
        for pattern, s in rules:
            if re.fullmatch(pattern, name):
                if len(s) > len(leaf.shape):
                    raise ShardingError(f"rule {pattern!r} gives {s} to {name} of rank "
                                        f"{len(leaf.shape)}")
                return s
        raise ShardingError(f"no sharding rule matches parameter {name!r} {tuple(leaf.shape)}; "
                            "add one to the rules table")
    return jax.tree_util.tree_map_with_path(spec, params)


def check_positions_within_processes(mesh: Mesh):
    """Each process loads its own rows, so the devices a row's positions are split over (the
    context and tensor axes) must belong to one process."""
    devices = np.moveaxis(mesh.devices, [AXES.index("context"), AXES.index("tensor")], [-2, -1])
    groups = devices.reshape(-1, mesh.shape["context"] * mesh.shape["tensor"])
    if any(len({d.process_index for d in g}) > 1 for g in groups):
        raise ShardingError(f"mesh_context={mesh.shape['context']} x mesh_tensor="
                            f"{mesh.shape['tensor']} spans several processes; each process "
                            "loads its own rows, so these axes must lie within one host (make "
                            "them smaller than its devices, or use fsdp / data across hosts)")


def batch_split(mesh: Mesh) -> int:
    """Into how many parts the batch's rows are split: data x fsdp x expert."""
    return _axis_size(mesh, BATCH)


def context_multiple(mesh: Mesh) -> int:
    """What a row's length is padded to a multiple of: 2n over a context axis of n (the 2n
    chunks of ring attention's zig-zag order, ``attention.zigzag``), 1 without one."""
    n = mesh.shape["context"]
    return 2 * n if n > 1 else 1


def _axis_size(mesh: Mesh, entry) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return int(np.prod([mesh.shape[n] for n in names]))


def check_divisible(mesh: Mesh, tree, specs, what: str = "parameter"):
    """Every split dimension must divide evenly: say which one does not, before XLA does."""
    def check(path, leaf, spec):
        for dim, entry in enumerate(spec):
            n = _axis_size(mesh, entry)
            if leaf.shape[dim] % n:
                raise ShardingError(f"{what} {_path_name(path)} {tuple(leaf.shape)}: dimension "
                                    f"{dim} ({leaf.shape[dim]}) does not divide over mesh axis "
                                    f"{entry} of size {n}")
    jax.tree_util.tree_map_with_path(check, tree, specs)


def check_model_fits(mesh: Mesh, model_config, pairs_per_batch: int):
    """The head, expert and batch constraints of a mesh, in the terms a user sets."""
    for axis, dims in (("tensor", model_config.tensor_parallel_dims()),
                       ("expert", getattr(model_config, "expert_parallel_dims", dict)())):
        n = mesh.shape[axis]
        for field, size in dims.items():
            if size % n:
                raise ShardingError(f"{field}={size} does not divide over the {axis} axis of "
                                    f"size {n} (config key mesh_{axis})")
    if mesh.shape["expert"] > 1 and not hasattr(model_config, "expert_parallel_dims"):
        raise ShardingError(f"mesh_expert={mesh.shape['expert']} splits experts, and this model "
                            f"({type(model_config).__name__}) has none: use mesh_data or "
                            "mesh_fsdp for data parallelism")
    n = _axis_size(mesh, BATCH)
    if pairs_per_batch % n:
        raise ShardingError(f"a batch of {pairs_per_batch} pairs does not divide over the "
                            f"data x fsdp x expert axes ({mesh.shape['data']} x "
                            f"{mesh.shape['fsdp']} x {mesh.shape['expert']} = {n})")


def named(mesh: Mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


def state_shardings(mesh: Mesh, abstract_state, param_spec_tree):
    """Shardings of a train state: optimizer moments follow their parameter
    (a leaf whose path ends with a parameter's path and has its shape); the rest is replicated."""
    by_name = {}
    jax.tree_util.tree_map_with_path(
        lambda path, leaf, spec: by_name.__setitem__(_path_name(path), (leaf.shape, spec)),
        abstract_state["params"], param_spec_tree)

    def spec(path, leaf):
        parts = _path_name(path).split(".")
        for i in range(len(parts)):  # "1.0.mu.h.attn.c_attn.weight" ends with a param's name
            shape, s = by_name.get(".".join(parts[i:]), (None, None))
            if shape is not None and tuple(leaf.shape) == tuple(shape):
                return s
        return P()
    specs = jax.tree_util.tree_map_with_path(spec, abstract_state)
    return named(mesh, specs)


def batch_sharding(mesh: Mesh, ndim: int, accumulate: bool = True) -> NamedSharding:
    """Batch leaves: (A, rows, ...) with rows split over (data, fsdp, expert); A (micro-batches)
    whole."""
    lead = (None,) if accumulate else ()
    spec = P(*lead, BATCH, *([None] * (ndim - len(lead) - 1)))
    return NamedSharding(mesh, spec)


def shard_batch(mesh: Mesh, batch: dict, accumulate: bool = True) -> dict:
    """Host numpy batch -> global arrays. Each process passes the rows it loaded (process-local
    data: its block of pairs), so on one host this is the whole batch."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim, accumulate), v)
            for k, v in batch.items()}


def place(tree, shardings):
    """Host arrays -> arrays laid out by ``shardings`` (each process fills its own shards)."""
    def put(a, s):
        if isinstance(a, jax.Array):
            return jax.device_put(a, s)
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, s, lambda idx: a[idx])
    return jax.tree.map(put, tree, shardings)


def init_params(mesh: Mesh, init_fn, rules):
    """Params created already sharded: the rules are applied to ``jax.eval_shape(init_fn)``, then
    ``init_fn`` runs under jit with those output shardings (no device ever holds them all)."""
    abstract = jax.eval_shape(init_fn)
    specs = param_specs(abstract, rules)
    check_divisible(mesh, abstract, specs)
    return jax.jit(init_fn, out_shardings=named(mesh, specs))()


def init_state(mesh: Mesh, params, optimizer, rules):
    """(state, state_shardings): ``steps.init_state`` laid out over the mesh, the optimizer state
    created in place with the sharding of its parameters."""
    specs = param_specs(params, rules)
    check_divisible(mesh, params, specs)
    params = place(params, named(mesh, specs))

    def make(p):
        return make_state(p, optimizer)

    shardings = state_shardings(mesh, jax.eval_shape(make, params), specs)
    return jax.jit(make, out_shardings=shardings)(params), shardings


def to_host(tree):
    """numpy copies of (possibly sharded, possibly multi-host) arrays, on every process."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)
