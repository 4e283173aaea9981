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
from jbtx.config import ExperimentConfig, MeshConfig, from_mapping
from jbtx.data import loader
from jbtx.eval.tasks import generate_continuations, multiple_choice, score_tasks
from jbtx.inference import likelihood
from jbtx.inference.generate import generate_ragged
from jbtx.pipeline.workdir import workdir_config
from jbtx.runtime import sharding
from tests.training_runs import btx_run, run_env  # noqa: F401 (fixtures)

UTILS = """
from jbtx.eval.tasks import is_correct


def process_results(doc, results):
  return {"exact_match": float(is_correct(doc, results[0]))}
"""

MULTIPLE_CHOICE = """\
      output_type: multiple_choice
      doc_to_choice: "{{choices}}"
      doc_to_target: "{{answer}}"
      target_delimiter: ""
      metric_list:
        - metric: acc
      """


def _task(directory, name, data, body, text="prompt"):
  path = directory / f"{name}.jsonl"
  path.write_text("".join(json.dumps(item) + "\n" for item in data))
  (directory / f"{name}.yaml").write_text(textwrap.dedent(f"""\
      task: {name}
      dataset_path: json
      dataset_kwargs:
        data_files:
          test: {path}
      test_split: test
      doc_to_text: "{{{{{text}}}}}"
      """) + textwrap.dedent(body))


def test_lm_eval_scores_local_tasks_as_jbtx_does(btx_run, tmp_path):  # noqa: F811
  config = from_mapping(ExperimentConfig, workdir_config(btx_run))
  math = loader.eval_tasks(config.data, "math", "validation")[:3]
  knowledge = loader.eval_tasks(config.data, "knowledge", "validation")[:3]
  others = knowledge[1:] + knowledge[:1]
  choices = [{"prompt": t["prompt"], "choices": [" " + t["answer"], " " + o["answer"], " no"],
              "answer": i % 3} for i, (t, o) in enumerate(zip(knowledge, others, strict=True))]
  _task(tmp_path, "jbtx_choices", choices, MULTIPLE_CHOICE)
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
  code = loader.open_source(config.data, "code", "validation")
  documents = [{"text": code[0][:40]}, {"text": "".join(code[i] for i in range(8))[:700]}]
  _task(tmp_path, "jbtx_rolling", documents, """\
      output_type: loglikelihood_rolling
      doc_to_target: "{{text}}"
      metric_list:
        - metric: word_perplexity
      """, text="text")
  results = lm_eval.simple_evaluate(
      model="jbtx", model_args=f"workdir={btx_run},stage=seed,batch_size=8",
      tasks=["jbtx_choices", "jbtx_math", "jbtx_rolling"],
      task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)

  model, params = jbtx.load(btx_run / "seed")
  tokenizer = loader.make_tokenizer(config.data)
  mesh = sharding.make_mesh(MeshConfig())
  score = likelihood.make_scorer(model, jax.device_put(params), mesh)
  ours = multiple_choice(score, tokenizer, choices, batch_size=8, max_len=256)
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

  # Rolling: every token predicted once, windows of the model's length, the first after BOS.
  samples = sorted(results["samples"]["jbtx_rolling"], key=lambda s: s["doc_id"])
  for sample, document in zip(samples, documents, strict=True):
    ids = [tokenizer.bos_id, *tokenizer.encode(document["text"], add_bos=False)]
    np.testing.assert_allclose(float(np.ravel(sample["resps"][0])[0]),
                               _windowed_log_likelihood(model, params, ids), rtol=1e-5)


def _windowed_log_likelihood(model, params, ids: list[int]) -> float:
  """log p(ids[1:] | BOS): the first window the model's length from the start, then each
  later target once, with as much context before it as fits."""
  width = model.config.max_seq_len
  total, done = 0.0, 1  # ids[0] is BOS
  while done < len(ids):
    end = min(len(ids), done + width - 1)
    window = ids[max(0, end - width):end]
    logits = model.apply({"params": params}, np.asarray([window], np.int32))[0, :-1]
    log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    picked = log_probs[np.arange(len(window) - 1), window[1:]]
    total += float(picked[len(picked) - (end - done):].sum())
    done = end
  return total


def test_the_command_line_is_lm_evals_with_the_model_registered(btx_run, tmp_path, capsys):  # noqa: F811
  _task(tmp_path, "jbtx_yes_no", [{"prompt": "Is the sky blue?", "choices": [" yes", " no"],
                                   "answer": 0}], MULTIPLE_CHOICE)
  jbtx.eval.harness.main(["--model_args", f"workdir={btx_run},stage=seed", "--tasks",
                          "jbtx_yes_no", "--include_path", str(tmp_path)])
  printed = capsys.readouterr().out
  assert "jbtx_yes_no" in printed and "acc" in printed
