"""Log-likelihoods of continuations, batched and sharded like training.

    score = make_scorer(model, params, mesh)
    pairs = [encode_pair(tokenizer, "The sky is", " blue"), ...]
    results = pair_log_likelihoods(score, pairs, batch_size=16, max_len=256, pad_id=0)

A pair is (context ids with BOS, continuation ids); its log-likelihood is the sum of
log p(continuation token | everything before it), and it is greedy when each
continuation token is the argmax there. lm-evaluation-harness's `loglikelihood`
(`jbtx.eval.lm_eval_model`), jbtx's multiple-choice tasks (`jbtx.eval.tasks`) and
BTM's per-expert target log-probabilities (`jbtx.eval.ensembles`) share these functions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jbtx.data.tokenizers import Tokenizer
from jbtx.models.forward import forward
from jbtx.models.llama import abstract_params
from jbtx.runtime import sharding

_LENGTH_MULTIPLE = 32  # sequence lengths are padded up to a multiple of this (few shapes)
# (tokens [batch, len], lengths [batch]) -> (log-probs [batch, len - 1], greedy [batch, len - 1])
Score = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
Pair = tuple[Sequence[int], Sequence[int]]


@functools.lru_cache(maxsize=16)
def target_scores(model: nn.Module, mesh: Any) -> Any:
  """`(params, batch) -> (log-probs, greedy)`, both `[batch, seq - 1]`: log p(token t + 1
  | tokens ≤ t) and whether token t + 1 is the argmax there, for a global packed batch
  (`tokens`, `positions`, `segment_ids`); jit-compiled once per (model, mesh), with
  the parameters sharded as training shards them and the outputs replicated."""

  def scores(params, batch):
    with sharding.sharding_rules(mesh):
      logits = forward(model, params, batch)[0][:, :-1].astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    targets = batch["tokens"][:, 1:, None]
    picked = jnp.take_along_axis(log_probs, targets, axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets[..., 0]

  params = sharding.param_shardings(abstract_params(model), mesh)
  return jax.jit(scores, in_shardings=(params, sharding.batch_sharding(mesh)),
                 out_shardings=NamedSharding(mesh, P()))


def make_scorer(model: nn.Module, params: Any, mesh: Any) -> Score:
  """The `Score` of `model` with `params` (sharded over `mesh`; every process passes
  the same whole batch, whose rows must split over the mesh's batch shards)."""
  step = target_scores(model, mesh)

  def score(tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    batch = {"tokens": tokens.astype(np.int32), "positions": positions,
             "segment_ids": (positions < lengths[:, None]).astype(np.int32)}
    picked, greedy = step(params, sharding.global_batch(mesh, sharding.local_rows(batch)))
    return np.asarray(picked), np.asarray(greedy)

  return score


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int],
                                                                                 list[int]]:
  """(context ids with BOS, continuation ids) as the text `context + continuation`
  tokenises: whitespace at the end of the context moves to the continuation, and the
  continuation's ids are those that follow the context's in the whole text's encoding."""
  stripped = context.rstrip()
  continuation = context[len(stripped):] + continuation
  whole = [int(i) for i in tokenizer.encode(stripped + continuation, add_bos=True)]
  context_ids = [int(i) for i in tokenizer.encode(stripped, add_bos=True)]
  if whole[:len(context_ids)] != context_ids:  # the join merged tokens: split as encoded
    return context_ids, [int(i) for i in tokenizer.encode(continuation, add_bos=False)]
  return context_ids, whole[len(context_ids):]


def _padded(length: int, max_len: int) -> int:
  return min(-(-length // _LENGTH_MULTIPLE) * _LENGTH_MULTIPLE, max_len)


def pair_log_likelihoods(score: Score, pairs: Sequence[Pair], batch_size: int, max_len: int,
                         pad_id: int, desc: str = "log-likelihood"
                         ) -> list[tuple[float, bool]]:
  """(summed log-likelihood, greedy) of each pair's continuation given its context.

  A pair longer than `max_len` keeps its last `max_len` ids (the context is cut from
  the left). Pairs run longest first in batches of `batch_size` rows (the last one
  padded with copies).

  Raises:
    ValueError: a pair with an empty continuation, or one of `max_len` ids or more.
  """
  rows = []
  for context, continuation in pairs:
    if not continuation:
      raise ValueError("a continuation to score has no tokens")
    if len(continuation) >= max_len:
      raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the "
                       f"model's {max_len} positions after its context")
    ids = [*context, *continuation][-max_len:]
    rows.append((ids, len(continuation)))
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
  results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
  starts = range(0, len(order), batch_size)
  for start in tqdm.tqdm(starts, desc=desc, unit="batch",
                         disable=None if len(starts) > 1 else True):
    chosen = order[start:start + batch_size]
    chosen += [chosen[-1]] * (batch_size - len(chosen))
    width = _padded(len(rows[chosen[0]][0]), max_len)
    tokens = np.full((batch_size, width), pad_id, np.int32)
    lengths = np.array([len(rows[i][0]) for i in chosen], np.int32)
    for row, i in zip(tokens, chosen, strict=True):
      row[:len(rows[i][0])] = rows[i][0]
    log_probs, greedy = score(tokens, lengths)
    for r, i in enumerate(chosen):
      end = lengths[r] - 1  # targets t + 1 = 1 .. length - 1 sit at indices 0 .. end - 1
      span = slice(end - rows[i][1], end)
      results[i] = (float(np.sum(log_probs[r, span])), bool(np.all(greedy[r, span])))
  return results
