"""Logits parity with Hugging Face LlamaForCausalLM after import from HF and Meta layouts."""

import numpy as np
import pytest

import jbtx
from jbtx.interop import conversion
from tests import llama_fixtures as fx

TOL = 1e-4  # max abs logit difference, float32


@pytest.mark.parametrize("shape", [fx.MHA, fx.GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_import_from_hf_matches_transformers(tmp_path, shape, scan_layers):
  hf = fx.hf_model(shape)
  tokens = fx.random_tokens(shape["vocab_size"])
  # The unrolled case also reads a sharded save (several files and an index).
  shard_size = "1GB" if scan_layers else "60KB"
  source = fx.save_hf(hf, tmp_path / "hf", max_shard_size=shard_size)
  assert (source / "model.safetensors.index.json").is_file() != scan_layers
  conversion.import_checkpoint(source, tmp_path / "jbtx", scan_layers=scan_layers,
                            show_progress=False)
  model, params = jbtx.load(tmp_path / "jbtx")
  logits = np.asarray(model.apply({"params": params}, tokens))
  assert logits.shape == (*tokens.shape, shape["vocab_size"])
  np.testing.assert_allclose(logits, fx.hf_logits(hf, tokens), atol=TOL, rtol=0)


@pytest.mark.parametrize("shape", [fx.MHA, fx.GQA], ids=["mha", "gqa"])
def test_import_from_meta_shards_matches_transformers(tmp_path, shape):
  hf = fx.hf_model(shape, seed=1)
  tokens = fx.random_tokens(shape["vocab_size"], seed=1)
  cfg = conversion.import_checkpoint(fx.save_meta(hf, tmp_path / "meta", n_shards=2),
                                  tmp_path / "jbtx", show_progress=False)
  assert cfg.d_ff == shape["intermediate_size"] and cfg.rope_theta == shape["rope_theta"]
  model, params = jbtx.load(tmp_path / "jbtx")
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, tokens)),
                             fx.hf_logits(hf, tokens), atol=TOL, rtol=0)


def test_export_round_trip_loads_in_transformers(tmp_path):
  hf = fx.hf_model(fx.GQA, seed=2)
  tokens = fx.random_tokens(fx.GQA["vocab_size"], seed=2)
  conversion.import_checkpoint(fx.save_hf(hf, tmp_path / "hf"), tmp_path / "jbtx",
                            show_progress=False)
  # A tiny shard limit forces a sharded export with an index file.
  conversion.export_checkpoint(tmp_path / "jbtx", tmp_path / "out", show_progress=False,
                            max_shard_bytes=40_000)
  assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
  reloaded = fx.transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
  model, params = jbtx.load(tmp_path / "jbtx")
  jbtx_logits = np.asarray(model.apply({"params": params}, tokens))
  np.testing.assert_allclose(fx.hf_logits(reloaded, tokens), jbtx_logits, atol=TOL, rtol=0)
  np.testing.assert_allclose(fx.hf_logits(reloaded, tokens), fx.hf_logits(hf, tokens),
                             atol=1e-6, rtol=0)


def test_bfloat16_import_stores_bfloat16(tmp_path):
  hf = fx.hf_model(fx.MHA)
  tokens = fx.random_tokens(fx.MHA["vocab_size"])
  cfg = conversion.import_checkpoint(fx.save_hf(hf, tmp_path / "hf"), tmp_path / "jbtx",
                                  dtype="bfloat16", show_progress=False)
  assert cfg.param_dtype == "bfloat16"
  model, params = jbtx.load(tmp_path / "jbtx")
  import jax
  assert {x.dtype.name for x in jax.tree.leaves(params)} == {"bfloat16"}
  logits = np.asarray(model.apply({"params": params}, tokens))
  # bf16 weights and compute: close to the float32 reference, not equal.
  assert np.abs(logits - fx.hf_logits(hf, tokens)).max() < 0.05
