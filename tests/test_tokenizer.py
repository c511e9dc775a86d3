import pytest
import torch

from qshift.models.tokenizer import NgramTokenizer


def test_typos_keep_most_pieces():
    tok = NgramTokenizer()
    clean = set(tok.word_pieces("triangle"))
    for typo in ("trianlge", "triangel", "tr1angle", "triangle", "triaangle"):
        overlap = len(clean & set(tok.word_pieces(typo))) / len(clean)
        assert overlap >= 0.5 if typo != "triangle" else overlap == 1.0, (typo, overlap)
    assert len(clean & set(tok.word_pieces("circle"))) / len(clean) < 0.2


def test_shapes_padding_and_determinism():
    tok = NgramTokenizer()
    out = tok(["a red circle", "there is a small blue square, on the left"])
    assert out.shape[0] == 2 and out.shape[1] == 10  # 9 words + the comma
    assert (out[0, 3:] == 0).all()
    assert torch.equal(out, NgramTokenizer()(["a red circle", "there is a small blue square, on the left"]))
    assert int(out.max()) < tok.n_buckets


def test_bad_text_raises():
    tok = NgramTokenizer()
    with pytest.raises(ValueError, match="empty"):
        tok(["a circle", "   "])
    with pytest.raises(TypeError):
        tok([None])


def test_symbols_inside_a_word_keep_it_one_word():
    assert NgramTokenizer.split_words("a l*a+rge red star, on the left: done") == [
        "a", "l*a+rge", "red", "star", ",", "on", "the", "left", ":", "done"]
    tok = NgramTokenizer()
    clean = set(tok.word_pieces("large"))
    assert len(clean & set(tok.word_pieces("l*arge"))) >= 0.4 * len(clean)
