"""The tokenizer: a Hugging Face ``tokenizers`` JSON file or a SentencePiece model.

Special tokens the pipeline needs: ``<image>`` (one placeholder per image token), ``</s>`` (end of
document), ``<pad>``; ``<s>`` and ``<unk>`` are kept when present. Text that happens to contain
the string "<image>" is tokenized as ordinary text, never as a placeholder: a stray placeholder
would shift every image after it.

``train_bpe`` trains the small tokenizer bundled for the default run (``data/bundled``).
"""

from __future__ import annotations

import os
from typing import Iterable, List, Optional

from .common import DataError

IMAGE, BOS, EOS, PAD, UNK = "<image>", "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, IMAGE]  # ids 0..4 in the bundled tokenizer


class MM1Tokenizer:
    """encode/decode plus the special-token ids; built by ``load_tokenizer``."""

    def __init__(self, backend, kind: str, path: str, ids: dict, vocab_size: int):
        self._backend, self.kind, self.path = backend, kind, path
        self.image_token_id: int = ids[IMAGE]
        self.eos_id: int = ids[EOS]
        self.pad_id: int = ids[PAD]
        self.bos_id: Optional[int] = ids.get(BOS)
        self.unk_id: Optional[int] = ids.get(UNK)
        self.vocab_size = vocab_size

    def encode(self, text: str) -> List[int]:
        if self.kind == "sentencepiece":
            ids = self._backend.encode(text)
            return [self._backend.unk_id() if i == self.image_token_id else i for i in ids]
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        if self.kind == "sentencepiece":
            return [self.encode(t) for t in texts]
        return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self._backend.decode(ids)
        return self._backend.decode(ids, skip_special_tokens=skip_special)

    def token(self, token_id: int) -> str:
        if self.kind == "sentencepiece":
            return self._backend.id_to_piece(int(token_id))
        return self._backend.id_to_token(int(token_id))

    def __repr__(self) -> str:
        return (f"MM1Tokenizer({self.kind}, {self.path}, vocab {self.vocab_size}, "
                f"image={self.image_token_id}, eos={self.eos_id}, pad={self.pad_id})")


def load_tokenizer(path: str, vocab_limit: Optional[int] = None) -> MM1Tokenizer:
    """Load ``path`` (``*.json``: tokenizers; ``*.model``: SentencePiece). ``vocab_limit``: the
    model's vocabulary size, which every token id must fit in."""
    if not os.path.isfile(path):
        raise DataError(f"data.tokenizer: no such file: {path}")
    tokenizer = _load_sentencepiece(path) if path.endswith(".model") else _load_hf(path)
    if vocab_limit is not None and tokenizer.vocab_size > vocab_limit:
        raise DataError(f"data.tokenizer {path} has {tokenizer.vocab_size} tokens but "
                        f"model.decoder.vocab_size is {vocab_limit}")
    return tokenizer


def _missing(path: str, names: List[str]) -> DataError:
    return DataError(f"data.tokenizer {path} lacks the special tokens {names}: add them "
                     f"({', '.join(SPECIAL_TOKENS)}) when training it")


def _load_hf(path: str) -> MM1Tokenizer:
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(path)
    except Exception as err:
        raise DataError(f"data.tokenizer {path}: not a tokenizers JSON file ({err})") from err
    backend.encode_special_tokens = True  # "<image>" in text stays text
    ids = {t: backend.token_to_id(t) for t in SPECIAL_TOKENS}
    missing = [t for t in (IMAGE, EOS, PAD) if ids[t] is None]
    if missing:
        raise _missing(path, missing)
    ids = {t: i for t, i in ids.items() if i is not None}
    return MM1Tokenizer(backend, "hf", path, ids, backend.get_vocab_size(with_added_tokens=True))


def _load_sentencepiece(path: str) -> MM1Tokenizer:
    try:
        import sentencepiece as spm
    except ImportError as err:
        raise DataError(f"data.tokenizer {path} is a SentencePiece model but the "
                        "'sentencepiece' package is not installed (pip install sentencepiece)"
                        ) from err
    backend = spm.SentencePieceProcessor(model_file=path)
    unk = backend.unk_id()

    def piece(name: str) -> Optional[int]:
        i = backend.piece_to_id(name)
        return None if i == unk and name != UNK else i

    ids = {IMAGE: piece(IMAGE), EOS: piece(EOS), PAD: piece(PAD), BOS: piece(BOS),
           UNK: piece(UNK)}
    if ids[PAD] is None and backend.pad_id() >= 0:
        ids[PAD] = backend.pad_id()
    missing = [t for t in (IMAGE, EOS, PAD) if ids[t] is None]
    if missing:
        raise _missing(path, missing)
    ids = {t: i for t, i in ids.items() if i is not None}
    return MM1Tokenizer(backend, "sentencepiece", path, ids, backend.get_piece_size())


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str) -> MM1Tokenizer:
    """Train a small reversible BPE (Metaspace pre-tokenizer: decode(encode(t)) == t) with the
    special tokens at ids 0..4, save it as JSON and return it loaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False, min_frequency=1)
    backend.train_from_iterator(list(texts), trainer=trainer)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    backend.save(out_path, pretty=True)
    return load_tokenizer(out_path)
