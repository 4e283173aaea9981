"""OLMoE-style fine-grained MoE trained from scratch on the built-in demo data.

    python -m jbtx.train --config=configs/olmoe_tiny.py

The tiny model with 16 experts of a quarter of the dense FFN width, top-4 of a softmax
over all experts without renormalisation, QK-norm, load balancing 0.01 ("switch" form,
per layer) and router z-loss 0.001, as in OLMoE (Muennighoff et al. 2024).
"""

import ml_collections

from configs import btx
from jbtx.config import MoEConfig
from jbtx.models import presets


def get_config() -> ml_collections.ConfigDict:
  config = btx.get_config()
  config.btx.experts = {}  # no BTX stages: this MoE is trained from scratch
  config.btx.seed_checkpoint = ""
  config.model = presets.config_dict(
      "tiny", qk_norm=True,
      moe=MoEConfig(n_experts=16, top_k=4, d_ff=88, routing="softmax_topk",
                    renormalize=False, load_balance="switch", load_balance_coef=0.01,
                    router_z_coef=0.001))
  return config
