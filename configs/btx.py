"""Branch-Train-MiX on the built-in demo data, sized to run on a laptop CPU in minutes.

    python -m jbtx.train --config=configs/btx.py

seed: a tiny dense Llama (0.80M parameters, byte tokens) trained from scratch on the
`general` domain plus a little of every other; expert/code, expert/math,
expert/knowledge: the seed trained further on one domain each (independent jobs); mix:
their FFNs and the seed's become the 4 experts of every layer's MoE, everything else
averaged, a new router; finetune: top-2 routing with BTX load balancing (0.01) on the
mixture; the baselines at matched compute: btm (the experts ensembled top-1/top-2
under the domain posterior, and averaged), upcycle (sparse upcycling of the seed) and
dense (the seed trained further), upcycle and dense trained for BTX's FLOPs; eval:
every model on every domain and the math/knowledge tasks (results.json, one table);
export: the BTX model in Hugging Face Mixtral format (hf/).
--config.btx.baselines="()" runs BTX alone; configs/btm.py, upcycle.py, dense.py,
llama_moe.py and olmoe.py run one baseline alone, and "llama_moe" and "olmoe" may be
added to btx.baselines to join this table (not by default: the demo's time).

The file lists every key of `jbtx.config.ExperimentConfig` (`to_config_dict`), so any
can be overridden, e.g. --config.btx.finetune.steps=200 --config.btx.moe.routing=soft
--config.btx.only=expert/math (but not the sub-keys of `model.moe`, None for this dense
seed; configs/olmoe_tiny.py has them).
"""

import ml_collections

from jbtx.config import (
    BTMConfig,
    BTXConfig,
    DataConfig,
    ExperimentConfig,
    LlamaMoEConfig,
    MoEConfig,
    OptimizerConfig,
    StageConfig,
    TrainConfig,
    to_config_dict,
)
from jbtx.config.data import DomainConfig, TokenizerConfig
from jbtx.models import presets

EXPERTS = ("code", "math", "knowledge")


def get_config() -> ml_collections.ConfigDict:
  domains = {name: DomainConfig(source="demo", name=name, weight=weight)
             for name, weight in [("code", 0.2), ("math", 0.2), ("knowledge", 0.2),
                                  ("general", 0.4)]}
  expert = StageConfig(steps=40, learning_rate=1e-3, warmup_steps=10)
  return to_config_dict(ExperimentConfig(
      seed=0,
      model=presets.get("tiny"),
      data=DataConfig(domains=domains, tokenizer=TokenizerConfig(type="byte"), seq_len=256,
                      batch_size=16),
      optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=20, min_lr_ratio=0.1,
                                b1=0.9, b2=0.95, weight_decay=0.1, grad_clip_norm=1.0),
      train=TrainConfig(steps=200, log_every=20, eval_batches=8, eval_every=0,
                        sample_prompt="def ", sample_tokens=0, sample_temperature=0.8,
                        checkpoint_every=50, keep_last=2, keep_every=0,
                        async_checkpoints=True, max_skipped_steps=10,
                        peak_flops_per_device=0.0, tensorboard=True),
      btx=BTXConfig(
          experts={name: expert for name in EXPERTS},
          seed_as_expert=True,
          ffn="experts",
          router_init="random",
          moe=MoEConfig(n_experts=4, top_k=2, routing="topk", load_balance="btx",
                        load_balance_coef=0.01),
          finetune=StageConfig(steps=60, learning_rate=1e-3, warmup_steps=10),
          finetune_weights={"code": 0.3, "math": 0.3, "knowledge": 0.2, "general": 0.2},
          task_examples=32, task_max_tokens={"math": 160, "knowledge": 32},
          export=True,
          baselines=("btm", "upcycle", "dense"),  # () = BTX alone
          train_btx=True,
          upcycle_every=1,
          olmoe=MoEConfig(n_experts=16, top_k=4, d_ff=None, routing="softmax_topk",
                          renormalize=False, load_balance="switch", load_balance_coef=0.01,
                          router_z_coef=0.001)),
      btm=BTMConfig(top_k=(1, 2), smoothing=0.01, average_batches=2, clusters=0,
                    temperature=0.1, cluster_documents=2000, tfidf_features=4096,
                    context_stride=32),
      llama_moe=LlamaMoEConfig(
          split="random", shared_experts=1, scale_outputs=True, importance_batches=4,
          clustering_iterations=20, reweighting="none", reweight_every=50,
          moe=MoEConfig(n_experts=8, top_k=2, routing="topk", router="noisy_mlp",
                        load_balance="cv", load_balance_coef=0.01)),
      profile_steps="",  # e.g. "10,15": trace steps 10-15 into <stage>/tensorboard/
      dump_hlo=False,
      reuse_host_memory=True,  # glibc keeps freed blocks for reuse (faster on CPU)
  ))
