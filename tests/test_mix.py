"""BTX mixing: N dense models -> one MoE (`jbtx.methods.mix`), its sources and router init.

Everything runs in float32 with "highest" matmul precision (conftest). Tolerances:
parameter averages rtol 1e-6 (float32 accumulation of 3 terms, a few ulp) with atol 1e-7
for entries where the terms cancel (kernel entries are ~1e-2); layer outputs rtol 1e-5 /
atol 1e-6 (the same SwiGLU, products summed in another order); decoder logits atol 1e-5
(as the other decoder-equivalence tests).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbtx.config import MeshConfig, ModelConfig, MoEConfig
from jbtx.inference.sharded import params_sharding
from jbtx.interop import checkpoint
from jbtx.interop.tensor_source import CheckpointSource, TreeSource
from jbtx.methods import mix, router_init
from jbtx.models import presets
from jbtx.models.layers import MLP
from jbtx.models.llama import Llama, abstract_params, init_params, unstack_layers
from jbtx.models.moe import MoE
from jbtx.runtime import sharding

DENSE = presets.get("micro")  # scanned layout, 2 layers, d_model 32, d_ff 72
N_MODELS = 3
FFN_KEYS = ("gate", "up", "down")
AVERAGE_TOL = dict(rtol=1e-6, atol=1e-7)
LOGITS_ATOL = 1e-5


_init = jax.jit(lambda key: init_params(Llama(DENSE), key))


def _perturbed_params(seed: int) -> dict[str, Any]:
  """A random micro model whose every leaf (norm scales too) differs from other seeds'."""
  params = _init(jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return treedef.unflatten([np.asarray(x) + rng.normal(0.0, 0.02, x.shape).astype(np.float32)
                            for x in leaves])


@pytest.fixture(scope="module")
def models() -> list[dict[str, Any]]:
  """Three different dense micro models (scanned layout, numpy leaves)."""
  return [_perturbed_params(seed) for seed in range(N_MODELS)]


def _moe_config(n_experts: int, top_k: int, d_ff: int = DENSE.d_ff) -> ModelConfig:
  """The mixed model's config: the seed's, with every FFN an MoE, layers unrolled."""
  moe = MoEConfig(n_experts=n_experts, top_k=top_k, d_ff=d_ff, routing="topk")
  return dataclasses.replace(DENSE, moe=moe, scan_layers=False)


def _routers(seed: int, n_experts: int, scale: float = 1.0) -> Callable[[int], np.ndarray]:
  """`layer -> [embed, E]` normal(0, scale) router: wide enough for uneven gates."""
  return lambda layer: np.random.default_rng([seed, layer]).normal(
      0.0, scale, (DENSE.d_model, n_experts)).astype(np.float32)


def _mix(params: Sequence[Any], config: ModelConfig, ffn: str, routers: Callable,
         weights: Sequence[float] = (1.0,) * N_MODELS, chunks: int = 1) -> dict[str, Any]:
  sources = [TreeSource(DENSE, p) for p in params]
  return mix.mix_params(sources, config, ffn, chunks, weights, routers)


@functools.cache
def _forward(config: ModelConfig) -> Callable:
  return jax.jit(lambda params, tokens: Llama(config).apply({"params": params}, tokens))


def _logits(config: ModelConfig, params: Any, seed: int = 0) -> np.ndarray:
  tokens = jax.random.randint(jax.random.key(seed), (2, 16), 0, DENSE.vocab_size, jnp.int32)
  return np.asarray(_forward(config)(params, tokens))


def _leaves(tree: Any) -> dict[tuple[str, ...], np.ndarray]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {tuple(k.key for k in path): np.asarray(leaf) for path, leaf in flat}


def _average(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
  return np.average(np.stack(arrays).astype(np.float64), axis=0, weights=weights)


def _averaged_dense(models: Sequence[Any], weights: Sequence[float]) -> dict[str, Any]:
  """The dense model whose every parameter, FFN included, is the weighted numpy average."""
  unrolled = [_leaves(unstack_layers(p)) for p in models]
  tree: dict[str, Any] = {}
  for path in unrolled[0]:
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = _average([u[path] for u in unrolled], weights).astype(np.float32)
  return tree


def test_experts_mix_stacks_the_ffns_and_averages_everything_else(models):
  config = _moe_config(N_MODELS, 2)
  routers = _routers(0, N_MODELS)
  unrolled = [_leaves(unstack_layers(p)) for p in models]
  for weights in ((1.0, 1.0, 1.0), (1.0, 2.0, 3.0)):
    mixed = _mix(models, config, "experts", routers, weights)
    leaves = _leaves(mixed)
    averaged = [p for p in leaves if p[1] != "moe"]
    assert len(averaged) == len([p for p in unrolled[0] if p[1] != "mlp"])
    for path in averaged:
      want = _average([u[path] for u in unrolled], weights)
      np.testing.assert_allclose(leaves[path], want, **AVERAGE_TOL, err_msg=str(path))
    for layer in range(DENSE.n_layers):
      moe = mixed[f"layers_{layer}"]["moe"]
      np.testing.assert_array_equal(moe["router"], routers(layer))
      for i, model in enumerate(unrolled):
        for k in FFN_KEYS:
          np.testing.assert_array_equal(moe[k][i], model[(f"layers_{layer}", "mlp", k, "kernel")])
  uniform = _mix(models, config, "experts", routers)
  assert not np.allclose(uniform["embed"]["embedding"], mixed["embed"]["embedding"], atol=1e-4)


def test_an_moe_layer_forced_onto_expert_i_computes_model_is_ffn(models):
  """Top-1 routing whose logit for expert i is 100 · x_0 ≥ 500 (x_0 ≥ 5, other logits 0)."""
  config = _moe_config(N_MODELS, 1)
  mixed = _mix(models, config, "experts", _routers(0, N_MODELS))
  rng = np.random.default_rng(0)
  x = rng.normal(0.0, 1.0, (2, 8, DENSE.d_model)).astype(np.float32)
  x[..., 0] = 5.0 + np.abs(x[..., 0])
  unrolled = [unstack_layers(p) for p in models]
  moe_apply = jax.jit(lambda p, x: MoE(config).apply({"params": p}, x))
  mlp_apply = jax.jit(lambda p, x: MLP(DENSE).apply({"params": p}, x))
  outputs = []
  for layer in range(DENSE.n_layers):
    for i in range(N_MODELS):
      router = np.zeros((DENSE.d_model, N_MODELS), np.float32)
      router[0, i] = 100.0
      got = moe_apply(mixed[f"layers_{layer}"]["moe"] | {"router": router}, x)
      want = mlp_apply(unrolled[i][f"layers_{layer}"]["mlp"], x)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
      outputs.append(np.asarray(want))
  assert min(np.abs(a - b).max() for j, a in enumerate(outputs) for b in outputs[:j]) > 1e-3


def test_mixed_parts_come_one_tensor_then_one_layer_at_a_time(models):
  config = _moe_config(N_MODELS, 2)
  parts = list(mix.mixed_parts([TreeSource(DENSE, p) for p in models], config, "experts", 1,
                               (1.0,) * N_MODELS, _routers(0, N_MODELS)))
  names = [next(iter(p)) for p in parts]
  assert sorted(names[:3]) == ["embed", "final_norm", "lm_head"]  # one tensor each
  assert all(len(jax.tree.leaves(p)) == 1 for p in parts[:3])
  assert names[3:] == [f"layers_{i}" for i in range(DENSE.n_layers)]


def test_the_mixed_tree_is_the_moe_models_parameter_tree(models):
  config = _moe_config(N_MODELS, 2)
  mixed = _mix(models, config, "experts", _routers(0, N_MODELS))
  boxed = abstract_params(Llama(config))
  want = jax.tree.map(lambda b: (b.value.shape, np.dtype(b.value.dtype)), boxed,
                      is_leaf=lambda x: hasattr(x, "value"))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), mixed) == want


def test_copies_of_one_model_mix_into_an_moe_with_its_logits_for_any_router(models):
  """seed_as_expert-like identical experts: top-2 gates sum to 1, so any router works."""
  config = _moe_config(N_MODELS, 2)
  want = _logits(DENSE, models[0])
  routers = [_routers(1, N_MODELS), _routers(2, N_MODELS, scale=5.0),
             mix.random_routers(config, seed=0)]
  for routers_ in routers:
    mixed = _mix([models[0]] * N_MODELS, config, "experts", routers_, (1.0, 2.0, 3.0))
    np.testing.assert_allclose(_logits(config, mixed), want, atol=LOGITS_ATOL, rtol=0)


def test_blending_gives_every_expert_the_average_ffn(models):
  weights = (1.0, 2.0, 3.0)
  config = _moe_config(N_MODELS, 2)
  mixed = _mix(models, config, "blend", _routers(3, N_MODELS), weights)
  averaged = _averaged_dense(models, weights)
  for layer in range(DENSE.n_layers):
    moe = mixed[f"layers_{layer}"]["moe"]
    for k in FFN_KEYS:
      want = averaged[f"layers_{layer}"]["mlp"][k]["kernel"]
      for i in range(N_MODELS):
        np.testing.assert_allclose(moe[k][i], want, **AVERAGE_TOL)
  dense = dataclasses.replace(DENSE, scan_layers=False)
  want = _logits(dense, averaged)
  np.testing.assert_allclose(_logits(config, mixed), want, atol=LOGITS_ATOL, rtol=0)
  other_router = _mix(models, config, "blend", _routers(4, N_MODELS, scale=5.0), weights)
  np.testing.assert_allclose(_logits(config, other_router), want, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("chunks", [2, 3])
def test_split_chunks_partition_each_ffn(models, chunks):
  config = _moe_config(N_MODELS * chunks, 2 * chunks, DENSE.d_ff // chunks)
  mixed = _mix(models, config, "split", _routers(0, N_MODELS * chunks), chunks=chunks)
  width = DENSE.d_ff // chunks
  for layer in range(DENSE.n_layers):
    moe = mixed[f"layers_{layer}"]["moe"]
    assert moe["gate"].shape == (N_MODELS * chunks, DENSE.d_model, width)
    assert moe["down"].shape == (N_MODELS * chunks, width, DENSE.d_model)
    for i, model in enumerate(models):
      ffn = {k: model["layers"]["mlp"][k]["kernel"][layer] for k in FFN_KEYS}
      own = slice(i * chunks, (i + 1) * chunks)
      for k in ("gate", "up"):
        np.testing.assert_array_equal(np.concatenate(list(moe[k][own]), axis=1), ffn[k])
      for c in range(chunks):
        neurons = slice(c * width, (c + 1) * width)
        np.testing.assert_array_equal(moe["down"][i * chunks + c],
                                      np.float32(chunks) * ffn["down"][neurons])
      np.testing.assert_allclose(np.concatenate(list(moe["down"][own]), axis=0) / chunks,
                                 ffn["down"], rtol=1e-6)


@pytest.mark.parametrize("chunks", [2, 3])
def test_split_moe_with_repeated_router_columns_equals_the_unsplit_moe(models, chunks):
  """Top-(C·k) over C equal logits per model picks the C chunks of the same top-k models."""
  top_k = 2
  routers = _routers(5, N_MODELS, scale=2.0)  # distinct columns: no ties across models
  weights = (1.0, 2.0, 3.0)
  unsplit_config = _moe_config(N_MODELS, top_k)
  unsplit = _mix(models, unsplit_config, "experts", routers, weights)
  split_config = _moe_config(N_MODELS * chunks, top_k * chunks, DENSE.d_ff // chunks)
  split = _mix(models, split_config, "split", lambda i: np.repeat(routers(i), chunks, axis=-1),
               weights, chunks)
  want = _logits(unsplit_config, unsplit)
  np.testing.assert_allclose(_logits(split_config, split), want, atol=LOGITS_ATOL, rtol=0)
  # The routing matters here (the experts differ), so the equality is not vacuous.
  rerouted = _mix(models, unsplit_config, "experts", lambda i: routers(i)[:, ::-1], weights)
  assert np.abs(_logits(unsplit_config, rerouted) - want).max() > 1e-3


# Router init from hidden states.

DOMAINS = ((0, 8), (40, 48), (80, 88))  # disjoint token ranges, one per expert
SEQ = 16


def _domain_batches(domain: int, n: int, seed: int, pad: int = 0) -> list[dict[str, np.ndarray]]:
  """`n` batches `[4, SEQ]` of tokens from the domain's range; the last `pad` positions of
  each row are padding (segment 0, tokens from the whole vocabulary)."""
  rng = np.random.default_rng([seed, domain])
  low, high = DOMAINS[domain]
  batches = []
  for _ in range(n):
    tokens = rng.integers(low, high, (4, SEQ))
    segment_ids = np.ones((4, SEQ), np.int32)
    if pad:
      tokens[:, -pad:] = rng.integers(0, DENSE.vocab_size, (4, pad))
      segment_ids[:, -pad:] = 0
    batches.append({"tokens": tokens.astype(np.int32), "segment_ids": segment_ids,
                    "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (4, SEQ))})
  return batches


@jax.jit
def _captured_ffn_inputs(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
  """Each layer's `mlp_norm` output `[layers, batch, seq, embed]`, from the unrolled model
  (independently of `router_init`'s reading of the scanned one)."""
  unrolled = dataclasses.replace(DENSE, scan_layers=False)
  _, state = Llama(unrolled).apply(
      {"params": unstack_layers(params)}, batch["tokens"], positions=batch["positions"],
      segment_ids=batch["segment_ids"], capture_intermediates=lambda m, _: m.name == "mlp_norm",
      mutable=["intermediates"])
  return jnp.stack([state["intermediates"][f"layers_{i}"]["mlp_norm"]["__call__"][0]
                    for i in range(DENSE.n_layers)])


def _ffn_inputs(params: Any, batch: dict[str, np.ndarray]) -> np.ndarray:
  """Each layer's FFN input over the real tokens: `[layers, tokens, embed]`."""
  inputs = np.asarray(_captured_ffn_inputs(params, batch))
  real = batch["segment_ids"].reshape(-1) > 0
  return inputs.reshape(DENSE.n_layers, -1, DENSE.d_model)[:, real]


def test_hidden_routers_send_each_domains_tokens_to_its_own_expert(models):
  params = models[0]
  model = Llama(DENSE)  # scanned: mean_hidden reads the stacked intermediates
  fit = [_domain_batches(d, 2, seed=0, pad=4) for d in range(len(DOMAINS))]
  means = np.stack([router_init.mean_hidden(model, params, b) for b in fit])
  assert means.shape == (len(DOMAINS), DENSE.n_layers, DENSE.d_model)
  for d, batches in enumerate(fit):  # mean over real tokens only (padding excluded)
    inputs = np.concatenate([_ffn_inputs(params, b) for b in batches], axis=1)
    assert inputs.shape[1] == 2 * 4 * (SEQ - 4)
    np.testing.assert_allclose(means[d], inputs.mean(axis=1), rtol=1e-5, atol=1e-6)

  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
  placed = jax.device_put(params, params_sharding(model, mesh))  # no device holds it whole
  np.testing.assert_allclose(router_init.mean_hidden(model, placed, fit[0], mesh), means[0],
                             rtol=1e-5, atol=1e-6)

  routers = router_init.hidden_routers(means)
  assert routers.shape == (DENSE.n_layers, DENSE.d_model, len(DOMAINS))
  assert routers.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(routers, axis=1), 1.0, rtol=1e-6)
  centred = means - means.mean(axis=0, keepdims=True)  # [E, layers, embed]
  norms = np.linalg.norm(centred, axis=-1)  # [E, layers]
  directions = routers * norms.T[:, None, :]  # column i scaled back to |mean_i - average|
  np.testing.assert_allclose(directions, centred.transpose(1, 2, 0), atol=1e-6)
  np.testing.assert_allclose(directions.sum(axis=-1), 0.0, atol=1e-6)

  # Held-out tokens of each domain: the fraction whose router argmax (of their own layer
  # input, per layer) is the domain's expert. Chance is 1/3.
  for d in range(len(DOMAINS)):
    inputs = _ffn_inputs(params, _domain_batches(d, 1, seed=1)[0])  # [layers, 64, embed]
    chosen = np.argmax(np.einsum("ltd,lde->lte", inputs, routers), axis=-1)
    own = (chosen == d).mean(axis=-1)
    assert np.all(own > 0.5), (d, own)


def test_hidden_routers_leave_a_column_zero_when_its_mean_is_the_average():
  means = np.random.default_rng(0).normal(size=(3, 2, 8))
  means[2] = (means[0] + means[1]) / 2  # the average of all three
  routers = router_init.hidden_routers(means)
  np.testing.assert_allclose(routers[..., 2], 0.0, atol=1e-7)
  np.testing.assert_allclose(np.linalg.norm(routers[..., :2], axis=1), 1.0, rtol=1e-6)


# Sources.


def _assert_same_tensors(got: Any, want: Any) -> None:
  assert got.config == want.config
  assert sorted(got.top_paths()) == sorted(want.top_paths())
  assert sorted(got.layer_paths()) == sorted(want.layer_paths())
  for path in want.top_paths():
    a, b = got.top(path), want.top(path)
    assert a.dtype == b.dtype and a.shape == b.shape, path
    np.testing.assert_array_equal(a, b)
  for path in want.layer_paths():
    for i in range(want.config.n_layers):
      a, b = got.layer(path, i), want.layer(path, i)
      assert a.dtype == b.dtype and a.shape == b.shape, (path, i)
      np.testing.assert_array_equal(a, b)
  with pytest.raises(IndexError):
    got.layer(want.layer_paths()[0], want.config.n_layers)


def test_checkpoint_sources_read_what_tree_sources_hold_in_both_layouts(models, tmp_path):
  unrolled = dataclasses.replace(DENSE, scan_layers=False)
  layouts = [(DENSE, models[0]), (unrolled, unstack_layers(models[1])), (DENSE, models[2])]
  tree_sources, checkpoint_sources = [], []
  for i, (config, params) in enumerate(layouts):
    directory = checkpoint.save(tmp_path / f"model_{i}", config, params)
    tree_sources.append(TreeSource(config, params))
    checkpoint_sources.append(CheckpointSource(directory))
    _assert_same_tensors(checkpoint_sources[-1], tree_sources[-1])
  # The two layouts hold the same model layer by layer.
  scanned_copy = TreeSource(DENSE, models[1])
  for path in scanned_copy.layer_paths():
    for i in range(DENSE.n_layers):
      np.testing.assert_array_equal(checkpoint_sources[1].layer(path, i),
                                    scanned_copy.layer(path, i))

  for ffn, chunks in (("experts", 1), ("blend", 1), ("split", 2)):
    config = _moe_config(N_MODELS * chunks, 2 * chunks, DENSE.d_ff // chunks)
    args = (config, ffn, chunks, (1.0, 2.0, 3.0), _routers(0, N_MODELS * chunks))
    from_disk = _leaves(mix.mix_params(checkpoint_sources, *args))
    in_memory = _leaves(mix.mix_params(tree_sources, *args))
    assert from_disk.keys() == in_memory.keys()
    for path, want in in_memory.items():
      assert from_disk[path].dtype == want.dtype, path
      np.testing.assert_array_equal(from_disk[path], want, err_msg=str(path))


def test_check_compatible_compares_decoder_shapes_not_layouts(models):
  """A converted seed may be unrolled, or differ in compute dtype or remat, from experts
  trained on `config.model`; shapes and parameter dtypes must agree."""
  unrolled = unstack_layers(models[1])
  same_shape = [(dataclasses.replace(DENSE, scan_layers=False), unrolled),
                (dataclasses.replace(DENSE, dtype="bfloat16", remat_policy="full",
                                     max_seq_len=64, init_std=0.01), models[1])]
  for config, params in same_shape:
    mix.check_compatible([TreeSource(DENSE, models[0]), TreeSource(config, params)],
                         ["a", "seed"])
  other = presets.get("micro", d_ff=48)
  with pytest.raises(ValueError, match="cannot mix 'seed' with 'a'"):
    mix.check_compatible([TreeSource(DENSE, models[0]), TreeSource(other, models[1])],
                         ["a", "seed"])
  bf16 = dataclasses.replace(DENSE, param_dtype="bfloat16")
  with pytest.raises(ValueError, match="their model configs differ"):
    mix.check_compatible([TreeSource(DENSE, models[0]), TreeSource(bf16, models[1])],
                         ["a", "seed"])
  moe = _moe_config(2, 1)
  with pytest.raises(ValueError, match="it is an MoE model"):
    mix.check_compatible([TreeSource(moe, {}), TreeSource(moe, {})], ["a", "b"])
