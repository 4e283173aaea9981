r"""Training throughput of the jbtx train step vs Hugging Face `MixtralForCausalLM`.

    python benchmarks/train_step.py [--batch=8] [--seq=128] [--steps=10] [--warmup=3]

Both train the same tiny Mixtral-shaped model (vocab 512, d_model 128, 2 layers, 4
heads / 2 KV heads, 8 experts of width 256, top-2, float32) on the same random token
batch `[batch, seq]`, on CPU, in this one process:

- jbtx: `make_train_step` (jit, donated state) with the default MoE dispatch
  (`--dispatch`): cross-entropy + load balancing ("switch" form, coefficient 0.01),
  AdamW with global-norm clipping at 1.0.
- PyTorch: `MixtralForCausalLM` (eager, default attention) with `output_router_logits`
  (HF's load-balancing loss, coefficient 0.01), `torch.optim.AdamW`,
  `clip_grad_norm_(1.0)`.

Same hyper-parameters (lr 1e-3, betas 0.9/0.95, weight decay 0.1). Each side runs
`--warmup` steps (jbtx: compilation); then the `--steps` timed steps alternate between
them, so all see the same machine load, and tokens/s is taken from each side's
median step time (jbtx waits for every step's result). Prints both and their ratio
(target >= 1.5).

The dense equivalents (on by default; `--no-dense-equivalent` skips them) replace each
MoE layer by one SwiGLU of width k·d_ff, the same active FLOPs: jbtx's `Llama` without
`moe`, and `LlamaForCausalLM`. Their ratio is the same comparison with no routing or
dispatch at all, i.e. how XLA's and PyTorch's CPU kernels compare on this model.
The last line, jbtx's dense equivalent over HF's MoE step, bounds the MoE ratio: an
MoE layer does the dense FFN's FLOPs in smaller matmuls, plus routing, so jbtx's MoE
step is not expected to beat its dense equivalent.

The process keeps freed host memory for reuse (`jbtx.runtime.host_memory`, as `jbtx.train`
does; it serves both frameworks); `--no-reuse-host-memory` keeps glibc's defaults, under
which every jbtx step page-faults its 68 MiB XLA:CPU buffer in again.

On a machine busy with other work, multi-threaded PyTorch can stall far more than XLA;
`--threads=1` runs both on one thread for a steadier comparison.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np
import torch
import transformers

from jbtx.config import MeshConfig, ModelConfig, MoEConfig, OptimizerConfig
from jbtx.models.llama import Llama
from jbtx.runtime import host_memory, sharding
from jbtx.training.optimizer import make_optimizer
from jbtx.training.step import init_train_state, make_train_step

SHAPE = {"vocab_size": 512, "d_model": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
         "d_ff": 256, "n_experts": 8, "top_k": 2}
LR, BETAS, WEIGHT_DECAY, CLIP, LB_COEF = 1e-3, (0.9, 0.95), 0.1, 1.0, 0.01


def jbtx_step(tokens: np.ndarray, dispatch: str, moe: bool = True) -> Callable[[], None]:
  """One jbtx training step per call, on the first device, waiting for its result.

  `moe=False`: the dense equivalent, a SwiGLU of width k·d_ff in place of the MoE.
  """
  s = SHAPE
  moe_config = MoEConfig(n_experts=s["n_experts"], top_k=s["top_k"], load_balance="switch",
                         load_balance_coef=LB_COEF, dispatch=dispatch)
  config = ModelConfig(vocab_size=s["vocab_size"], d_model=s["d_model"], n_layers=s["n_layers"],
                       n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"],
                       d_ff=s["d_ff"] * (1 if moe else s["top_k"]),
                       max_seq_len=tokens.shape[1], moe=moe_config if moe else None)
  model = Llama(config)
  optimizer = make_optimizer(OptimizerConfig(learning_rate=LR, warmup_steps=0, b1=BETAS[0],
                                             b2=BETAS[1], weight_decay=WEIGHT_DECAY,
                                             grad_clip_norm=CLIP), 1000)
  mesh = sharding.make_mesh(MeshConfig(), jax.devices()[:1])
  train_step = make_train_step(model, optimizer, mesh)
  batch = sharding.global_batch(mesh, {
      "tokens": tokens, "segment_ids": np.ones_like(tokens),
      "positions": np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)})
  state = [init_train_state(model, optimizer, 0, mesh)]

  def step() -> None:
    state[0], metrics = train_step(state[0], batch)
    jax.block_until_ready(metrics)

  return step


def torch_step(tokens: np.ndarray, moe: bool = True) -> Callable[[], None]:
  """One PyTorch training step of `MixtralForCausalLM` per call.

  `moe=False`: the dense equivalent, `LlamaForCausalLM` with intermediate size k·d_ff.
  """
  s = SHAPE
  common = dict(vocab_size=s["vocab_size"], hidden_size=s["d_model"],
                num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"],
                num_key_value_heads=s["n_kv_heads"], max_position_embeddings=tokens.shape[1],
                tie_word_embeddings=False)
  if moe:
    config = transformers.MixtralConfig(
        intermediate_size=s["d_ff"], num_local_experts=s["n_experts"],
        num_experts_per_tok=s["top_k"], output_router_logits=True,
        router_aux_loss_coef=LB_COEF, **common)
    model_cls = transformers.MixtralForCausalLM
  else:
    config = transformers.LlamaConfig(intermediate_size=s["d_ff"] * s["top_k"], **common)
    model_cls = transformers.LlamaForCausalLM
  torch.manual_seed(0)
  model = model_cls(config).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS,
                                weight_decay=WEIGHT_DECAY)
  ids = torch.from_numpy(tokens.astype(np.int64))

  def step() -> None:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  return step


def _seconds(fn: Callable[[], None]) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--dispatch", default="auto", help="jbtx MoE dispatch path")
  parser.add_argument("--dense-equivalent", action=argparse.BooleanOptionalAction, default=True,
                      help="also time both frameworks' dense equivalents (FFN width k·d_ff)")
  parser.add_argument("--threads", type=int, default=0,
                      help="1: both single-threaded (steadier on a busy machine); 0: defaults")
  parser.add_argument("--reuse-host-memory", action=argparse.BooleanOptionalAction, default=True,
                      help="glibc keeps freed blocks for reuse, as jbtx.train does "
                           "(jbtx.runtime.host_memory)")
  args = parser.parse_args()
  if args.reuse_host_memory:  # Before JAX (and PyTorch) start their threads.
    host_memory.reuse_freed_blocks()
  if args.threads == 1:  # Before JAX starts its CPU backend.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                               "false intra_op_parallelism_threads=1").strip()
    torch.set_num_threads(1)
  tokens = np.random.default_rng(0).integers(0, SHAPE["vocab_size"], (args.batch, args.seq),
                                             dtype=np.int32)
  print(f"model {SHAPE}, batch {args.batch}x{args.seq}, {args.steps} timed steps each, "
        f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")
  steps = {f"jbtx train step ({args.dispatch})": jbtx_step(tokens, args.dispatch),
           "HF MixtralForCausalLM": torch_step(tokens)}
  if args.dense_equivalent:
    steps |= {"jbtx dense equivalent": jbtx_step(tokens, args.dispatch, moe=False),
              "HF LlamaForCausalLM (dense eq.)": torch_step(tokens, moe=False)}
  for _ in range(args.warmup):
    for step in steps.values():
      step()
  times = {name: [] for name in steps}
  for _ in range(args.steps):
    for name, step in steps.items():
      times[name].append(_seconds(step))
  rates = {name: tokens.size / statistics.median(t) for name, t in times.items()}
  for name, rate in rates.items():
    print(f"{name + ':':<34}{rate:10,.0f} tokens/s")
  ours, theirs = list(rates.values())[:2]
  print(f"{'ratio jbtx / PyTorch:':<34}{ours / theirs:10.2f}  (target >= 1.5)")
  if args.dense_equivalent:
    dense_ours, dense_theirs = list(rates.values())[2:]
    print(f"{'ratio, dense equivalents:':<34}{dense_ours / dense_theirs:10.2f}  "
          "(the same comparison without MoE layers)")
    print(f"{'bound, jbtx dense / HF Mixtral:':<34}{dense_ours / theirs:10.2f}  "
          "(the ratio if jbtx's MoE layers cost no more than its dense FFN)")


if __name__ == "__main__":
  main()
