"""Batched greedy generation of ragged prompts, and exact-match task scoring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbtx.config import MeshConfig
from jbtx.data.tokenizers import ByteTokenizer
from jbtx.eval import tasks
from jbtx.inference import generate as gen
from jbtx.inference.sharded import make_generator, params_sharding, ragged_decoder
from jbtx.models import presets
from jbtx.models.llama import Llama, init_params
from jbtx.runtime import sharding


def _model(preset: str, **overrides):
  model = Llama(presets.get(preset, **overrides))
  return model, init_params(model, jax.random.key(0))


def _prompts(vocab_size: int, lengths: list[int]) -> tuple[jax.Array, jax.Array]:
  """Random non-zero prompts, right-padded with zeros: `[batch, max_len]`, `[batch]`."""
  tokens = jax.random.randint(jax.random.key(1), (len(lengths), max(lengths)), 1, vocab_size)
  mask = jnp.arange(max(lengths))[None, :] < jnp.array(lengths)[:, None]
  return jnp.where(mask, tokens, 0).astype(jnp.int32), jnp.array(lengths, jnp.int32)


def _one_by_one(model, params, prompts, lengths, max_new_tokens, eos_id=None) -> np.ndarray:
  """`generate` on each unpadded prompt alone: the new tokens `[batch, max_new_tokens]`."""
  rows = [gen.generate(model, params, prompts[r:r + 1, :n], max_new_tokens, jax.random.key(0),
                       temperature=0.0, eos_id=eos_id)[0, n:]
          for r, n in enumerate(np.asarray(lengths).tolist())]
  return np.stack(rows)


@pytest.mark.parametrize("preset", ["micro", "micro_moe"])
def test_ragged_generation_matches_each_prompt_alone(preset):
  model, params = _model(preset)
  prompts, lengths = _prompts(model.config.vocab_size, [5, 1, 8])
  out = gen.generate_ragged(model, params, prompts, lengths, max_new_tokens=6)
  assert out.shape == (3, 6) and out.dtype == jnp.int32
  np.testing.assert_array_equal(out, _one_by_one(model, params, prompts, lengths, 6))


@pytest.mark.parametrize("preset", ["micro", "micro_moe"])
def test_generation_sharded_over_a_mesh_equals_one_device(preset):
  """`make_generator`: parameters, prompts and the KV cache sharded over fsdp, expert
  and tensor axes; 3 prompts padded to the 4 batch shards; the same tokens."""
  model, params = _model(preset)
  prompts, lengths = _prompts(model.config.vocab_size, [5, 1, 8])
  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
  placed = jax.device_put(params, params_sharding(model, mesh))
  generate = make_generator(model, placed, mesh)
  np.testing.assert_array_equal(generate(prompts, lengths, 6, eos_id=3),
                                gen.generate_ragged(model, params, prompts, lengths, 6, eos_id=3))
  compiled = ragged_decoder(model, mesh, 6, 3).lower(
      placed, *sharding.global_rows(mesh, *sharding.padded_rows(
          [np.asarray(prompts), np.asarray(lengths)], mesh)[0])).compile()
  assert "all-gather" in compiled.as_text()  # the weights stay sharded between layers


def test_ragged_generation_fills_with_eos():
  model, params = _model("micro")
  prompts, lengths = _prompts(model.config.vocab_size, [5, 1, 8])
  free = np.asarray(gen.generate_ragged(model, params, prompts, lengths, max_new_tokens=6))
  eos_id = int(free[1, 2])  # row 1 emits it at its third new token (maybe earlier too)
  out = np.asarray(gen.generate_ragged(model, params, prompts, lengths, 6, eos_id=eos_id))
  np.testing.assert_array_equal(out, _one_by_one(model, params, prompts, lengths, 6, eos_id))
  first = np.flatnonzero(out[1] == eos_id)[0]
  assert first <= 2 and (out[1, first:] == eos_id).all()
  np.testing.assert_array_equal(out[1, :first], free[1, :first])


@pytest.mark.parametrize("text, expected", [
    ("  Paris \n", "paris"),
    ("New   York\tCity", "new york city"),
    ("Vousul Lamoruland.", "vousul lamoruland"),
    ("florin !?", "florin"),
    ("1,000", "1000"),
    ("1,000.", "1000"),
    ("-1,234.50", "-1234.50"),
    ("3.14", "3.14"),
    ("-8", "-8"),
    ("1,00", "1,00"),  # not thousands separators
    ("a, b", "a, b"),
])
def test_normalize_answer(text, expected):
  assert tasks.normalize_answer(text) == expected


def test_normalized_answers_compare_equal():
  assert tasks.normalize_answer(" 1,000 ") == tasks.normalize_answer("1000.")
  assert tasks.normalize_answer("ASHEZEL") == tasks.normalize_answer("Ashezel")


def test_extract_answer():
  math_prompt = "Problem: Find x if x + 1 = 3.\nSolution:"
  math_out = " Subtracting 1 gives x = 2.\nAnswer: 2\nProblem: Find y"
  assert tasks.extract_answer(math_out, math_prompt) == " 2"
  assert tasks.extract_answer(math_out) == " 2"
  assert tasks.extract_answer(" x = 2, so 2\nProblem:", math_prompt) == " x = 2, so 2"
  knowledge_prompt = "Question: What is the capital of Souvosk?\nAnswer:"
  knowledge_out = " Ashezel\nQuestion: Who rules Souvosk?\nAnswer: Vousul Lamoruland\n"
  assert tasks.extract_answer(knowledge_out, knowledge_prompt) == " Ashezel"
  assert tasks.extract_answer(" Ashezel", knowledge_prompt) == " Ashezel"


def test_exact_match_counts_the_models_own_answers():
  model, params = _model("micro", vocab_size=ByteTokenizer.vocab_size)
  tokenizer = ByteTokenizer()
  prompts = ["Question: What is the capital of Souvosk?\nAnswer:",
             "Problem: Find x if x + y = -22 and x - y = 6.\nSolution:",
             "Question: Who rules it?\nAnswer:",
             "Q: 2+2?\nAnswer:",
             "Problem: 7 * 6?\nSolution:"]
  max_new_tokens = 8
  answers = []
  for prompt in prompts:
    ids = jnp.asarray(tokenizer.encode(prompt))[None]  # BOS first
    out = gen.generate(model, params, ids, max_new_tokens, jax.random.key(0),
                       eos_id=tokenizer.eos_id)
    continuation = tokenizer.decode(np.asarray(out[0, ids.shape[1]:]))
    answers.append(tasks.extract_answer(continuation, prompt))
  right = [0, 1, 4]
  items = [{"prompt": p, "answer": a if i in right else "no such answer"}
           for i, (p, a) in enumerate(zip(prompts, answers, strict=True))]
  result = tasks.exact_match(model, params, tokenizer, items, max_new_tokens, batch_size=2)
  assert result["correct"] == 3 and result["n"] == 5
  assert result["accuracy"] == 3 / 5
  assert [e["prompt"] for e in result["examples"]] == prompts[:3]
  assert tasks.extract_answer(result["examples"][1]["output"], prompts[1]) == answers[1]
