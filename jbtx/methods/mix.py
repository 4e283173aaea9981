"""Mixing: N dense models with the same shape -> one MoE model (BTX's "MiX" step).

    FFN of model i        -> expert i of each layer's MoE (stacked on the expert axis)
    everything else       -> weighted average over the models (attention, embeddings,
                             norms, output layer)
    router                -> new: given per layer (random, or from hidden states)

Variants (`BTXConfig.ffn`): "blend" gives every expert the averaged FFN (no FFN
specialisation); "split" cuts each FFN into C chunks of d_ff / C neurons (rows of gate
and up, columns of down), giving C · N experts; each chunk's down projection is scaled
by C, so that a token routed to all C chunks of expert i with equal logits (gates g/C
each under top-(C·k) softmax) gets exactly g · FFN_i(x), as the unsplit MoE gives it.

The model is produced one layer at a time (`mixed_parts`) from tensor sources
(`jbtx.interop.tensor_source`: a tree in memory or a checkpoint read tensor by tensor), so
mixing checkpoints on disk holds a few tensors in memory, never N models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jbtx.config import ModelConfig

FFN_KEYS = ("gate", "up", "down")
Source = Any  # jbtx.interop.tensor_source.TreeSource | CheckpointSource


def weighted_mean(arrays: Iterable[np.ndarray], weights: Sequence[float]) -> np.ndarray:
  """`Σ_i w_i · a_i / Σ_i w_i`, accumulated in float32, in the dtype of the inputs.

  `arrays` may be a generator: each is drawn, added and released before the next, so
  memory is one input and two float32 copies, not N inputs.
  """
  total = float(sum(weights))
  out = dtype = None
  for array, weight in zip(arrays, weights, strict=True):
    if out is None:
      out, dtype = np.zeros(np.shape(array), np.float32), np.asarray(array).dtype
    if weight:
      term = np.array(array, np.float32)
      term *= np.float32(weight / total)
      out += term
      del term
    del array
  return out.astype(dtype)


def moe_experts(ffns: Sequence[Mapping[str, np.ndarray]], ffn: str, chunks: int,
                weights: Sequence[float]) -> dict[str, np.ndarray]:
  """The expert kernels of one MoE layer from the models' FFNs.

  Args:
    ffns: per model, `gate`, `up` `[embed, mlp]` and `down` `[mlp, embed]`, or some of
      them (the same in every model; each kernel is mixed on its own).
    ffn: "experts", "blend" or "split" (module docstring).
    chunks: C for "split".
    weights: the models' averaging weights (for "blend").

  Returns:
    `gate`, `up` `[E, embed, mlp']`, `down` `[E, mlp', embed]` (those given), with E = N
    (C · N for "split", expert i · C + c being chunk c of model i) and mlp' = mlp (/ C
    for "split").
  """
  keys = [k for k in FFN_KEYS if k in ffns[0]]
  if ffn == "blend":
    return {k: np.stack([weighted_mean([f[k] for f in ffns], weights)] * len(ffns))
            for k in keys}
  if ffn == "split":
    split = lambda k, axis: [c for f in ffns for c in np.split(f[k], chunks, axis=axis)]
    out = {k: np.stack(split(k, 0 if k == "down" else 1)) for k in keys}
    if "down" in out:
      out["down"] = (out["down"].astype(np.float32) * chunks).astype(out["down"].dtype)
    return out
  if ffn != "experts":
    raise ValueError(f"config key 'btx.ffn': unknown value {ffn!r}")
  return {k: np.stack([f[k] for f in ffns]) for k in keys}


def random_routers(config: ModelConfig, seed: int) -> Callable[[int], np.ndarray]:
  """`layer -> router [embed, E]`: normal(0, init_std), one stream per layer."""
  n_experts = config.moe.n_experts

  def router(layer: int) -> np.ndarray:
    rng = np.random.default_rng([seed, layer])
    values = rng.normal(0.0, config.init_std, (config.d_model, n_experts))
    return values.astype(config.param_dtype)

  return router


# ModelConfig fields that change no stored tensor (layout, compute numerics, init).
_NOT_SHAPE_KEYS = ("max_seq_len", "dtype", "scan_layers", "remat_policy", "init_std")


def check_compatible(sources: Sequence[Source], names: Sequence[str]) -> None:
  """Raises ValueError unless every model has the first one's decoder shape."""
  first = sources[0].config
  for source, name in zip(sources[1:], names[1:], strict=True):
    layout = {k: getattr(first, k) for k in _NOT_SHAPE_KEYS}
    if dataclasses.replace(source.config, **layout) != first:
      raise ValueError(f"cannot mix {name!r} with {names[0]!r}: their model configs differ "
                       f"({source.config} vs {first})")
  if first.moe is not None:
    raise ValueError(f"cannot mix {names[0]!r}: it is an MoE model; BTX mixes dense models")


def mixed_parts(sources: Sequence[Source], config: ModelConfig, ffn: str, chunks: int,
                weights: Sequence[float], routers: Callable[[int], np.ndarray]
                ) -> Iterator[dict[str, Any]]:
  """The mixed MoE model's parameters in the unrolled layout, a part at a time.

  Yields first one part per non-layer tensor (`{"embed": {"embedding": …}}`, …), then
  one part per layer (`{"layers_3": {...}}`); together they are the parameter tree of
  `config` (the MoE model, `scan_layers=False`).

  Args:
    sources: the models to mix, in expert order.
    config: the MoE model's config (`jbtx.pipeline.experiments.moe_model_config`).
    ffn, chunks: the FFN variant (`moe_experts`).
    weights: averaging weights of the models.
    routers: `layer -> [embed, E]` router kernel.
  """
  reference = sources[0]
  for path in reference.top_paths():
    yield unflatten_dict({path: weighted_mean((s.top(path) for s in sources), weights)})
  for layer in range(config.n_layers):
    block = {path: weighted_mean((s.layer(path, layer) for s in sources), weights)
             for path in reference.layer_paths() if path[0] != "mlp"}
    for k in FFN_KEYS:  # a kernel at a time: N slices of one kernel in memory, not N FFNs
      mixed = moe_experts([{k: s.layer(("mlp", k, "kernel"), layer)} for s in sources], ffn,
                          chunks, weights)
      block[("moe", k)] = mixed[k]
    block[("moe", "router")] = routers(layer)
    yield {f"layers_{layer}": unflatten_dict(block)}


def mix_params(*args: Any, **kwargs: Any) -> dict[str, Any]:
  """`mixed_parts` merged into one tree (for models that fit in memory)."""
  return unflatten_dict({path: leaf for part in mixed_parts(*args, **kwargs)
                         for path, leaf in flatten_dict(part).items()})
