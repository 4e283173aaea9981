"""Sparse upcycling (Komatsuzaki et al. 2023): a dense model -> an MoE whose experts are
exact copies of its FFNs.

    FFN of layer l      -> every expert of layer l's MoE (E copies)
    router              -> new, normal(0, init_std)
    everything else     -> copied

Before training the MoE computes exactly what the dense model does, for any router:
the gate values of each token sum to 1 and every expert is the same FFN. With
`moe.every = n` only the last layer of each group of n becomes an MoE layer.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jbtx.config import ModelConfig
from jbtx.methods.mix import random_routers
from jbtx.models.llama import unstack_layers


def upcycle_params(dense: dict[str, Any], config: ModelConfig, seed: int) -> dict[str, Any]:
  """The MoE model `config` upcycled from dense parameters in the scanned layout.

  Args:
    dense: the dense model's parameters with layers stacked (`layers/…` `[layers, …]`).
    config: the MoE model (`moe` set; `moe.d_ff` None or the dense width).
    seed: seeds the routers (one stream per MoE layer).

  Returns:
    The parameter tree of `config`, in its layout (scanned or unrolled).
  """
  moe, every = config.moe, config.moe.every
  if (moe.d_ff or config.d_ff) != config.d_ff or moe.n_shared_experts:
    raise ValueError("upcycled experts are copies of the dense FFN: moe.d_ff must be the "
                     "model's d_ff and there are no shared experts")
  groups = config.n_layers // every
  routers = random_routers(config, seed)
  grouped = jax.tree.map(lambda x: np.asarray(x).reshape(groups, every, *x.shape[1:]),
                         dense["layers"])
  blocks = {}
  for j in range(every):
    block = jax.tree.map(lambda x, j=j: x[:, j], grouped)
    if j == every - 1:
      ffn = block.pop("mlp")
      block["moe"] = {k: np.repeat(ffn[k]["kernel"][:, None], moe.n_experts, axis=1)
                      for k in ("gate", "up", "down")}
      block["moe"]["router"] = np.stack([routers(g) for g in range(groups)])
    blocks[f"block_{j}"] = block
  layers = blocks["block_0"] if every == 1 else blocks
  params = {k: v for k, v in dense.items() if k != "layers"} | {"layers": layers}
  return params if config.scan_layers else unstack_layers(params)
