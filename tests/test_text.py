import json

import pytest
import torch

from rsitr.errors import DatasetError
from rsitr.text import PAD_INDEX, UNK_TOKEN, Vocabulary, encode_batch, load_glove, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("Many planes, parked next to a BUILDING.") == ["many", "planes", "parked", "next", "to", "a", "building"]
    assert tokenize("2 tanks") == ["2", "tanks"]


def test_build_min_count_and_layout():
    vocab = Vocabulary.build(["a plane", "a plane", "a ship"], min_count=2)
    assert vocab.idx2word[0] == ""  # padding
    assert vocab.word2idx["a"] == 1 and vocab.word2idx["plane"] == 2
    assert "ship" not in vocab
    assert vocab.idx2word[-1] == UNK_TOKEN and vocab.unk_index == len(vocab) - 1
    assert vocab.encode("a ship") == [1, vocab.unk_index]


def test_amfmn_json_round_trip(tmp_path):
    vocab = Vocabulary.build(["storage tanks near a river", "a river"])
    path = tmp_path / "vocab.json"
    vocab.save(path)
    data = json.loads(path.read_text())
    assert min(data["word2idx"].values()) == 1
    assert data["idx2word"][str(data["word2idx"][UNK_TOKEN])] == UNK_TOKEN
    assert Vocabulary.load(path) == vocab


def test_load_rejects_gaps(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"word2idx": {"a": 1, "b": 3}}))
    with pytest.raises(DatasetError, match="bad.json"):
        Vocabulary.load(path)


def test_encode_batch_pads():
    vocab = Vocabulary.build(["one two three", "four"])
    tokens, lengths = encode_batch(vocab, ["one two three", "four", ""])
    assert tokens.shape == (3, 3)
    assert lengths.tolist() == [3, 1, 1]
    assert tokens[1, 1:].tolist() == [PAD_INDEX, PAD_INDEX]
    assert tokens[2, 0].item() == vocab.unk_index


def test_glove_reader(tmp_path):
    vocab = Vocabulary.build(["plane ship"])
    path = tmp_path / "glove.txt"
    path.write_text("plane 1 2 3\nunrelated 4 5 6\n")
    weights, found = load_glove(path, vocab, 3)
    assert found == 1
    assert torch.equal(weights[vocab.word2idx["plane"]], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(weights[PAD_INDEX], torch.zeros(3))
    path.write_text("plane 1 2\n")
    with pytest.raises(DatasetError, match="line 1"):
        load_glove(path, vocab, 3)
