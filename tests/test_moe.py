"""The MoE layer: every dispatch path equals the per-expert loop oracle, aux losses."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbtx.config import MoEConfig
from jbtx.models import dispatch, routing
from jbtx.models.dispatch import Experts
from jbtx.models.routing import Routing

E, D, F, T = 6, 16, 24, 64
TOL = 2e-5  # float32, max abs difference of outputs and gradients

ROUTINGS = {
    "topk2": MoEConfig(n_experts=E, top_k=2, routing="topk"),
    "softmax_top3_renorm": MoEConfig(n_experts=E, top_k=3, routing="softmax_topk"),
    "softmax_top3_olmoe": MoEConfig(n_experts=E, top_k=3, routing="softmax_topk",
                                    renormalize=False),
    "switch": MoEConfig(n_experts=E, routing="switch"),
    "sample_top1": MoEConfig(n_experts=E, routing="sample_top1", gumbel_temperature=0.5),
    "soft": MoEConfig(n_experts=E, routing="soft"),
}
# Expert 5 never wins: uneven loads and an expert with no tokens at all.
BIAS = jnp.array([0.8, 0.0, -0.3, 0.5, 0.1, -1e4])


def _inputs(seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(keys[0], (T, D))
  router = jax.random.normal(keys[1], (D, E))
  experts = Experts(*(0.3 * jax.random.normal(k, s) for k, s in zip(
      keys[2:], [(E, D, F), (E, D, F), (E, F, D)], strict=True)))
  return x, router, experts


def _layer(path, config, rng):
  def apply(x, router, experts):
    choice = routing.route(x @ router + BIAS, config, rng)
    if path == "loop":
      return dispatch.loop(x, choice, experts)
    if path == "dense":
      return dispatch.dense(x, choice, experts)
    if path == "dropless":
      return dispatch.dropless(x, choice, experts)
    if path == "blocked":
      return dispatch.blocked(x, choice, experts, blocks=(16, 4))
    # A capacity large enough that nothing is dropped.
    out, dropped = dispatch.capacity_dispatch(x, choice, experts, factor=E, group_size=32)
    return out + 0.0 * dropped
  return apply


def _value_and_grads(fn, x, router, experts):
  cotangent = jax.random.normal(jax.random.key(9), (T, D))
  loss = lambda *args: jnp.sum(fn(*args) * cotangent)
  return fn(x, router, experts), jax.grad(loss, argnums=(0, 1, 2))(x, router, experts)


@pytest.mark.parametrize("name", ROUTINGS)
@pytest.mark.parametrize("path", ["dense", "dropless", "blocked", "capacity"])
def test_dispatch_paths_equal_the_loop_oracle(name, path):
  config = ROUTINGS[name]
  rng = jax.random.key(3) if config.routing == "sample_top1" else None
  x, router, experts = _inputs()
  choice = routing.route(x @ router + BIAS, config, rng)
  loads = np.bincount(np.asarray(choice.experts).ravel(), minlength=E)
  if config.routing != "soft":  # soft routing sends every token to every expert
    assert loads[5] == 0 and len(set(loads[:5])) > 1  # uneven, and one idle expert
  assert_matches_oracle(_layer(path, config, rng), _layer("loop", config, rng), x, router,
                        experts)


def assert_matches_oracle(layer, oracle, x, router, experts):
  """`layer` equals `oracle` in outputs and gradients w.r.t. x, router and experts."""
  want, want_grads = _value_and_grads(jax.jit(oracle), x, router, experts)
  got, got_grads = _value_and_grads(jax.jit(layer), x, router, experts)
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(g, w, atol=TOL, rtol=0)
  assert float(jnp.abs(want_grads[1]).max()) > 0  # the router does receive gradient


@pytest.mark.parametrize("n_experts", [7, 2**26])  # the packed key, and argsort's fallback
def test_sort_by_expert_is_a_stable_sort_with_its_inverse(n_experts):
  experts = jax.random.randint(jax.random.key(4), (257,), 0, min(n_experts, 7))
  order = dispatch.sort_by_expert(experts, n_experts)
  np.testing.assert_array_equal(order, np.argsort(np.asarray(experts), kind="stable"))
  assert order.dtype == jnp.int32
  inverse = dispatch.inverse_permutation(order)
  np.testing.assert_array_equal(inverse[order], np.arange(257))


def test_blocked_rounds_nearly_full_blocks_up_and_stays_exact():
  # Blocks (16, 4) with FULL_BLOCK_FILL 7/8: groups of 14 and 15 rows run as one padded
  # 16-row block, 31 as two, 1 and 3 as one 4-row block; the last group, 16 + 1 rows,
  # runs past the end by the most any group can (3 rows).
  sizes = [15, 0, 14, 31, 3, 1, 17]
  plans = [[int(c) for c in dispatch._block_counts(size, (16, 4))] for size in [*sizes, 13]]
  assert plans == [[1, 0], [0, 0], [1, 0], [2, 0], [0, 1], [0, 1], [1, 1], [0, 4]]  # 13 < 14
  assert dispatch._overrun((16, 4)) == 3
  n_experts, n_tokens = len(sizes), sum(sizes)
  assignment = np.random.default_rng(0).permutation(np.repeat(np.arange(n_experts), sizes))
  keys = jax.random.split(jax.random.key(5), 6)
  x = jax.random.normal(keys[0], (n_tokens, D))
  experts = Experts(*(0.3 * jax.random.normal(k, s) for k, s in zip(
      keys[1:4], [(n_experts, D, F), (n_experts, D, F), (n_experts, F, D)], strict=True)))
  weights = jax.random.uniform(keys[4], (n_tokens, 1), minval=0.1)
  cotangent = jax.random.normal(keys[5], (n_tokens, D))

  def value_and_grads(path):
    def loss(x, weights, experts):
      out = path(x, Routing(jnp.asarray(assignment[:, None], jnp.int32), weights), experts)
      return jnp.sum(out * cotangent)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, weights, experts)

  got = value_and_grads(lambda *a: dispatch.blocked(*a, blocks=(16, 4)))
  want = value_and_grads(dispatch.loop)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, atol=TOL, rtol=0)


def test_capacity_drops_exactly_the_assignments_over_capacity():
  x, router, experts = _inputs(1)
  choice = routing.route(x @ router + BIAS, ROUTINGS["topk2"])
  out, dropped = dispatch.capacity_dispatch(x, choice, experts, factor=1.0, group_size=32)
  # Recompute which assignments fit, group by group, and apply the oracle to those.
  slots = dispatch.capacity(32, E, 2, 1.0)
  kept = np.zeros((T, 2), bool)
  for g in range(T // 32):
    counts = np.zeros(E, int)
    for j in range(2):  # all first choices before second choices
      for t in range(g * 32, (g + 1) * 32):
        e = int(choice.experts[t, j])
        kept[t, j] = counts[e] < slots
        counts[e] += 1
  reference = dispatch.loop(x, Routing(choice.experts, choice.weights * kept), experts)
  assert 0 < float(dropped) == pytest.approx(1 - kept.mean())
  np.testing.assert_allclose(out, reference, atol=TOL, rtol=0)


def test_topk_gates_are_softmax_over_the_top_logits():
  logits = jnp.array([[1.0, 3.0, 2.0, -1.0]])
  choice = routing.route(logits, MoEConfig(n_experts=4, top_k=2))
  np.testing.assert_array_equal(choice.experts, [[1, 2]])
  np.testing.assert_allclose(choice.weights, [[np.e / (np.e + 1), 1 / (np.e + 1)]], rtol=1e-6)
  olmoe = routing.route(logits, MoEConfig(n_experts=4, top_k=2, routing="softmax_topk",
                                          renormalize=False))
  np.testing.assert_allclose(olmoe.weights, jax.nn.softmax(logits)[:, [1, 2]], rtol=1e-6)


def test_sample_top1_is_argmax_at_inference_and_random_in_training():
  logits = jax.random.normal(jax.random.key(0), (256, E))
  config = ROUTINGS["sample_top1"]
  inference = routing.route(logits, config)
  np.testing.assert_array_equal(inference.experts[:, 0], jnp.argmax(logits, -1))
  np.testing.assert_array_equal(inference.weights, 1.0)
  sampled = routing.route(logits, config, jax.random.key(1))
  agree = np.mean(np.asarray(sampled.experts[:, 0] == inference.experts[:, 0]))
  assert 0.3 < agree < 0.95


def test_gumbel_temperature_anneals_to_its_floor_and_sharpens_the_samples():
  config = MoEConfig(n_experts=E, routing="sample_top1", gumbel_temperature=2.0,
                     gumbel_min_temperature=0.25, gumbel_anneal_rate=1e-2)
  steps = jnp.array([0, 100, 1000])
  expected = np.maximum(0.25, 2.0 * np.exp(-1e-2 * np.array([0, 100, 1000])))
  np.testing.assert_allclose(routing.gumbel_temperature(config, steps), expected, rtol=1e-6)
  assert float(routing.gumbel_temperature(config, None)) == 2.0
  logits = jax.random.normal(jax.random.key(0), (512, E))
  hot, cold = (routing.route(logits, config, jax.random.key(1),
                             routing.gumbel_temperature(config, jnp.array(step)))
               for step in (0, 1000))
  # Same noise, same argmax; a colder softmax puts more weight on the sampled expert.
  np.testing.assert_array_equal(hot.experts, cold.experts)
  assert float(jnp.mean(cold.weights)) > float(jnp.mean(hot.weights)) + 0.1


@pytest.mark.parametrize("kind", ["btx", "switch"])
def test_load_balance_is_one_when_balanced_and_larger_when_not(kind):
  balanced = 5.0 * jnp.eye(4)  # token i prefers expert i; softmax means are uniform
  config = MoEConfig(n_experts=4, top_k=1)
  loss = routing.load_balance_loss(balanced, routing.route(balanced, config), kind)
  assert float(loss) == pytest.approx(1.0, abs=1e-6)
  skewed = balanced.at[:, 0].add(10.0)
  assert float(routing.load_balance_loss(skewed, routing.route(skewed, config), kind)) > 1.5


def test_load_balance_formulas():
  logits = jax.random.normal(jax.random.key(2), (50, E))
  choice = routing.route(logits, ROUTINGS["topk2"])
  p = np.asarray(jax.nn.softmax(logits)).mean(0)
  gates = np.zeros((50, E))
  counts = np.zeros(E)
  for t in range(50):
    for j in range(2):
      gates[t, int(choice.experts[t, j])] = float(choice.weights[t, j])
      counts[int(choice.experts[t, j])] += 1
  assert float(routing.load_balance_loss(logits, choice, "btx")) == pytest.approx(
      E * np.sum(gates.mean(0) * p), rel=1e-5)
  assert float(routing.load_balance_loss(logits, choice, "switch")) == pytest.approx(
      E * np.sum(counts / 100 * p), rel=1e-5)
  lse = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
  assert float(routing.router_z_loss(logits)) == pytest.approx(np.mean(lse**2), rel=1e-5)


def test_hf_pooled_load_balance_matches_transformers():
  torch = pytest.importorskip("torch")
  mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
  layer_logits = jax.random.normal(jax.random.key(4), (3, 40, 8))
  want = mixtral.load_balancing_loss_func(
      tuple(torch.from_numpy(np.array(layer)) for layer in layer_logits), 8, 2)
  got = routing.hf_load_balancing_loss(layer_logits, top_k=2)
  assert float(got) == pytest.approx(float(want), rel=1e-5)
