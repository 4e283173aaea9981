"""Training data: named domains and their sources, tokenizer, packing, mixture weights."""

from __future__ import annotations

import dataclasses
from typing import Literal

from jbtx.config.base import require as _require

DEMO_DOMAINS = ("code", "math", "knowledge", "general")


@dataclasses.dataclass(frozen=True)
class DomainConfig:
  """One domain: where its documents come from and its share of the mixture.

  Attributes:
    source: "demo" (built in, `name` one of code, math, knowledge, general), "files"
      (local `.txt`, `.jsonl`, optionally `.gz`), or "tfds" (a prepared TFDS dataset).
    name: the demo domain, or the TFDS dataset name (e.g. "wikipedia/20230601.en").
    splits: split name ("train", "validation", "test") -> a glob of files (source
      "files") or a TFDS split spec such as "train[:99%]" (source "tfds"). Demo
      domains have fixed splits and ignore this.
    text_key: the text field of a JSONL line or TFDS example.
    txt_unit: "file" (each `.txt` file is one document) or "line" (each non-empty line).
    prepare: for source "files": convert the files once into an ArrayRecord TFDS
      dataset named `jbtx_text/<domain>` under `data_dir`, then read that.
    weight: relative share of training sequences drawn from this domain.
    reference_loss: the target validation loss for dynamic re-weighting.
  """

  source: Literal["demo", "files", "tfds"] = "demo"
  name: str = ""
  splits: dict[str, str] = dataclasses.field(default_factory=dict)
  text_key: str = "text"
  txt_unit: Literal["file", "line"] = "file"
  prepare: bool = False
  weight: float = 1.0
  reference_loss: float | None = None

  def __post_init__(self):
    _require(self.weight >= 0, "weight", f"must be non-negative, got {self.weight}")
    if self.source == "demo":
      _require(self.name in DEMO_DOMAINS, "name",
               f"demo domains are {', '.join(DEMO_DOMAINS)}, got {self.name!r}")
    if self.source == "tfds":
      _require(bool(self.name), "name", "a TFDS dataset name is required")
    if self.source in ("files", "tfds"):
      _require("train" in self.splits, "splits",
               f"needs a 'train' entry, got {sorted(self.splits)}")
    _require(not self.prepare or self.source == "files", "prepare",
             f"only applies to source 'files', got source {self.source!r}")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """Text -> token ids.

  Attributes:
    type: "byte" (UTF-8 bytes, no file), "sentencepiece" (e.g. Llama-2's
      `tokenizer.model`) or "huggingface" (a `tokenizer.json`).
    path: the tokenizer file for "sentencepiece" and "huggingface", or the folder
      holding it (an HF model folder, or a checkpoint `python -m jbtx.convert import`
      made from one, which carries its tokenizer files).
    bos_token, eos_token, pad_token: special tokens of a "huggingface" tokenizer. ""
      (the default) takes the model's own from the files next to `tokenizer.json`
      (tokenizer_config.json, special_tokens_map.json, config.json), with BOS only if
      the model's tokenizer adds one (not Qwen2's or SmolLM2's); for a `tokenizer.json`
      alone, Llama-2's "<s>" and "</s>". EOS separates packed documents. pad_token ""
      pads with the EOS id (padding is masked by segment id 0 anyway).
  """

  type: Literal["byte", "sentencepiece", "huggingface"] = "byte"
  path: str = ""
  bos_token: str = ""
  eos_token: str = ""
  pad_token: str = ""

  def __post_init__(self):
    _require(self.type == "byte" or bool(self.path), "path",
             f"a {self.type} tokenizer needs a file path")


def _demo_domains() -> dict[str, DomainConfig]:
  return {name: DomainConfig(source="demo", name=name) for name in DEMO_DOMAINS}


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Training data.

  Attributes:
    domains: domain name -> DomainConfig; training draws each packed row from one
      domain with probability proportional to its weight.
    tokenizer: see TokenizerConfig.
    data_dir: where built-in demo data and prepared local files are cached ("" means
      `$JBTX_DATA_DIR`, else `~/.cache/jbtx`).
    tfds_data_dir: where source "tfds" datasets are read from ("": TFDS's default);
      they must be prepared as ArrayRecord, nothing is downloaded.
    seq_len: tokens per packed row.
    batch_size: rows per step (global batch, over all processes).
    reweighting: "none" (static weights) or "loss": after each evaluation the weights
      become softmax(log w + eta * (L - L_ref)), smoothed towards uniform by
      `reweighting_smoothing` (Sheared-LLaMA / LLaMA-MoE dynamic data mixing).
    reweighting_eta: the step size eta.
    reweighting_smoothing: c in w <- (1 - c) w + c / n_domains.
    prefetch: batches prepared ahead in a background thread (0: none).
  """

  domains: dict[str, DomainConfig] = dataclasses.field(default_factory=_demo_domains)
  tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
  data_dir: str = ""
  tfds_data_dir: str = ""
  seq_len: int = 256
  batch_size: int = 16
  reweighting: Literal["none", "loss"] = "none"
  reweighting_eta: float = 1.0
  reweighting_smoothing: float = 1e-4
  prefetch: int = 2

  def __post_init__(self):
    _require(self.seq_len > 1, "seq_len", f"must be at least 2, got {self.seq_len}")
    _require(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")
    _require(bool(self.domains), "domains", "at least one domain is required")
    _require(sum(d.weight for d in self.domains.values()) > 0, "domains",
             "the domain weights sum to 0")
    _require(self.prefetch >= 0, "prefetch", f"must be non-negative, got {self.prefetch}")
    _require(0 <= self.reweighting_smoothing <= 1, "reweighting_smoothing",
             f"must be in [0, 1], got {self.reweighting_smoothing}")
    if self.reweighting == "loss":
      missing = [n for n, d in self.domains.items() if d.reference_loss is None]
      _require(not missing, f"domains.{missing[0] if missing else ''}.reference_loss",
               "dynamic re-weighting needs a reference loss for every domain")

  def single_domain(self, name: str, spec: DomainConfig | None = None) -> DataConfig:
    """This data with one domain, `name`, alone and static: its own spec (or `spec`)
    with weight 1 (an expert's, a cluster's or one domain's statistics)."""
    spec = dataclasses.replace(spec or self.domains[name], weight=1.0)
    return dataclasses.replace(self, domains={name: spec}, reweighting="none")
