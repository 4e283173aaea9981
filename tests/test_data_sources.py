"""Local-file and TFDS sources, and every bad input named by file, line or key."""

import gzip
import warnings

import pytest

from jbtx.config import DataConfig, from_mapping
from jbtx.config.data import DomainConfig
from jbtx.data import loader, sources, tfds_builder
from tests.data_fixtures import write_jsonl


def test_txt_jsonl_gzip_and_globs(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "a.txt").write_text("first file\nstill first\n")
  (tmp_path / "sub" / "b.txt.gz").write_bytes(gzip.compress(b"second file"))
  (tmp_path / "blank.txt").write_text(" \n")
  write_jsonl(tmp_path / "sub" / "c.jsonl", ["third", "fourth"])
  (tmp_path / "sub" / "d.jsonl.gz").write_bytes(gzip.compress(b'{"body": "fifth"}\n\n'))
  with pytest.raises(ValueError, match=r"d\.jsonl\.gz:1: no text field 'text'"):
    sources.FileSource(str(tmp_path / "**" / "*.*"), text_key="text")
  body = sources.FileSource(str(tmp_path / "**" / "d.*"), text_key="body")
  assert (len(body), body[0]) == (1, "fifth")
  src = sources.FileSource(str(tmp_path / "**" / "[abc].*"))
  assert [src[i] for i in range(len(src))] == [
      "first file\nstill first\n", "second file", "third", "fourth"]
  lines = sources.FileSource(str(tmp_path / "*.txt"), txt_unit="line")
  assert [lines[i] for i in range(len(lines))] == ["first file", "still first"]


@pytest.mark.parametrize("name, content, error, fragment", [
    ("missing.jsonl", None, FileNotFoundError, "no files match"),
    ("empty.jsonl", b"\n\n", ValueError, "empty dataset"),
    ("bad.jsonl", b'{"text": "ok"}\n{"txt": "no"}\n', ValueError,
     r"bad\.jsonl:2: no text field 'text'"),
    ("broken.jsonl", b'{"text": "ok"}\n\n{"text": \n', ValueError,
     r"broken\.jsonl:3: not valid JSON"),
    ("typed.jsonl", b'{"text": 5}\n', ValueError, r"typed\.jsonl:1: field 'text' is not"),
    ("doc.pdf", b"%PDF", ValueError, r"doc\.pdf: unsupported file type"),
    ("bad.txt.gz", b"not gzip", ValueError, r"bad\.txt\.gz: not a readable gzip"),
])
def test_bad_files_name_the_file_and_line(tmp_path, name, content, error, fragment):
  if content is not None:
    (tmp_path / name).write_bytes(content)
  with pytest.raises(error, match=fragment):
    sources.FileSource(str(tmp_path / name))


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
  (tmp_path / "x.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n'
                                     b'{"text": "\xff\xfe"}\n')
  with pytest.warns(UserWarning, match=r"x\.jsonl:2: invalid UTF-8 in 2 document"):
    src = sources.FileSource(str(tmp_path / "x.jsonl"))
  assert src.invalid_utf8 == 2
  assert [src[i] for i in range(3)] == ["fine", "caf\ufffd", "\ufffd\ufffd"]


def _domain_config(tmp_path, **domain) -> DataConfig:
  return from_mapping(DataConfig, {"domains": {"web": domain}, "batch_size": 2,
                                   "seq_len": 8, "data_dir": str(tmp_path / "cache"),
                                   "tfds_data_dir": str(tmp_path / "tfds")})


def test_errors_name_the_domain_and_split(tmp_path):
  config = _domain_config(tmp_path, source="files", splits={"train": str(tmp_path / "no*")})
  with pytest.raises(FileNotFoundError, match=r"domain 'web' \(train\): no files match"):
    loader.train_iterator(config, seed=0)
  with pytest.raises(ValueError, match=r"'data.domains.web.splits': no 'test' entry"):
    next(loader.eval_batches(config, "test"))


def test_unknown_tfds_dataset(tmp_path):
  config = _domain_config(tmp_path, source="tfds", name="no_such_dataset_xyz",
                          splits={"train": "train"})
  with pytest.raises(ValueError, match="unknown TFDS dataset 'no_such_dataset_xyz'"):
    loader.train_iterator(config, seed=0)


def test_empty_tfds_split_names_the_dataset():
  # Any sequence of examples stands in for the ArrayRecord data source of a split.
  with pytest.raises(ValueError, match=r"empty dataset: tfds:wiki/en\[train\] has no examples"):
    sources.TfdsSource([], "text", "tfds:wiki/en[train]")
  assert sources.TfdsSource([{"text": "a"}], "text", "tfds:wiki/en[train]")[0] == "a"


def test_files_prepared_once_into_array_record_and_read_through_tfds(tmp_path):
  write_jsonl(tmp_path / "train.jsonl", [f"doc {i} ü" for i in range(7)])
  write_jsonl(tmp_path / "val.jsonl", ["held out"])
  splits = {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "val.jsonl")}
  config = _domain_config(tmp_path, source="files", splits=splits, prepare=True)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    batch = next(loader.train_iterator(config, seed=0))
    [prepared] = (tmp_path / "cache" / "tfds" / "jbtx_text").iterdir()
    stamp = (prepared / tfds_builder.VERSION / "dataset_info.json").stat().st_mtime_ns
    held_out = list(loader.eval_batches(config, "validation"))
    # Read by name like any TFDS dataset (source "tfds"); the preparation is reused.
    by_name = sources.tfds_source(f"jbtx_text/{prepared.name}", "train",
                                  str(tmp_path / "cache" / "tfds"), "text")
  assert (prepared / tfds_builder.VERSION / "dataset_info.json").stat().st_mtime_ns == stamp
  assert sorted(by_name[i] for i in range(len(by_name))) == [f"doc {i} ü" for i in range(7)]
  tokenizer = loader.make_tokenizer(config)
  assert "doc " in tokenizer.decode(batch["tokens"][0])
  assert "".join(tokenizer.decode(row) for b in held_out for row in b["tokens"]) == "held out"
  with pytest.raises(ValueError, match="no feature 'body'"):
    sources.tfds_source(f"jbtx_text/{prepared.name}", "train",
                        str(tmp_path / "cache" / "tfds"), "body")
  with pytest.raises(ValueError, match="bad split 'tain'"):
    sources.tfds_source(f"jbtx_text/{prepared.name}", "tain",
                        str(tmp_path / "cache" / "tfds"), "text")


def test_changed_files_are_prepared_anew(tmp_path):
  path = write_jsonl(tmp_path / "train.jsonl", ["one"])
  domain = DomainConfig(source="files", splits={"train": str(path)}, prepare=True)
  before = tfds_builder.fingerprint(domain)
  write_jsonl(path, ["one", "two"])
  assert tfds_builder.fingerprint(domain) != before
