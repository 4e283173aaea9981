"""An lm-evaluation-harness model over a jbtx model and its parameters.

    lm = HarnessModel(model, params, tokenizer, mesh, batch_size=16, max_gen_toks=256)
    lm.loglikelihood(requests); lm.loglikelihood_rolling(requests); lm.generate_until(requests)

Every request runs through the same code as jbtx's own evaluation:
`jbtx.inference.likelihood` for `loglikelihood` and `loglikelihood_rolling` (batched and
sharded over `mesh` as training shards the model), `jbtx.eval.tasks.generate_continuations`
(greedy, with the KV cache) for `generate_until`. `jbtx.eval.harness` registers it with
lm_eval as "jbtx", loaded from a workdir.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM

from jbtx.data.tokenizers import Tokenizer
from jbtx.eval.tasks import generate_continuations
from jbtx.inference.likelihood import encode_pair, make_scorer, pair_log_likelihoods
from jbtx.inference.sharded import make_generator
from jbtx.models.llama import Llama, abstract_params
from jbtx.runtime import sharding

_GREEDY_KEYS = ("until", "max_gen_toks", "do_sample", "temperature")


def _cut(text: str, until: Sequence[str]) -> str:
  """`text` up to the first of the stop strings `until`."""
  for stop in until:
    if stop:
      text = text.split(stop, 1)[0]
  return text


class HarnessModel(LM):
  """A jbtx model as an `lm_eval` model (greedy generation only)."""

  def __init__(self, model: Llama, params: Any, tokenizer: Tokenizer, mesh: Mesh,
               batch_size: int = 16, max_gen_toks: int = 256):
    """`params`: a host tree, placed on `mesh` as training shards it; `batch_size` is
    rounded up to split over the mesh's batch shards."""
    super().__init__()
    self._model, self._mesh, self._tokenizer = model, mesh, tokenizer
    params = jax.device_put(params, sharding.param_shardings(abstract_params(model), mesh))
    self._score = make_scorer(model, params, mesh)
    self._generate = make_generator(model, params, mesh)
    self._max_len = model.config.max_seq_len
    shards = sharding.batch_shards(mesh)
    self._batch_size = -(-int(batch_size) // shards) * shards
    self._max_gen_toks = int(max_gen_toks)

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    """(log p(continuation | context), greedy) of each request's `(context, continuation)`."""
    pairs = [encode_pair(self._tokenizer, *request.args) for request in requests]
    return pair_log_likelihoods(self._score, pairs, self._batch_size, self._max_len,
                                self._tokenizer.pad_id)

  def loglikelihood_rolling(self, requests) -> list[float]:
    """log p(text) of each request's `(text,)`, in disjoint windows of the model's length
    (the first conditioned on BOS, or on EOS for a model without BOS), as lm-eval
    defines it."""
    windows, owners = [], []
    bos = self._tokenizer.bos_id
    prefix = int(self._tokenizer.eos_id if bos is None else bos)
    for index, request in enumerate(requests):
      ids = [int(i) for i in self._tokenizer.encode(request.args[0], add_bos=False)]
      for window in lm_utils.get_rolling_token_windows(
          token_list=ids, prefix_token=prefix,
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
