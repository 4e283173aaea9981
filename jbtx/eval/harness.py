r"""An lm-evaluation-harness model for jbtx checkpoints (`pip install -e ".[eval]"`).

    python -m jbtx.eval.harness --model_args workdir=runs/btx,stage=finetune \
        --tasks arc_easy,gsm8k [any other lm_eval flag]

or from Python, after importing this module (which registers the model as "jbtx"):

    import lm_eval, jbtx.eval.harness
    lm_eval.simple_evaluate(model="jbtx", model_args="workdir=runs/btx,stage=finetune",
                            tasks=["arc_easy"])

`lm_eval` 0.4 finds models only in its own registry, so the bare `lm_eval` command
cannot see this one; `python -m jbtx.eval.harness` is that command with the model
registered (and `--model jbtx` implied). Model arguments: `workdir`, `stage` (any
checkpointed model of the workdir, as `python -m jbtx.eval --stage` names them;
default finetune, the BTX model), `batch_size` (default 16), `max_gen_toks` (default
256). The model is sharded over the workdir experiment's mesh
(`--config.mesh.*` of the training run); every request runs through the same code as
jbtx's own evaluation: `jbtx.eval.likelihood` for `loglikelihood` and
`loglikelihood_rolling`, `jbtx.eval.tasks.generate_continuations` (greedy, with the KV
cache) for `generate_until`.
"""

from __future__ import annotations

import functools
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from jbtx import checkpoint, parallel
from jbtx.btx import eval_stage
from jbtx.btx.workdir import Paths
from jbtx.config import ConfigError, ExperimentConfig, from_mapping
from jbtx.data import pipeline
from jbtx.eval.evaluate import workdir_config
from jbtx.eval.generate import generate_ragged
from jbtx.eval.likelihood import encode_pair, make_scorer, pair_log_likelihoods
from jbtx.eval.tasks import generate_continuations
from jbtx.models.llama import Llama, abstract_params
from jbtx.training.evaluation import host_params

_GREEDY_KEYS = ("until", "max_gen_toks", "do_sample", "temperature")


def _cut(text: str, until: Sequence[str]) -> str:
  """`text` up to the first of the stop strings `until`."""
  for stop in until:
    if stop:
      text = text.split(stop, 1)[0]
  return text


@register_model("jbtx")
class JbtxLM(LM):
  """A checkpoint of a jbtx workdir as an `lm_eval` model."""

  def __init__(self, workdir: str, stage: str = "finetune", batch_size: int | str = 16,
               max_gen_toks: int = 256, **unused: Any):
    super().__init__()
    del unused  # lm_eval passes device=… and the like, which the mesh decides here
    workdir_path = pathlib.Path(workdir).absolute()
    config = from_mapping(ExperimentConfig, workdir_config(workdir_path))
    row = eval_stage.row_of(config, stage)
    models = eval_stage.checkpoint_rows(config, Paths(config, workdir_path))
    if row not in models:
      raise ConfigError("stage", f"{stage!r} is not one checkpoint (BTM's ensembles are "
                        "evaluated by python -m jbtx.eval); choose one of "
                        f"{', '.join(models)}")
    directory = models[row]
    model_config = checkpoint.load_config(directory)
    self._model = Llama(model_config)
    self._mesh = parallel.make_mesh(config.mesh)
    params = jax.device_put(checkpoint.load_params_for(directory, model_config),
                            parallel.param_shardings(abstract_params(self._model), self._mesh))
    self._score = make_scorer(self._model, params, self._mesh)
    self._generate = functools.partial(generate_ragged, self._model, host_params(params))
    self._tokenizer = pipeline.make_tokenizer(config.data)
    self._max_len = model_config.max_seq_len
    shards = parallel.batch_shards(self._mesh)
    self._batch_size = -(-int(batch_size if batch_size != "auto" else 16) // shards) * shards
    self._max_gen_toks = int(max_gen_toks)

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    """(log p(continuation | context), greedy) of each request's `(context, continuation)`."""
    pairs = [encode_pair(self._tokenizer, *request.args) for request in requests]
    return pair_log_likelihoods(self._score, pairs, self._batch_size, self._max_len,
                                self._tokenizer.pad_id)

  def loglikelihood_rolling(self, requests) -> list[float]:
    """log p(text) of each request's `(text,)`, in disjoint windows of the model's length
    (the first conditioned on BOS), as lm-eval defines it."""
    windows, owners = [], []
    for index, request in enumerate(requests):
      ids = [int(i) for i in self._tokenizer.encode(request.args[0], add_bos=False)]
      for window in lm_utils.get_rolling_token_windows(
          token_list=ids, prefix_token=int(self._tokenizer.bos_id),
          max_seq_len=self._max_len - 1, context_len=1):
        windows.append(lm_utils.make_disjoint_window(window))
        owners.append(index)
    totals = [0.0] * len(requests)
    scores = pair_log_likelihoods(self._score, windows, self._batch_size, self._max_len,
                                  self._tokenizer.pad_id, desc="rolling log-likelihood")
    for owner, (value, _) in zip(owners, scores, strict=True):
      totals[owner] += value
    return totals

  def generate_until(self, requests) -> list[str]:
    """Greedy continuations of each request's context, cut at its `until` strings."""
    groups: dict[tuple, list[int]] = {}
    for index, request in enumerate(requests):
      kwargs = request.args[1]
      unknown = sorted(set(kwargs) - set(_GREEDY_KEYS))
      if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) or unknown:
        raise ValueError(f"jbtx's lm_eval model decodes greedily; got generation kwargs "
                         f"{kwargs} (unsupported: do_sample/temperature > 0 "
                         f"{', '.join(unknown)})".rstrip())
      until = kwargs.get("until", [])
      until = (until,) if isinstance(until, str) else tuple(until)
      groups.setdefault((until, int(kwargs.get("max_gen_toks", self._max_gen_toks))),
                        []).append(index)
    outputs = [""] * len(requests)
    for (until, max_tokens), indices in groups.items():
      prompts = [requests[i].args[0] for i in indices]
      texts = generate_continuations(self._generate, self._tokenizer, prompts, max_tokens,
                                     self._batch_size)
      for i, text in zip(indices, texts, strict=True):
        outputs[i] = _cut(text, until)
    return outputs


def main(argv: Sequence[str]) -> None:
  """lm_eval's command line with this model registered and `--model jbtx` implied."""
  from lm_eval.__main__ import cli_evaluate

  argv = list(argv)
  if not any(a == "--model" or a.startswith("--model=") for a in argv):
    argv = ["--model", "jbtx", *argv]
  sys.argv = ["lm_eval", *argv]
  cli_evaluate()


if __name__ == "__main__":
  main(sys.argv[1:])
