"""Training and evaluation batches: shuffle, tokenize, pack, mix domains, shard, prefetch.

The training stream is defined for the global batch, independent of the number of
processes. Row `lane` (0 ≤ lane < batch_size) of every global batch is packed by its
own packer: it draws its domain per step from the mixture (`mixture.choose_domains`)
and, within domain d, packs documents from the slots lane, lane + B, lane + 2B, … of
d's infinite shuffled order (a fresh permutation per epoch). Lanes therefore never
share a document, every epoch's documents are spread over the lanes exactly once, and
process p of P computes only its lanes `[p B/P, (p+1) B/P)`: the P shards are disjoint
and, stacked, equal the single-process batch.

The state of a lane is its cursor (document number, token offset) per domain; the
iterator's state is those cursors plus the step and the mixture weights, a small JSON
dict. Restoring it continues the exact same token stream.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from jbtx.config.base import ConfigError
from jbtx.config.data import DataConfig, DomainConfig
from jbtx.data import demo, mixture, packing, sources
from jbtx.data.tokenizers import Tokenizer, make

Batch = dict[str, np.ndarray]
STATE_VERSION = 1


def make_tokenizer(config: DataConfig) -> Tokenizer:
  """The tokenizer of `config.tokenizer`."""
  return make(config.tokenizer)


def open_source(config: DataConfig, name: str, split: str) -> sources.Source:
  """Split `split` of domain `name` as a random-access source of texts."""
  domain: DomainConfig = config.domains[name]
  root = demo.data_dir(config.data_dir)
  if domain.source == "demo":
    return sources.FileSource(str(demo.split_file(domain.name, split, root)))
  if split not in domain.splits:
    raise ValueError(f"config key 'data.domains.{name}.splits': no {split!r} entry; "
                     f"have {', '.join(sorted(domain.splits))}")
  try:
    if domain.source == "tfds":
      return sources.tfds_source(domain.name, domain.splits[split], config.tfds_data_dir,
                                 domain.text_key)
    if domain.prepare:
      from jbtx.data import tfds_builder

      return tfds_builder.prepared_source(name, domain, split, root)
    return sources.FileSource(domain.splits[split], domain.text_key, domain.txt_unit)
  except (ValueError, FileNotFoundError) as e:
    raise type(e)(f"domain {name!r} ({split}): {e}") from None


def _lanes(batch_size: int, process_index: int, process_count: int) -> range:
  """The global batch rows of process `process_index`."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if batch_size % process_count:
    raise ConfigError("data.batch_size", f"must be divisible by the process count "
                                         f"({process_count}), got {batch_size}")
  per = batch_size // process_count
  return range(process_index * per, (process_index + 1) * per)


class _Producer:
  """The deterministic state machine behind `TrainIterator` (no threads)."""

  def __init__(self, config: DataConfig, seed: int, lanes: range):
    self._config = config
    self._seed = seed
    self._lanes = lanes
    self._names = list(config.domains)
    self._tokenizer = make_tokenizer(config)
    self._sources = [open_source(config, n, "train") for n in self._names]
    self._orders = [mixture.ShuffledOrder(len(s), seed, stream=d)
                    for d, s in enumerate(self._sources)]
    self._last: dict[tuple[int, int], tuple[int, np.ndarray]] = {}
    self.restore({"version": STATE_VERSION, "step": 0, "domains": self._names,
                  "batch_size": config.batch_size, "seq_len": config.seq_len,
                  "weights": mixture.normalize(
                      [config.domains[n].weight for n in self._names]).tolist(),
                  "cursors": {str(lane): [[0, 0]] * len(self._names) for lane in lanes}})

  def _document(self, d: int, lane: int, number: int) -> np.ndarray:
    """Tokens `[n]` of the `number`-th document of `lane` in domain `d`."""
    cached = self._last.get((d, lane))
    if cached is None or cached[0] != number:
      slot = lane + number * self._config.batch_size
      text = self._sources[d][self._orders[d][slot]]
      cached = (number, self._tokenizer.encode(text, add_bos=True, add_eos=True))
      self._last[(d, lane)] = cached
    return cached[1]

  def next(self) -> Batch:
    """This process's rows of the next global batch, each int32 `[rows, seq_len]`."""
    domains = mixture.choose_domains(self._weights, self._seed, self._step,
                                     self._config.batch_size)
    rows = []
    for lane in self._lanes:
      d = int(domains[lane])
      row, self._cursors[lane][d] = packing.fill_row(
          self._cursors[lane][d], lambda k, d=d, lane=lane: self._document(d, lane, k),
          self._config.seq_len, self._tokenizer.pad_id)
      rows.append(row)
    self._step += 1
    return packing.stack(rows)

  def state(self) -> dict:
    return {"version": STATE_VERSION, "step": self._step, "domains": self._names,
            "batch_size": self._config.batch_size, "seq_len": self._config.seq_len,
            "weights": self._weights.tolist(),
            "cursors": {str(lane): [list(c) for c in self._cursors[lane]]
                        for lane in self._lanes}}

  def restore(self, state: Mapping) -> None:
    """Continues from `state` (of this or any process count, as long as it holds this
    process's lanes)."""
    expected = {"version": STATE_VERSION, "domains": self._names,
                "batch_size": self._config.batch_size, "seq_len": self._config.seq_len}
    for key, value in expected.items():
      if state.get(key) != value:
        raise ValueError(f"data iterator state has {key} {state.get(key)!r}, but this "
                         f"pipeline has {value!r}")
    missing = [lane for lane in self._lanes if str(lane) not in state["cursors"]]
    if missing:
      raise ValueError(f"data iterator state lacks the cursors of rows {missing[:4]}…; "
                       "it was saved by another process")
    self._step = int(state["step"])
    self._weights = mixture.normalize(state["weights"])
    self._cursors = {lane: [(int(k), int(o)) for k, o in state["cursors"][str(lane)]]
                     for lane in self._lanes}

  def reweighted(self, losses: Mapping[str, float]) -> list[float]:
    """The mixture weights after dynamic re-weighting with validation `losses`."""
    unknown = sorted(set(self._names) ^ set(losses))
    if unknown:
      raise ValueError(f"re-weighting needs a loss for exactly the domains "
                       f"{', '.join(self._names)}; mismatch on {', '.join(unknown)}")
    c = self._config
    return mixture.reweight(
        self._weights, [losses[n] for n in self._names],
        [c.domains[n].reference_loss for n in self._names], c.reweighting_eta,
        c.reweighting_smoothing).tolist()


class TrainIterator:
  """An endless, checkpointable iterator of training batches (see the module doc).

  `next()` returns `{"tokens", "segment_ids", "positions"}`, each int32
  `[batch_size // process_count, seq_len]`. `get_state()` is the state after the last
  batch returned; `set_state()` continues from such a state. With `prefetch > 0` a
  background thread prepares batches ahead; that changes no batch.
  """

  def __init__(self, producer: _Producer, prefetch: int):
    self._producer = producer
    self._prefetch = prefetch
    self._state = producer.state()
    self._thread: threading.Thread | None = None
    self._error: Exception | None = None
    self._start()

  def _start(self) -> None:
    if not self._prefetch:
      return
    self._queue: queue.Queue = queue.Queue(self._prefetch)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._fill, args=(self._queue, self._stop),
                                    daemon=True, name="jbtx-data-prefetch")
    self._thread.start()

  def _fill(self, out: queue.Queue, stop: threading.Event) -> None:
    while not stop.is_set():
      try:
        item = (self._producer.next(), self._producer.state())
      except Exception as e:  # Re-raised by __next__ in the consumer's thread.
        item = e
      while not stop.is_set():
        try:
          out.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if isinstance(item, Exception):
        return

  def _halt(self) -> None:
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> Batch:
    if not self._prefetch:
      batch = self._producer.next()
      self._state = self._producer.state()
      return batch
    if self._error is not None:
      raise self._error
    item = self._queue.get()
    if isinstance(item, Exception):
      self._error = item  # The thread has stopped; every later call fails the same way.
      raise item
    batch, self._state = item
    return batch

  def get_state(self) -> dict:
    """JSON-serialisable state after the last batch returned."""
    return copy.deepcopy(self._state)

  def set_state(self, state: Mapping) -> None:
    """Continues after the batch at which `state` was taken."""
    self._halt()
    self._producer.restore(state)
    self._state = self._producer.state()
    self._error = None
    self._start()

  @property
  def weights(self) -> dict[str, float]:
    """The current mixture probabilities by domain."""
    return dict(zip(self._state["domains"], self._state["weights"], strict=True))

  def update_weights(self, losses: Mapping[str, float]) -> dict[str, float]:
    """Dynamic re-weighting from per-domain validation `losses` (`data.reweighting`
    "loss"); applies from the next batch on and is part of the state."""
    self._halt()
    self._producer.restore(self._state)
    state = self._producer.state() | {"weights": self._producer.reweighted(losses)}
    self.set_state(state)
    return self.weights

  def close(self) -> None:
    """Stops the prefetch thread."""
    self._halt()


def train_iterator(config: DataConfig, *, seed: int, process_index: int = 0,
                   process_count: int = 1) -> TrainIterator:
  """Endless training batches of process `process_index` (see `TrainIterator`)."""
  lanes = _lanes(config.batch_size, process_index, process_count)
  return TrainIterator(_Producer(config, seed, lanes), config.prefetch)


def merge_states(states: Sequence[Mapping]) -> dict:
  """One iterator state holding the lanes of all `states`, the per-process states of
  one job at one step; a job with any number of processes resumes from it.

  Raises:
    ValueError: if the states differ in anything but their lanes, or share a lane.
  """
  if not states:
    raise ValueError("no data iterator states to merge")
  merged = copy.deepcopy(dict(states[0]))
  for other in states[1:]:
    for key in merged.keys() - {"cursors"}:
      if other.get(key) != merged[key]:
        raise ValueError(f"the processes' data iterator states differ in {key!r}: "
                         f"{merged[key]!r} vs {other.get(key)!r}")
    shared = sorted(merged["cursors"].keys() & other["cursors"].keys(), key=int)
    if shared:
      raise ValueError(f"the processes' data iterator states share rows {shared[:4]}")
    merged["cursors"] |= copy.deepcopy(dict(other["cursors"]))
  return merged


def _concatenated(tokenizer: Tokenizer, srcs: Sequence[sources.Source]):
  """Document number -> tokens `[n]` over `srcs` back to back, None past the end."""
  bounds = np.cumsum([0] + [len(s) for s in srcs])
  last: list = [None, None]

  def document(k: int) -> np.ndarray | None:
    if k >= bounds[-1]:
      return None
    if last[0] != k:
      i = int(np.searchsorted(bounds, k, side="right")) - 1
      last[:] = [k, tokenizer.encode(srcs[i][k - int(bounds[i])], add_bos=True,
                                     add_eos=True)]
    return last[1]
  return document


def eval_batches(config: DataConfig, split: str, *, domain: str | None = None,
                 process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
  """Evaluation batches of `split`: one pass over the documents of `domain` (None: all
  domains, in config order), in order, packed like training; the last batch is padded
  with empty rows (segment id 0), so every token is seen exactly once. Every process
  packs the whole stream and keeps its rows, so all yield the same number of batches.
  """
  if domain is not None and domain not in config.domains:
    raise ValueError(f"unknown domain {domain!r}; config.data.domains has "
                     f"{', '.join(config.domains)}")
  lanes = _lanes(config.batch_size, process_index, process_count)
  tokenizer = make_tokenizer(config)
  names = [domain] if domain is not None else list(config.domains)
  document = _concatenated(tokenizer, [open_source(config, n, split) for n in names])
  cursor = (0, 0)
  while document(cursor[0]) is not None:
    rows = []
    for _ in range(config.batch_size):
      row, cursor = packing.fill_row(cursor, document, config.seq_len, tokenizer.pad_id)
      rows.append(row)
    yield packing.stack(rows[lanes.start:lanes.stop])


def eval_tasks(config: DataConfig, domain: str, split: str) -> list[dict[str, str]]:
  """Evaluation tasks `{"prompt", "answer"}` of a demo domain (math, knowledge)."""
  spec = config.domains.get(domain)
  if spec is None or spec.source != "demo":
    raise ValueError(f"config key 'data.domains.{domain}': tasks come with the demo "
                     f"domains {', '.join(demo.TASK_DOMAINS)} only")
  return demo.tasks(spec.name, split, demo.data_dir(config.data_dir))

