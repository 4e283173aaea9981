"""OLMoE-style fine-grained MoE trained from scratch, as a baseline of BTX's table."""

from __future__ import annotations

import dataclasses

from jbtx.config.model import MoEConfig


@dataclasses.dataclass(frozen=True)
class OLMoEConfig:
  """The OLMoE baseline (`btx.baselines` lists "olmoe"): the seed's decoder with QK-norm
  and fine-grained MoE layers, from scratch, trained on the finetune mixture for the
  seed's training FLOPs plus BTX's (it has no seed to start from).

  Attributes:
    moe: its MoE layer (OLMoE: softmax over all experts, top-k without
      renormalisation, Switch-form load balancing 0.01, z-loss 0.001); `d_ff` None =
      the seed's d_ff / top_k (the active FFN as wide as the seed's).
  """

  moe: MoEConfig = dataclasses.field(default_factory=lambda: MoEConfig(
      n_experts=16, top_k=4, routing="softmax_topk", renormalize=False,
      load_balance="switch", load_balance_coef=0.01, router_z_coef=0.001))
