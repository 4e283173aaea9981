"""The optimizer: per-group learning-rate multipliers and the recorded learning rate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbtx.config import ConfigError, OptimizerConfig
from jbtx.training.optimizer import (
    current_learning_rate,
    learning_rate_schedule,
    make_optimizer,
)


def _params():
  """A parameter tree with one leaf per group: router, experts, other."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return {"layers": {"moe": {"router": normal(4, 3), "gate": normal(3, 4, 5)},
                     "attn": {"q": {"kernel": normal(4, 4)}}}}


def _updates(**config):
  optimizer = make_optimizer(OptimizerConfig(warmup_steps=2, **config), total_steps=10)
  params = _params()
  grads = jax.tree.map(lambda p: jnp.cos(3.0 * p), params)
  state, update = optimizer.init(params), jax.jit(optimizer.update)
  for _ in range(3):
    updates, state = update(grads, state, params)
  return updates, state


def test_group_multipliers_scale_the_whole_update_of_their_group():
  base, _ = _updates()
  scaled, _ = _updates(router_lr_multiplier=10.0, experts_lr_multiplier=0.5)
  moe, scaled_moe = base["layers"]["moe"], scaled["layers"]["moe"]
  np.testing.assert_allclose(scaled_moe["router"], 10.0 * moe["router"], rtol=1e-6)
  np.testing.assert_allclose(scaled_moe["gate"], 0.5 * moe["gate"], rtol=1e-6)
  np.testing.assert_array_equal(scaled["layers"]["attn"]["q"]["kernel"],
                                base["layers"]["attn"]["q"]["kernel"])


@pytest.mark.parametrize("freeze", ["none", "experts"])
def test_the_state_records_the_learning_rate_of_the_last_update(freeze):
  _, state = _updates(freeze=freeze)
  schedule = learning_rate_schedule(OptimizerConfig(warmup_steps=2), 10)
  assert float(current_learning_rate(state)) == pytest.approx(float(schedule(2)))
  assert float(schedule(2)) != float(schedule(1))


@pytest.mark.parametrize("key, value", [("router_lr_multiplier", -1.0),
                                        ("grad_accum_steps", 0)])
def test_bad_values_name_their_key(key, value):
  with pytest.raises(ConfigError) as error:
    OptimizerConfig(**{key: value})
  assert error.value.key == key
