"""LLaMA-MoE's gate: the noisy MLP router, the CV² balance loss, expert-output scaling."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from scipy.stats import norm

from jbtx.config import ConfigError, MeshConfig, ModelConfig, MoEConfig
from jbtx.models import llama, routing
from jbtx.models.layers import MLP
from jbtx.models.moe import MoE
from jbtx.runtime import sharding
from jbtx.training.optimizer import parameter_group

E, K, D, F = 8, 2, 16, 24
BATCH, SEQ = 2, 32  # 64 tokens


def _config(**moe) -> ModelConfig:
  return ModelConfig(vocab_size=64, d_model=D, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=F,
                     moe=MoEConfig(**({"n_experts": E, "top_k": K} | moe)))


def _x(seed: int = 0, positive: bool = False) -> np.ndarray:
  """Float32 tokens `[batch, seq, embed]`, all entries ≥ 0.1 if `positive`."""
  x = np.random.default_rng(seed).standard_normal((BATCH, SEQ, D)).astype(np.float32)
  return np.abs(x) + np.float32(0.1) if positive else x


def _params(config: ModelConfig, seed: int = 0) -> dict:
  """Unboxed MoE params with O(1) router logits (and a non-zero noise kernel)."""
  params = nn.meta.unbox(MoE(config).init(jax.random.key(seed), _x()[:1, :1])["params"])
  rng = np.random.default_rng(seed + 1)
  for name in ("router", "router_hidden", "router_noise"):
    if name in params:
      shape = params[name].shape
      params[name] = jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[0]), jnp.float32)
  return params


def _apply(config, params, x, train=False, seed=0):
  """The MoE output `[batch, seq, embed]`, its sown stats and router logits `[T, E]`."""
  rngs = {"router": jax.random.key(seed)} if train else None
  out, state = MoE(config, train=train).apply({"params": params}, x, rngs=rngs,
                                              mutable=["intermediates"])
  found = state["intermediates"]
  return out, found["moe_stats"][0], found["router_logits"][0]


def _clean_logits(params, x) -> np.ndarray:
  tokens = np.asarray(x, np.float64).reshape(-1, D)
  return np.tanh(tokens @ np.asarray(params["router"])) @ np.asarray(params["router_hidden"])


def _noise_std(params, x) -> np.ndarray:
  tokens = np.asarray(x, np.float64).reshape(-1, D)
  return np.logaddexp(0.0, tokens @ np.asarray(params["router_noise"])) + 0.01


def _cv2(v) -> float:
  v = np.asarray(v, np.float64)
  return np.var(v, ddof=1) / (np.mean(v) ** 2 + 1e-10)


def _importance_and_counts(logits, k=K):
  """Summed top-k softmax gates `[E]` and tokens per expert `[E]`, in numpy."""
  top = np.argsort(-logits, axis=-1)[:, :k]
  top_logits = np.take_along_axis(logits, top, axis=-1)
  gates = np.exp(top_logits - top_logits.max(-1, keepdims=True))
  gates /= gates.sum(-1, keepdims=True)
  importance, counts = np.zeros(logits.shape[1]), np.zeros(logits.shape[1])
  for t in range(len(logits)):
    importance[top[t]] += gates[t]
    counts[top[t]] += 1
  return importance, counts


def test_noisy_mlp_inference_logits_are_tanh_mlp_without_noise():
  config = _config(router="noisy_mlp")
  params, x = _params(config), _x()
  _, _, logits = _apply(config, params, x)
  np.testing.assert_allclose(logits, _clean_logits(params, x), rtol=1e-5, atol=1e-5)
  _, _, again = _apply(config, params, x)  # deterministic at inference
  np.testing.assert_array_equal(logits, again)


def test_noisy_mlp_training_adds_shazeer_noise_from_the_router_rng():
  config = _config(router="noisy_mlp")
  params, x = _params(config), _x(positive=True)
  clean = _clean_logits(params, x)
  noisy = [np.asarray(_apply(config, params, x, train=True, seed=s)[2]) for s in (0, 0, 1)]
  np.testing.assert_array_equal(noisy[0], noisy[1])
  assert np.abs(noisy[0] - clean).min() > 0 and np.abs(noisy[0] - noisy[2]).mean() > 0.1
  # x > 0 and W_noise = −100: softplus ≈ 0, std = 0.01; W_noise = 0: std = log 2 + 0.01.
  # The same rng draws the same N(0, 1) in both.
  tiny = _apply(config, params | {"router_noise": jnp.full((D, E), -100.0)}, x, True)[2]
  zero = _apply(config, params | {"router_noise": jnp.zeros((D, E))}, x, True)[2]
  z_tiny = (np.asarray(tiny) - clean) / 0.01
  z_zero = (np.asarray(zero) - clean) / (np.log(2.0) + 0.01)
  np.testing.assert_allclose(z_tiny, z_zero, atol=2e-3)
  assert abs(z_zero.mean()) < 0.15 and 0.85 < z_zero.std() < 1.15


def test_noise_kernel_is_zero_initialised_like_llama_moe():
  config = _config(router="noisy_mlp")
  boxed = MoE(config).init(jax.random.key(0), _x()[:1, :1])["params"]
  assert boxed["router_hidden"].value.shape == (E, E)
  assert boxed["router_hidden"].names == (None, "expert")
  assert not np.any(boxed["router_noise"].value) and boxed["router_noise"].value.shape == (D, E)
  assert float(jnp.std(boxed["router"].value)) > 0


@pytest.mark.parametrize("router", ["linear", "noisy_mlp"])
def test_cv_loss_at_inference_uses_token_counts(router):
  config = _config(router=router, load_balance="cv")
  params, x = _params(config), _x()
  _, stats, _ = _apply(config, params, x)
  tokens = np.asarray(x, np.float64).reshape(-1, D)
  logits = (_clean_logits(params, x) if router == "noisy_mlp"
            else tokens @ np.asarray(params["router"]))
  importance, counts = _importance_and_counts(logits)
  assert len(set(counts)) > 1  # unbalanced, so both terms count
  assert float(stats["load_balance_loss"]) == pytest.approx(
      _cv2(importance) + _cv2(counts), rel=1e-5)
  assert set(stats) == {"load_balance_loss", "router_z_loss", "dropped_fraction",
                        "expert_load", "router_entropy", "top1_gate"}


def test_cv_loss_in_training_uses_shazeers_smooth_load_of_the_same_noise():
  config = _config(router="noisy_mlp", load_balance="cv")
  params, x = _params(config), _x()
  _, stats, noisy = _apply(config, params, x, train=True)
  noisy = np.asarray(noisy, np.float64)
  clean, std = _clean_logits(params, x), _noise_std(params, x)
  top = -np.sort(-noisy, axis=-1)
  is_in = noisy > top[:, K:K + 1]
  threshold = np.where(is_in, top[:, K:K + 1], top[:, K - 1:K])
  load = norm.cdf((clean - threshold) / std).sum(0)
  importance, counts = _importance_and_counts(noisy)
  assert not np.allclose(load, counts, atol=0.5)
  assert float(stats["load_balance_loss"]) == pytest.approx(
      _cv2(importance) + _cv2(load), rel=1e-4)


def test_cv_loss_in_training_with_every_expert_counts_tokens():
  config = _config(router="noisy_mlp", load_balance="cv", top_k=E)
  params, x = _params(config), _x()
  _, stats, noisy = _apply(config, params, x, train=True)
  importance, counts = _importance_and_counts(np.asarray(noisy, np.float64), k=E)
  assert _cv2(counts) == 0
  assert float(stats["load_balance_loss"]) == pytest.approx(_cv2(importance), rel=1e-4)


def test_prob_in_top_k_by_hand():
  clean = jnp.array([[2.0, 1.0, 0.0, -1.0]])
  noisy = jnp.array([[2.5, 0.5, 0.7, -1.0]])  # top-2: experts 0 and 2; 3rd largest 0.5
  std = jnp.array([[1.0, 1.0, 2.0, 0.5]])
  got = routing.prob_in_top_k(clean, noisy, std, 2)
  want = norm.cdf([(2.0 - 0.5) / 1.0, (1.0 - 0.7) / 1.0, (0.0 - 0.5) / 2.0, (-1.0 - 0.7) / 0.5])
  np.testing.assert_allclose(got, [want], rtol=1e-5)
  np.testing.assert_allclose(routing.smooth_load(clean, noisy, std, 2), want, rtol=1e-5)


def test_cv_loss_is_zero_when_balanced_and_cv_squared_is_torchs():
  # Token i prefers experts i and i+1 (mod 4) equally: gates 1/2, two tokens per expert.
  logits = 5.0 * (jnp.eye(4) + jnp.roll(jnp.eye(4), 1, axis=1))
  config = MoEConfig(n_experts=4, top_k=2)
  choice = routing.route(logits, config)
  assert float(routing.load_balance_loss(logits, choice, "cv")) == pytest.approx(0, abs=1e-6)
  smooth = jnp.full((4,), 1.7)
  assert float(routing.load_balance_loss(logits, choice, "cv", smooth)) == pytest.approx(
      0, abs=1e-6)
  skewed = logits.at[:, 0].add(10.0)
  assert float(routing.load_balance_loss(skewed, routing.route(skewed, config), "cv")) > 0.5
  assert float(routing.cv_squared(jnp.array([1.0, 2.0, 3.0]))) == pytest.approx(0.25)
  assert float(routing.cv_squared(jnp.array([5.0]))) == 0


@pytest.mark.parametrize("n_shared", [0, 1])
def test_output_scale_multiplies_only_the_routed_experts(n_shared):
  config = _config(n_shared_experts=n_shared)
  scaled = dataclasses.replace(config, moe=dataclasses.replace(config.moe, output_scale=4.0))
  params, x = _params(config), _x()
  base, scaled_out = _apply(config, params, x)[0], _apply(scaled, params, x)[0]
  shared = 0.0
  if n_shared:
    shared_cfg = dataclasses.replace(config, moe=None)
    shared = MLP(shared_cfg).apply({"params": params["shared"]}, x)
    assert float(jnp.abs(shared).max()) > 1e-3
  np.testing.assert_allclose(scaled_out - shared, 4.0 * (base - shared), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("moe, key, fragment", [
    ({"router": "noisy_mlp", "routing": "softmax_topk"}, "routing", "noisy_mlp"),
    ({"router": "noisy_mlp", "routing": "switch"}, "routing", "'topk'"),
    ({"output_scale": 0.0}, "output_scale", "must be positive"),
    ({"output_scale": -4.0}, "output_scale", "must be positive"),
])
def test_config_errors_name_their_key(moe, key, fragment):
  with pytest.raises(ConfigError) as info:
    MoEConfig(**moe)
  assert info.value.key == key and fragment in str(info.value)


def test_cv_load_balance_is_valid_with_either_router():
  for router in ("linear", "noisy_mlp"):
    assert MoEConfig(router=router, load_balance="cv").load_balance == "cv"


def test_noisy_gate_params_count_shard_and_train_as_router():
  config = _config(router="noisy_mlp")
  abstract = llama.abstract_params(llama.Llama(config))
  leaves = jax.tree.leaves(abstract, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert config.num_params() == sum(leaf.value.size for leaf in leaves)
  linear = _config()
  assert config.num_params() - linear.num_params() == 2 * (D * E + E * E)
  assert config.num_active_params() - linear.num_active_params() == 2 * (D * E + E * E)
  moe = abstract["layers"]["moe"]
  mesh = sharding.make_mesh(MeshConfig(1, 2, 4, 1))
  specs = sharding.param_shardings(moe, mesh)
  assert specs["router_hidden"].spec == P(None, None, "expert")  # replicated on its input
  assert specs["router_noise"].spec == P(None, "fsdp", "expert")
  groups = {name: parameter_group(("params", "layers", "moe", name)) for name in moe}
  assert groups == {"router": "router", "router_hidden": "router", "router_noise": "router",
                    "gate": "experts", "up": "experts", "down": "experts"}
