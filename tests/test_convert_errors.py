"""Bad conversion input: a clear error naming the tensor or file, and no output left behind."""

import json
import subprocess
import sys

import pytest

from jbtx.interop import checkpoint, conversion
from jbtx.interop.hf_tensor_map import ConversionError
from tests import llama_fixtures as fx

torch = fx.torch


@pytest.fixture(scope="module")
def hf():
  return fx.hf_model(fx.GQA)


def _import(source, output):
  return conversion.import_checkpoint(source, output, show_progress=False)


def _assert_fails(source, tmp_path, *fragments):
  with pytest.raises(ConversionError) as info:
    _import(source, tmp_path / "out")
  for fragment in fragments:
    assert fragment in str(info.value)
  assert not (tmp_path / "out").exists()
  assert not list(tmp_path.glob(".out.partial-*"))


def _edit_meta_shard(directory, index, edit):
  path = directory / f"consolidated.{index:02d}.pth"
  shard = torch.load(path)
  edit(shard)
  torch.save(shard, path)


def test_unknown_format(tmp_path):
  (tmp_path / "src").mkdir()
  (tmp_path / "src" / "weights.npz").write_bytes(b"x")
  _assert_fails(tmp_path / "src", tmp_path, "unknown checkpoint format")


def test_missing_source(tmp_path):
  _assert_fails(tmp_path / "nope", tmp_path, "no such directory")


def test_hf_missing_tensor(tmp_path, hf):
  state = {k: v for k, v in hf.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
  fx.save_hf(hf, tmp_path / "hf", state_dict=state)
  _assert_fails(tmp_path / "hf", tmp_path, "missing tensor 'model.layers.1.mlp.up_proj.weight'")


def test_hf_extra_tensor(tmp_path, hf):
  state = dict(hf.state_dict())
  state["model.layers.0.self_attn.q_proj.bias"] = torch.ones(60)
  fx.save_hf(hf, tmp_path / "hf", state_dict=state)
  _assert_fails(tmp_path / "hf", tmp_path,
                "unexpected tensor 'model.layers.0.self_attn.q_proj.bias'", "model.safetensors")


def test_hf_misshaped_tensor(tmp_path, hf):
  state = dict(hf.state_dict())
  state["model.layers.2.mlp.down_proj.weight"] = torch.ones(60, 99)
  fx.save_hf(hf, tmp_path / "hf", state_dict=state)
  _assert_fails(tmp_path / "hf", tmp_path, "'model.layers.2.mlp.down_proj.weight' has shape "
                "(60, 99), expected (60, 100)")


def test_hf_truncated_file(tmp_path, hf):
  fx.save_hf(hf, tmp_path / "hf")
  weights = tmp_path / "hf" / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:-1000])
  _assert_fails(tmp_path / "hf", tmp_path, "model.safetensors")


def test_hf_index_names_a_missing_file(tmp_path, hf):
  fx.save_hf(hf, tmp_path / "hf", max_shard_size="100KB")
  shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
  assert len(shards) > 1
  shards[-1].unlink()
  _assert_fails(tmp_path / "hf", tmp_path, shards[-1].name, "missing")


def test_hf_pytorch_bin_truncated(tmp_path, hf):
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text(hf.config.to_json_string())
  torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
  data = (tmp_path / "hf" / "pytorch_model.bin").read_bytes()
  (tmp_path / "hf" / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
  _assert_fails(tmp_path / "hf", tmp_path, "pytorch_model.bin")


def test_hf_pytorch_bin_converts(tmp_path, hf):
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text(hf.config.to_json_string())
  torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
  assert _import(tmp_path / "hf", tmp_path / "out").n_kv_heads == 2


def test_meta_shards_disagree_on_shape(tmp_path, hf):
  fx.save_meta(hf, tmp_path / "meta")
  _edit_meta_shard(tmp_path / "meta", 1, lambda s: s.update(
      {"layers.0.feed_forward.w1.weight": torch.ones(50, 59)}))
  _assert_fails(tmp_path / "meta", tmp_path, "shards disagree on tensor "
                "'layers.0.feed_forward.w1.weight'", "consolidated.01.pth")


def test_meta_shards_disagree_on_replicated_values(tmp_path, hf):
  fx.save_meta(hf, tmp_path / "meta")
  _edit_meta_shard(tmp_path / "meta", 1, lambda s: s["layers.2.ffn_norm.weight"].mul_(2))
  _assert_fails(tmp_path / "meta", tmp_path, "replicated tensor 'layers.2.ffn_norm.weight'",
                "consolidated.01.pth")


def test_meta_tensor_missing_from_one_shard(tmp_path, hf):
  fx.save_meta(hf, tmp_path / "meta")
  _edit_meta_shard(tmp_path / "meta", 0, lambda s: s.pop("layers.1.attention.wv.weight"))
  _assert_fails(tmp_path / "meta", tmp_path, "'layers.1.attention.wv.weight'",
                "consolidated.00.pth", "consolidated.01.pth")


def test_meta_missing_layer_everywhere(tmp_path, hf):
  fx.save_meta(hf, tmp_path / "meta")
  for i in range(2):
    _edit_meta_shard(tmp_path / "meta", i, lambda s: s.pop("layers.2.attention.wo.weight"))
  _assert_fails(tmp_path / "meta", tmp_path, "missing tensor 'model.layers.2.self_attn.o_proj")


def test_meta_unknown_tensor_name(tmp_path, hf):
  fx.save_meta(hf, tmp_path / "meta")
  for i in range(2):
    _edit_meta_shard(tmp_path / "meta", i, lambda s: s.update({"adapter.weight": torch.ones(2)}))
  _assert_fails(tmp_path / "meta", tmp_path, "unexpected tensor 'adapter.weight'")


def test_meta_truncated_shard(tmp_path, hf):
  fx.save_meta(hf, tmp_path / "meta")
  shard = tmp_path / "meta" / "consolidated.01.pth"
  shard.write_bytes(shard.read_bytes()[:5000])
  _assert_fails(tmp_path / "meta", tmp_path, "consolidated.01.pth")


def test_meta_shard_numbering_gap(tmp_path, hf):
  fx.save_meta(hf, tmp_path / "meta")
  (tmp_path / "meta" / "consolidated.01.pth").rename(tmp_path / "meta" / "consolidated.02.pth")
  _assert_fails(tmp_path / "meta", tmp_path, "consolidated.01.pth")


def test_meta_params_json_missing_key(tmp_path, hf):
  params = fx.meta_params_json(hf)
  del params["n_layers"]
  fx.save_meta(hf, tmp_path / "meta", params=params)
  _assert_fails(tmp_path / "meta", tmp_path, "params.json", "'n_layers'")


def test_existing_output_is_never_touched(tmp_path, hf):
  fx.save_hf(hf, tmp_path / "hf")
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "precious.txt").write_text("keep me")
  with pytest.raises(checkpoint.CheckpointError, match="already exists"):
    _import(tmp_path / "hf", tmp_path / "out")
  assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def test_failure_midway_leaves_no_output(tmp_path, hf, monkeypatch):
  fx.save_hf(hf, tmp_path / "hf")

  def broken_save(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(checkpoint.ocp.partial, "finalize", broken_save)
  with pytest.raises(OSError, match="disk full"):
    _import(tmp_path / "hf", tmp_path / "out")
  assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_load_rejects_incomplete_directories(tmp_path, hf):
  _import(fx.save_hf(hf, tmp_path / "hf"), tmp_path / "ok")
  with pytest.raises(checkpoint.CheckpointError, match=r"jbtx\.json is missing"):
    checkpoint.load(tmp_path / "hf")
  record = json.loads((tmp_path / "ok" / "jbtx.json").read_text())
  (tmp_path / "ok" / "jbtx.json").write_text(json.dumps(record | {"model": {"d_model": 1}}))
  with pytest.raises(checkpoint.CheckpointError, match="missing required key"):
    checkpoint.load(tmp_path / "ok")


def test_cli_reports_errors_without_traceback(tmp_path, hf):
  fx.save_meta(hf, tmp_path / "meta")
  _edit_meta_shard(tmp_path / "meta", 1, lambda s: s["layers.0.ffn_norm.weight"].add_(1))
  result = subprocess.run([sys.executable, "-m", "jbtx.convert", "import",
                           f"--source={tmp_path / 'meta'}", f"--output={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert "error: shards disagree on replicated tensor 'layers.0.ffn_norm.weight'" in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "out").exists()


def test_cli_import_and_export(tmp_path, hf):
  fx.save_meta(hf, tmp_path / "meta")
  for args in (["import", f"--source={tmp_path / 'meta'}", f"--output={tmp_path / 'j'}",
                "--dtype=bfloat16"],
               ["export", f"--checkpoint={tmp_path / 'j'}", f"--output={tmp_path / 'hf'}"]):
    result = subprocess.run([sys.executable, "-m", "jbtx.convert", *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert config["torch_dtype"] == "bfloat16" and config["num_key_value_heads"] == 2
  reloaded = fx.transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
  assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
