"""The dense baseline alone on the demo data: the seed (configs/btx.py's, the shipped one)
trained further on the finetune mixture for BTX's training FLOPs (its experts plus
finetune, from configs/btx.py's budgets).

    python -m jbtx.train --config=configs/dense.py
"""

import ml_collections

from configs import btx


def get_config() -> ml_collections.ConfigDict:
  config = btx.get_config()
  config.btx.baselines = ("dense",)
  config.btx.train_btx = False  # BTX's stages only set the matched budget
  return config
