"""Branch-Train-MiX on the built-in demo data, in the paper's regime, on a CPU in minutes.

    python -m jbtx.train --config=configs/btx.py

seed: the shipped checkpoint `jbtx/data/demo/seed`, the `demo` dense Llama (0.35M
parameters, byte tokens) pretrained by `configs/seed.py` on the `general` domain plus a
little of every other for 3000 steps, to its plateau (the seed stage loads it and checks
its recorded validation losses); expert/code, expert/math, expert/knowledge: the seed
trained further on one domain each (independent jobs), each 3.2 times as long as the
finetune; mix: their FFNs and the seed's become the 4 experts of every layer's MoE,
everything else averaged, a new router; finetune: top-2 routing with BTX load
balancing (0.01) on the mixture; the baselines at matched compute: btm (the experts
ensembled top-1/top-2 under the domain posterior, and averaged), upcycle (sparse
upcycling of the seed) and dense (the seed trained further), upcycle and dense trained
for BTX's FLOPs; a validation pass every 20 steps of every stage; eval: every model on
every domain and the math/knowledge tasks (results.json, one table) and the
validation loss of every method against its training FLOPs (eval/curves.png); export:
the BTX model in Hugging Face Mixtral format (hf/).

Only what differs from the defaults of `jbtx.config` is stated here; every key can be
overridden (`to_config_dict` lists them all), e.g. --config.btx.finetune.steps=200
--config.btx.moe.routing=soft --config.btx.only=expert/math. --config.btx.baselines="()"
runs BTX alone; --config.btx.seed_checkpoint= trains a seed of `model` first (200 steps);
configs/btm.py, upcycle.py, dense.py, llama_moe.py and olmoe.py run one baseline alone,
and "llama_moe" and "olmoe" may be added to btx.baselines.
"""

import ml_collections

from jbtx.config import (
    BTXConfig,
    DataConfig,
    ExperimentConfig,
    OptimizerConfig,
    StageConfig,
    TrainConfig,
    to_config_dict,
)
from jbtx.config.data import DomainConfig
from jbtx.data import demo
from jbtx.models import presets

EXPERTS = ("code", "math", "knowledge")
# configs/seed.py's seed, shipped in the package (its jbtx.json holds its curve).
DEMO_SEED = str(demo.SEED_DIR)
WEIGHTS = {"code": 0.2, "math": 0.2, "knowledge": 0.2, "general": 0.4}  # the seed's data


def get_config() -> ml_collections.ConfigDict:
  domains = {name: DomainConfig(source="demo", name=name, weight=weight)
             for name, weight in WEIGHTS.items()}
  expert = StageConfig(steps=80, learning_rate=1e-3, warmup_steps=10)
  return to_config_dict(ExperimentConfig(
      model=presets.get("demo"),
      data=DataConfig(domains=domains),
      optimizer=OptimizerConfig(learning_rate=1e-3),
      train=TrainConfig(checkpoint_every=50, sample_tokens=0, eval_every=20),
      btx=BTXConfig(
          seed_checkpoint=DEMO_SEED,
          experts={name: expert for name in EXPERTS},
          finetune=StageConfig(steps=25, learning_rate=1e-3, warmup_steps=5),
          finetune_weights={"code": 0.3, "math": 0.3, "knowledge": 0.2, "general": 0.2},
          task_examples=16,
          baselines=("btm", "upcycle", "dense"),  # () = BTX alone
      ),
  ))
