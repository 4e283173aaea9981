"""Device meshes, the logical-axis rule table and the shardings derived from it.

The mesh has four axes, `MESH_AXES = ("data", "fsdp", "expert", "tensor")`:

  data    replicates parameters; splits the batch.
  fsdp    shards parameters on their "embed" dimension (gathered per layer by XLA);
          splits the batch.
  expert  shards MoE experts; every other parameter's "embed" dimension is split over
          fsdp × expert (ZeRO-style: no parameter or optimizer moment is replicated
          over it), and outside MoE layers it splits the batch like "data".
  tensor  shards hidden ("mlp"), head and vocabulary dimensions (Megatron-style).

Model code names axes logically (`jbtx.models.layers`); `AXIS_RULES` is the one table
that maps those names to mesh axes, for parameters and activations alike. A new
layout is a new table, not new model code. Rules apply in order, a mesh axis at most
once per array: an expert kernel `[expert, embed, mlp]` takes "expert" for its experts,
so its "embed" falls through to the fsdp-only rule.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jbtx.config import MESH_AXES, ConfigError, MeshConfig

BATCH_AXES = ("data", "fsdp", "expert")
_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("platform", default=None)

MeshAxes = str | tuple[str, ...] | None

AXIS_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # Parameters.
    ("expert", "expert"),
    ("vocab", "tensor"),
    ("embed", ("fsdp", "expert")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    # Activations.
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_q_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_head_dim", None),
    ("act_vocab", "tensor"),
    ("act_expert", "expert"),
)


def _fill(sizes: Sequence[int], total: int, keys: Sequence[str], unit: str) -> tuple[int, ...]:
  """`sizes` with a -1 replaced by what makes their product `total`; checks the product."""
  known = math.prod(s for s in sizes if s != -1)
  shown = ", ".join(f"{k}={s}" for k, s in zip(keys, sizes, strict=True))
  if -1 in sizes:
    fill = keys[list(sizes).index(-1)]
    if total % known:
      raise ConfigError(fill, f"cannot fill {total} {unit}: the other sizes ({shown}) "
                              f"multiply to {known}, which does not divide {total}")
    return tuple(total // known if s == -1 else s for s in sizes)
  if known != total:
    key = next((k for k, s in zip(keys, sizes, strict=True) if s != 1), keys[0])
    raise ConfigError(key, f"the sizes ({shown}) multiply to {known}, but there are "
                           f"{total} {unit}; set one size to -1 to fill")
  return tuple(sizes)


def _granules(devices: Sequence[jax.Device]) -> tuple[int, bool]:
  """Number of DCN-connected groups and whether they are processes.

  The groups are the slices when the devices span several (TPU multi-slice), else the
  processes: CPU and GPU devices, and those of one slice, all report slice 0.
  """
  by_process = len({getattr(d, "slice_index", 0) for d in devices}) == 1
  attr = "process_index" if by_process else "slice_index"
  return len({getattr(d, attr) for d in devices}), by_process


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The `("data", "fsdp", "expert", "tensor")` mesh over `devices` (default: all).

  Without DCN sizes, the ICI sizes cover all devices (`create_device_mesh` orders
  them for the physical topology). With any DCN size other than 1, the ICI sizes
  cover one slice (TPU) or one process (GPU/CPU hosts) and the DCN sizes the slices
  (`create_hybrid_device_mesh`), so that only the DCN axes cross slow links.

  Raises:
    ConfigError: naming the `mesh.*` key whose size cannot fit the devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  ici_keys = [f"mesh.{a}" for a in MESH_AXES]
  dcn_keys = [f"mesh.dcn_{a}" for a in MESH_AXES]
  if all(s == 1 for s in config.dcn_sizes()):
    ici = _fill(config.ici_sizes(), len(devices), ici_keys, "devices")
    array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  else:
    n_granules, by_process = _granules(devices)
    plural, singular = ("processes", "process") if by_process else ("slices", "slice")
    dcn = _fill(config.dcn_sizes(), n_granules, dcn_keys, plural)
    ici = _fill(config.ici_sizes(), len(devices) // n_granules, ici_keys,
                f"devices per {singular}")
    array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                 process_is_granule=by_process)
  return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
  """The mesh `PartitionSpec` of an array with logical `axes` and `shape` under `AXIS_RULES`.

  A dimension is split over as many of its mapped mesh axes, in order, as divide its
  size; one they do not divide stays replicated (e.g. a vocabulary of 97 on tensor=2):
  jit boundaries need even shards.
  """
  spec = nn.logical_to_mesh_axes(tuple(axes), AXIS_RULES)
  entries = []
  for entry, size in zip(spec, shape, strict=True):
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    names = tuple(n for n in names if mesh.shape[n] > 1)
    while names and size % math.prod(mesh.shape[n] for n in names):
      names = names[:-1]
    entries.append(None if not names else names[0] if len(names) == 1 else names)
  return P(*entries)


def param_shardings(abstract_params: Any, mesh: Mesh) -> Any:
  """`NamedSharding`s of a boxed parameter tree (`llama.abstract_params`), unboxed.

  Leaves without logical names (`nn.LogicallyPartitioned`) are replicated.
  """

  def sharding(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return NamedSharding(mesh, logical_to_spec(leaf.names, leaf.value.shape, mesh))
    return NamedSharding(mesh, P())

  return jax.tree.map(sharding, abstract_params,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def batch_shards(mesh: Mesh) -> int:
  """Number of pieces the batch dimension is split into (`data * fsdp * expert`)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of int `[batch, seq]` inputs: rows split over `BATCH_AXES`."""
  return NamedSharding(mesh, P(BATCH_AXES, None))


def check_batch_rows(mesh: Mesh, rows: int) -> None:
  """Raises ConfigError ('data.batch_size') unless `rows` split evenly over the mesh's
  batch shards."""
  shards = batch_shards(mesh)
  if rows % shards:
    raise ConfigError("data.batch_size",
                      f"the global batch ({rows} rows) must be divisible by the mesh's "
                      f"{shards} batch shards (mesh.data x mesh.fsdp x mesh.expert = "
                      f"{' x '.join(str(mesh.shape[a]) for a in BATCH_AXES)})")


def global_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Each process's rows `[local_batch, seq]` -> global arrays `[global_batch, seq]`.

  Process i contributes the rows of the batch shards its devices hold; with one
  process the local batch is the global batch.

  Raises:
    ConfigError: ('data.batch_size') if the global batch does not split evenly over
      the mesh's batch shards.
  """
  check_batch_rows(mesh, next(iter(local_batch.values())).shape[0] * jax.process_count())
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


@contextlib.contextmanager
def sharding_rules(mesh: Mesh):
  """Activates `AXIS_RULES` and `mesh` for the logical constraints of model code, and
  the mesh's platform for `target_platform`.

  Enter it inside a function being traced by `jax.jit` (it sets the abstract mesh,
  which is allowed under tracing).
  """
  token = _PLATFORM.set(mesh.devices.flat[0].platform)
  try:
    with (jax.sharding.use_abstract_mesh(mesh.abstract_mesh),
          nn.logical_axis_rules(AXIS_RULES)):
      yield
  finally:
    _PLATFORM.reset(token)


def target_platform() -> str:
  """The platform the code being traced runs on: that of the mesh of `sharding_rules`,
  else JAX's default backend. Compiling ahead of time for TPU devices on a CPU host
  (`jbtx.compile`) thus picks the TPU code paths (e.g. the MoE dispatch)."""
  return _PLATFORM.get() or jax.default_backend()


def host_params(params: Any) -> Any:
  """The full parameter tree as numpy arrays, on every process."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(params, tiled=True)
  return jax.device_get(params)


def rows_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of an array of any rank with its rows (first axis) split over `BATCH_AXES`."""
  return NamedSharding(mesh, P(BATCH_AXES))


def padded_rows(arrays: Sequence[np.ndarray], mesh: Mesh) -> tuple[list[np.ndarray], int]:
  """`arrays` (one row count) with their last row repeated until the rows split evenly
  over the mesh's batch shards and the processes; and the original row count."""
  rows = len(arrays[0])
  multiple = math.lcm(batch_shards(mesh), jax.process_count())
  extra = -rows % multiple
  return [np.concatenate([a, np.repeat(a[-1:], extra, axis=0)]) for a in arrays], rows


def global_rows(mesh: Mesh, *arrays: np.ndarray) -> list[jax.Array]:
  """Whole arrays that every process holds (rows splitting evenly, `padded_rows`) as
  global arrays with their rows split over the batch axes."""
  local = local_rows({str(i): np.asarray(a) for i, a in enumerate(arrays)})
  return [jax.make_array_from_process_local_data(rows_sharding(mesh), local[str(i)])
          for i in range(len(arrays))]


def local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's share of a whole batch's rows (every process holds the same whole
  batch; process i takes the i-th equal slice of rows, as `global_batch` expects)."""
  per = next(iter(batch.values())).shape[0] // jax.process_count()
  start = jax.process_index() * per
  return {k: np.ascontiguousarray(v[start:start + per]) for k, v in batch.items()}
