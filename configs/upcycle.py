"""Sparse upcycling alone on the demo data: the seed (configs/btx.py's, the shipped one),
its FFN copied into 4 experts with a new top-2 router, trained on the finetune mixture
for BTX's training FLOPs (its experts plus finetune, from configs/btx.py's budgets).

    python -m jbtx.train --config=configs/upcycle.py [--config.upcycle.every=2]
"""

import ml_collections

from configs import btx


def get_config() -> ml_collections.ConfigDict:
  config = btx.get_config()
  config.btx.baselines = ("upcycle",)
  config.btx.train_btx = False  # BTX's stages only set the matched budget
  return config
