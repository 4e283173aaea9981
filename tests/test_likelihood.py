"""Continuation log-likelihoods and multiple choice against a full forward per item."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbtx.config import MeshConfig
from jbtx.data.tokenizers import ByteTokenizer
from jbtx.eval.tasks import multiple_choice
from jbtx.inference import likelihood
from jbtx.models import presets
from jbtx.models.llama import Llama, init_params
from jbtx.runtime import sharding

TOKENIZER = ByteTokenizer()


@pytest.fixture(scope="module")
def model_and_params():
  model = Llama(presets.get("tiny", n_layers=2, max_seq_len=64))
  return model, init_params(model, jax.random.key(3))


def _reference(model, params, ids: list[int], n_continuation: int) -> tuple[float, bool]:
  """Sum of log p(continuation) and greediness from one unpadded forward pass."""
  logits = model.apply({"params": params}, jnp.asarray([ids], jnp.int32))[0, :-1]
  log_probs = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
  targets = np.asarray(ids[1:])
  span = slice(len(ids) - 1 - n_continuation, len(ids) - 1)
  picked = log_probs[np.arange(len(targets)), targets][span]
  greedy = np.argmax(log_probs, axis=-1)[span] == targets[span]
  return float(picked.sum()), bool(greedy.all())


def test_pairs_score_like_one_forward_each_in_any_batch(model_and_params):
  model, params = model_and_params
  mesh = sharding.make_mesh(MeshConfig(data=-1))
  score = likelihood.make_scorer(model, params, mesh)
  texts = [("The sky is", " blue"), ("2 + 2 =", " 4"), ("", "hello"),
           ("A longer context that fills more of it", " than the others")]
  pairs = [likelihood.encode_pair(TOKENIZER, c, t) for c, t in texts]
  results = likelihood.pair_log_likelihoods(score, pairs, batch_size=8, max_len=64,
                                            pad_id=TOKENIZER.pad_id)
  for (context, continuation), (value, greedy) in zip(pairs, results, strict=True):
    expected = _reference(model, params, [*context, *continuation], len(continuation))
    np.testing.assert_allclose(value, expected[0], rtol=1e-5, atol=1e-5)
    assert greedy == expected[1]
  # The model's own greedy continuation is greedy.
  context = likelihood.encode_pair(TOKENIZER, "def f", "x")[0]
  logits = model.apply({"params": params}, jnp.asarray([context], jnp.int32))[0, -1]
  best = [int(jnp.argmax(logits))]
  assert likelihood.pair_log_likelihoods(score, [(context, best)], 8, 64, 0)[0][1]


def test_a_long_pair_keeps_its_last_ids_and_an_impossible_one_is_refused(model_and_params):
  model, params = model_and_params
  score = likelihood.make_scorer(model, params, sharding.make_mesh(MeshConfig(data=-1)))
  context, continuation = list(range(10, 90)), [5, 6, 7]
  (value, _), = likelihood.pair_log_likelihoods(score, [(context, continuation)], 8, 64, 0)
  ids = [*context, *continuation][-64:]
  np.testing.assert_allclose(value, _reference(model, params, ids, 3)[0], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="does not fit"):
    likelihood.pair_log_likelihoods(score, [([1], list(range(64)))], 8, 64, 0)
  with pytest.raises(ValueError, match="no tokens"):
    likelihood.pair_log_likelihoods(score, [([1], [])], 8, 64, 0)


def test_trailing_context_whitespace_moves_to_the_continuation():
  context, continuation = likelihood.encode_pair(TOKENIZER, "Answer: ", "blue")
  assert context == [TOKENIZER.bos_id, *b"Answer:"]
  assert continuation == list(b" blue")


def test_multiple_choice_picks_the_likeliest_choice(model_and_params):
  model, params = model_and_params
  score = likelihood.make_scorer(model, params, sharding.make_mesh(MeshConfig(data=-1)))
  items = [{"prompt": "The sky is", "choices": [" blue", " green", " a"], "answer": 0},
           {"prompt": "1 + 1 =", "choices": [" 2", " 11"], "answer": 1}]
  result = multiple_choice(score, TOKENIZER, items, batch_size=8, max_len=64)
  expected = []
  for item in items:
    values = []
    for choice in item["choices"]:
      context, cont = likelihood.encode_pair(TOKENIZER, item["prompt"], choice)
      values.append(_reference(model, params, [*context, *cont], len(cont))[0])
    expected.append(values)
  np.testing.assert_allclose(result["log_likelihoods"][0], expected[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(result["log_likelihoods"][1], expected[1], rtol=1e-5, atol=1e-5)
  correct = sum(int(np.argmax(v)) == item["answer"]
                for v, item in zip(expected, items, strict=True))
  assert result["correct"] == correct and result["accuracy"] == correct / 2
  normalised = sum(int(np.argmax([x / len(c) for x, c in zip(v, item["choices"],
                                                              strict=True)])) == item["answer"]
                   for v, item in zip(expected, items, strict=True))
  assert result["accuracy_norm"] == normalised / 2
