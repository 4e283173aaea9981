"""The features of small real seeds against transformers: tied embeddings, Llama-3 and
linear rotary scaling, Qwen2's and Llama's attention biases (import, logits, export
round trip); a BTX mix of a tied seed exported as Mixtral; unsupported variants refused."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.torch import load_file, save_file

import jbtx
from jbtx.config import ConfigError, ModelConfig, MoEConfig, RopeScalingConfig, from_mapping
from jbtx.interop import checkpoint, conversion
from jbtx.interop.hf_tensor_map import ConversionError
from jbtx.interop.tensor_source import TreeSource
from jbtx.methods import mix, split
from jbtx.methods.upcycle import upcycle_params
from jbtx.models import llama, presets
from jbtx.training import metrics
from tests import llama_fixtures as fx

torch = fx.torch

TOL = 1e-4  # max abs logit difference, float32
# name: (HF shape, expected jbtx features, HF class of the export)
VARIANTS = {
    "tied": (fx.TIED, {"tie_embeddings": True}, "LlamaForCausalLM"),
    "llama3": (fx.LLAMA3, {"tie_embeddings": True, "rope_type": "llama3"}, "LlamaForCausalLM"),
    "linear": (fx.LINEAR, {"rope_type": "linear"}, "LlamaForCausalLM"),
    "qwen2": (fx.QWEN2, {"tie_embeddings": True, "attention_bias": "qkv"}, "Qwen2ForCausalLM"),
    "llama_bias": (fx.LLAMA_BIAS, {"attention_bias": "qkvo"}, "LlamaForCausalLM"),
}
# Past the scaled models' original 64 positions, where the scaling matters.
LONG = (2, 100)


def _features(cfg: ModelConfig) -> dict:
  return {"tie_embeddings": cfg.tie_embeddings, "rope_type": cfg.rope_scaling.rope_type,
          "attention_bias": cfg.attention_bias}


def _jbtx_logits(directory, tokens) -> np.ndarray:
  model, params = jbtx.load(directory)
  return np.asarray(model.apply({"params": params}, tokens))


def _tensors(directory) -> dict:
  return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_import_matches_transformers_and_exports_back_exactly(tmp_path, name):
  shape, features, architecture = VARIANTS[name]
  hf = fx.hf_model(shape, seed=len(name))
  tokens = fx.random_tokens(shape["vocab_size"], LONG)
  source = fx.save_hf(hf, tmp_path / "hf")
  cfg = conversion.import_checkpoint(source, tmp_path / "jbtx", show_progress=False)
  expected = {"tie_embeddings": False, "rope_type": "default", "attention_bias": "none"}
  assert _features(cfg) == expected | features
  hf_logits = fx.hf_logits(hf, tokens)
  np.testing.assert_allclose(_jbtx_logits(tmp_path / "jbtx", tokens), hf_logits, atol=TOL,
                             rtol=0)
  params = checkpoint.load_params(tmp_path / "jbtx", as_numpy=True)
  assert ("lm_head" in params) != cfg.tie_embeddings

  out = conversion.export_checkpoint(tmp_path / "jbtx", tmp_path / "out", show_progress=False)
  config = json.loads((out / "config.json").read_text())
  assert config["architectures"] == [architecture]
  assert config["tie_word_embeddings"] == cfg.tie_embeddings
  exported, original = _tensors(out), _tensors(source)
  assert exported.keys() == original.keys()
  for key, value in original.items():
    assert torch.equal(exported[key], value), key
  reloaded = fx.transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(reloaded) is type(hf)
  np.testing.assert_array_equal(fx.hf_logits(reloaded, tokens), hf_logits)
  assert conversion.import_checkpoint(out, tmp_path / "again", show_progress=False) == cfg


@pytest.mark.parametrize("name", ["llama3", "linear"])
def test_the_scaling_matters_at_these_positions(name):
  """The scaled model is far from its unscaled twin (the parity above is not vacuous)."""
  shape = VARIANTS[name][0]
  tokens = fx.random_tokens(shape["vocab_size"], LONG)
  scaled = fx.hf_logits(fx.hf_model(shape), tokens)
  plain = fx.hf_logits(fx.hf_model(dict(shape, rope_scaling=None)), tokens)
  assert np.abs(scaled - plain).max() > 10 * TOL
  np.testing.assert_array_equal(scaled[:, :1], plain[:, :1])  # position 0: no rotation


def test_olmoe_attention_biases_match_transformers(tmp_path):
  hf = fx.hf_moe_model(dict(fx.OLMOE, attention_bias=True, tie_word_embeddings=True))
  fx._randomise(hf)
  tokens = fx.random_tokens(fx.OLMOE["vocab_size"])
  cfg = conversion.import_checkpoint(fx.save_hf(hf, tmp_path / "hf"), tmp_path / "jbtx",
                                     show_progress=False)
  assert cfg.attention_bias == "qkvo" and cfg.tie_embeddings
  np.testing.assert_allclose(_jbtx_logits(tmp_path / "jbtx", tokens), fx.hf_logits(hf, tokens),
                             atol=TOL, rtol=0)
  out = conversion.export_checkpoint(tmp_path / "jbtx", tmp_path / "out", show_progress=False)
  reloaded = fx.transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  np.testing.assert_array_equal(fx.hf_logits(reloaded, tokens), fx.hf_logits(hf, tokens))


# --------------------------------------------------------------------------------------
# A BTX model from a tied seed.
# --------------------------------------------------------------------------------------


def _expert(params: dict, index: int) -> dict:
  """The seed with every tensor moved a little, differently per expert (as training
  would): the mix then averages distinct tables and stacks distinct FFNs."""
  rng = np.random.default_rng(index)
  return jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype), params)


def test_mixed_model_of_a_tied_seed_exports_to_mixtral(tmp_path):
  hf = fx.hf_model(fx.TIED, seed=5)
  conversion.import_checkpoint(fx.save_hf(hf, tmp_path / "hf"), tmp_path / "seed",
                               show_progress=False)
  seed = checkpoint.load_params(tmp_path / "seed", as_numpy=True)
  seed_cfg = checkpoint.load_config(tmp_path / "seed")
  experts = [_expert(seed, i) for i in range(3)]
  moe_cfg = dataclasses.replace(seed_cfg, scan_layers=False,
                                moe=MoEConfig(n_experts=3, top_k=2, d_ff=seed_cfg.d_ff))
  rng = np.random.default_rng(0)  # decisive routers: no near-ties between implementations
  routers = lambda _: rng.normal(0, 0.5, (seed_cfg.d_model, 3)).astype(np.float32)
  mixed = mix.mix_params([TreeSource(seed_cfg, p) for p in experts], moe_cfg, "experts", 1,
                         [1.0] * 3, routers)
  assert set(mixed) == {"embed", "final_norm", *(f"layers_{i}" for i in range(3))}
  np.testing.assert_allclose(mixed["embed"]["embedding"],
                             np.mean([p["embed"]["embedding"] for p in experts], 0), atol=1e-6)
  checkpoint.save(tmp_path / "mix", moe_cfg, mixed)

  out = conversion.export_checkpoint(tmp_path / "mix", tmp_path / "out", show_progress=False)
  config = json.loads((out / "config.json").read_text())
  assert config["architectures"] == ["MixtralForCausalLM"] and config["tie_word_embeddings"]
  assert "lm_head.weight" not in _tensors(out)
  reloaded = fx.transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tokens = fx.random_tokens(fx.TIED["vocab_size"], seed=3)
  np.testing.assert_allclose(fx.hf_logits(reloaded, tokens), _jbtx_logits(tmp_path / "mix", tokens),
                             atol=TOL, rtol=0)


def _real_seed_params(cfg: ModelConfig) -> dict:
  """Fresh parameters of `cfg` with random (not zero) attention biases."""
  params = jax.device_get(llama.init_params(llama.Llama(cfg), jax.random.key(0)))
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: rng.normal(0, 0.1, x.shape).astype(x.dtype) if path[-1].key == "bias"
      else x, params)


def test_upcycling_and_splitting_a_real_seed_compute_the_seed():
  """Both baselines start exactly at the seed, whose table, biases and scaled rotary
  frequencies they keep (upcycling: any router; splitting: all experts, equal gates)."""
  scaling = RopeScalingConfig(rope_type="llama3", factor=8.0,
                              original_max_position_embeddings=16)
  dense_cfg = presets.get("micro", tie_embeddings=True, attention_bias="qkv",
                          rope_scaling=scaling)
  dense = _real_seed_params(dense_cfg)
  tokens = fx.random_tokens(dense_cfg.vocab_size, (2, 40))
  expected = llama.Llama(dense_cfg).apply({"params": dense}, tokens)
  upcycled_cfg = dataclasses.replace(dense_cfg, moe=MoEConfig(n_experts=4, top_k=2))
  upcycled = upcycle_params(dense, upcycled_cfg, seed=0)
  np.testing.assert_allclose(llama.Llama(upcycled_cfg).apply({"params": upcycled}, tokens),
                             expected, atol=1e-5, rtol=0)
  split_cfg = dataclasses.replace(dense_cfg, moe=MoEConfig(
      n_experts=8, top_k=8, d_ff=9, output_scale=8.0, router="noisy_mlp", load_balance="cv"))
  partitions = [split.random_partition(72, 8, np.random.default_rng(i)) for i in range(2)]
  params = split.split_params(llama.unstack_layers(dense), split_cfg, partitions, seed=0)
  params = jax.tree_util.tree_map_with_path(  # zero routers: equal gates
      lambda path, x: np.zeros_like(x) if path[-1].key.startswith("router") else x, params)
  assert "lm_head" not in params
  np.testing.assert_allclose(llama.Llama(split_cfg).apply({"params": params}, tokens),
                             expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------
# Refusals.
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A tied Llama and a Qwen2 folder, saved once (tests copy and edit them)."""
  root = tmp_path_factory.mktemp("saved")
  return {"llama": fx.save_hf(fx.hf_model(fx.TIED), root / "llama"),
          "qwen2": fx.save_hf(fx.hf_model(fx.QWEN2), root / "qwen2")}


def _assert_import_fails(source, tmp_path, *fragments):
  with pytest.raises(ConversionError) as info:
    conversion.import_checkpoint(source, tmp_path / "out", show_progress=False)
  for fragment in fragments:
    assert fragment in str(info.value)
  assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


LLAMA3_SCALING = fx.LLAMA3["rope_scaling"]


@pytest.mark.parametrize("family,changes,fragment", [
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "rope_scaling.rope_type='yarn' is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "rope_parameters.rope_type='dynamic' is not supported"),
    ("llama", {"rope_scaling": {"type": "longrope", "factor": 2.0}},
     "rope_scaling.type='longrope'"),
    ("llama", {"rope_scaling": dict(LLAMA3_SCALING, beta_fast=32)},
     "rope_scaling.beta_fast=32 is not supported"),
    ("llama", {"rope_scaling": {"rope_type": "linear"}}, "lacks 'factor'"),
    ("llama", {"mlp_bias": True}, "mlp_bias=True"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8},
     "use_sliding_window=True (sliding_window=8) is not supported"),
], ids=["yarn", "dynamic", "longrope", "unknown_parameter", "missing_factor", "mlp_bias",
        "sliding_window"])
def test_unsupported_variants_are_refused_before_anything_is_written(
    tmp_path, saved, family, changes, fragment):
  source = shutil.copytree(saved[family], tmp_path / "hf")
  config = json.loads((source / "config.json").read_text())
  (source / "config.json").write_text(json.dumps(config | changes))
  _assert_import_fails(source, tmp_path, "config.json", fragment)


def test_qwen2_sliding_window_off_is_accepted(tmp_path, saved):
  source = shutil.copytree(saved["qwen2"], tmp_path / "hf")
  config = json.loads((source / "config.json").read_text())
  (source / "config.json").write_text(json.dumps(config | {"use_sliding_window": False,
                                                           "sliding_window": 8}))
  cfg = conversion.import_checkpoint(source, tmp_path / "out", show_progress=False)
  assert cfg.attention_bias == "qkv"


def test_a_tied_checkpoint_may_carry_its_head_only_if_it_is_the_table(tmp_path, saved):
  source = shutil.copytree(saved["llama"], tmp_path / "hf")
  state = load_file(source / "model.safetensors")
  assert "lm_head.weight" not in state  # transformers saves a tied table once
  state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
  save_file(state, source / "model.safetensors", metadata={"format": "pt"})
  assert conversion.import_checkpoint(source, tmp_path / "ok", show_progress=False
                                      ).tie_embeddings
  state["lm_head.weight"] += 1.0
  save_file(state, source / "model.safetensors", metadata={"format": "pt"})
  _assert_import_fails(source, tmp_path, "'lm_head.weight' differs from "
                       "'model.embed_tokens.weight'", "tie_word_embeddings=True")


def test_exports_that_hf_cannot_represent_are_refused():
  from jbtx.interop import hf_folder

  moe = MoEConfig(n_experts=4, top_k=2)
  for cfg, fragment in [
      (presets.get("micro", moe=moe, attention_bias="qkv"), "attention_bias='qkv'"),
      (presets.get("micro", moe=moe, qk_norm=True, attention_bias="qkv"), "attention_bias"),
  ]:
    with pytest.raises(ConversionError, match=fragment):
      hf_folder.hf_config_from_model(cfg, "float32")


# --------------------------------------------------------------------------------------
# Config and parameter counts.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes,key,fragment", [
    ({"rope_scaling": {"rope_type": "yarn"}}, "model.rope_scaling.rope_type", "must be one of"),
    ({"rope_scaling": {"factr": 2.0}}, "model.rope_scaling.factr", "unknown key"),
    ({"rope_scaling": {"rope_type": "llama3", "high_freq_factor": 1.0}},
     "model.rope_scaling.high_freq_factor", "must exceed low_freq_factor"),
    ({"attention_bias": "qk"}, "model.attention_bias", "must be one of"),
], ids=["rope_type", "unknown_key", "frequency_bounds", "attention_bias"])
def test_config_names_bad_keys(changes, key, fragment):
  with pytest.raises(ConfigError, match=fragment) as info:
    from_mapping(ModelConfig, presets.get("micro").__dict__ | changes, "model")
  assert info.value.key == key


@pytest.mark.parametrize("changes", [{"tie_embeddings": True},
                                     {"tie_embeddings": True, "attention_bias": "qkvo"},
                                     {"attention_bias": "qkv", "moe": MoEConfig(n_experts=3)}])
def test_parameter_counts_and_flops(changes):
  cfg = presets.get("micro", **changes)
  shapes = jax.tree.leaves(llama.abstract_params(llama.Llama(cfg)))
  assert cfg.num_params() == sum(int(np.prod(leaf.shape)) for leaf in shapes)
  untied = dataclasses.replace(cfg, tie_embeddings=False)
  assert untied.num_params() - cfg.num_params() == (cfg.vocab_size * cfg.d_model
                                                     if cfg.tie_embeddings else 0)
  # The output projection's FLOPs count either way; only the input gather is free.
  assert metrics.train_flops_per_token(cfg, 64) == metrics.train_flops_per_token(untied, 64)
