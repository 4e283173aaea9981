"""Expert parallelism: the sharded MoE layer equals the unsharded one, values and gradients."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jbtx.config import MeshConfig
from jbtx.models import presets
from jbtx.models.moe import MoE
from jbtx.runtime import sharding

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _layer(path):
  config = presets.get("micro_moe")
  moe = dataclasses.replace(config.moe, n_experts=8, top_k=2, dispatch=path)
  return MoE(dataclasses.replace(config, moe=moe))


def _inputs(layer, batch=8, seq=6):
  """Boxed params and tokens `[batch, seq, embed]`; the router favours expert 0."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, seq, layer.config.d_model)).astype(np.float32)
  boxed = layer.init(jax.random.key(0), jnp.asarray(x[:1, :1]))["params"]
  router = boxed["router"].value
  boxed["router"] = boxed["router"].replace_boxed(router.at[:, 0].add(0.1 * x.mean((0, 1))))
  return boxed, x


def _value_and_grads(layer, mesh, boxed, x):
  """`Σ layer(x) · c` for fixed c, and its gradients, jit-compiled for `mesh`."""
  c = np.cos(np.arange(x.size, dtype=np.float32)).reshape(x.shape)

  def loss(params, x):
    with sharding.sharding_rules(mesh):
      return jnp.sum(layer.apply({"params": params}, x) * c)

  shardings = (sharding.param_shardings(boxed, mesh),
               NamedSharding(mesh, P(sharding.BATCH_AXES)))
  params = nn.meta.unbox(boxed)
  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), in_shardings=shardings)
  compiled = fn.lower(params, x).compile(FAST_COMPILE)
  return jax.device_get(compiled(params, x)), compiled.as_text()


@pytest.mark.parametrize("path, shape", [("dropless", (2, 1, 4, 1)), ("blocked", (1, 2, 2, 2))])
def test_expert_parallel_layer_equals_the_unsharded_layer(path, shape):
  layer = _layer(path)
  boxed, x = _inputs(layer)
  one = sharding.make_mesh(MeshConfig(), jax.devices()[:1])
  (want, want_grads), want_hlo = _value_and_grads(layer, one, boxed, x)
  (got, got_grads), got_hlo = _value_and_grads(layer, sharding.make_mesh(MeshConfig(*shape)),
                                               boxed, x)
  assert "all-to-all" in got_hlo and "all-to-all" not in want_hlo
  np.testing.assert_allclose(got, want, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               got_grads, want_grads)
  assert np.abs(want_grads[0]["gate"]).sum(axis=(1, 2)).min() > 0  # every expert got tokens
