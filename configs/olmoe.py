"""OLMoE from scratch on the demo data, as a row of BTX's compute-matched table: the
demo decoder with QK-norm and 16 experts of a quarter of the seed's FFN width, top-4 of
a softmax over all experts without renormalisation (`olmoe.moe`), trained on the
finetune mixture for the FLOPs BTX spends on its seed, its experts and its finetune
(from configs/btx.py's budgets; no seed is trained here).

    python -m jbtx.train --config=configs/olmoe.py

configs/olmoe_tiny.py trains the same kind of model for a fixed 200 steps instead,
without the table.
"""

import ml_collections

from configs import btx


def get_config() -> ml_collections.ConfigDict:
  config = btx.get_config()
  config.btx.baselines = ("olmoe",)
  config.btx.train_btx = False  # BTX's stages only set the matched budget
  return config
