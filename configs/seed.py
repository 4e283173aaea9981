"""The demo's seed: the dense model `configs/btx.py` mixes, pretrained far longer than
the demo's own seed stage would train it. Its checkpoint is shipped in
`jbtx/data/demo/seed/` (the `jbtx.json` and `params/` of the command's `seed/`).

    python -m jbtx.train --config=configs/seed.py --workdir=runs/seed

The seed stage alone: the `demo` model (0.35M parameters) on the `general` domain plus
a little of every other, 3000 steps (12.3M tokens, 35 per parameter), with a
validation pass every 5% of the steps, so that
`jbtx.pipeline.curves.improvement(curve, PLATEAU_WINDOW)` measures how much its
validation loss still fell over the last 20% of the steps (the curve is in the
checkpoint's `jbtx.json`). The plateau criterion is under 1%; the shipped seed's loss
did not fall at all (-0.96%: 0.984 at step 2400, 0.993 at the end), and the same
model stopped at 2000 steps was still falling 2.2% (docs/benchmarks.md).
Deterministic on CPU: the same command makes the same parameters, bit for bit
(`tests/test_seed_config.py` checks a shortened run twice).
"""

import ml_collections

from configs import btx

SEED_WEIGHTS = {"general": 0.7, "code": 0.1, "math": 0.1, "knowledge": 0.1}
STEPS = 3000
PLATEAU_WINDOW = 0.2  # the plateau is measured over the last 20% of steps


def get_config() -> ml_collections.ConfigDict:
  config = btx.get_config()
  config.btx.experts = {}  # the seed stage alone
  config.btx.seed_checkpoint = ""  # trained here
  config.btx.baselines = ()
  for name, weight in SEED_WEIGHTS.items():
    config.data.domains[name].weight = weight
  config.train.update(steps=STEPS, eval_every=STEPS // 20, checkpoint_every=500)
  config.optimizer.update(learning_rate=2e-3, warmup_steps=100)
  return config
