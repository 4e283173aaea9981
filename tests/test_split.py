"""LLaMA-MoE's FFN splitting: where every neuron lands, the dense FFN recovered from its
experts, and the importance score against a direct gradient."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbtx.config import ExperimentConfig, MoEConfig, from_mapping
from jbtx.methods import split
from jbtx.models import presets
from jbtx.models.layers import MLP
from jbtx.models.llama import Llama, init_params, unstack_layers
from jbtx.models.moe import MoE
from jbtx.pipeline.stages import llama_moe
from jbtx.training.step import next_token_loss
from tests import btx_short


def _counts(partition: split.Partition, d_ff: int) -> np.ndarray:
  """How many times each neuron appears in the routed experts."""
  return np.bincount(partition.experts.reshape(-1), minlength=d_ff)


def test_random_partition_places_every_neuron_once_in_equal_experts():
  a = split.random_partition(72, 8, np.random.default_rng(0))
  assert a.experts.shape == (8, 9) and len(a.shared) == 0
  np.testing.assert_array_equal(_counts(a, 72), np.ones(72))
  b = split.random_partition(72, 8, np.random.default_rng(0))
  c = split.random_partition(72, 8, np.random.default_rng(1))
  np.testing.assert_array_equal(a.experts, b.experts)  # seeded
  assert not np.array_equal(a.experts, c.experts)
  with pytest.raises(ValueError, match="72 neurons do not split into 7"):
    split.random_partition(72, 7, np.random.default_rng(0))


def test_clustering_partition_is_balanced_and_groups_neurons_of_one_direction():
  rng = np.random.default_rng(0)
  directions = rng.normal(size=(4, 16))
  owner = rng.permutation(np.repeat(np.arange(4), 6))  # 24 neurons, 6 per direction
  scale = rng.uniform(0.5, 3.0, size=24)  # the norm does not matter: rows are normalised
  up = (directions[owner] + 0.05 * rng.normal(size=(24, 16))) * scale[:, None]
  partition = split.clustering_partition(up.T, 4, seed=0)
  assert partition.experts.shape == (4, 6)
  np.testing.assert_array_equal(_counts(partition, 24), np.ones(24))
  for row in partition.experts:
    assert len(set(owner[row])) == 1  # each expert is one planted direction


@pytest.mark.parametrize("inter", [False, True])
def test_sharing_puts_the_most_important_neurons_in_every_expert_and_partitions_the_rest(inter):
  d_ff, n_experts, n_shared = 40, 4, 1  # m = 40 / 5 = 8
  rng = np.random.default_rng(0)
  scores = rng.uniform(0.0, 1.0, size=(2, d_ff))  # two domains
  top, favourite = np.split(rng.permutation(d_ff)[:16], 2)
  scores[:, top] = 10.0  # important on both domains: shared
  scores[0, favourite], scores[1, favourite] = 4.0, 0.0  # for domain 0 (experts 0, 2) only
  partition = split.sharing_partition(scores, n_experts, n_shared, inter)
  shared = set(top)
  if inter:
    assert set(partition.shared) == shared and partition.experts.shape == (4, 8)
    counts = _counts(partition, d_ff)
    assert (counts[list(shared)] == 0).all()
    assert (np.delete(counts, list(shared)) == 1).all()
  else:
    assert len(partition.shared) == 0 and partition.experts.shape == (4, 16)
    for row in partition.experts:
      assert shared <= set(row)
    routed = [sorted(set(row) - shared) for row in partition.experts]
    assert sorted(np.concatenate(routed)) == sorted(set(range(d_ff)) - shared)
  own = [set(row) - shared for row in partition.experts]
  assert set(favourite) <= own[0] | own[2]  # taken by domain 0's experts


def _dense_and_split(method: str, n_shared: int = 0):
  dense_config = presets.get("micro")
  dense = jax.device_get(init_params(Llama(dense_config), jax.random.key(0)))
  rng = np.random.default_rng(0)
  layers = unstack_layers(dense)
  scores = rng.uniform(size=(2, dense_config.d_ff))
  partitions = [split.random_partition(72, 8, np.random.default_rng(i)) if method == "random"
                else split.sharing_partition(scores, 8, n_shared, inter=True)
                for i in range(dense_config.n_layers)]
  width, _ = split.expert_width(72, 8, method, n_shared)
  moe = MoEConfig(n_experts=8, top_k=8, d_ff=width, n_shared_experts=n_shared,
                  output_scale=8.0, router="noisy_mlp", load_balance="cv")
  config = dataclasses.replace(dense_config, moe=moe)
  params = split.split_params(layers, config, partitions, seed=0)
  return dense_config, dense, config, params


@pytest.mark.parametrize("method, n_shared", [("random", 0), ("sharing_inter", 1)])
def test_all_experts_with_equal_gates_and_scale_e_compute_the_dense_ffn(method, n_shared):
  """k = E, gate values 1/E (zero gate weights give equal logits), outputs × E: the
  experts' neurons add up to the dense FFN's (residual experts unscaled)."""
  dense_config, dense, config, params = _dense_and_split(method, n_shared)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 32)), jnp.float32)
  mlp, moe_layer = jax.jit(MLP(dense_config).apply), jax.jit(MoE(config).apply)
  for layer in range(config.n_layers):
    moe = jax.tree.map(lambda a, layer=layer: a[layer], params["layers"]["moe"])
    moe = moe | {k: np.zeros_like(v) for k, v in moe.items() if k.startswith("router")}
    ffn = jax.tree.map(lambda a, layer=layer: a[layer], dense["layers"]["mlp"])
    expected, got = mlp({"params": ffn}, x), moe_layer({"params": moe}, x)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-5)  # float32


def test_split_model_keeps_everything_but_the_ffns():
  _, dense, config, params = _dense_and_split("random")
  assert set(params) == set(dense)
  np.testing.assert_array_equal(params["embed"]["embedding"], dense["embed"]["embedding"])
  np.testing.assert_array_equal(params["layers"]["attn"]["q"]["kernel"],
                                dense["layers"]["attn"]["q"]["kernel"])
  moe = params["layers"]["moe"]
  assert moe["gate"].shape == (2, 8, 32, 9) and moe["down"].shape == (2, 8, 9, 32)
  assert {"router", "router_hidden", "router_noise"} <= set(moe)
  jax.eval_shape(Llama(config).apply, {"params": params}, np.ones((1, 4), np.int32))


def test_importance_is_activation_times_gradient_from_a_direct_jax_grad():
  config = dataclasses.replace(presets.get("micro"), scan_layers=False)
  model = Llama(config)
  params = init_params(model, jax.random.key(3))
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(1, config.vocab_size, (2, 10)),
           "positions": np.tile(np.arange(10), (2, 1)),
           "segment_ids": np.array([[1] * 10, [1] * 6 + [2] * 4])}
  got = split.importance(model, params, [batch, batch])

  # Directly: an additive perturbation e at every down-projection input; ∂L/∂e = ∂L/∂a,
  # and the activations a themselves from the same forward pass.
  def loss(perturbations):
    activations = []

    def add(next_fun, args, kwargs, context):
      if context.method_name == "__call__" and isinstance(context.module.parent, MLP) and (
          context.module.name == "down"):
        layer = int(context.module.parent.parent.name.removeprefix("layers_"))
        activations.append(args[0])
        args = (args[0] + perturbations[layer],)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(add):
      logits = model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                           segment_ids=batch["segment_ids"])
    return next_token_loss(logits, batch)[0], jnp.stack(activations)

  zeros = jnp.zeros((config.n_layers, 2, 10, config.d_ff))
  grads, activations = jax.jit(jax.grad(loss, has_aux=True))(zeros)
  expected = 2 * np.abs(np.asarray(activations * grads)).sum(axis=(1, 2))  # two batches
  assert got.shape == (config.n_layers, config.d_ff) and expected.max() > 0
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("method", ["random", "clustering"])
def test_the_stage_partitions_every_layer_of_the_seed(method):
  """`llama_moe.partitions` on the demo seed's shape (2 layers of 256 neurons, 8 experts)."""
  raw = btx_short.get_config()
  raw.llama_moe.split = method
  config = from_mapping(ExperimentConfig, raw)
  model_config = dataclasses.replace(config.model, scan_layers=False)
  dense = jax.device_get(init_params(Llama(model_config), jax.random.key(0)))
  layers = llama_moe.partitions(config, dense)
  assert len(layers) == 2
  for partition in layers:
    assert partition.experts.shape == (8, 32)
    np.testing.assert_array_equal(_counts(partition, 256), np.ones(256))
