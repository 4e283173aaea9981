"""The tokenizers of real models: BOS and EOS as the model's own tokenizer uses them (its
files next to tokenizer.json), checked against transformers; packing with the model's
EOS as the document separator."""

import json
import shutil

import numpy as np
import pytest

from jbtx.config.data import TokenizerConfig
from jbtx.data import loader, tokenizers
from tests import data_fixtures
from tests import llama_fixtures as fx

TEXTS = ["the quick brown fox", "pack my box, 12 + 30 = 42.", "", "THE LAZY DOG!\nok"]
# Tokenizers saved by transformers as these models' are: whether they add a BOS is baked
# into tokenizer.json's post-processor.
STYLES = {
    "llama2": dict(bos_token="<s>", eos_token="</s>", add_bos_token=True),
    "llama3": dict(bos_token="<|begin_of_text|>", eos_token="<|endoftext|>",
                   add_bos_token=True),
    "qwen2": dict(eos_token="<|endoftext|>"),
    "smollm2": dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """One folder per style, and two with `add_bos_token` set in tokenizer_config.json as
  older folders have it (true over a tokenizer.json that adds no BOS; false over one
  that does), which transformers 5 ignores next to a tokenizer.json, as jbtx does."""
  root = tmp_path_factory.mktemp("tokenizers")
  out = {name: fx.save_tokenizer(root / name, **specials) for name, specials in STYLES.items()}
  for name, base, add_bos in (("explicit_bos", "qwen2", True), ("explicit_no_bos", "llama3",
                                                                  False)):
    out[name] = shutil.copytree(out[base], root / name)
    settings = json.loads((out[name] / "tokenizer_config.json").read_text())
    bos = settings.get("bos_token", "<s>")
    (out[name] / "tokenizer_config.json").write_text(json.dumps(
        settings | {"add_bos_token": add_bos, "bos_token": bos}))
  return out


@pytest.mark.parametrize("name", [*STYLES, "explicit_bos", "explicit_no_bos"])
def test_special_tokens_match_transformers(folders, name):
  reference = fx.transformers.AutoTokenizer.from_pretrained(folders[name])
  tok = tokenizers.make(TokenizerConfig(type="huggingface", path=str(folders[name])))
  adds_bos = reference("x").input_ids[0] == reference.bos_token_id
  assert tok.bos_id == (reference.bos_token_id if adds_bos else None)
  assert tok.eos_id == tok.pad_id == reference.eos_token_id
  assert tok.vocab_size == len(reference)
  for text in TEXTS:
    ids = tok.encode(text, add_bos=True, add_eos=False)
    assert list(ids) == reference(text).input_ids, text
    assert list(tok.encode(text, add_bos=True, add_eos=True)) == [*ids, reference.eos_token_id]
    assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_no_bos_where_the_model_has_none(folders):
  expected = {"llama2": 1, "llama3": 4, "qwen2": None, "smollm2": None, "explicit_bos": None,
              "explicit_no_bos": 4}
  for name, bos in expected.items():
    tok = tokenizers.make(TokenizerConfig(type="huggingface", path=str(folders[name])))
    assert tok.bos_id == bos, name


def test_ids_from_the_models_config_json_and_explicit_tokens(folders, tmp_path):
  shutil.copy(folders["qwen2"] / "tokenizer.json", tmp_path / "tokenizer.json")
  (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1,
                                                    "eos_token_id": [2, 3]}))
  tok = tokenizers.make(TokenizerConfig(type="huggingface", path=str(tmp_path)))
  assert (tok.bos_id, tok.eos_id) == (None, 2)  # the first of several EOS ids
  named = tokenizers.make(TokenizerConfig(type="huggingface", path=str(tmp_path),
                                          bos_token="<s>", eos_token="<|endoftext|>"))
  assert (named.bos_id, named.eos_id) == (1, 3)
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(ValueError, match=r"no EOS token in config\.json.*data\.tokenizer\."
                                       r"eos_token"):
    tokenizers.make(TokenizerConfig(type="huggingface", path=str(tmp_path)))


def test_a_tokenizer_json_alone_keeps_llama2s_tokens(folders, tmp_path):
  shutil.copy(folders["llama2"] / "tokenizer.json", tmp_path / "tokenizer.json")
  tok = tokenizers.make(TokenizerConfig(type="huggingface",
                                        path=str(tmp_path / "tokenizer.json")))
  assert (tok.bos_id, tok.eos_id) == (1, 2)


@pytest.mark.parametrize("name", ["qwen2", "llama2"])
def test_documents_are_packed_with_the_models_eos_between_them(folders, tmp_path, name):
  reference = fx.transformers.AutoTokenizer.from_pretrained(folders[name])
  docs = ["the lazy dog", "pack my box", "12 + 30 = 42", "the quick fox"]
  config = data_fixtures.files_config(
      tmp_path, {"d": (docs, 1.0)}, seq_len=64, batch_size=1,
      tokenizer={"type": "huggingface", "path": str(folders[name])})
  batch = next(loader.train_iterator(config, seed=0))
  tokens, segments = batch["tokens"][0], batch["segment_ids"][0]
  packed = [list(tokens[segments == s]) for s in np.unique(segments[segments > 0])]
  expected = sorted([*reference(d).input_ids, reference.eos_token_id] for d in docs)
  assert sorted(packed[:4]) == expected  # the first epoch: each ended by the model's EOS
  assert all(p in expected for p in packed[4:-1])  # the row goes on into the next epoch
