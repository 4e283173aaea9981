"""`python -m jbtx.eval` on a finished BTX workdir: the eval stage's numbers from the
same code, task files, perplexity checked against an independent computation."""

import dataclasses
import itertools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbtx
from jbtx.config import ConfigError, EvalConfig, ExperimentConfig, from_mapping
from jbtx.data import loader
from jbtx.eval import ensembles
from jbtx.inference import likelihood
from jbtx.pipeline.stages.evaluation import evaluate_workdir, row_of
from jbtx.pipeline.workdir import workdir_config
from tests.training_runs import btx_run, run_env  # noqa: F401 (fixtures)


def _config(workdir, **eval_settings) -> ExperimentConfig:
  """The workdir's experiment with 8 rows per batch (the 8 simulated devices here)."""
  config = from_mapping(ExperimentConfig, workdir_config(workdir))
  return dataclasses.replace(config, data=dataclasses.replace(config.data, batch_size=8),
                             eval=EvalConfig(**eval_settings))


def _task_files(config, directory):
  """An exact-match file (demo math items) and a multiple-choice one (knowledge answers
  against another item's answer), as a user writes them."""
  math = loader.eval_tasks(config.data, "math", "validation")[:3]
  knowledge = loader.eval_tasks(config.data, "knowledge", "validation")[:4]
  sums = directory / "sums.jsonl"
  sums.write_text("".join(json.dumps(t) + "\n" for t in math))
  choices = directory / "capitals.jsonl"
  choices.write_text("".join(json.dumps({
      "prompt": t["prompt"], "choices": [" " + t["answer"], " " + other["answer"]],
      "answer": i % 2 and 0}) + "\n" for i, (t, other) in enumerate(
          zip(knowledge, knowledge[1:] + knowledge[:1], strict=True))))
  return sums, choices


def test_the_cli_gives_the_eval_stages_row_of_one_stage(btx_run, run_env, tmp_path):  # noqa: F811
  out = tmp_path / "btx.json"
  result = subprocess.run([sys.executable, "-m", "jbtx.eval", f"--workdir={btx_run}",
                           "--stage=finetune", f"--output={out}"],
                          capture_output=True, text=True, env=run_env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "ppl code" in result.stdout and f"results in {out}" in result.stdout
  rows = json.loads(out.read_text())["rows"]
  stage = json.loads((btx_run / "results.json").read_text())["rows"]["btx"]
  assert list(rows) == ["btx"]
  for domain, values in stage["domains"].items():
    assert rows["btx"]["domains"][domain]["loss"] == pytest.approx(values["loss"], rel=1e-6)
  assert rows["btx"]["tasks"] == stage["tasks"]
  assert rows["btx"]["compute"] == stage["compute"]


def _independent_perplexity(config, directory, domain):
  """exp(mean NLL) over the valid targets of the domain's eval batches, from logits."""
  model, params = jbtx.load(directory)
  total = count = 0.0
  for batch in itertools.islice(loader.eval_batches(config.data, "validation",
                                                      domain=domain),
                                config.train.eval_batches):
    logits = model.apply({"params": params}, jnp.asarray(batch["tokens"]),
                         positions=jnp.asarray(batch["positions"]),
                         segment_ids=jnp.asarray(batch["segment_ids"]))
    log_probs = np.asarray(jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32)))
    targets, segments = batch["tokens"][:, 1:], batch["segment_ids"]
    valid = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
    nll = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    total, count = total + float(nll[valid].sum()), count + float(valid.sum())
  return float(np.exp(total / count))


def test_perplexity_and_task_files_match_independent_computations(btx_run, tmp_path):  # noqa: F811
  config = _config(btx_run)
  sums, choices = _task_files(config, tmp_path)
  config = _config(btx_run, tasks=(str(sums), str(choices)), max_new_tokens=16)
  output = evaluate_workdir(config, btx_run, "seed", tmp_path / "seed.json")
  row = json.loads(output.read_text())["rows"]["seed"]
  for domain in ("code", "knowledge"):
    assert row["domains"][domain]["perplexity"] == pytest.approx(
        _independent_perplexity(config, btx_run / "seed", domain), rel=1e-5)
  assert set(row["tasks"]) == {"math", "knowledge", "sums", "capitals"}
  assert row["tasks"]["sums"]["n"] == 3

  model, params = jbtx.load(btx_run / "seed")
  tokenizer = loader.make_tokenizer(config.data)
  expected = []
  for line in choices.read_text().splitlines():
    item = json.loads(line)
    values = []
    for choice in item["choices"]:
      context, continuation = likelihood.encode_pair(tokenizer, item["prompt"], choice)
      ids = jnp.asarray([[*context, *continuation]], jnp.int32)
      log_probs = jax.nn.log_softmax(model.apply({"params": params}, ids)[0, :-1], axis=-1)
      picked = np.asarray(log_probs)[np.arange(ids.shape[1] - 1), np.asarray(ids[0, 1:])]
      values.append(float(picked[len(context) - 1:].sum()))
    expected.append(values)
  capitals = row["tasks"]["capitals"]
  np.testing.assert_allclose(capitals["log_likelihoods"], expected, rtol=1e-5, atol=1e-5)
  answers = [json.loads(line)["answer"] for line in choices.read_text().splitlines()]
  assert capitals["correct"] == sum(int(np.argmax(v)) == a
                                    for v, a in zip(expected, answers, strict=True))


def test_bad_stages_and_workdirs_are_named(btx_run, tmp_path):  # noqa: F811
  config = _config(btx_run)
  with pytest.raises(ConfigError, match=r"'upcycle' is not a model of this experiment.*"
                     r"seed, code, math, btx"):
    evaluate_workdir(config, btx_run, "upcycle", None)
  with pytest.raises(ConfigError, match=r"config key 'workdir'.*config\.json not found"):
    workdir_config(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"seed": 0}))
  with pytest.raises(ConfigError, match="model"):
    workdir_config(tmp_path)
  with pytest.raises(ConfigError, match=r"'stage': expert/math not complete"):
    evaluate_workdir(config, tmp_path, "math", None)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "x"}\n')
  with pytest.raises(ConfigError, match=r"eval\.tasks.*bad\.jsonl:1"):
    evaluate_workdir(_config(btx_run, tasks=(str(bad),)), btx_run, "seed", tmp_path / "x.json")
  assert not (tmp_path / "x.json").exists()
  assert row_of(config, "expert/code") == "code"


def test_btm_ensembles_score_task_files_and_cbtm_skips_multiple_choice(btx_run, tmp_path):  # noqa: F811
  sums, choices = _task_files(_config(btx_run), tmp_path)
  config = _config(btx_run, tasks=(str(sums), str(choices)), max_new_tokens=8)
  config = dataclasses.replace(config, btx=dataclasses.replace(config.btx, task_examples=0))
  model, stacked = ensembles.stacked_members(config, [btx_run / "expert" / d
                                                      for d in ("code", "math")])
  tasks = ensembles._ensemble_tasks(config, model, stacked, top_k=1)
  assert set(tasks) == {"sums", "capitals"}
  assert tasks["sums"]["n"] == 3 and tasks["capitals"]["n"] == 4
  assert np.all(np.isfinite(tasks["capitals"]["log_likelihoods"]))
  uniform = lambda texts: np.full((len(texts), 2), 0.5)
  assert set(ensembles._ensemble_tasks(config, model, stacked, 1, uniform)) == {"sums"}
