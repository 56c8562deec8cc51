"""The tokenizer: round trip, special tokens, and that text never forges an image placeholder."""

import json

import pytest

from mm1_moe.data.common import DataError
from mm1_moe.data.spec import DataSpec
from mm1_moe.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_bpe


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DataSpec().with_bundled_defaults().tokenizer)


def test_bundled_special_tokens_and_size(tok):
    assert [tok.token(i) for i in range(5)] == SPECIAL_TOKENS
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.image_token_id) == (0, 2, 3, 4)
    assert tok.vocab_size <= 256  # fits the tiny configs' decoder vocabulary


def test_round_trip_on_the_bundled_text(tok):
    root = DataSpec().with_bundled_defaults().text[0]
    with open(root) as handle:
        texts = [json.loads(line)["text"] for line in handle][:50]
    texts += ["two shapes: a red circle in the top left and an orange diamond in the center.",
              "Unseen Words, digits 123 and ümlauts"]
    for text in texts[:-1]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(texts[-1])  # characters outside the bundled alphabet become <unk>
    assert 1 in ids and tok.image_token_id not in ids


def test_text_never_becomes_an_image_placeholder(tok):
    for text in ["<image>", "see <image> here", "</s><pad><image>"]:
        ids = tok.encode(text)
        assert tok.image_token_id not in ids and tok.eos_id not in ids and tok.pad_id not in ids
        assert tok.encode_batch([text]) == [ids]


def test_train_bpe_writes_a_loadable_tokenizer(tmp_path):
    texts = ["a blue square.", "a red circle.", "three shapes."] * 10
    path = tmp_path / "tok.json"
    tok = train_bpe(texts, 64, str(path))
    assert tok.decode(tok.encode("a red square.")) == "a red square."
    again = load_tokenizer(str(path), vocab_limit=64)
    assert again.encode("a blue circle.") == tok.encode("a blue circle.")
    with pytest.raises(DataError, match="vocab_size is 10"):
        load_tokenizer(str(path), vocab_limit=10)


def test_tokenizer_without_special_tokens_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    plain = Tokenizer(models.BPE(unk_token="[UNK]"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    plain.train_from_iterator(["a b c"], trainers.BpeTrainer(special_tokens=["[UNK]"],
                                                              show_progress=False))
    path = tmp_path / "plain.json"
    plain.save(str(path))
    with pytest.raises(DataError, match="lacks the special tokens"):
        load_tokenizer(str(path))
