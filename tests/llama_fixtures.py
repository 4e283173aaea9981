"""Tiny random checkpoints written by the tests themselves: Llama in HF and Meta layouts,
HF Mixtral and OLMoE, and the features of small real seeds (tied embeddings, Llama-3
and linear rotary scaling, Qwen2's and Llama's attention biases)."""

from __future__ import annotations

import json
import pathlib

import numpy as np

torch = __import__("pytest").importorskip("torch")
transformers = __import__("pytest").importorskip("transformers")

# Odd sizes on purpose: nothing a power of two, head_dim 10, a non-default rope theta.
MHA = dict(vocab_size=131, hidden_size=60, intermediate_size=100, num_hidden_layers=3,
           num_attention_heads=6, num_key_value_heads=6, rope_theta=31337.0,
           rms_norm_eps=1e-5, max_position_embeddings=64)
GQA = dict(MHA, num_attention_heads=6, num_key_value_heads=2, rope_theta=500000.0)
# MoE (`model_type` first): 5 experts top-2 with GQA; 7 experts top-3 with QK norms, no
# renormalisation of the top-3 gates. Expert width 40; non-default aux-loss weights.
MIXTRAL = dict(GQA, model_type="mixtral", intermediate_size=40, num_local_experts=5,
               num_experts_per_tok=2, rope_theta=31337.0, router_aux_loss_coef=0.02)
OLMOE = dict(GQA, model_type="olmoe", intermediate_size=40, num_key_value_heads=3,
             num_experts=7, num_experts_per_tok=3, norm_topk_prob=False, rope_theta=77777.0,
             router_aux_loss_coef=0.03, eos_token_id=None)
# Small real seeds (SmolLM2, Llama-3.2, Qwen2.5) tie their embeddings.
TIED = dict(GQA, tie_word_embeddings=True)
# Llama-3's scaling over head_dim 10 at theta 1e4 (wavelengths 6, 40, 250, 1580, 9960)
# with original length 64: one frequency kept (< 64 / 4), one interpolated, three divided.
LLAMA3 = dict(TIED, rope_theta=10000.0, max_position_embeddings=256, rope_scaling={
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64})
LINEAR = dict(GQA, max_position_embeddings=256,
              rope_scaling={"rope_type": "linear", "factor": 4.0})
QWEN2 = dict(TIED, model_type="qwen2", rope_theta=1000000.0)  # biases on q, k, v
LLAMA_BIAS = dict(GQA, attention_bias=True)  # biases on q, k, v and o


def hf_model(shape: dict, seed: int = 0):
  """A random `LlamaForCausalLM` (or the dense model of `shape["model_type"]`); norms and
  biases are randomised too so no weight is all ones or zeros."""
  torch.manual_seed(seed)
  if "model_type" not in shape:
    return _randomise(transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)).eval())
  shape = dict(shape)
  config = transformers.AutoConfig.for_model(shape.pop("model_type"), **shape)
  return _randomise(transformers.AutoModelForCausalLM.from_config(config).eval())


def hf_moe_model(shape: dict, seed: int = 0):
  """A random `MixtralForCausalLM` / `OlmoeForCausalLM` (`shape["model_type"]`).

  Norms are randomised as in `hf_model`, and router weights scaled up so that routing
  is decisive (no near-ties between the k-th and the next expert).
  """
  torch.manual_seed(seed)
  shape = dict(shape)
  config = transformers.AutoConfig.for_model(shape.pop("model_type"), **shape)
  model = _randomise(transformers.AutoModelForCausalLM.from_config(config).eval())
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("mlp.gate.weight"):
        p.copy_(0.3 * torch.randn_like(p))
  return model


def _randomise(model):
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.1 * torch.randn_like(p))
  return model


# Every character of these strings is in the tiny tokenizers' alphabet (others are <unk>).
TOKENIZER_CORPUS = ["the quick brown fox jumps over the lazy dog. " * 3,
                    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG! 0123456789\n",
                    "def f(x): return [x + 1, x * 2] # {'a': \"b\"} = ; - / < > % ? _",
                    "pack my box with five dozen liquor jugs, then 12 + 30 = 42."] * 5
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|begin_of_text|>"]


def save_tokenizer(directory: pathlib.Path, vocab_size: int = 120, **specials) -> pathlib.Path:
  """A tiny byte-level BPE tokenizer trained on `TOKENIZER_CORPUS`, saved as a model's
  own by transformers (`tokenizer.json`, `tokenizer_config.json`) into `directory`.

  Args:
    directory: the folder to write (an HF model folder).
    vocab_size: ids, special tokens (`SPECIAL_TOKENS`, ids 0-4) included.
    **specials: `PreTrainedTokenizerFast` settings: bos_token, eos_token, add_bos_token.
  """
  import tokenizers as hf

  tok = hf.Tokenizer(hf.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  split = tok.pre_tokenizer.pre_tokenize_str
  alphabet = sorted({c for text in TOKENIZER_CORPUS for word, _ in split(text) for c in word})
  tok.train_from_iterator(TOKENIZER_CORPUS, hf.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                              **specials)
  fast.save_pretrained(directory)
  return directory


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def save_hf(model, directory: pathlib.Path, **kwargs) -> pathlib.Path:
  model.save_pretrained(directory, **kwargs)
  return directory


def _to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
  """Inverse of HF's rotary permutation: rotate-half rows back to Meta's pairs."""
  rows, cols = w.shape
  return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


_META_NAMES = {
    "self_attn.q_proj": ("attention.wq", 0), "self_attn.k_proj": ("attention.wk", 0),
    "self_attn.v_proj": ("attention.wv", 0), "self_attn.o_proj": ("attention.wo", 1),
    "mlp.gate_proj": ("feed_forward.w1", 0), "mlp.down_proj": ("feed_forward.w2", 1),
    "mlp.up_proj": ("feed_forward.w3", 0), "input_layernorm": ("attention_norm", None),
    "post_attention_layernorm": ("ffn_norm", None),
}


def meta_state_dicts(model, n_shards: int) -> list[dict[str, torch.Tensor]]:
  """The model as Meta's model-parallel shards (`consolidated.NN.pth` contents)."""
  cfg = model.config
  full: dict[str, tuple[torch.Tensor, int | None]] = {
      "tok_embeddings.weight": (model.model.embed_tokens.weight, 1),
      "norm.weight": (model.model.norm.weight, None),
      "output.weight": (model.lm_head.weight, 0),
  }
  for i, layer in enumerate(model.model.layers):
    for hf_name, (meta_name, axis) in _META_NAMES.items():
      w = layer.get_submodule(hf_name).weight
      if hf_name == "self_attn.q_proj":
        w = _to_interleaved(w, cfg.num_attention_heads)
      elif hf_name == "self_attn.k_proj":
        w = _to_interleaved(w, cfg.num_key_value_heads)
      full[f"layers.{i}.{meta_name}.weight"] = (w, axis)
  shards = [{} for _ in range(n_shards)]
  for name, (w, axis) in full.items():
    w = w.detach().clone()
    parts = [w] * n_shards if axis is None else torch.chunk(w, n_shards, dim=axis)
    for shard, part in zip(shards, parts, strict=False):
      shard[name] = part.clone()
  for shard in shards:
    shard["rope.freqs"] = torch.ones(cfg.hidden_size // cfg.num_attention_heads // 2)
  return shards


def meta_params_json(model) -> dict:
  cfg = model.config
  return {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers,
          "n_heads": cfg.num_attention_heads, "n_kv_heads": cfg.num_key_value_heads,
          "vocab_size": -1, "multiple_of": 4, "norm_eps": cfg.rms_norm_eps,
          "rope_theta": cfg.rope_parameters["rope_theta"]}


def save_meta(model, directory: pathlib.Path, n_shards: int = 2,
              params: dict | None = None) -> pathlib.Path:
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "params.json").write_text(json.dumps(params or meta_params_json(model)))
  for i, shard in enumerate(meta_state_dicts(model, n_shards)):
    torch.save(shard, directory / f"consolidated.{i:02d}.pth")
  return directory


def random_tokens(vocab: int, shape=(2, 13), seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)
