"""A TFDS builder that prepares local text files into ArrayRecord once.

Large local corpora (`.txt`, `.jsonl`, gzip) are indexed and parsed once into the TFDS
dataset `jbtx_text/<config>` under the data dir, read later through TFDS's
random-access ArrayRecord data source, without TensorFlow. The builder config's name
carries a fingerprint of the files (paths, sizes, modification times) and of the
parsing options, so changed files are prepared anew and unchanged ones never again.
"""

from __future__ import annotations

import glob
import hashlib
import json
import pathlib
import re

import tensorflow_datasets as tfds

from jbtx.config.data import DomainConfig
from jbtx.data import sources

VERSION = "1.0.0"


class JbtxText(tfds.core.GeneratorBasedBuilder):
  """Documents `{"text": str}` of local files, one split per configured glob."""

  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, splits: dict[str, str], text_key: str, txt_unit: str, **kwargs):
    self._patterns = splits
    self._text_key = text_key
    self._txt_unit = txt_unit
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description="Local text files prepared by jbtx.",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    return {split: self._generate_examples(pattern)
            for split, pattern in self._patterns.items()}

  def _generate_examples(self, pattern: str):
    source = sources.FileSource(pattern, self._text_key, self._txt_unit)
    for i in range(len(source)):
      yield i, {"text": source[i]}


def fingerprint(domain: DomainConfig) -> str:
  """A hash of the domain's file list (with sizes and mtimes) and parsing options."""
  files = {}
  for split, pattern in sorted(domain.splits.items()):
    paths = sorted(glob.glob(str(pathlib.Path(pattern).expanduser()), recursive=True))
    files[split] = [(p, pathlib.Path(p).stat().st_size, pathlib.Path(p).stat().st_mtime_ns)
                    for p in paths if pathlib.Path(p).is_file()]
  key = json.dumps([files, domain.text_key, domain.txt_unit])
  return hashlib.sha256(key.encode()).hexdigest()[:12]


def prepare(name: str, domain: DomainConfig, root: pathlib.Path) -> pathlib.Path:
  """Prepares (once) the files of `domain`; returns the prepared dataset's directory."""
  config_name = f"{re.sub(r'[^a-zA-Z0-9_]', '_', name)}_{fingerprint(domain)}"
  builder = JbtxText(splits=dict(domain.splits), text_key=domain.text_key,
                     txt_unit=domain.txt_unit, data_dir=str(root / "tfds"),
                     config=tfds.core.BuilderConfig(name=config_name),
                     file_format="array_record")
  builder.download_and_prepare()
  return pathlib.Path(builder.data_dir)


def prepared_source(name: str, domain: DomainConfig, split: str,
                    root: pathlib.Path) -> sources.TfdsSource:
  """Split `split` of domain `name`'s files, read from their ArrayRecord preparation."""
  directory = prepare(name, domain, root)
  data = tfds.builder_from_directory(str(directory)).as_data_source(split=split)
  return sources.TfdsSource(data, "text", f"{directory}[{split}]")
