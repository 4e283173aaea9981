"""The lm-evaluation-harness adapter, run through `lm_eval.simple_evaluate` on local
task YAMLs and data written here, scores items exactly as jbtx's own evaluation does."""

import functools
import json
import os
import textwrap

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before lm_eval imports datasets
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import lm_eval
import numpy as np
from lm_eval.tasks import TaskManager

import jbtx
import jbtx.eval.harness  # registers the "jbtx" model
from jbtx import parallel
from jbtx.config import ExperimentConfig, MeshConfig, from_mapping
from jbtx.data import pipeline
from jbtx.eval import likelihood
from jbtx.eval.__main__ import workdir_config
from jbtx.eval.generate import generate_ragged
from jbtx.eval.tasks import generate_continuations, score_tasks
from tests.training_runs import btx_run, run_env  # noqa: F401 (fixtures)

UTILS = """
from jbtx.eval.tasks import is_correct


def process_results(doc, results):
  return {"exact_match": float(is_correct(doc, results[0]))}
"""


def _task(directory, name, data, body):
  path = directory / f"{name}.jsonl"
  path.write_text("".join(json.dumps(item) + "\n" for item in data))
  (directory / f"{name}.yaml").write_text(textwrap.dedent(f"""\
      task: {name}
      dataset_path: json
      dataset_kwargs:
        data_files:
          test: {path}
      test_split: test
      doc_to_text: "{{{{prompt}}}}"
      """) + textwrap.dedent(body))


def test_lm_eval_scores_local_tasks_as_jbtx_does(btx_run, tmp_path):  # noqa: F811
  config = from_mapping(ExperimentConfig, workdir_config(btx_run))
  math = pipeline.eval_tasks(config.data, "math", "validation")[:3]
  knowledge = pipeline.eval_tasks(config.data, "knowledge", "validation")[:3]
  others = knowledge[1:] + knowledge[:1]
  choices = [{"prompt": t["prompt"], "choices": [" " + t["answer"], " " + o["answer"], " no"],
              "answer": i % 3} for i, (t, o) in enumerate(zip(knowledge, others, strict=True))]
  _task(tmp_path, "jbtx_choices", choices, """\
      output_type: multiple_choice
      doc_to_choice: "{{choices}}"
      doc_to_target: "{{answer}}"
      target_delimiter: ""
      metric_list:
        - metric: acc
      """)
  (tmp_path / "utils.py").write_text(UTILS)
  _task(tmp_path, "jbtx_math", math, """\
      output_type: generate_until
      doc_to_target: "{{answer}}"
      generation_kwargs:
        until: ["\\n\\n"]
        max_gen_toks: 12
        do_sample: false
      process_results: !function utils.process_results
      metric_list:
        - metric: exact_match
          aggregation: mean
          higher_is_better: true
      """)
  results = lm_eval.simple_evaluate(
      model="jbtx", model_args=f"workdir={btx_run},stage=seed,batch_size=8",
      tasks=["jbtx_choices", "jbtx_math"], task_manager=TaskManager(include_path=str(tmp_path)),
      log_samples=True)

  model, params = jbtx.load(btx_run / "seed")
  tokenizer = pipeline.make_tokenizer(config.data)
  mesh = parallel.make_mesh(MeshConfig())
  score = likelihood.make_scorer(model, jax.device_put(params), mesh)
  ours = likelihood.multiple_choice(score, tokenizer, choices, batch_size=8, max_len=256)
  samples = sorted(results["samples"]["jbtx_choices"], key=lambda s: s["doc_id"])
  theirs = [[float(r[0][0]) for r in s["resps"]] for s in samples]
  np.testing.assert_allclose(theirs, ours["log_likelihoods"], rtol=1e-6, atol=1e-6)
  assert results["results"]["jbtx_choices"]["acc,none"] == ours["accuracy"]

  generate = functools.partial(generate_ragged, model, params)
  outputs = generate_continuations(generate, tokenizer, [t["prompt"] for t in math], 12, 8)
  samples = sorted(results["samples"]["jbtx_math"], key=lambda s: s["doc_id"])
  assert [s["resps"][0][0] for s in samples] == [o.split("\n\n")[0] for o in outputs]
  assert results["results"]["jbtx_math"]["exact_match,none"] == score_tasks(
      generate, tokenizer, math, 12, 8)["accuracy"]
