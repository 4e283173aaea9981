"""Parity with Hugging Face Mixtral and OLMoE: logits and the load-balancing aux loss
after import (per-expert and fused expert layouts), export back, and conversion errors."""

import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.torch import load_file, save_file

import jbtx
from jbtx.config import ModelConfig, MoEConfig
from jbtx.interop import checkpoint, conversion, hf_folder
from jbtx.interop.hf_tensor_map import ConversionError
from jbtx.models import llama, routing
from jbtx.models.moe import collect_router_logits
from tests import llama_fixtures as fx

torch = fx.torch

TOL = 1e-4  # max abs logit difference, float32
AUX_RTOL = 1e-5  # aux loss, relative
SHAPES = {"mixtral": fx.MIXTRAL, "olmoe": fx.OLMOE,
          "olmoe_renorm": dict(fx.OLMOE, norm_topk_prob=True)}


@pytest.fixture(scope="module")
def hf_models():
  return {name: fx.hf_moe_model(shape, seed=i) for i, (name, shape) in enumerate(SHAPES.items())}


def _hf_forward(model, tokens):
  """HF logits `[B, S, V]`, router logits `[L, B*S, E]` and aux loss (not yet × coef)."""
  with torch.no_grad():
    out = model(torch.from_numpy(tokens).long(), output_router_logits=True)
  return (out.logits.numpy(), torch.stack(out.router_logits).numpy(), float(out.aux_loss))


def _jbtx_forward(directory, tokens):
  """jbtx logits, the router logits it sows `[L, B*S, E]`, and its config and params."""
  model, params = jbtx.load(directory)
  apply = jax.jit(lambda p, t: model.apply({"params": p}, t, mutable=["intermediates"]))
  logits, state = apply(params, tokens)
  router_logits = collect_router_logits(state["intermediates"])
  return np.asarray(logits), router_logits, model.config, params


def _expert_tensor_names(directory):
  names = set()
  for path in directory.glob("*.safetensors"):
    names.update(n for n in load_file(path) if ".experts." in n)
  return names


def _save_fused(hf, directory):
  """The model's transformers-5 state dict as is (fused experts), bypassing
  `save_pretrained`, which writes per-expert tensors."""
  hf.config.save_pretrained(directory)
  save_file({k: v.contiguous() for k, v in hf.state_dict().items()},
            directory / "model.safetensors", metadata={"format": "pt"})
  return directory


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", ["mixtral", "olmoe"])
@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_import_matches_transformers(tmp_path, hf_models, name, scan_layers):
  hf, shape = hf_models[name], SHAPES[name]
  tokens = fx.random_tokens(shape["vocab_size"])
  # The unrolled case also reads a sharded save (several files and an index).
  source = fx.save_hf(hf, tmp_path / "hf", max_shard_size="1GB" if scan_layers else "60KB")
  # transformers 5 holds experts fused but saves them per expert.
  expert = "block_sparse_moe.experts.4.w3" if name == "mixtral" else "mlp.experts.6.up_proj"
  assert f"model.layers.2.{expert}.weight" in _expert_tensor_names(source)
  cfg = conversion.import_checkpoint(source, tmp_path / "jbtx", scan_layers=scan_layers,
                                  show_progress=False)
  mixtral = name == "mixtral"
  assert cfg.moe == MoEConfig(
      n_experts=shape["num_local_experts" if mixtral else "num_experts"],
      top_k=shape["num_experts_per_tok"], d_ff=40,
      routing="topk" if mixtral else "softmax_topk", renormalize=mixtral,
      load_balance="switch", load_balance_coef=shape["router_aux_loss_coef"], router_z_coef=0.0)
  assert cfg.qk_norm == (not mixtral)

  logits, router_logits, cfg, _ = _jbtx_forward(tmp_path / "jbtx", tokens)
  hf_logits, hf_router_logits, hf_aux = _hf_forward(hf, tokens)
  np.testing.assert_allclose(logits, hf_logits, atol=TOL, rtol=0)
  np.testing.assert_allclose(router_logits, hf_router_logits, atol=TOL, rtol=0)
  # HF's aux_loss pools all layers (balanced: k); `loss` adds router_aux_loss_coef × it.
  aux = routing.hf_load_balancing_loss(router_logits, cfg.moe.top_k)
  np.testing.assert_allclose(float(aux), hf_aux, rtol=AUX_RTOL)


@pytest.mark.parametrize("name", ["mixtral", "olmoe_renorm"])
def test_import_fused_experts(tmp_path, hf_models, name):
  hf = hf_models[name]
  tokens = fx.random_tokens(SHAPES[name]["vocab_size"], seed=1)
  source = _save_fused(hf, tmp_path / "fused")
  assert "model.layers.0.mlp.experts.gate_up_proj" in _expert_tensor_names(source)
  cfg = conversion.import_checkpoint(source, tmp_path / "jbtx", show_progress=False)
  assert cfg.moe.renormalize
  logits, *_, params = _jbtx_forward(tmp_path / "jbtx", tokens)
  np.testing.assert_allclose(logits, _hf_forward(hf, tokens)[0], atol=TOL, rtol=0)
  # The same parameters as from the per-expert save.
  conversion.import_checkpoint(fx.save_hf(hf, tmp_path / "hf"), tmp_path / "jbtx_per_expert",
                            show_progress=False)
  _assert_trees_equal(params, checkpoint.load_params(tmp_path / "jbtx_per_expert"))


@pytest.mark.parametrize("name", ["mixtral", "olmoe"])
def test_export_round_trip_loads_in_transformers(tmp_path, hf_models, name):
  hf = hf_models[name]
  tokens = fx.random_tokens(SHAPES[name]["vocab_size"], seed=2)
  cfg = conversion.import_checkpoint(fx.save_hf(hf, tmp_path / "hf"), tmp_path / "jbtx",
                                  show_progress=False)
  # A tiny shard limit forces a sharded export with an index file.
  out = conversion.export_checkpoint(tmp_path / "jbtx", tmp_path / "out", show_progress=False,
                                  max_shard_bytes=100_000)
  assert (out / "model.safetensors.index.json").is_file()
  assert all(".experts.gate_up_proj" not in n for n in _expert_tensor_names(out))
  reloaded = fx.transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(reloaded) is type(hf)
  logits = _jbtx_forward(tmp_path / "jbtx", tokens)[0]
  np.testing.assert_allclose(_hf_forward(reloaded, tokens)[0], logits, atol=TOL, rtol=0)
  np.testing.assert_array_equal(_hf_forward(reloaded, tokens)[0], _hf_forward(hf, tokens)[0])
  # Importing the export gives back the same model.
  assert conversion.import_checkpoint(out, tmp_path / "again", show_progress=False) == cfg
  _assert_trees_equal(checkpoint.load_params(tmp_path / "again"),
                      checkpoint.load_params(tmp_path / "jbtx"))


def _native_moe(qk_norm: bool, **moe) -> ModelConfig:
  return ModelConfig(vocab_size=97, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24,
                     qk_norm=qk_norm,
                     moe=MoEConfig(n_experts=4, top_k=2, load_balance="btx", **moe))


def _save_native(cfg: ModelConfig, directory):
  """A random jbtx model (normal kernels, norm scales around 1), saved as a checkpoint."""
  rng = np.random.default_rng(0)
  shapes = nn.meta.unbox(llama.abstract_params(llama.Llama(cfg)))
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (1.0 if path[-1].key == "scale" else 0.0)
      + 0.1 * rng.standard_normal(x.shape, np.float32), shapes)
  return checkpoint.save(directory, cfg, params)


@pytest.mark.parametrize("qk_norm,moe,architecture,renormalize", [
    (False, {"routing": "topk"}, "MixtralForCausalLM", None),
    (False, {"routing": "softmax_topk", "renormalize": True}, "MixtralForCausalLM", None),
    (True, {"routing": "topk"}, "OlmoeForCausalLM", True),
    (True, {"routing": "softmax_topk", "renormalize": False}, "OlmoeForCausalLM", False),
], ids=["topk", "softmax_topk_renorm", "qk_norm_topk", "qk_norm_softmax_topk"])
def test_export_of_jbtx_moe_matches(tmp_path, qk_norm, moe, architecture, renormalize):
  cfg = _native_moe(qk_norm, **moe)
  tokens = fx.random_tokens(cfg.vocab_size, seed=3)
  out = conversion.export_checkpoint(_save_native(cfg, tmp_path / "jbtx"), tmp_path / "out",
                                  show_progress=False)
  config = json.loads((out / "config.json").read_text())
  assert config["architectures"] == [architecture]
  assert config.get("norm_topk_prob") == renormalize
  hf = fx.transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  np.testing.assert_allclose(_hf_forward(hf, tokens)[0],
                             _jbtx_forward(tmp_path / "jbtx", tokens)[0], atol=TOL, rtol=0)


# --------------------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------------------


def _assert_import_fails(source, tmp_path, *fragments):
  with pytest.raises(ConversionError) as info:
    conversion.import_checkpoint(source, tmp_path / "out", show_progress=False)
  for fragment in fragments:
    assert fragment in str(info.value)
  assert not (tmp_path / "out").exists()


def _edit_config(directory, **changes):
  path = directory / "config.json"
  path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_missing_expert_tensor(tmp_path, hf_models):
  source = fx.save_hf(hf_models["mixtral"], tmp_path / "hf")
  state = load_file(source / "model.safetensors")
  del state["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
  save_file(state, source / "model.safetensors", metadata={"format": "pt"})
  _assert_import_fails(source, tmp_path, "missing tensor "
                       "'model.layers.1.block_sparse_moe.experts.3.w2.weight'", "5 experts")


def test_misshaped_fused_tensor(tmp_path, hf_models):
  source = _save_fused(hf_models["olmoe"], tmp_path / "fused")
  state = load_file(source / "model.safetensors")
  name = "model.layers.2.mlp.experts.gate_up_proj"
  state[name] = state[name][:, :-2].contiguous()
  save_file(state, source / "model.safetensors", metadata={"format": "pt"})
  _assert_import_fails(source, tmp_path, f"'{name}' has shape (7, 78, 60), expected (7, 80, 60)",
                       "model.safetensors")


@pytest.mark.parametrize("name,changes,fragments", [
    ("mixtral", {"model_type": "qwen2_moe"}, ["config.json", "model_type 'qwen2_moe'"]),
    ("mixtral", {"sliding_window": 16}, ["config.json", "sliding_window=16"]),
    ("olmoe", {"clip_qkv": 8.0}, ["config.json", "clip_qkv=8.0"]),
    ("olmoe", {"num_experts_per_tok": 9}, ["config.json", "moe.top_k"]),
    ("mixtral", {"head_dim": 12}, ["config.json", "head_dim 12"]),
], ids=["unknown_model_type", "sliding_window", "clip_qkv", "top_k", "head_dim"])
def test_unsupported_config(tmp_path, hf_models, name, changes, fragments):
  source = fx.save_hf(hf_models[name], tmp_path / "hf")
  _edit_config(source, **changes)
  _assert_import_fails(source, tmp_path, *fragments)


@pytest.mark.parametrize("cfg,fragment", [
    (dataclasses.replace(_native_moe(False), moe=MoEConfig(every=2)), "moe.every=2"),
    (_native_moe(False, n_shared_experts=1), "moe.n_shared_experts=1"),
    (_native_moe(True, routing="switch"), "moe.routing='switch'"),
    (_native_moe(False, routing="softmax_topk", renormalize=False),
     "moe.routing='softmax_topk' without renormalize"),
    (dataclasses.replace(_native_moe(True), moe=None), "no MoE layers and no QK norm"),
], ids=["every", "shared", "switch", "no_renormalize", "dense_qk_norm"])
def test_export_rejects_what_hf_cannot_represent(cfg, fragment):
  with pytest.raises(ConversionError) as info:
    hf_folder.hf_config_from_model(cfg, "float32")
  assert fragment in str(info.value)


def test_failed_export_writes_nothing(tmp_path):
  source = _save_native(_native_moe(False, n_shared_experts=1), tmp_path / "jbtx")
  with pytest.raises(ConversionError, match="shared"):
    conversion.export_checkpoint(source, tmp_path / "out", show_progress=False)
  assert not (tmp_path / "out").exists()
