"""LLaMA-MoE alone on the demo data: the seed (configs/btx.py's, the shipped one) with every
FFN split into 8 experts of its neurons (IndependentRandom), LLaMA-MoE's noisy MLP gate
choosing 2, expert outputs scaled by 8/2, trained further on the finetune mixture for
BTX's training FLOPs with dynamic domain weights (Sheared-LLaMA's, towards the seed's
own validation losses).

    python -m jbtx.train --config=configs/llama_moe.py [--config.llama_moe.split=clustering]

Splits: random, clustering, sharing_inner, sharing_inter (with llama_moe.shared_experts,
d_ff = 352 must divide into 8 + S groups: S = 3); --config.llama_moe.reweighting=none
keeps the mixture static; --config.btx.seed_checkpoint=DIR splits a converted Llama-2.
"""

import ml_collections

from configs import btx


def get_config() -> ml_collections.ConfigDict:
  config = btx.get_config()
  config.btx.baselines = ("llama_moe",)
  config.btx.train_btx = False  # BTX's stages only set the matched budget
  config.llama_moe.reweighting = "loss"
  return config
