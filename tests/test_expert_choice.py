"""Expert-choice routing (Zhou et al. 2022): each expert takes its C best tokens."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbtx.config import ConfigError, MoEConfig
from jbtx.models import dispatch, presets, routing
from jbtx.models.llama import Llama, init_params
from jbtx.models.moe import collect_moe_stats, dispatch_path
from tests.test_moe import BIAS, TOL, E, T, _inputs, assert_matches_oracle

GROUP = 32  # two routing groups of the T = 64 test tokens
CONFIG = MoEConfig(n_experts=E, top_k=2, routing="expert_choice", capacity_factor=1.0,
                   capacity_group_size=GROUP)


def _layer(path, config=CONFIG):
  def apply(x, router, experts):
    logits = x @ router + BIAS
    if path == "expert_choice":
      return dispatch.expert_choice(x, routing.expert_choice(logits, config), experts)
    return getattr(dispatch, path)(x, routing.route(logits, config), experts)
  return apply


@pytest.mark.parametrize("path", ["expert_choice", "dense"])
def test_expert_choice_dispatch_equals_the_loop_oracle(path):
  assert_matches_oracle(_layer(path), _layer("loop"), *_inputs())


def test_each_expert_takes_its_top_c_tokens_of_every_group():
  x, router, _ = _inputs(1)
  logits = x @ router + BIAS
  size, slots = routing.expert_choice_slots(T, CONFIG)
  assert (size, slots) == (GROUP, 11)  # ceil(1.0 · 32 · 2 / 6)
  choice = routing.expert_choice(logits, CONFIG)
  assert choice.tokens.shape == choice.gates.shape == (E, 2 * slots)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  for e in range(E):
    for g in range(T // GROUP):
      taken = np.asarray(choice.tokens[e, g * slots:(g + 1) * slots])
      want = g * GROUP + np.argsort(-probs[g * GROUP:(g + 1) * GROUP, e], kind="stable")[:slots]
      assert set(taken) == set(want)  # within its own group, the C most probable
      np.testing.assert_allclose(choice.gates[e, g * slots:(g + 1) * slots],
                                 probs[taken, e], rtol=1e-6)
  # Expert 5's logit is -1e4: its gates are 0 but it still takes exactly C tokens.
  np.testing.assert_array_equal(choice.gates[5], 0.0)


def test_tokens_no_expert_takes_get_zero_output_and_count_as_dropped():
  x, router, experts = _inputs(2)
  scarce = dataclasses.replace(CONFIG, capacity_factor=0.25)  # 6 × 3 slots, 32 tokens
  choice = routing.expert_choice(x @ router + BIAS, scarce)
  taken = np.zeros(T, bool)
  taken[np.asarray(choice.tokens).ravel()] = True
  assert 0 < (~taken).sum() < T
  out = dispatch.expert_choice(x, choice, experts)
  np.testing.assert_array_equal(np.asarray(out)[~taken], 0.0)
  assert float(routing.untaken_fraction(choice, T)) == pytest.approx((~taken).mean())


def test_expert_choice_with_room_for_every_token_is_soft_routing():
  """C = S: every expert takes every token with its softmax probability."""
  x, router, experts = _inputs(3)
  full = dataclasses.replace(CONFIG, capacity_factor=E / 2)  # C = S = 32
  assert routing.expert_choice_slots(T, full)[1] == GROUP
  got = _layer("expert_choice", full)(x, router, experts)
  want = dispatch.dense(x, routing.route(x @ router + BIAS, MoEConfig(n_experts=E,
                                                                      routing="soft")), experts)
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_expert_choice_config_errors():
  with pytest.raises(ConfigError, match="dispatch"):
    MoEConfig(n_experts=E, routing="expert_choice", dispatch="blocked")
  with pytest.raises(ConfigError, match="dispatch"):
    MoEConfig(n_experts=E, routing="topk", dispatch="expert_choice")
  with pytest.raises(ValueError, match="capacity_group_size"):
    routing.expert_choice(jnp.ones((48, E)), CONFIG)  # 48 tokens, groups of 32


def _decoder(**moe):
  base = presets.get("micro_moe", n_layers=2)
  return dataclasses.replace(base, moe=dataclasses.replace(
      base.moe, routing="expert_choice", capacity_group_size=16, **moe))


def test_expert_choice_decoder_balances_loads_and_refuses_to_decode():
  cfg = _decoder()
  assert dispatch_path(cfg) == "expert_choice"
  model = Llama(cfg)
  params = init_params(model, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size, jnp.int32)
  logits, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
  loop_logits = Llama(_decoder(dispatch="loop")).apply({"params": params}, tokens)
  np.testing.assert_allclose(logits, loop_logits, atol=1e-5, rtol=0)
  stats = collect_moe_stats(state["intermediates"])
  np.testing.assert_allclose(stats["expert_load"], 1 / cfg.moe.n_experts, rtol=1e-6)
  assert np.all((stats["dropped_fraction"] >= 0) & (stats["dropped_fraction"] < 1))
  with pytest.raises(ValueError, match="not causal"):
    Llama(cfg, decode=True).init(jax.random.key(0), tokens[:, :1],
                                 positions=jnp.zeros((2, 1), jnp.int32))


def test_active_parameters_count_the_average_experts_per_token():
  cfg = presets.get("micro_moe")
  with_moe = lambda **moe: dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe))
  top2 = with_moe(routing="topk", top_k=2)
  assert (with_moe(routing="expert_choice", top_k=2, capacity_factor=1.0).num_active_params()
          == top2.num_active_params())
  every_expert = with_moe(routing="expert_choice", capacity_factor=100.0)  # C = S
  assert every_expert.num_active_params() == every_expert.num_params()
