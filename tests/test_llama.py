"""The dense decoder: KV-cache decoding, packed sequences, dtypes, layer layouts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbtx.inference import generate as gen
from jbtx.models import layers, presets
from jbtx.models.llama import Llama, abstract_params, init_params
from tests.decoding import decode_in_steps


def _model(**overrides):
  cfg = presets.get("micro", **overrides)
  model = Llama(cfg)
  return model, init_params(model, jax.random.key(0))


def _apply(model, params, tokens, **kwargs):
  return jax.jit(model.apply)({"params": params}, tokens, **kwargs)


def _tokens(cfg, shape, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size, jnp.int32)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_kv_cache_decoding_matches_full_forward(scan_layers):
  model, params = _model(scan_layers=scan_layers)
  tokens = _tokens(model.config, (2, 12))
  full = _apply(model, params, tokens)
  # Prefill 5 tokens at once, then one token per call, into a cache longer than needed.
  stepped = decode_in_steps(model, params, tokens, prefill=5, cache_len=16)
  np.testing.assert_allclose(stepped, full, atol=1e-5, rtol=0)


def test_greedy_generation_equals_argmax_of_full_forward():
  model, params = _model()
  prompt = _tokens(model.config, (2, 4))
  out = gen.generate(model, params, prompt, max_new_tokens=6, rng=jax.random.key(1))
  assert out.shape == (2, 10)
  np.testing.assert_array_equal(out[:, :4], prompt)
  # Each new token is the argmax given everything before it (causal: one forward suffices).
  logits = _apply(model, params, out[:, :-1])
  np.testing.assert_array_equal(out[:, 4:], jnp.argmax(logits[:, 3:], axis=-1))


def test_sampling_respects_top_p_and_temperature():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 2000)
  draw = jax.vmap(lambda k, p: gen.sample(logits, k, 1.0, p)[0], in_axes=(0, None))
  assert set(np.unique(draw(keys, 0.7)).tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7
  assert set(np.unique(draw(keys, 1.0)).tolist()) == {0, 1, 2, 3}
  freq = np.bincount(draw(keys, 1.0), minlength=4) / len(keys)
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.04)
  np.testing.assert_array_equal(gen.sample(logits, keys[0], 0.0, 0.5), [0])


def test_generation_stops_at_eos():
  model, params = _model()
  prompt = _tokens(model.config, (3, 3))
  out = gen.generate(model, params, prompt, 8, jax.random.key(2), temperature=1.0, eos_id=5)
  for row in np.asarray(out[:, 3:]):
    hits = np.flatnonzero(row == 5)
    if hits.size:
      assert (row[hits[0]:] == 5).all()


def test_packed_documents_do_not_see_each_other():
  model, params = _model()
  cfg = model.config
  docs = [_tokens(cfg, (1, n), seed=n) for n in (5, 7, 4)]
  packed = jnp.concatenate(docs, axis=1)
  segment_ids = jnp.concatenate([jnp.full((1, d.shape[1]), i + 1) for i, d in enumerate(docs)],
                                axis=1)
  logits = _apply(model, params, packed, segment_ids=segment_ids)
  start = 0
  for doc in docs:
    alone = _apply(model, params, doc)
    np.testing.assert_allclose(logits[:, start:start + doc.shape[1]], alone, atol=1e-5, rtol=0)
    start += doc.shape[1]


def test_positions_from_segments_restart_per_document():
  segments = jnp.array([[1, 1, 1, 2, 2, 3], [4, 4, 4, 4, 0, 0]])
  np.testing.assert_array_equal(layers.positions_from_segments(segments),
                                [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])


def test_scan_and_unrolled_layouts_compute_the_same_function():
  scanned, params = _model(scan_layers=True)
  unrolled = Llama(dataclasses.replace(scanned.config, scan_layers=False))
  per_layer = {k: v for k, v in params.items() if k != "layers"}
  for i in range(scanned.config.n_layers):
    per_layer[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
  tokens = _tokens(scanned.config, (2, 9))
  np.testing.assert_allclose(_apply(scanned, params, tokens),
                             _apply(unrolled, per_layer, tokens), atol=1e-6, rtol=0)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_changes_memory_not_gradients(policy):
  base, params = _model()
  remat = Llama(dataclasses.replace(base.config, remat_policy=policy))
  tokens = _tokens(base.config, (2, 8))

  def loss(model):
    return jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2)))(params)

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), loss(base),
               loss(remat))


def test_bfloat16_compute_with_float32_params():
  model, params = _model(dtype="bfloat16", param_dtype="float32")
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  tokens = _tokens(model.config, (2, 8))
  logits = _apply(model, params, tokens)
  assert logits.dtype == jnp.float32
  reference = Llama(dataclasses.replace(model.config, dtype="float32"))
  error = jnp.abs(logits - _apply(reference, params, tokens)).max()
  assert 0 < error < 0.05  # bf16 rounding shows, but only a little


def test_every_parameter_has_logical_axes():
  model = Llama(presets.get("micro"))
  boxed = abstract_params(model)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
  assert leaves and all(hasattr(leaf, "names") for leaf in leaves)
  for leaf in leaves:
    assert len(leaf.names) == len(leaf.value.shape)
  assert boxed["layers"]["attn"]["q"]["kernel"].names == (
      "layers", "embed", "q_heads", "head_dim")


def test_llama2_presets_have_published_sizes():
  assert round(presets.get("llama2_7b").num_params() / 1e9, 2) == 6.74
  assert round(presets.get("llama2_13b").num_params() / 1e9, 2) == 13.02
  assert round(presets.get("llama2_70b").num_params() / 1e9, 2) == 68.98
  assert presets.get("llama2_70b").n_kv_heads == 8


def test_conftest_simulates_eight_cpu_devices():
  assert jax.device_count() == 8 and jax.devices()[0].platform == "cpu"
