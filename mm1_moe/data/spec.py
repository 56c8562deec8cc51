"""``DataSpec``: everything the MM1 data pipeline needs, read from a ``Config``.

The pipeline is written against this small dataclass rather than ``config.data`` directly, so
it runs before (and independently of) the schema: ``data_spec_from_config`` reads each field
with a default when the config does not have it yet. Empty path lists mean the bundled dataset
(``data/bundled`` in the repository, generated on first use when absent).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence

from .common import DataError

SOURCES = ("interleaved", "captions", "text")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUNDLED_DIR = os.path.join(REPO, "data", "bundled")


@dataclass
class DataSpec:
    interleaved: List[str] = field(default_factory=list)
    """Interleaved-document tar shards (files or globs)."""
    captions: List[str] = field(default_factory=list)
    """Image-caption tar shards (img2dataset layout: key.jpg + key.txt/key.json)."""
    text: List[str] = field(default_factory=list)
    """Text-only files: JSONL with a ``text`` field, or plain text (one document per file)."""
    weights: Sequence[float] = (0.45, 0.45, 0.10)
    """Mixture weights of (interleaved, captions, text), MM1's 45/45/10 by default."""
    tokenizer: str = ""
    """Hugging Face ``tokenizers`` JSON or SentencePiece ``.model``; empty: the bundled one."""
    image_size: int = 378
    tokens_per_image: int = 144
    seq_length: int = 4096
    max_images_per_sequence: int = 16
    seed: int = 1234
    pack_window: int = 16
    """Sequences packed together (first-fit) before they are emitted: more fills them better."""
    vocab_size: Optional[int] = None
    """The model's vocabulary; the tokenizer must fit in it (checked when both are known)."""

    def __post_init__(self) -> None:
        self.weights = tuple(float(w) for w in self.weights)
        if len(self.weights) != 3 or any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise DataError(f"data.weights must be 3 non-negative numbers (interleaved, captions,"
                            f" text) with a positive sum, got {list(self.weights)}")
        if self.tokens_per_image + 2 > self.seq_length:
            raise DataError(f"seq_length ({self.seq_length}) cannot hold one image "
                            f"({self.tokens_per_image} tokens) and its caption")
        if self.max_images_per_sequence < 1 or self.pack_window < 1:
            raise DataError("max_images_per_sequence and pack_window must be >= 1")

    def paths(self, source: str) -> List[str]:
        return list(getattr(self, source))

    def with_bundled_defaults(self) -> "DataSpec":
        """Fill empty path lists and the tokenizer from the bundled dataset (generating it
        on first use when the repository copy is absent)."""
        if all(self.paths(s) for s in SOURCES) and self.tokenizer:
            return self
        root = bundled_dir()
        return replace(
            self,
            interleaved=self.interleaved or [os.path.join(root, "interleaved-*.tar")],
            captions=self.captions or [os.path.join(root, "captions-*.tar")],
            text=self.text or [os.path.join(root, "text.jsonl")],
            tokenizer=self.tokenizer or os.path.join(root, "tokenizer.json"),
        )


def bundled_dir() -> str:
    """The bundled dataset's folder: the repository's ``data/bundled``, or a generated copy
    under ``$MM1_MOE_DATA_CACHE`` (default ``~/.cache/mm1_moe``) for installs without it."""
    if os.path.exists(os.path.join(BUNDLED_DIR, "tokenizer.json")):
        return BUNDLED_DIR
    from .bundled import BUNDLED_VERSION, generate

    cache = os.environ.get("MM1_MOE_DATA_CACHE", os.path.expanduser("~/.cache/mm1_moe"))
    root = os.path.join(cache, f"bundled-v{BUNDLED_VERSION}")
    if not os.path.exists(os.path.join(root, "tokenizer.json")):
        generate(root)
    return root


def resolve_paths(patterns: Sequence[str], source: str) -> List[str]:
    """Expand files and globs in order (each glob sorted); a missing file or a pattern that
    matches nothing stops with the path named."""
    files: List[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matched = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            if not matched:
                raise DataError(f"data.{source}: pattern {pattern!r} matches no files")
            files.extend(matched)
        elif os.path.isfile(pattern):
            files.append(pattern)
        else:
            raise DataError(f"data.{source}: no such file: {pattern}")
    return files


def data_spec_from_config(config) -> DataSpec:
    """The ``DataSpec`` of a ``Config``: data.* fields plus the image size, tokens per image
    and vocabulary of ``config.model`` (fields the schema lacks take DataSpec's defaults)."""
    data, model = config.data, config.model
    default = DataSpec()

    def get(name, fallback):
        value = getattr(data, name, None)
        return fallback if value is None else value

    return DataSpec(
        interleaved=list(get("interleaved", [])),
        captions=list(get("captions", [])),
        text=list(get("text", [])),
        weights=tuple(get("weights", default.weights)),
        tokenizer=get("tokenizer", ""),
        image_size=model.vision.image_size,
        tokens_per_image=model.connector.num_tokens,
        seq_length=data.seq_length,
        max_images_per_sequence=get("max_images_per_sequence", default.max_images_per_sequence),
        seed=data.seed,
        pack_window=get("pack_window", default.pack_window),
        vocab_size=model.decoder.vocab_size,
    )
