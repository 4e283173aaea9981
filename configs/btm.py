"""Branch-Train-Merge alone on the demo data: the seed (the shipped one), its domain experts (as
configs/btx.py trains them), and no mix: the experts ensembled at inference (top-1 and
top-2 under the Bayes domain posterior) and averaged (uniform and posterior-weighted).

    python -m jbtx.train --config=configs/btm.py
    python -m jbtx.train --config=configs/btm.py --config.btm.clusters=4   # c-BTM

With `btm.clusters = K`, c-BTM: the finetune mixture's documents clustered by balanced
k-means on tf-idf, one expert per cluster trained from the seed (together BTX's
training FLOPs), each context weighted by softmax(-d^2/T), T = btm.temperature.
"""

import ml_collections

from configs import btx


def get_config() -> ml_collections.ConfigDict:
  config = btx.get_config()
  config.btx.baselines = ("btm",)
  config.btx.train_btx = False  # BTX's stages only set the matched budget
  return config
