"""BTM: the ensemble's mixture and posterior, top-k, parameter averaging, ensemble
decoding (against single-expert decoding), c-BTM's context weights. Float32 throughout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbtx.config import MeshConfig
from jbtx.data.tokenizers import ByteTokenizer
from jbtx.eval import ensembles
from jbtx.inference.generate import generate_ragged
from jbtx.inference.likelihood import target_scores
from jbtx.inference.sharded import run_rows, stacked_sharding
from jbtx.methods import btm
from jbtx.methods.clusters import fit_clusters
from jbtx.models import presets
from jbtx.models.llama import Llama, init_params
from jbtx.runtime.sharding import make_mesh
from jbtx.training.step import token_losses


def _experts(n: int, config=None):
  config = config or presets.get("micro")
  model = Llama(config)
  return model, [jax.device_get(init_params(model, jax.random.key(i))) for i in range(n)]


def _packed_batch(rng, vocab: int, rows: int = 2, seq: int = 24) -> dict[str, np.ndarray]:
  """Rows of two documents each (the first two rows' lengths vary), row 1 ending in
  padding."""
  tokens = rng.integers(3, vocab, (rows, seq)).astype(np.int32)
  segments = np.ones((rows, seq), np.int32)
  segments[0, 10:] = 2
  segments[1, 7:] = 2
  segments[1, 20:] = 0
  positions = np.zeros_like(tokens)
  for r in range(rows):
    for s in np.unique(segments[r]):
      where = segments[r] == s
      positions[r, where] = np.arange(where.sum())
  return {"tokens": tokens, "segment_ids": segments, "positions": positions}


def test_one_hot_weights_give_the_chosen_experts_log_probs_exactly():
  log_probs = jax.nn.log_softmax(jax.random.normal(jax.random.key(0), (3, 2, 5, 7)), axis=-1)
  for j in range(3):
    weights = jax.nn.one_hot(jnp.full((2, 5), j), 3)
    mixed = btm.ensemble_log_probs(log_probs, weights[..., None, :].repeat(7, axis=-2))
    np.testing.assert_array_equal(mixed, log_probs[j])


def test_mixture_is_the_weighted_sum_of_probabilities():
  log_probs = jax.nn.log_softmax(jax.random.normal(jax.random.key(1), (3, 4, 6)), axis=-1)
  weights = jax.nn.softmax(jax.random.normal(jax.random.key(2), (4, 3)), axis=-1)
  expected = np.log(np.einsum("nbv,bn->bv", np.exp(log_probs), weights))
  mixed = btm.ensemble_log_probs(log_probs, weights[:, None, :])
  np.testing.assert_allclose(mixed, expected, atol=1e-6)


def test_top_k_keeps_the_largest_weights_renormalised():
  weights = jnp.array([[0.1, 0.5, 0.15, 0.25], [0.4, 0.3, 0.2, 0.1]])
  np.testing.assert_allclose(btm.top_k_weights(weights, 1), [[0, 1, 0, 0], [1, 0, 0, 0]])
  np.testing.assert_allclose(btm.top_k_weights(weights, 2),
                             [[0, 2 / 3, 0, 1 / 3], [4 / 7, 3 / 7, 0, 0]], rtol=1e-6)
  np.testing.assert_allclose(btm.top_k_weights(weights, 0), weights, rtol=1e-6)


def _reference_posterior(lp: np.ndarray, segments: np.ndarray, smoothing: float) -> np.ndarray:
  """A loop over targets: uniform at each document's first target, then Bayes."""
  n, rows, length = lp.shape
  out = np.zeros((rows, length, n))
  for r in range(rows):
    total = np.zeros(n)
    for t in range(length):
      if t == 0 or segments[r, t] != segments[r, t - 1]:
        total = np.zeros(n)
      post = np.exp(total - total.max())
      out[r, t] = (1 - smoothing) * post / post.sum() + smoothing / n
      total = total + lp[:, r, t]
  return out


def test_running_posterior_is_bayes_over_each_documents_tokens_so_far():
  batch = _packed_batch(np.random.default_rng(0), 50)
  valid = np.asarray(btm.valid_targets(jnp.asarray(batch["segment_ids"])))
  lp = np.where(valid, np.log(np.random.default_rng(1).uniform(0.01, 1, (3, *valid.shape))), 0)
  posterior = btm.running_posterior(jnp.asarray(lp, jnp.float32),
                                    jnp.asarray(batch["segment_ids"]), 0.01)
  np.testing.assert_allclose(posterior, _reference_posterior(lp, batch["segment_ids"], 0.01),
                             atol=1e-5)
  np.testing.assert_allclose(posterior[0, 10], np.full(3, 1 / 3), atol=1e-6)  # new document


def test_posterior_concentrates_on_the_expert_that_models_the_document():
  length, n = 40, 3
  lp = np.full((n, 1, length), np.log(0.02), np.float32)
  lp[1] = np.log(0.6)  # only expert 1 models this document well
  posterior = btm.running_posterior(jnp.asarray(lp), jnp.ones((1, length + 1), jnp.int32), 0.01)
  assert posterior[0, -1, 1] > 0.98
  assert posterior[0, 0, 1] == pytest.approx(1 / 3)
  assert np.all(np.diff(np.asarray(posterior[0, :, 1])) >= -1e-7)  # rises monotonically


def test_uniform_average_is_the_numpy_mean():
  _, trees = _experts(3)
  averaged = btm.average_params(trees, [1.0, 1.0, 1.0])
  assert jax.tree.structure(averaged) == jax.tree.structure(trees[0])
  for leaf, *leaves in zip(*map(jax.tree.leaves, [averaged, *trees]), strict=True):
    np.testing.assert_allclose(leaf, np.mean(leaves, axis=0), rtol=1e-6, atol=1e-7)
  weighted = btm.average_params(trees, [1.0, 0.0, 3.0])
  kernel = lambda t: t["embed"]["embedding"]
  np.testing.assert_allclose(kernel(weighted), 0.25 * kernel(trees[0]) + 0.75 * kernel(trees[2]),
                             rtol=1e-6, atol=1e-7)


def test_target_log_probs_sum_to_the_training_loss_and_mix_one_hot_to_it():
  model, trees = _experts(2)
  batch = _packed_batch(np.random.default_rng(3), model.config.vocab_size, rows=8)
  mesh = make_mesh(MeshConfig())
  step = target_scores(model, mesh)
  lp = np.stack([ensembles.valid_log_probs(step, t, mesh, batch) for t in trees])
  for j, tree in enumerate(trees):
    logits = model.apply({"params": tree}, batch["tokens"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"])
    loss, count = token_losses(logits, batch)
    np.testing.assert_allclose(-lp[j].sum(), loss, rtol=1e-5)
    one_hot = jax.nn.one_hot(jnp.full(lp.shape[1:], j), 2)
    nll, n = btm.ensemble_loss(jnp.asarray(lp), jnp.asarray(batch["segment_ids"]), one_hot)
    np.testing.assert_allclose(nll, loss, rtol=1e-5)
    assert n == count


def _prompts(vocab: int):
  rng = np.random.default_rng(4)
  prompts = rng.integers(3, vocab, (3, 8)).astype(np.int32)
  return jnp.asarray(prompts), jnp.asarray([3, 8, 5], jnp.int32)


def test_ensemble_decoding_with_one_hot_weights_is_that_experts_decoding():
  model, trees = _experts(3)
  prompts, lengths = _prompts(model.config.vocab_size)
  stacked = btm.stack_params(trees)
  for j in (0, 2):
    weights = jax.nn.one_hot(jnp.full((3,), j), 3)
    ours = btm.generate_ensemble(model, stacked, prompts, lengths, 6, weights=weights)
    alone = generate_ragged(model, trees[j], prompts, lengths, 6)
    np.testing.assert_array_equal(ours, alone)


def _reference_ensemble(apply, trees, prompt, n_new, top_k, smoothing):
  """Greedy decoding from the mixture by recomputing every expert on the whole sequence
  at each step: the posterior from all targets so far, mixed at the last position.
  `apply(params, tokens [1, 16])` is an expert's log-probabilities."""
  tokens = list(prompt)
  for _ in range(n_new):
    seq = np.zeros((1, 16), np.int32)  # a causal model: what follows the sequence is unread
    seq[0, :len(tokens)] = tokens
    log_probs = jnp.stack([apply(t, seq)[0, :len(tokens)] for t in trees])  # [N, len, vocab]
    targets = jnp.take_along_axis(log_probs[:, :-1], seq[None, 0, 1:len(tokens), None], axis=-1)
    posterior = btm.smoothed_posterior(targets[..., 0].sum(-1), smoothing)
    mixed = btm.ensemble_log_probs(log_probs[:, -1], btm.top_k_weights(posterior, top_k)[None])
    tokens.append(int(jnp.argmax(mixed)))
  return tokens[len(prompt):]


@pytest.mark.parametrize("top_k", [1, 0])
def test_ensemble_decoding_under_the_posterior_matches_recomputing_each_step(top_k):
  """Distinct experts, prompts of lengths 3, 8, 5: each row's tokens equal those of the
  reference that reruns every expert on the row's whole sequence per new token."""
  model, trees = _experts(3)
  prompts, lengths = _prompts(model.config.vocab_size)
  ours = np.asarray(btm.generate_ensemble(model, btm.stack_params(trees), prompts, lengths, 5,
                                          top_k=top_k, smoothing=0.05))
  apply = jax.jit(lambda params, seq: jax.nn.log_softmax(model.apply({"params": params}, seq)))
  for row, n in enumerate(np.asarray(lengths).tolist()):
    expected = _reference_ensemble(apply, trees, np.asarray(prompts[row, :n]).tolist(), 5,
                                   top_k, 0.05)
    np.testing.assert_array_equal(ours[row], expected)


def test_ensemble_of_copies_decodes_like_one_expert_under_the_posterior():
  model, trees = _experts(1)
  prompts, lengths = _prompts(model.config.vocab_size)
  stacked = btm.stack_params(trees * 3)
  for top_k in (1, 2, 0):
    ours = btm.generate_ensemble(model, stacked, prompts, lengths, 6, top_k=top_k,
                                 smoothing=0.01)
    np.testing.assert_array_equal(ours, generate_ragged(model, trees[0], prompts, lengths, 6))


def test_ensembles_sharded_over_a_mesh_decode_and_score_as_on_one_device():
  """The members stacked `[N, …]` with each sharded as training shards it: ensemble
  decoding (running posterior, and fixed c-BTM weights) and target scores equal the
  one-device results."""
  model, trees = _experts(3)
  prompts, lengths = _prompts(model.config.vocab_size)
  stacked = btm.stack_params(trees)
  mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
  placed = jax.device_put(stacked, stacked_sharding(model, mesh))
  decoder = ensembles.ensemble_decoder(model, mesh, 6, 2, 0.01, None, False)
  np.testing.assert_array_equal(
      run_rows(decoder, placed, mesh, prompts, lengths),
      btm.generate_ensemble(model, stacked, prompts, lengths, 6, top_k=2, smoothing=0.01))
  weights = np.asarray(jax.nn.softmax(jax.random.normal(jax.random.key(5), (3, 3))))
  given = ensembles.ensemble_decoder(model, mesh, 6, 0, 0.0, None, True)
  np.testing.assert_array_equal(
      run_rows(given, placed, mesh, prompts, lengths, weights),
      btm.generate_ensemble(model, stacked, prompts, lengths, 6, weights=jnp.asarray(weights)))
  segments = (np.arange(8) < np.asarray(lengths)[:, None]).astype(np.int32)
  chosen, greedy = run_rows(ensembles.ensemble_scorer(model, mesh, 2, 0.01), placed, mesh,
                            prompts, segments)
  expected = btm.ensemble_target_scores(model, stacked, prompts, jnp.asarray(segments),
                                        top_k=2, smoothing=0.01)
  np.testing.assert_allclose(chosen, expected[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(greedy, expected[1])


def test_cbtm_context_weights_are_distributions_from_the_text_before_each_chunk():
  texts = [" ".join(["alpha beta gamma"] * 3)] * 4 + [" ".join(["delta epsilon"] * 3)] * 4
  clusters, _ = fit_clusters(texts, 2, seed=0)
  tokenizer = ByteTokenizer()
  document = tokenizer.encode("alpha beta gamma alpha beta gamma alpha", add_bos=True)
  tokens = np.zeros((1, 64), np.int32)
  tokens[0, :len(document)] = document
  segments = np.zeros((1, 64), np.int32)
  segments[0, :len(document)] = 1
  weights = ensembles.context_weights(clusters, tokenizer, {"tokens": tokens,
                                                            "segment_ids": segments}, 8, 0.1)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(weights[0, :8], 0.5)  # no context yet
  alpha = clusters.nearest(["alpha beta gamma"])[0]
  assert np.all(weights[0, 8:len(document) - 1, alpha] > 0.9)


def _member_scores(model, params, tokens, segments):
  logits = model.apply({"params": params}, tokens, segment_ids=segments)[:, :-1]
  log_probs = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
  return log_probs


def test_ensemble_scores_mix_each_experts_distribution_under_the_posterior():
  model, trees = _experts(2)
  rng = np.random.default_rng(4)
  tokens = rng.integers(3, model.config.vocab_size, (2, 12)).astype(np.int32)
  segments = np.ones_like(tokens)
  segments[1, 9:] = 0  # a shorter row
  members = [_member_scores(model, t, tokens, segments) for t in trees]
  targets = tokens[:, 1:]
  picked = np.stack([np.take_along_axis(m, targets[..., None], -1)[..., 0] for m in members])
  picked = np.where(btm.valid_targets(segments)[None], picked, 0.0)
  chosen, greedy = btm.ensemble_target_scores(model, btm.stack_params(trees), tokens, segments)
  for t in range(5):  # Bayes' rule over the targets before t, then the mixture
    weights = np.exp(picked[:, :, :t].sum(-1)) / np.exp(picked[:, :, :t].sum(-1)).sum(0)
    mixture = np.log(sum(w[:, None] * np.exp(m[:, t]) for w, m in zip(weights, members,
                                                                        strict=True)))
    np.testing.assert_allclose(chosen[:, t], mixture[np.arange(2), targets[:, t]], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(greedy[:, t], np.argmax(mixture, -1) == targets[:, t])
  # Copies of one expert: its own scores, whatever the posterior.
  copies = btm.stack_params([trees[0]] * 3)
  chosen, _ = btm.ensemble_target_scores(model, copies, tokens, segments, top_k=1,
                                         smoothing=0.01)
  valid = btm.valid_targets(segments)
  np.testing.assert_allclose(np.where(valid, chosen, 0), picked[0], rtol=1e-5, atol=1e-5)
