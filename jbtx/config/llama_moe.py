"""LLaMA-MoE: the seed's FFNs split into experts, then continued pretraining."""

from __future__ import annotations

import dataclasses
from typing import Literal

from jbtx.config.base import require as _require
from jbtx.config.base import require_positive
from jbtx.config.model import MoEConfig

SplitMethod = Literal["random", "clustering", "sharing_inner", "sharing_inter"]


def expert_width(d_ff: int, n_experts: int, method: str, n_shared: int = 0) -> tuple[int, int]:
  """`(routed expert width, residual experts' total width)` of a split of `d_ff` neurons.

  Raises ValueError when the neurons do not divide into equal experts.
  """
  groups = n_experts + (n_shared if method.startswith("sharing") else 0)
  if method.startswith("sharing") and n_shared < 1:
    raise ValueError(f"{method} shares n_shared ≥ 1 expert widths of neurons, got {n_shared}")
  if d_ff % groups:
    raise ValueError(f"{method}: d_ff = {d_ff} neurons do not split into {groups} equal "
                     f"groups ({n_experts} experts" + (f" + {n_shared} shared)" if
                                                       method.startswith("sharing") else ")"))
  m = d_ff // groups
  if method == "sharing_inner":
    return (n_shared + 1) * m, 0
  return m, (n_shared * m if method == "sharing_inter" else 0)


def _llama_moe_layer() -> MoEConfig:
  return MoEConfig(n_experts=8, top_k=2, routing="topk", router="noisy_mlp",
                   load_balance="cv", load_balance_coef=0.01)


@dataclasses.dataclass(frozen=True)
class LlamaMoEConfig:
  """The LLaMA-MoE baseline (`btx.baselines` lists "llama_moe"; `jbtx.methods.split`).

  Every FFN of the seed becomes an MoE layer whose experts are subsets of its neurons;
  the model is then trained further on the finetune mixture for BTX's training FLOPs.

  Attributes:
    split: "random" (IndependentRandom), "clustering" (IndependentClustering),
      "sharing_inner" or "sharing_inter" (shared neurons by importance).
    moe: the MoE layer; `d_ff`, `n_shared_experts` and `output_scale` are set by the
      split (E experts of d_ff / E neurons, or as `jbtx.methods.split` says for sharing).
      Default: LLaMA-MoE's noisy MLP gate, top-2 of 8, balance loss 0.01·(CV² + CV²).
    shared_experts: sharing methods: how many expert widths of neurons are shared
      (S in `jbtx.methods.split`); d_ff must divide into E + S groups.
    scale_outputs: multiply the routed experts' output by E/k (LLaMA-MoE; 4.0 for
      2-of-8); False leaves it at 1 (the ablation).
    importance_batches: training batches per domain over which the sharing methods
      sum neuron importance.
    clustering_iterations: k-means iterations of "clustering".
    reweighting: "none" (the finetune mixture's static weights) or "loss": every
      `reweight_every` steps, LLaMA-MoE's (Sheared-LLaMA's) dynamic data mixing
      `w ← softmax(log w + η (L − L_ref))`, smoothed by `data.reweighting_smoothing`,
      with L_ref a domain's `data.domains.<d>.reference_loss`, else the seed's own
      validation loss on that domain (the dense model the experts were cut from).
    reweight_every: steps between re-weightings (validation passes) for "loss".
  """

  split: SplitMethod = "random"
  moe: MoEConfig = dataclasses.field(default_factory=_llama_moe_layer)
  shared_experts: int = 1
  scale_outputs: bool = True
  importance_batches: int = 4
  clustering_iterations: int = 20
  reweighting: Literal["none", "loss"] = "none"
  reweight_every: int = 50

  def __post_init__(self):
    require_positive(self, "shared_experts", "importance_batches", "clustering_iterations",
                     "reweight_every")
    _require(self.moe.every == 1, "moe.every",
             f"LLaMA-MoE splits every layer's FFN (every = 1), got {self.moe.every}")
    _require(self.moe.n_shared_experts == 0, "moe.n_shared_experts",
             "is set by the split (llama_moe.shared_experts for sharing_inter)")
