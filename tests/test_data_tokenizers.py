"""Tokenizers: byte, SentencePiece and tokenizer.json models trained here; Llama-2 BOS/EOS."""

import numpy as np
import pytest

from jbtx.config import DataConfig, from_mapping
from jbtx.config.data import TokenizerConfig
from jbtx.data import loader, tokenizers

CORPUS = ["the quick brown fox jumps over the lazy dog",
          "pack my box with five dozen liquor jugs",
          "how vexingly quick daft zebras jump"] * 20
TEXT = "the lazy fox jumps over five zebras"


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
  """A tiny BPE model with Llama-2's special ids: unk 0, BOS 1, EOS 2, no pad."""
  import sentencepiece

  prefix = tmp_path_factory.mktemp("sp") / "tokenizer"
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_prefix=str(prefix), vocab_size=60,
      model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
  return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def huggingface_json(tmp_path_factory):
  """A tiny byte-level BPE `tokenizer.json` with <s>, </s> and <pad>."""
  import tokenizers as hf

  tok = hf.Tokenizer(hf.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, hf.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
      initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet()))
  path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
  tok.save(str(path))
  return path


def test_byte_tokenizer_llama_style_specials():
  tok = tokenizers.ByteTokenizer()
  ids = tok.encode("hé", add_bos=True, add_eos=True)
  np.testing.assert_array_equal(ids, [256, 104, 195, 169, 257])
  assert ids.dtype == np.int32 and tok.decode(ids) == "hé"
  assert list(tok.encode("a", add_bos=False)) == [97]


def test_sentencepiece_matches_the_library_and_adds_bos_eos(sentencepiece_model):
  import sentencepiece

  tok = tokenizers.make(TokenizerConfig(type="sentencepiece", path=str(sentencepiece_model)))
  reference = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 60)
  ids = tok.encode(TEXT, add_bos=True, add_eos=True)
  assert ids.dtype == np.int32 and len(ids) > 4
  assert list(ids) == [1, *reference.encode(TEXT), 2]
  assert tok.decode(ids) == TEXT and list(tok.encode(TEXT)) == list(ids[:-1])  # No EOS.


def test_huggingface_json_specials_looked_up_by_token(huggingface_json):
  import tokenizers as hf

  config = TokenizerConfig(type="huggingface", path=str(huggingface_json), pad_token="<pad>")
  tok = tokenizers.make(config)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3) and tok.vocab_size == 300
  ids = tok.encode(TEXT, add_bos=True, add_eos=True)
  reference = hf.Tokenizer.from_file(str(huggingface_json)).encode(TEXT).ids
  assert list(ids) == [1, *reference, 2] and tok.decode(ids) == TEXT
  with pytest.raises(ValueError, match=r"'data.tokenizer.bos_token': token '<bos>' is not"):
    tokenizers.make(TokenizerConfig(type="huggingface", path=str(huggingface_json),
                                    bos_token="<bos>"))


def test_pipeline_packs_with_a_file_tokenizer(tmp_path, sentencepiece_model):
  (tmp_path / "t.txt").write_text("\n".join(CORPUS[:3]))
  config = from_mapping(DataConfig, {
      "domains": {"t": {"source": "files", "splits": {"train": str(tmp_path / "t.txt")},
                        "txt_unit": "line"}},
      "tokenizer": {"type": "sentencepiece", "path": str(sentencepiece_model)},
      "seq_len": 16, "batch_size": 2, "data_dir": str(tmp_path / "cache")})
  batch = next(loader.train_iterator(config, seed=0))
  assert batch["tokens"].max() < 60 and (batch["tokens"] == 1).any()


@pytest.mark.parametrize("kind, name, fragment", [
    ("sentencepiece", "tokenizer.model", "is not a SentencePiece model"),
    ("huggingface", "tokenizer.json", "is not a Hugging Face tokenizer.json"),
])
def test_a_file_that_is_not_a_tokenizer(tmp_path, kind, name, fragment):
  path = tmp_path / name
  path.write_bytes(b'{"not": "a tokenizer"}\x00\x01')
  with pytest.raises(ValueError, match=fragment) as info:
    tokenizers.make(TokenizerConfig(type=kind, path=str(path)))
  assert str(path) in str(info.value)
  with pytest.raises(FileNotFoundError, match=r"data.tokenizer.path"):
    tokenizers.make(TokenizerConfig(type=kind, path=str(tmp_path / "absent")))


def test_a_tokenizer_larger_than_the_model_vocabulary_is_a_config_error(huggingface_json):
  from jbtx.config import ConfigError, ExperimentConfig
  from jbtx.models import presets
  from jbtx.pipeline.runner import check_vocabulary

  config = from_mapping(ExperimentConfig, {
      "model": presets.config_dict("micro", max_seq_len=256),
      "data": {"tokenizer": {"type": "huggingface", "path": str(huggingface_json)}}})
  with pytest.raises(ConfigError, match=r"model\.vocab_size.*300 ids, more than the model's 97"):
    check_vocabulary(config)
