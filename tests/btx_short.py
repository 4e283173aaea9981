"""configs/btx.py shrunk for the tests: 2-layer models, 2 experts (code, math) plus the
seed, a few steps per stage, 4 task items per task domain, no baselines."""

import ml_collections

from configs import btx


def get_config() -> ml_collections.ConfigDict:
  config = btx.get_config()
  config.model.n_layers = 2
  config.btx.seed_checkpoint = ""  # the tests train their own 2-layer seed
  config.data.update(batch_size=4, seq_len=32)
  config.train.update(steps=6, log_every=2, checkpoint_every=2, eval_batches=1)
  config.optimizer.warmup_steps = 2
  short = {"steps": 6, "learning_rate": 1e-3, "warmup_steps": 2}
  config.btx.experts = {"code": dict(short), "math": dict(short)}
  config.btx.finetune.update(steps=6, warmup_steps=2)
  config.btx.update(task_examples=4, task_max_tokens={"math": 8, "knowledge": 8},
                    baselines=())  # tests add them
  return config
