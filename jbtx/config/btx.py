"""Branch-Train-MiX: the stages after the seed (experts, mix, finetune, eval, export)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from jbtx.config.base import require as _require
from jbtx.config.model import MoEConfig

MixFFN = Literal["experts", "blend", "split"]
RouterInit = Literal["random", "hidden"]
SEED_EXPERT = "seed"  # the name of the seed's FFN among the mixed experts


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """How long and how fast one training stage runs; unset values come from the
  experiment's `train.steps`, `optimizer.learning_rate` and `optimizer.warmup_steps`.

  Attributes:
    steps: optimizer steps (0 = `train.steps`).
    learning_rate: peak learning rate (0 = `optimizer.learning_rate`).
    warmup_steps: linear warmup steps (-1 = `optimizer.warmup_steps`).
  """

  steps: int = 0
  learning_rate: float = 0.0
  warmup_steps: int = -1

  def __post_init__(self):
    _require(self.steps >= 0, "steps", f"must be non-negative (0 = train.steps), got {self.steps}")
    _require(self.learning_rate >= 0, "learning_rate",
             f"must be non-negative (0 = optimizer.learning_rate), got {self.learning_rate}")
    _require(self.warmup_steps >= -1, "warmup_steps",
             f"must be at least -1 (-1 = optimizer.warmup_steps), got {self.warmup_steps}")


@dataclasses.dataclass(frozen=True)
class BTXConfig:
  """The BTX pipeline: seed -> one expert per domain -> mix -> MoE finetune -> eval -> export.

  With no `experts` the experiment is the seed stage alone (e.g. an MoE from scratch).

  Attributes:
    seed_checkpoint: a converted jbtx checkpoint (`python -m jbtx.convert import`) used
      as the seed instead of training one ("" = train `config.model`).
    check_seed: a `seed_checkpoint` trained by jbtx records its validation losses; the
      seed stage measures them again on the experiment's validation batches and refuses
      a checkpoint whose losses differ (False: use it unchecked, e.g. with other
      data.seq_len or data.batch_size than it was trained with). Converted checkpoints
      record none and are not checked.
    model_from_seed: `python -m jbtx.train` takes `model`'s shape (the keys of
      `jbtx.config.model.SHAPE_KEYS`) from `seed_checkpoint` as it starts; the model's
      numerics, layout and `max_seq_len` stay the config's. False: the config states the
      shape, and a seed of another shape is refused naming the key.
    experts: domain name (a key of `data.domains`) -> its training stage; each expert
      starts from the seed's parameters with a fresh optimizer and trains on that
      domain alone.
    only: run this one stage and exit (a stage of the experiment: "seed",
      "expert/<domain>", "mix", "finetune", a baseline's, "eval", "export"; "" = every
      stage that is not complete).
    seed_as_expert: the seed's FFN is one more expert ("generalist", last).
    mix_weights: averaging weights of the non-FFN parameters, by expert name (and
      "seed"; a model not named gets 0); empty = uniform over the mixed models.
    ffn: "experts" (expert i's FFN is MoE expert i), "blend" (every MoE expert is the
      average FFN: the paper's blending ablation) or "split" (each FFN cut into
      `split_chunks` experts along d_ff, top-k becomes `split_chunks · k`).
    split_chunks: chunks per FFN for `ffn = "split"`.
    router_init: "random" (normal, `model.init_std`) or "hidden": router column of
      expert i = the centred, unit-norm mean of the seed's MoE-layer inputs over
      domain i's training tokens (as mergekit-moe's `hidden` mode; not in the paper).
    router_init_batches: training batches per domain averaged for "hidden".
    moe: the MoE layer of the mixed model; `n_experts` and `d_ff` are set by the mix
      (experts × chunks, d_ff / chunks), `top_k` is multiplied by `split_chunks`.
    finetune: the MoE finetune's training stage.
    finetune_weights: domain -> sampling weight of the finetune mixture (empty = the
      `data.domains` weights).
    task_examples: items per task domain (math, knowledge) scored by exact match.
    task_max_tokens: tokens generated per task item, by task domain (a math solution is
      worked out before its answer; a knowledge answer comes at once).
    export: write the final model in Hugging Face Mixtral format to `workdir/hf/`.
    baselines: the methods evaluated beside BTX, from the same seed, by stage kind
      (`jbtx.pipeline.stages`): "btm" (Branch-Train-Merge on BTX's experts, or c-BTM's:
      `config.btm`), "upcycle" (sparse upcycling: the seed's FFN copied into every
      expert, `config.upcycle`), "dense" (the seed trained further), "llama_moe" (the
      seed's FFNs split into experts, `config.llama_moe`), each trained on the finetune
      mixture for BTX's training FLOPs (experts + finetune), and "olmoe" (a fine-grained
      MoE from scratch, `config.olmoe`) for the seed's FLOPs plus BTX's.
    train_btx: run BTX's mix, finetune and export; False runs the baselines alone
      (BTX's expert and finetune stages still set their matched budget).
  """

  MOVED: ClassVar[dict[str, str]] = {"upcycle_every": "upcycle.every",
                                     "olmoe": "olmoe.moe"}

  seed_checkpoint: str = ""
  check_seed: bool = True
  model_from_seed: bool = False
  experts: dict[str, StageConfig] = dataclasses.field(default_factory=dict)
  only: str = ""
  seed_as_expert: bool = True
  mix_weights: dict[str, float] = dataclasses.field(default_factory=dict)
  ffn: MixFFN = "experts"
  split_chunks: int = 2
  router_init: RouterInit = "random"
  router_init_batches: int = 4
  moe: MoEConfig = dataclasses.field(
      default_factory=lambda: MoEConfig(n_experts=4, top_k=2, load_balance="btx",
                                        load_balance_coef=0.01))
  finetune: StageConfig = dataclasses.field(default_factory=StageConfig)
  finetune_weights: dict[str, float] = dataclasses.field(default_factory=dict)
  task_examples: int = 64
  task_max_tokens: dict[str, int] = dataclasses.field(
      default_factory=lambda: {"math": 160, "knowledge": 32})
  export: bool = True
  baselines: tuple[str, ...] = ()
  train_btx: bool = True

  def __post_init__(self):
    _require(not self.model_from_seed or bool(self.seed_checkpoint), "model_from_seed",
             "needs btx.seed_checkpoint, the checkpoint to read the model's shape from")
    _require(SEED_EXPERT not in self.experts, f"experts.{SEED_EXPERT}",
             f"{SEED_EXPERT!r} names the seed's expert (btx.seed_as_expert); "
             "choose another name")
    _require(self.split_chunks > 0, "split_chunks",
             f"must be positive, got {self.split_chunks}")
    _require(self.router_init_batches > 0, "router_init_batches",
             f"must be positive, got {self.router_init_batches}")
    _require(len(set(self.baselines)) == len(self.baselines), "baselines",
             f"lists a baseline twice: {self.baselines}")
    _require(self.task_examples >= 0, "task_examples",
             f"must be non-negative, got {self.task_examples}")
    for name, tokens in self.task_max_tokens.items():
      _require(tokens > 0, f"task_max_tokens.{name}", f"must be positive, got {tokens}")
    for name, weight in {**self.mix_weights, **self.finetune_weights}.items():
      _require(weight >= 0, "mix_weights" if name in self.mix_weights else "finetune_weights",
               f"weights must be non-negative, got {name}: {weight}")

  @property
  def expert_names(self) -> tuple[str, ...]:
    """The mixed models in expert order: the domain experts, then the seed if mixed."""
    return tuple(self.experts) + ((SEED_EXPERT,) if self.seed_as_expert else ())
