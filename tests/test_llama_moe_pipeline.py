"""LLaMA-MoE and OLMoE as rows of BTX's compute-matched table: both join a finished BTX
run (tests/btx_short.py), LLaMA-MoE split from its seed with shared residual experts
and dynamic domain weights, OLMoE from scratch with the seed's FLOPs as well."""

import json
import shutil

from jbtx import checkpoint
from tests.training_runs import (
    btx,
    btx_run,  # noqa: F401 (fixture)
    run_env,  # noqa: F401 (fixture)
)


def test_llama_moe_and_olmoe_join_a_finished_run_at_matched_flops(btx_run, run_env, tmp_path):  # noqa: F811
  workdir = tmp_path / "run"
  shutil.copytree(btx_run, workdir)
  result = btx(workdir, run_env, "--config.btx.baselines=('llama_moe', 'olmoe')",
               "--config.llama_moe.split=sharing_inter", "--config.llama_moe.shared_experts=3",
               "--config.llama_moe.reweighting=loss", "--config.llama_moe.reweight_every=4")
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  out = result.stdout
  assert "[btx] stage 6/9 llama_moe: starting" in out and "[btx] stage 7/9 olmoe" in out
  assert "into 8 experts of 32 (sharing_inter)" in out
  assert "[llama_moe] neuron importance over 4 batches of each of code, general" in out
  assert "[llama_moe] domain weights code" in out  # re-weighted every 4 steps

  rows = json.loads((workdir / "results.json").read_text())["rows"]
  assert tuple(rows) == ("seed", "code", "math", "llama_moe", "olmoe", "btx")
  btx_flops, seed_flops = rows["btx"]["compute"]["flops"], rows["seed"]["compute"]["flops"]
  for name, budget in [("llama_moe", btx_flops), ("olmoe", btx_flops + seed_flops)]:
    steps = checkpoint.read_record(workdir / name)["metrics"]["steps"]
    assert abs(rows[name]["compute"]["flops"] - budget) <= rows[name]["compute"]["flops"] / steps

  split = checkpoint.load_config(workdir / "llama_moe")
  assert (split.moe.n_experts, split.moe.d_ff, split.moe.n_shared_experts) == (8, 32, 3)
  assert split.moe.output_scale == 4.0 and split.moe.router == "noisy_mlp"
  olmoe = checkpoint.load_config(workdir / "olmoe")
  assert olmoe.qk_norm and (olmoe.moe.n_experts, olmoe.moe.top_k, olmoe.moe.d_ff) == (16, 4, 88)
  assert not olmoe.moe.renormalize and olmoe.moe.routing == "softmax_topk"
