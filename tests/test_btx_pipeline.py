"""The BTX pipeline end to end on a shrunken demo (tests/btx_short.py): stages, results,
compute accounting, kill -9 and rerun, experts as independent jobs, refusal of a
workdir made by another experiment, and the Mixtral export against transformers."""

import dataclasses
import json
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

import jbtx
from jbtx.config import ConfigError, ExperimentConfig, from_mapping
from jbtx.eval import curve_plot
from jbtx.interop import checkpoint
from jbtx.models.llama import unstack_layers
from jbtx.pipeline import runner
from jbtx.pipeline.stages import evaluation
from jbtx.pipeline.workdir import workdir_config
from tests import btx_short
from tests.training_runs import (
  btx,
  btx_command,
  btx_run,  # noqa: F401 (fixture)
  run_env,  # noqa: F401 (fixture)
)

MODELS = ("seed", "code", "math", "btx")


def _params(directory):
  return checkpoint.load_params(directory, as_numpy=True)


def _assert_same_params(a, b):
  equal = jax.tree.map(np.array_equal, a, b)
  assert all(jax.tree.leaves(equal)), equal


def test_pipeline_runs_every_stage_and_writes_the_results_table(btx_run):  # noqa: F811
  output = (btx_run / "output.txt").read_text()
  for i, stage in enumerate(["seed", "expert/code", "expert/math", "mix", "finetune", "eval",
                             "export"], start=1):
    assert f"[btx] stage {i}/7 {stage}: starting" in output
    assert f"[btx] stage {i}/7 {stage}: done in " in output
  results = json.loads((btx_run / "results.json").read_text())
  rows = results["rows"]
  assert tuple(rows) == MODELS
  for row in rows.values():
    assert set(row["domains"]) == {"code", "math", "knowledge", "general"}
    assert set(row["tasks"]) == {"math", "knowledge"}
    assert all(t["n"] == 4 for t in row["tasks"].values())
    for domain in row["domains"].values():
      assert domain["perplexity"] == pytest.approx(np.exp(domain["loss"]))
  assert "ppl code" in output and "train FLOPs" in output  # the printed table
  assert "[eval] btx: share of each domain's tokens whose top-1 expert is its own" in output
  routing = json.loads((btx_run / "eval" / "btx" / "routing.json").read_text())
  assert set(routing) == {"code", "math", "knowledge", "general"}
  assert np.asarray(routing["code"]["top1_load"]).shape == (2, 3)  # layers, experts
  for plot in ("layer_loads", "domain_experts", "tokens"):  # PNGs, not empty
    assert (btx_run / "eval" / "btx" / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (btx_run / "eval" / "btx" / f"{plot}.png").stat().st_size > 5000

  # Each expert trained on its own domain only, from the seed.
  for name in ("code", "math"):
    record = checkpoint.read_record(btx_run / "expert" / name)
    assert set(record["metrics"]["validation"]["domains"]) == {name}
    assert rows[name]["domains"][name]["loss"] < rows["seed"]["domains"][name]["loss"]

  # Compute: 6 steps x 4 x 32 tokens per stage; BTX counts its experts and the finetune.
  compute = {name: rows[name]["compute"] for name in MODELS}
  assert all(compute[name]["tokens"] == 6 * 4 * 32 for name in ("seed", "code", "math"))
  finetune = checkpoint.read_record(btx_run / "finetune")["metrics"]["compute"]
  assert compute["btx"]["flops"] == pytest.approx(
      compute["code"]["flops"] + compute["math"]["flops"] + finetune["flops"])
  assert finetune["flops"] > compute["seed"]["flops"]  # top-2 of 3 experts: more active FFN


def test_mixed_model_has_the_experts_ffns_and_averaged_rest(btx_run):  # noqa: F811
  mixed = _params(btx_run / "mix")
  dense = [_params(btx_run / d) for d in ("expert/code", "expert/math", "seed")]
  config = checkpoint.load_config(btx_run / "mix")
  assert config.moe.n_experts == 3 and config.moe.top_k == 2 and not config.scan_layers
  for layer in range(config.n_layers):
    moe = mixed[f"layers_{layer}"]["moe"]
    for i, expert in enumerate(dense):
      for name in ("gate", "up", "down"):
        np.testing.assert_array_equal(moe[name][i],
                                      expert["layers"]["mlp"][name]["kernel"][layer])
    np.testing.assert_allclose(  # float32 accumulation of a 3-way mean
        mixed[f"layers_{layer}"]["attn"]["q"]["kernel"],
        np.mean([d["layers"]["attn"]["q"]["kernel"][layer] for d in dense], axis=0), rtol=1e-6,
        atol=1e-7)
  np.testing.assert_allclose(mixed["embed"]["embedding"],
                             np.mean([d["embed"]["embedding"] for d in dense], axis=0),
                             rtol=1e-6, atol=1e-7)


def test_a_complete_pipeline_is_skipped_and_a_changed_experiment_refused(
    btx_run, run_env, tmp_path):  # noqa: F811
  workdir = tmp_path / "copy"
  shutil.copytree(btx_run, workdir)
  again = btx(workdir, run_env)
  assert again.returncode == 0, again.stderr
  assert again.stdout.count("already complete") == 7
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}

  changed = btx(workdir, run_env, "--config.btx.moe.top_k=1")  # the CLI's exit and message
  assert changed.returncode == 2
  assert "config key 'model.moe.top_k'" in changed.stderr
  assert "mix was made by another experiment" in changed.stderr
  with pytest.raises(ConfigError, match=r"'train\.steps'.*expert/math was made by another"):
    _run_in_process(workdir, lambda c: c.btx.experts.math.update(steps=7))
  after = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
  assert after == before  # nothing written

  (workdir / "expert" / "code" / "stage.json").write_text("{")  # a damaged record
  with pytest.raises(ConfigError, match=r"expert/code/stage\.json is not a stage record"):
    _run_in_process(workdir, lambda c: None)


def _run_in_process(workdir, mutate):
  """The pipeline on tests/btx_short.py changed by `mutate`, in this process (for runs
  refused before anything is computed)."""
  config = btx_short.get_config()
  mutate(config)
  runner.run(from_mapping(ExperimentConfig, config), workdir)


def test_experts_trained_as_separate_jobs_mix_into_the_same_model(
    btx_run, run_env, tmp_path):  # noqa: F811
  hosts = {}
  for expert in ("code", "math"):
    hosts[expert] = tmp_path / f"host_{expert}"
    shutil.copytree(btx_run / "seed", hosts[expert] / "seed")
    result = btx(hosts[expert], run_env, f"--config.btx.only=expert/{expert}")
    assert result.returncode == 0, result.stderr
    assert not (hosts[expert] / "mix").exists()  # one stage, then exit
  mixer = tmp_path / "mixer"
  shutil.copytree(btx_run / "seed", mixer / "seed")
  for expert, host in hosts.items():
    shutil.copytree(host / "expert" / expert, mixer / "expert" / expert)
  result = btx(mixer, run_env, "--config.btx.only=mix")
  assert result.returncode == 0, result.stderr
  _assert_same_params(_params(mixer / "mix"), _params(btx_run / "mix"))

  missing = btx(tmp_path / "empty", run_env, "--config.btx.only=mix")
  assert missing.returncode == 2 and "stage mix needs seed, expert/code" in missing.stderr


def _complete_steps(directory):
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _kill_when(workdir, env, ready, *extra):
  """Starts the pipeline and kills it (-9) as soon as `ready()` holds."""
  process = subprocess.Popen(btx_command(workdir, *extra), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env)
  deadline = time.monotonic() + 600
  while not ready():
    if process.poll() is not None or time.monotonic() > deadline:
      process.kill()
      pytest.fail(f"the run ended before the kill:\n{process.communicate()[0][-3000:]}")
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()


def test_kill9_during_expert_mix_and_finetune_then_rerun_gives_the_same_result(
    btx_run, run_env, tmp_path):  # noqa: F811
  expert = tmp_path / "expert" / "math"
  _kill_when(tmp_path, run_env, lambda: _complete_steps(expert / "checkpoints"))
  assert not (expert / checkpoint.CONFIG_FILE).exists()  # killed inside the stage

  # What a mix killed midway leaves: its identity, a half-written staging directory and
  # Orbax's temporary files. The rerun must discard them and mix again.
  (tmp_path / "mix").mkdir()
  shutil.copy(btx_run / "mix" / "stage.json", tmp_path / "mix" / "stage.json")
  shutil.copytree(btx_run / "mix" / "params", tmp_path / "mix" / "model" / "params")
  shutil.rmtree(tmp_path / "mix" / "model" / "params" / "state")
  (tmp_path / "mix" / ".model.partial-0123abcd").mkdir()

  finetune = tmp_path / "finetune"
  _kill_when(tmp_path, run_env, lambda: _complete_steps(finetune / "checkpoints"))
  assert not (finetune / checkpoint.CONFIG_FILE).exists()
  assert (tmp_path / "mix" / checkpoint.CONFIG_FILE).exists()
  assert not (tmp_path / "mix" / "model").exists()
  assert not list((tmp_path / "mix").glob(".model.partial-*"))

  result = btx(tmp_path, run_env)
  assert result.returncode == 0, result.stderr
  assert "[finetune] resuming from step" in result.stdout
  _assert_same_params(_params(tmp_path / "finetune"), _params(btx_run / "finetune"))
  assert (json.loads((tmp_path / "results.json").read_text())
          == json.loads((btx_run / "results.json").read_text()))


def test_exported_model_gives_jbtx_logits_in_transformers(btx_run):  # noqa: F811
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf = transformers.MixtralForCausalLM.from_pretrained(btx_run / "hf", torch_dtype=torch.float32)
  hf.eval()
  model, params = jbtx.load(btx_run / "finetune")
  tokens = np.random.default_rng(0).integers(3, 259, (2, 24)).astype(np.int32)
  ours = np.asarray(model.apply({"params": params}, tokens))
  with torch.no_grad():
    theirs = hf(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def _seed_and_experts(run, workdir):
  for stage in ("seed", "expert/code", "expert/math"):
    shutil.copytree(run / stage, workdir / stage)


def test_a_converted_seed_checkpoint_is_used_instead_of_training_one(
    btx_run, run_env, tmp_path):  # noqa: F811
  converted = tmp_path / "converted"
  model, params = jbtx.load(btx_run / "seed")
  unrolled = dataclasses.replace(model.config, scan_layers=False)  # as `convert` may write
  checkpoint.save(converted, unrolled, unstack_layers(jax.device_get(params)))
  result = btx(tmp_path / "run", run_env, f"--config.btx.seed_checkpoint={converted}",
               "--config.btx.only=expert/code")
  assert result.returncode == 0, result.stderr
  assert not (tmp_path / "run" / "seed").exists()
  _assert_same_params(_params(tmp_path / "run" / "expert" / "code"),
                      _params(btx_run / "expert" / "code"))

  wrong = btx(tmp_path / "wrong", run_env, f"--config.btx.seed_checkpoint={converted}",
              "--config.model.d_ff=64")
  assert wrong.returncode == 2
  assert "config key 'model.d_ff': the seed checkpoint" in wrong.stderr


def test_a_trained_seed_checkpoint_is_checked_against_its_recorded_losses(
    btx_run, run_env, tmp_path):  # noqa: F811
  """The shipped demo seed's case: a jbtx-trained seed records its validation losses;
  the seed stage measures them again before anything starts from it."""
  seed = f"--config.btx.seed_checkpoint={btx_run / 'seed'}"
  result = btx(tmp_path / "run", run_env, seed, "--config.btx.only=seed")
  assert result.returncode == 0, result.stderr
  check = json.loads((tmp_path / "run" / "seed" / "check.json").read_text())
  recorded = checkpoint.read_record(btx_run / "seed")["metrics"]["validation"]["domains"]
  assert set(check) == set(recorded) == {"code", "general", "knowledge", "math"}
  for domain, losses in check.items():
    assert losses["recorded"] == recorded[domain]
    assert losses["measured"] == pytest.approx(recorded[domain], rel=1e-4)
  assert "[seed] " in result.stdout and "validation loss as recorded on code" in result.stdout
  again = btx(tmp_path / "run", run_env, seed, "--config.btx.only=seed")
  assert "[btx] stage 1/7 seed: already complete" in again.stdout

  other = btx(tmp_path / "other", run_env, seed, "--config.btx.only=seed",
              "--config.train.eval_batches=2")  # other validation batches than recorded
  assert other.returncode == 2
  assert "config key 'btx.seed_checkpoint':" in other.stderr
  assert "set btx.check_seed=False" in other.stderr
  assert not (tmp_path / "other" / "seed" / "check.json").exists()
  unchecked = btx(tmp_path / "other", run_env, seed, "--config.btx.only=expert/code",
                  "--config.train.eval_batches=2", "--config.btx.check_seed=False")
  assert unchecked.returncode == 0, unchecked.stderr


def test_finetune_variants_are_overrides_of_the_stage(btx_run, run_env, tmp_path):  # noqa: F811
  _seed_and_experts(btx_run, tmp_path)
  result = btx(tmp_path, run_env, "--config.btx.moe.routing=sample_top1",
               "--config.optimizer.freeze=experts", "--config.btx.moe.load_balance_coef=0",
               "--config.btx.router_init=hidden")
  assert result.returncode == 0, result.stderr
  assert "[btx] stage 1/7 seed: already complete" in result.stdout
  assert "[export] skipped: routing 'sample_top1'" in result.stdout
  assert not (tmp_path / "hf" / "config.json").exists()
  config = checkpoint.load_config(tmp_path / "finetune")
  assert config.moe.routing == "sample_top1" and config.moe.load_balance_coef == 0
  mixed, tuned = _params(tmp_path / "mix"), _params(tmp_path / "finetune")
  for layer in range(config.n_layers):  # frozen experts; the router trained
    for name in ("gate", "up", "down"):
      np.testing.assert_array_equal(tuned["layers"]["moe"][name][layer],
                                    mixed[f"layers_{layer}"]["moe"][name])
  assert not np.array_equal(tuned["layers"]["moe"]["router"][0],
                            mixed["layers_0"]["moe"]["router"])
  assert set(json.loads((tmp_path / "results.json").read_text())["rows"]) == set(MODELS)


@pytest.fixture(scope="module")
def joined(btx_run, run_env, tmp_path_factory):  # noqa: F811
  """The finished run with all five baselines added (one evaluation): BTM on the experts,
  upcycling, dense, LLaMA-MoE split from the seed with residual experts and dynamic
  domain weights, OLMoE from scratch with the seed's FLOPs as well; and its output."""
  workdir = tmp_path_factory.mktemp("joined") / "run"
  shutil.copytree(btx_run, workdir)
  result = btx(workdir, run_env,
               "--config.btx.baselines=('btm', 'upcycle', 'dense', 'llama_moe', 'olmoe')",
               "--config.llama_moe.split=sharing_inter", "--config.llama_moe.shared_experts=8",
               "--config.llama_moe.reweighting=loss", "--config.llama_moe.reweight_every=4",
               "--config.btx.task_examples=0")  # perplexity only: decoding costs compiles
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return workdir, result.stdout


def test_baselines_join_a_finished_run_each_with_its_flops(btx_run, joined):  # noqa: F811
  workdir, out = joined
  for i, stage in enumerate(["upcycle", "dense", "llama_moe", "olmoe"], start=6):
    assert f"[btx] stage {i}/11 {stage}: starting" in out
  assert "eval's settings or inputs changed" in out and (workdir / "results.json.old").exists()
  assert "[btx] stage 11/11 export: already complete" in out
  assert "into 8 experts of 16 (sharing_inter)" in out
  assert "[llama_moe] neuron importance over 4 batches of each of code, general" in out
  assert "[llama_moe] domain weights code" in out  # re-weighted every 4 steps

  rows = json.loads((workdir / "results.json").read_text())["rows"]
  btm = ("btm top-1", "btm top-2", "btm average", "btm posterior average")
  assert tuple(rows) == (*MODELS[:-1], *btm, "upcycle", "dense", "llama_moe", "olmoe", "btx")
  expert_flops = sum(rows[n]["compute"]["flops"] for n in ("code", "math"))
  assert all(rows[n]["compute"]["flops"] == expert_flops for n in btm)
  weights = rows["btm posterior average"]["weights"]
  assert set(weights) == {"code", "general", "knowledge", "math"}
  assert all(sum(w.values()) == pytest.approx(1.0) and set(w) == {"code", "math", "seed"}
             for w in weights.values())
  assert weights["math"]["math"] > weights["math"]["code"]  # math text favours the math expert
  before = json.loads((btx_run / "results.json").read_text())["rows"]["btx"]
  assert rows["btx"]["domains"] == before["domains"] and not rows["btx"]["tasks"]
  btx_flops, seed_flops = rows["btx"]["compute"]["flops"], rows["seed"]["compute"]["flops"]
  for name in ("upcycle", "dense", "llama_moe", "olmoe"):  # to within one of its steps
    budget = btx_flops + (seed_flops if name == "olmoe" else 0.0)
    steps = checkpoint.read_record(workdir / name)["metrics"]["steps"]
    assert abs(rows[name]["compute"]["flops"] - budget) <= rows[name]["compute"]["flops"] / steps
  assert checkpoint.load_config(workdir / "upcycle").moe.n_experts == 3
  split = checkpoint.load_config(workdir / "llama_moe")
  assert (split.moe.n_experts, split.moe.d_ff, split.moe.n_shared_experts) == (8, 16, 8)
  assert split.moe.output_scale == 4.0 and split.moe.router == "noisy_mlp"
  olmoe = checkpoint.load_config(workdir / "olmoe")
  assert olmoe.qk_norm and (olmoe.moe.n_experts, olmoe.moe.top_k, olmoe.moe.d_ff) == (16, 4, 64)
  assert not olmoe.moe.renormalize and olmoe.moe.routing == "softmax_topk"


def test_every_row_has_a_validation_curve_that_ends_at_its_flops_and_loss(joined):
  workdir, out = joined
  rows = json.loads((workdir / "results.json").read_text())["rows"]
  expert_flops = sum(rows[n]["compute"]["flops"] for n in ("code", "math"))
  for name, row in rows.items():
    flops = [p["flops"] for p in row["curve"]]
    assert flops == sorted(flops) and len(flops) >= 1, name
    assert flops[-1] == pytest.approx(row["compute"]["flops"], rel=1e-9), name
    last = row["curve"][-1]["domains"]
    for domain, loss in last.items():  # the stage's last validation is the eval's
      assert loss == pytest.approx(row["domains"][domain]["loss"], rel=1e-4), (name, domain)
  assert len(rows["btx"]["curve"]) == 2 and rows["btx"]["curve"][0]["flops"] == expert_flops
  assert rows["dense"]["curve"][0]["flops"] == 0.0
  assert set(rows["btx"]["curve"][0]["domains"]) == {"code", "general", "knowledge", "math"}

  methods = evaluation.methods(from_mapping(ExperimentConfig, workdir_config(workdir)), rows)
  assert methods == [n for n in rows if n not in ("seed", "code", "math")]
  figure = curve_plot.curves_figure({n: r["curve"] for n, r in rows.items()}, methods, "seed")
  average, *domains = figure.axes
  assert [t.get_text() for t in average.get_legend().get_texts()] == [*methods, "seed"]
  assert [ax.get_title() for ax in domains] == ["code", "general", "knowledge", "math"]
  assert (workdir / "eval" / "curves.png").stat().st_size > 10_000
  assert f"validation loss against training FLOPs: {workdir / 'eval' / 'curves.png'}" in out


ALONE = ("--config.btx.train_btx=False", "--config.btx.baselines=('upcycle', 'dense')",
         "--config.btx.task_examples=0")  # configs/upcycle.py and dense.py on the test budgets


def test_upcycle_and_dense_alone_killed_in_upcycle_rerun_to_the_joined_rows(
    btx_run, joined, run_env, tmp_path):  # noqa: F811
  """Without BTX's stages (they only set the budget), killed -9 while upcycling: the
  rerun resumes and gives the models and rows the baselines got joined to the full run."""
  shutil.copytree(btx_run / "seed", tmp_path / "seed")
  upcycle = tmp_path / "upcycle"
  _kill_when(tmp_path, run_env, lambda: _complete_steps(upcycle / "checkpoints"), *ALONE)
  assert not (upcycle / checkpoint.CONFIG_FILE).exists()
  result = btx(tmp_path, run_env, *ALONE)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "[upcycle] resuming from step" in result.stdout
  assert not (tmp_path / "expert").exists() and not (tmp_path / "finetune").exists()
  reference = joined[0]
  for name in ("upcycle", "dense"):
    _assert_same_params(_params(tmp_path / name), _params(reference / name))
  rows = json.loads((tmp_path / "results.json").read_text())["rows"]
  full = json.loads((reference / "results.json").read_text())["rows"]
  assert tuple(rows) == ("seed", "upcycle", "dense")
  for name in rows:
    assert rows[name]["domains"] == full[name]["domains"]
    assert rows[name]["compute"] == full[name]["compute"]


CBTM = ("--config.btx.train_btx=False", "--config.btx.baselines=('btm',)",
        "--config.btm.clusters=2", "--config.btm.context_stride=8",
        "--config.btx.task_examples=0")  # the ensembles' decoding is tested in test_btm.py


def test_cbtm_alone_killed_in_a_cluster_expert_reruns_to_the_same_table(
    btx_run, run_env, tmp_path):  # noqa: F811
  reference, killed = tmp_path / "reference", tmp_path / "killed"
  for workdir in (reference, killed):  # the same seed: its identity ignores the btm group
    shutil.copytree(btx_run / "seed", workdir / "seed")
  result = btx(reference, run_env, *CBTM)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "[btx] stage 1/5 seed: already complete" in result.stdout
  for i, stage in enumerate(["clusters", "cluster/0", "cluster/1", "eval"], 2):
    assert f"[btx] stage {i}/5 {stage}: done" in result.stdout
  summary = json.loads((reference / "clusters" / "summary.json").read_text())
  assert abs(summary["documents"][0] - summary["documents"][1]) <= 1
  rows = json.loads((reference / "results.json").read_text())["rows"]
  assert tuple(rows) == ("seed", "c-btm top-1", "c-btm top-2")
  assert not (reference / "mix").exists() and not (reference / "expert").exists()

  _kill_when(killed, run_env,
             lambda: _complete_steps(killed / "cluster" / "1" / "checkpoints"), *CBTM)
  assert not (killed / "cluster" / "1" / checkpoint.CONFIG_FILE).exists()
  result = btx(killed, run_env, *CBTM)
  assert result.returncode == 0, result.stderr
  assert "[cluster/1] resuming from step" in result.stdout
  assert "[btx] stage 3/5 cluster/0: already complete" in result.stdout
  assert (json.loads((killed / "results.json").read_text())
          == json.loads((reference / "results.json").read_text()))
