"""The training iterator: determinism, exact resume, mixtures, per-process shards; eval."""

import json

import numpy as np
import pytest

from jbtx.config import DataConfig, from_mapping, to_dict
from jbtx.data import loader, mixture
from tests.data_fixtures import BOS, files_config, take, texts

KEYS = ("tokens", "segment_ids", "positions")


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    for key in KEYS:
      np.testing.assert_array_equal(x[key], y[key])


def _three_domains(tmp_path, weights=(0.5, 0.3, 0.2), n_docs=25, **data):
  return files_config(tmp_path, {name: (texts(name, n_docs + 7 * i, seed=i), w)
                                 for i, (name, w) in enumerate(zip("abc", weights,
                                                                   strict=True))},
                      **({"batch_size": 8, "seq_len": 24} | data))


@pytest.mark.parametrize("n", [1, 5, 64, 1000])
def test_every_epoch_is_a_fresh_permutation(n):
  order = mixture.ShuffledOrder(n, seed=7, stream=2)
  epochs = [[order[e * n + i] for i in range(n)] for e in range(3)]
  assert all(sorted(e) == list(range(n)) for e in epochs)
  if n == 1000:
    assert epochs[0] != epochs[1] and epochs[0] != list(range(n))
    assert epochs[0] != [mixture.ShuffledOrder(n, seed=8, stream=2)[i] for i in range(n)]


def test_same_seed_same_batches_other_seed_other_batches(tmp_path):
  config = _three_domains(tmp_path)
  first = take(loader.train_iterator(config, seed=1), 6)
  _assert_same(first, take(loader.train_iterator(config, seed=1), 6))
  other = take(loader.train_iterator(config, seed=2), 6)
  assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(first, other,
                                                                          strict=True))
  assert first[0]["tokens"].shape == (8, 24) and first[0]["tokens"].dtype == np.int32


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_continues_the_exact_stream(tmp_path, prefetch):
  config = _three_domains(tmp_path, prefetch=prefetch)
  uninterrupted = take(loader.train_iterator(config, seed=5), 40)
  before = loader.train_iterator(config, seed=5)
  head = take(before, 25)  # Several epochs of the smallest domain's lanes.
  state = json.loads(json.dumps(before.get_state()))
  before.close()
  resumed = loader.train_iterator(config, seed=5)
  next(resumed)  # Whatever it did before is overwritten.
  resumed.set_state(state)
  _assert_same(head + take(resumed, 15), uninterrupted)
  assert len(json.dumps(state)) < 2000


def test_two_processes_split_each_global_batch(tmp_path):
  config = _three_domains(tmp_path, n_docs=200)  # No domain finishes an epoch.
  single = take(loader.train_iterator(config, seed=0), 12)
  shards = [loader.train_iterator(config, seed=0, process_index=p, process_count=2)
            for p in range(2)]
  halves = [take(s, 12) for s in shards]
  for step, batch in enumerate(single):
    for key in KEYS:
      assert halves[0][step][key].shape == (4, 24)
      np.testing.assert_array_equal(
          np.concatenate([halves[0][step][key], halves[1][step][key]]), batch[key])
  # Disjoint: no document starts in both shards (documents are tagged "<domain><i>:").
  # They cover the data as the single-process stream does (test_data_packing).
  starts = [{t for b in h for t in _document_tags(b)} for h in halves]
  assert len(starts[0]) > 20 and len(starts[1]) > 20 and not starts[0] & starts[1]
  # The two processes' states together resume one process, or four.
  merged = loader.merge_states([s.get_state() for s in shards])
  resumed = loader.train_iterator(config, seed=0)
  resumed.set_state(merged)
  expected = take(loader.train_iterator(config, seed=0), 15)[12:]
  _assert_same(take(resumed, 3), expected)
  quarters = [loader.train_iterator(config, seed=0, process_index=p, process_count=4)
              for p in range(4)]
  for quarter in quarters:
    quarter.set_state(merged)
  batches = [take(q, 3) for q in quarters]
  _assert_same([{k: np.concatenate([b[step][k] for b in batches]) for k in KEYS}
                for step in range(3)], expected)
  with pytest.raises(ValueError, match="lacks the cursors"):
    resumed.set_state(shards[1].get_state())
  with pytest.raises(ValueError, match="share rows"):
    loader.merge_states([merged, shards[1].get_state()])
  with pytest.raises(ValueError, match="differ in 'step': 12 vs 15"):
    loader.merge_states([shards[0].get_state(), quarters[2].get_state()])
  with pytest.raises(ValueError, match="has seq_len 24, but this pipeline has 32"):
    loader.train_iterator(_three_domains(tmp_path, n_docs=200, seq_len=32),
                            seed=0).set_state(merged)


def test_errors_in_the_prefetch_thread_reach_the_caller(tmp_path, monkeypatch):
  choose = mixture.choose_domains

  def failing(probabilities, seed, step, batch_size):
    if step == 3:
      raise RuntimeError("broken at step 3")
    return choose(probabilities, seed, step, batch_size)

  monkeypatch.setattr(mixture, "choose_domains", failing)
  it = loader.train_iterator(_three_domains(tmp_path, prefetch=2), seed=0)
  assert len(take(it, 3)) == 3
  for _ in range(2):
    with pytest.raises(RuntimeError, match="broken at step 3"):
      next(it)


def _document_tags(batch) -> list[str]:
  """The `<domain><i>:` tags of the documents that start in `batch`."""
  tags = []
  for tokens in batch["tokens"]:
    for start in np.flatnonzero(tokens == BOS):
      tail = bytes(tokens[start + 1:start + 8].clip(0, 255).astype(np.uint8))
      if b":" in tail:  # Not cut off by the end of the row.
        tags.append(tail.split(b":")[0].decode())
  return tags


def test_mixture_proportions_over_10k_sequences(tmp_path):
  weights = {"a": 0.5, "b": 0.3, "c": 0.2}
  lengths = np.random.default_rng(0).integers(1, 80, 40)
  config = files_config(tmp_path, {n: ([n * int(k) for k in lengths], w)
                                   for n, w in weights.items()},
                        batch_size=200, seq_len=32)
  rows = np.concatenate([b["tokens"] for b in take(loader.train_iterator(config, seed=0),
                                                   50)])
  assert len(rows) == 10_000
  # Each domain's text is one repeated letter; a row's first text byte names its domain.
  domains = [chr(row[row < 256][0]) for row in rows]
  for name, weight in weights.items():
    assert abs(domains.count(name) / len(domains) - weight) < 0.02, name


def test_reweighting_is_llama_moes_update_towards_the_domain_furthest_behind():
  """LLaMA-MoE / Sheared-LLaMA: w ← softmax(log w + η (L − L_ref)), then (1 − c) w + c/n,
  with the defaults η = 1 and c = 1e-4."""
  defaults = DataConfig()
  assert (defaults.reweighting_eta, defaults.reweighting_smoothing) == (1.0, 1e-4)
  weights, losses, reference = [0.2, 0.3, 0.5], [3.5, 2.2, 1.8], [2.0, 2.0, 2.0]
  new = mixture.reweight(weights, losses, reference, eta=1.0, smoothing=1e-4)
  logits = np.log(weights) + (np.asarray(losses) - reference)
  expected = np.exp(logits) / np.exp(logits).sum()
  np.testing.assert_allclose(new, (1 - 1e-4) * expected + 1e-4 / 3, rtol=1e-12)
  assert new.sum() == pytest.approx(1.0) and (new > 0).all()
  gains = new / np.asarray(weights)
  assert np.argmax(gains) == 0 and gains[2] < 1 < gains[0]  # furthest above gains most
  at_reference = mixture.reweight(weights, reference, reference, eta=1.0, smoothing=0.0)
  np.testing.assert_allclose(at_reference, weights)  # nothing to correct


def test_dynamic_reweighting_favours_domains_behind_their_reference(tmp_path):
  new = mixture.reweight([0.5, 0.5], losses=[3.0, 2.0], reference=[2.0, 2.0], eta=1.0,
                         smoothing=0.1)
  np.testing.assert_allclose(new, np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum() * 0.9 + 0.05)
  spec = to_dict(_three_domains(tmp_path))
  for domain in spec["domains"].values():
    domain["reference_loss"] = 2.0
  config = from_mapping(DataConfig, spec | {"reweighting": "loss", "prefetch": 2})
  it = loader.train_iterator(config, seed=0)
  take(it, 2)
  weights = it.update_weights({"a": 2.0, "b": 2.0, "c": 4.0})
  np.testing.assert_allclose(list(weights.values()), mixture.reweight(
      [0.5, 0.3, 0.2], [2.0, 2.0, 4.0], [2.0] * 3, 1.0, 1e-4))
  assert weights["c"] > 0.5
  state = it.get_state()
  after = take(it, 4)
  resumed = loader.train_iterator(config, seed=0)
  resumed.set_state(state)
  assert resumed.weights == weights
  _assert_same(take(resumed, 4), after)
  with pytest.raises(ValueError, match="re-weighting needs a loss"):
    it.update_weights({"a": 1.0})


def test_eval_batches_cover_every_document_once_in_order(tmp_path):
  config = _three_domains(tmp_path, batch_size=4, seq_len=16)
  tokenizer = loader.make_tokenizer(config)
  for domain, names in (("b", "b"), (None, "abc")):
    batches = list(loader.eval_batches(config, "validation", domain=domain))
    tokens = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches])
    expected = np.concatenate([tokenizer.encode(t, True, True) for n in names
                               for t in texts(n, 25 + 7 * "abc".index(n),
                                              seed="abc".index(n))])
    np.testing.assert_array_equal(tokens, expected)
    assert (batches[-1]["segment_ids"][-1] == 0).any()  # The tail is padded.
  halves = [list(loader.eval_batches(config, "validation", process_index=p,
                                       process_count=2)) for p in range(2)]
  assert len(halves[0]) == len(halves[1]) == len(batches)
  for a, b, full in zip(*halves, batches, strict=True):
    np.testing.assert_array_equal(np.concatenate([a["tokens"], b["tokens"]]), full["tokens"])
