"""The MoE decoder: layouts, dispatch paths end to end, KV cache, upcycling, freezing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbtx.config import MeshConfig, MoEConfig, OptimizerConfig
from jbtx.models import presets
from jbtx.models.llama import Llama, init_params
from jbtx.models.moe import aux_loss, collect_moe_stats, collect_router_logits
from jbtx.runtime import sharding
from jbtx.training.optimizer import make_optimizer, parameter_group
from jbtx.training.step import TrainState, make_train_step
from tests.decoding import decode_in_steps


def _config(**moe):
  base = presets.get("micro_moe", n_layers=4, qk_norm=True)
  return dataclasses.replace(base, moe=dataclasses.replace(base.moe, **moe))


def _tokens(cfg, shape=(2, 12), seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size, jnp.int32)


def _one_device():
  return sharding.make_mesh(MeshConfig(), jax.devices()[:1])


def _unstack(params, n):
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(n):
    out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
  return out


@pytest.mark.parametrize("every", [1, 2])
def test_scanned_and_unrolled_moe_decoders_agree(every):
  cfg = _config(every=every, n_shared_experts=every - 1)
  scanned = Llama(cfg)
  params = init_params(scanned, jax.random.key(0))
  unrolled = Llama(dataclasses.replace(cfg, scan_layers=False))
  tokens = _tokens(cfg)
  a, state_a = jax.jit(lambda p: scanned.apply({"params": p}, tokens,
                                               mutable=["intermediates"]))(params)
  groups = cfg.n_layers // every
  b, state_b = jax.jit(lambda p: unrolled.apply({"params": p}, tokens,
                                                mutable=["intermediates"]))(
      _unstack(params, groups))
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  stats_a = collect_moe_stats(state_a["intermediates"])
  stats_b = collect_moe_stats(state_b["intermediates"])
  assert stats_a["expert_load"].shape == (groups, cfg.moe.n_experts)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), stats_a, stats_b)
  np.testing.assert_allclose(stats_a["expert_load"].sum(-1), 1.0, rtol=1e-6)
  logits_a = collect_router_logits(state_a["intermediates"])
  assert logits_a.shape == (groups, tokens.size, cfg.moe.n_experts)
  np.testing.assert_allclose(logits_a, collect_router_logits(state_b["intermediates"]),
                             atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", ["dense", "dropless", "capacity"])
def test_dispatch_paths_agree_through_the_whole_model(path):
  reference = Llama(_config(dispatch="loop"))
  params = init_params(reference, jax.random.key(1))
  model = Llama(_config(dispatch=path, capacity_factor=4.0))  # no drops at factor E
  tokens = _tokens(reference.config, seed=1)

  def loss(m, p):
    logits, state = m.apply({"params": p}, tokens, mutable=["intermediates"])
    return jnp.mean(logits ** 2) + aux_loss(collect_moe_stats(state["intermediates"]),
                                            m.config)

  want, want_grads = jax.jit(jax.value_and_grad(lambda p: loss(reference, p)))(params)
  got, got_grads = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(params)
  assert float(got) == pytest.approx(float(want), rel=1e-5)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=2e-6, rtol=0),
               got_grads, want_grads)


def test_training_step_anneals_the_gumbel_temperature_in_every_layer():
  cfg = _config(routing="sample_top1", gumbel_anneal_rate=1e-2, gumbel_min_temperature=0.1)
  model = Llama(cfg, train=True)
  params = init_params(model, jax.random.key(0))
  tokens = _tokens(cfg)
  logits = jax.jit(lambda step: model.apply({"params": params}, tokens, step=step,
                                            rngs={"router": jax.random.key(1)}))
  np.testing.assert_array_equal(logits(None), logits(jnp.array(0)))  # τ0 at step 0
  assert not np.allclose(logits(jnp.array(0)), logits(jnp.array(1000)), atol=1e-3)


def test_kv_cache_decoding_with_moe_layers():
  model = Llama(_config(every=2))
  params = init_params(model, jax.random.key(2))
  tokens = _tokens(model.config, (2, 9), seed=2)
  full = jax.jit(model.apply)({"params": params}, tokens)
  stepped = decode_in_steps(model, params, tokens, prefill=4, cache_len=9)
  np.testing.assert_allclose(stepped, full, atol=1e-5, rtol=0)


def test_dense_ffn_copied_into_every_expert_reproduces_the_dense_model():
  """Sparse upcycling in one line: stack the dense FFN E times; any router, same output."""
  dense_cfg = presets.get("micro", n_layers=3)
  dense = Llama(dense_cfg)
  dense_params = init_params(dense, jax.random.key(3))
  moe_cfg = dataclasses.replace(dense_cfg, moe=MoEConfig(n_experts=4, top_k=2))
  moe_params = init_params(Llama(moe_cfg), jax.random.key(4))  # random routers
  layers = dict(dense_params["layers"])
  mlp = layers.pop("mlp")
  layers["moe"] = {"router": moe_params["layers"]["moe"]["router"],
                   **{name: jnp.stack([mlp[name]["kernel"]] * 4, axis=1)
                      for name in ("gate", "up", "down")}}
  upcycled = {**dense_params, "layers": layers}
  tokens = _tokens(dense_cfg, seed=3)
  np.testing.assert_allclose(jax.jit(Llama(moe_cfg).apply)({"params": upcycled}, tokens),
                             jax.jit(dense.apply)({"params": dense_params}, tokens),
                             atol=1e-5, rtol=0)


def _one_step(freeze):
  cfg = _config(router_jitter=0.1)
  model = Llama(cfg)
  params = init_params(model, jax.random.key(5))
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0,
                                             freeze=freeze), total_steps=10)
  state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                     jax.random.key(6))
  tokens = _tokens(cfg, (2, 16), seed=4)
  batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens),
           "positions": jnp.broadcast_to(jnp.arange(16), tokens.shape)}
  before = jax.device_get(params)  # the step donates (deletes) the old state
  new_state, metrics = make_train_step(model, optimizer, _one_device())(state, batch)
  changed = jax.tree_util.tree_map_with_path(
      lambda path, a, b: (parameter_group(tuple(p.key for p in path)),
                          bool(np.any(a != np.asarray(b)))), before, new_state.params)
  groups = {}
  for group, moved in jax.tree.leaves(changed, is_leaf=lambda x: isinstance(x, tuple)):
    groups.setdefault(group, set()).add(moved)
  return groups, metrics


@pytest.mark.parametrize("freeze, moving", [
    ("none", {"router", "experts", "other"}),
    ("experts", {"router", "other"}),
    ("all_but_router", {"router"}),
])
def test_freezing_masks(freeze, moving):
  groups, metrics = _one_step(freeze)
  assert {g for g, moved in groups.items() if moved == {True}} == moving
  assert {g for g, moved in groups.items() if moved == {False}} == {"router", "experts",
                                                                     "other"} - moving
  assert float(metrics["aux_loss"]) > 0 and metrics["expert_load"].shape == (4, 4)


def test_train_step_minimises_cross_entropy_plus_aux_loss():
  cfg = _config(load_balance_coef=0.5, router_z_coef=0.1)
  model = Llama(cfg)
  params = init_params(model, jax.random.key(7))
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0), 10)
  state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                     jax.random.key(8))
  tokens = _tokens(cfg, (2, 16), seed=5)
  batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens),
           "positions": jnp.broadcast_to(jnp.arange(16), tokens.shape)}
  step = make_train_step(model, optimizer, _one_device())
  state, first = step(state, batch)
  expected = (0.5 * first["load_balance_loss"] + 0.1 * first["router_z_loss"])
  assert float(first["aux_loss"]) == pytest.approx(float(expected), rel=1e-5)
  for _ in range(5):
    state, metrics = step(state, batch)
  assert float(metrics["loss"] + metrics["aux_loss"]) < float(first["loss"] + first["aux_loss"])


def test_moe_presets_have_published_sizes():
  mixtral, olmoe = presets.get("mixtral_8x7b"), presets.get("olmoe_1b_7b")
  assert round(mixtral.num_params() / 1e9, 1) == 46.7
  assert round(mixtral.num_active_params() / 1e9, 1) == 12.9
  assert round(olmoe.num_params() / 1e9, 1) == 6.9
  assert round(olmoe.num_active_params() / 1e9, 1) == 1.3
  assert olmoe.moe.n_experts == 64 and olmoe.moe.top_k == 8 and not olmoe.moe.renormalize
