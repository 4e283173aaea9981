"""The BTM baseline's rows in the results table: the experts ensembled and averaged.

    btm top-k              the ensemble of the top-k experts under the domain posterior
    btm average            the experts' parameters averaged uniformly (one dense model)
    btm posterior average  per domain, averaged with that domain's mean posterior
    c-btm top-k            c-BTM: the cluster experts weighted by softmax(−d²/T)

Perplexity uses the validation batches the other rows use: each expert's target
log-probabilities are computed once (sharded like training, one expert at a time) and
mixed on the host. The posterior-average weights come from `btm.average_batches`
batches of the test split. Tasks are decoded greedily from the ensemble's mixture
(`btm.generate_ensemble`), with every expert on one device.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import unflatten_dict
from jax.sharding import Mesh

from jbtx.config import ExperimentConfig
from jbtx.data import loader
from jbtx.data.tokenizers import Tokenizer
from jbtx.eval.scoring import (
  evaluate_params,
  score_task_files,
  score_tasks_of,
  task_domains,
  task_files,
)
from jbtx.inference.likelihood import target_scores
from jbtx.inference.sharded import on_mesh, params_sharding, run_rows, stacked_sharding
from jbtx.interop import checkpoint
from jbtx.interop.tensor_source import CheckpointSource
from jbtx.methods import btm
from jbtx.methods.clusters import TfidfClusters, cluster_weights
from jbtx.methods.mix import weighted_mean
from jbtx.models.forward import valid_targets
from jbtx.models.llama import Llama, abstract_params
from jbtx.runtime import sharding
from jbtx.runtime.distributed import log

Batch = dict[str, np.ndarray]


def whole_batches(config: ExperimentConfig, domain: str, split: str, n: int) -> list[Batch]:
  """The first `n` evaluation batches of `domain`'s `split`, all rows (every process)."""
  return list(itertools.islice(loader.eval_batches(config.data, split, domain=domain), n))


def valid_log_probs(step: Any, params: Any, mesh: Any, batch: Batch) -> np.ndarray:
  """float32 `[batch, seq - 1]`: log p(token t + 1 | tokens ≤ t), 0 where the target is
  not valid (padding, document boundaries)."""
  picked, _ = step(params, sharding.global_batch(mesh, sharding.local_rows(batch)))
  return np.where(np.asarray(valid_targets(batch["segment_ids"])), np.asarray(picked), 0.0)


def member_log_probs(config: ExperimentConfig, directories: Sequence[Any],
                     batches: Mapping[str, Sequence[Batch]]) -> dict[str, np.ndarray]:
  """Domain -> float32 `[N, n_batches, batch, seq - 1]`: each member's target
  log-probabilities on that domain's `batches`, one member in memory at a time."""
  mesh = sharding.make_mesh(config.mesh)
  out: dict[str, list] = {domain: [] for domain in batches}
  for directory in directories:
    model_config = checkpoint.load_config(directory)
    model = Llama(model_config)
    params = jax.device_put(checkpoint.load_params_for(directory, model_config),
                            sharding.param_shardings(abstract_params(model), mesh))
    step = target_scores(model, mesh)  # compiled once for members of one shape
    for domain, domain_batches in batches.items():
      out[domain].append(np.stack([valid_log_probs(step, params, mesh, b)
                                   for b in domain_batches]))
    del params
  return {domain: np.stack(values) for domain, values in out.items()}


def _row(losses: Mapping[str, float], tasks: Mapping[str, Any]) -> dict[str, Any]:
  return {"domains": {d: {"loss": loss, "perplexity": math.exp(loss)}
                      for d, loss in losses.items()}, "tasks": dict(tasks)}


def ensemble_losses(log_probs: Mapping[str, np.ndarray], batches: Mapping[str, Sequence[Batch]],
                    weights_of: Any) -> dict[str, float]:
  """Domain -> the mixture's mean NLL, with `weights_of(domain, i, log_probs [N, B, T])`
  giving batch i's weights `[B, T, N]`."""
  losses = {}
  for domain, values in log_probs.items():
    total = count = 0.0
    for i, batch in enumerate(batches[domain]):
      weights = weights_of(domain, i, values[:, i])
      nll, n = btm.ensemble_loss(jnp.asarray(values[:, i]), jnp.asarray(batch["segment_ids"]),
                                 jnp.asarray(weights))
      total, count = total + float(nll), count + float(n)
    losses[domain] = total / count
  return losses


@functools.lru_cache(maxsize=32)
def ensemble_decoder(model: Llama, mesh: Mesh, max_new_tokens: int, top_k: int,
                      smoothing: float, eos_id: int | None, given_weights: bool) -> Any:
  """`(stacked, tokens, lengths[, weights]) -> ids`: `btm.generate_ensemble` on `mesh`."""

  def step(stacked, tokens, lengths, *weights):
    return btm.generate_ensemble(model, stacked, tokens, lengths, max_new_tokens, top_k=top_k,
                                 smoothing=smoothing, weights=weights[0] if weights else None,
                                 eos_id=eos_id)

  return on_mesh(step, mesh, stacked_sharding(model, mesh), 3 if given_weights else 2)


@functools.lru_cache(maxsize=32)
def ensemble_scorer(model: Llama, mesh: Mesh, top_k: int, smoothing: float) -> Any:
  """`(stacked, tokens, segments) -> (log-probs, greedy)`: `btm.ensemble_target_scores`
  on `mesh`."""

  def step(stacked, tokens, segments):
    return btm.ensemble_target_scores(model, stacked, tokens, segments, top_k=top_k,
                                      smoothing=smoothing)

  return on_mesh(step, mesh, stacked_sharding(model, mesh), 2)


def _ensemble_tasks(config: ExperimentConfig, model: Llama, stacked: Any, top_k: int,
                    prompt_weights: Any = None) -> dict[str, Any]:
  """Task accuracy of the ensemble (`stacked` on the mesh of `config.mesh`);
  `prompt_weights(prompts) -> [batch, N]` fixes the weights from the prompts (c-BTM),
  None = the running posterior (BTM).

  Multiple-choice task files are scored under the running posterior (BTM only: c-BTM's
  weights would come from a prompt that the scored sequence runs past)."""
  tokenizer = loader.make_tokenizer(config.data)
  mesh = sharding.make_mesh(config.mesh)
  smoothing = config.btm.smoothing

  def generate(tokens, lengths, max_new_tokens, eos_id):
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    decoder = ensemble_decoder(model, mesh, max_new_tokens, top_k, smoothing, eos_id,
                                prompt_weights is not None)
    if prompt_weights is None:
      return run_rows(decoder, stacked, mesh, tokens, lengths)
    texts = [tokenizer.decode(row[:n]) for row, n in zip(tokens, lengths, strict=True)]
    return run_rows(decoder, stacked, mesh, tokens, lengths, prompt_weights(texts))

  def score(tokens, lengths):
    segments = (np.arange(tokens.shape[1]) < lengths[:, None]).astype(np.int32)
    return run_rows(ensemble_scorer(model, mesh, top_k, smoothing), stacked, mesh, tokens,
                    segments)

  tasks = {}
  if config.btx.task_examples:
    tasks = {domain: score_tasks_of(config, domain, generate)
             for domain in task_domains(config)}
  files = task_files(config)
  scored = [t for t in files if prompt_weights is None or t.kind == "exact_match"]
  if len(scored) < len(files):
    log("[eval] c-btm: multiple-choice task files skipped (its weights come from a prompt)")
  return tasks | score_task_files(config, scored, generate, score, model.config.max_seq_len)


def stacked_members(config: ExperimentConfig, directories: Sequence[Any]) -> tuple[Llama, Any]:
  """The members' decoder and their parameters stacked `[N, ...]` on the mesh of
  `config.mesh`, each member sharded as training shards it (loaded one at a time)."""
  mesh = sharding.make_mesh(config.mesh)
  model_config = checkpoint.load_config(directories[0])
  model = Llama(model_config)
  member = params_sharding(model, mesh)
  trees = [jax.device_put(checkpoint.load_params_for(d, model_config), member)
           for d in directories]
  stack = jax.jit(lambda *trees: btm.stack_params(trees),
                  out_shardings=stacked_sharding(model, mesh))
  return model, stack(*trees)


def average_checkpoints(directories: Sequence[Any], weights: Sequence[float]) -> Any:
  """`Σ_j w_j θ_j / Σ_j w_j` of the members' checkpoints, a tensor at a time (read
  through TensorStore: N tensors in memory, not N models), in their stored layout."""
  sources = [CheckpointSource(d) for d in directories]
  return unflatten_dict({path: weighted_mean((s.leaf(path) for s in sources), weights)
                         for path in sources[0].leaf_paths()})


@contextlib.contextmanager
def _timed(what: str):
  """Logs `[eval] what (seconds)` when the block ends."""
  began = time.perf_counter()
  yield
  log(f"[eval] {what} ({time.perf_counter() - began:.1f} s)")


def _top_k_name(prefix: str, k: int) -> str:
  return f"{prefix} {'all' if k == 0 else f'top-{k}'}"


def btm_rows(config: ExperimentConfig, members: Mapping[str, Any]) -> dict[str, dict]:
  """The BTM rows (ensembles, averages) of the experts `members` (name -> checkpoint)."""
  names, directories = list(members), list(members.values())
  domains = list(config.data.domains)
  validation = {d: whole_batches(config, d, "validation", config.train.eval_batches)
                for d in domains}
  held_out = {d: whole_batches(config, d, "test", config.btm.average_batches) for d in domains}
  with _timed("btm: each expert's log-probabilities"):
    log_probs = member_log_probs(config, directories, {**{f"v/{d}": b for d, b in
                                                          validation.items()},
                                                       **{f"t/{d}": b for d, b in
                                                          held_out.items()}})
  valid = {d: log_probs[f"v/{d}"] for d in domains}
  model, stacked = stacked_members(config, directories)
  rows = {}
  for k in config.btm.top_k:
    def posterior(domain, i, values, k=k):
      segments = jnp.asarray(validation[domain][i]["segment_ids"])
      return btm.top_k_weights(btm.running_posterior(jnp.asarray(values), segments,
                                                     config.btm.smoothing), k)
    name = _top_k_name("btm", k)
    with _timed(f"{name}: perplexity"):
      losses = ensemble_losses(valid, validation, posterior)
    with _timed(f"{name}: tasks"):
      rows[name] = _row(losses, _ensemble_tasks(config, model, stacked, k))
  with _timed("btm average"):
    uniform = average_checkpoints(directories, [1.0] * len(directories))
    rows["btm average"] = evaluate_params(config, model.config, uniform)
  weights = {d: mean_posterior(log_probs[f"t/{d}"], held_out[d], config.btm.smoothing)
             for d in domains}
  with _timed("btm posterior average"):
    averaged = [evaluate_params(config, model.config,
                                average_checkpoints(directories, weights[d]), domains=[d])
                for d in domains]
  rows["btm posterior average"] = {
      "domains": {d: r["domains"][d] for d, r in zip(domains, averaged, strict=True)},
      "tasks": {t: r["tasks"][t] for r in averaged for t in r["tasks"]},
      "weights": {d: dict(zip(names, map(float, w), strict=True)) for d, w in weights.items()}}
  return rows


def mean_posterior(log_probs: np.ndarray, batches: Sequence[Batch],
                   smoothing: float) -> np.ndarray:
  """float `[N]`: the posterior over all experts averaged over the valid targets."""
  total, count = 0.0, 0
  for i, batch in enumerate(batches):
    segments = jnp.asarray(batch["segment_ids"])
    post = btm.running_posterior(jnp.asarray(log_probs[:, i]), segments, smoothing)
    valid = valid_targets(segments)
    total = total + np.asarray(jnp.sum(jnp.where(valid[..., None], post, 0.0), axis=(0, 1)))
    count += int(jnp.sum(valid))
  if count == 0:
    raise ValueError("the test split yielded no targets for the posterior-weighted average")
  return total / count


def context_weights(clusters: TfidfClusters, tokenizer: Tokenizer, batch: Batch, stride: int,
                    temperature: float) -> np.ndarray:
  """c-BTM's weights `[batch, seq - 1, K]` for each target of packed rows: the cluster
  weights of the document's text before the target's chunk of `stride` tokens (uniform
  for a document's first chunk, which has no context)."""
  tokens, segments = batch["tokens"], batch["segment_ids"]
  rows, length = tokens.shape[0], tokens.shape[1] - 1
  k = clusters.centroids.shape[0]
  weights = np.full((rows, length, k), 1.0 / k, np.float32)
  spans, texts = [], []
  for r in range(rows):
    for start, end in _documents(segments[r]):
      for chunk in range(start + stride, min(end, length), stride):
        spans.append((r, chunk, min(chunk + stride, end, length)))
        texts.append(tokenizer.decode(tokens[r, start:chunk]))
  if texts:
    chunk_weights = cluster_weights(clusters.squared_distances(texts), temperature)
    for (r, first, last), w in zip(spans, chunk_weights, strict=True):
      weights[r, first:last] = w
  return weights


def _documents(segment_ids: np.ndarray) -> list[tuple[int, int]]:
  """`[(start, end)]` of the non-padding documents of one packed row."""
  edges = np.flatnonzero(np.diff(segment_ids)) + 1
  bounds = [0, *edges.tolist(), len(segment_ids)]
  return [(a, b) for a, b in itertools.pairwise(bounds) if segment_ids[a] != 0]


def cbtm_rows(config: ExperimentConfig, members: Sequence[Any],
              clusters: TfidfClusters) -> dict[str, dict]:
  """c-BTM's ensemble rows of the cluster experts `members` (checkpoints, cluster order)."""
  btm_config = config.btm
  domains = list(config.data.domains)
  validation = {d: whole_batches(config, d, "validation", config.train.eval_batches)
                for d in domains}
  log_probs = member_log_probs(config, members, validation)
  tokenizer = loader.make_tokenizer(config.data)
  weights = {d: [context_weights(clusters, tokenizer, b, btm_config.context_stride,
                                 btm_config.temperature) for b in batches]
             for d, batches in validation.items()}
  model, stacked = stacked_members(config, members)
  prompt_weights = functools.partial(_prompt_weights, clusters, btm_config.temperature)
  rows = {}
  for k in btm_config.top_k:
    def given(domain, i, values, k=k):
      del values
      return btm.top_k_weights(jnp.asarray(weights[domain][i]), k)
    rows[_top_k_name("c-btm", k)] = _row(
        ensemble_losses(log_probs, validation, given),
        _ensemble_tasks(config, model, stacked, k, prompt_weights))
  return rows


def _prompt_weights(clusters: TfidfClusters, temperature: float,
                    texts: Sequence[str]) -> np.ndarray:
  return cluster_weights(clusters.squared_distances(texts), temperature)
