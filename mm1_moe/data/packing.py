"""Tokenizing documents and packing them into sequences of S tokens with at most M images.

Shapes: B sequences, S tokens per sequence (4096), M images per sequence at most (16), V image
tokens per image (144), P image side (378), I images in a micro-batch.

Token layout of one packed document (the ``doc_ids`` span the attention kernel keeps apart):
  caption pair   <image> x V, caption, </s>
  interleaved    text and <image> x V runs in reading order, </s>
  text           text, </s>
A document longer than S (or with more than M images) is cut at S tokens / M images into
chunks that pack as documents of their own (an image run is never cut). ``labels`` are the next
token; ``loss_mask`` is 1 where the label is a text token of the same document (so the last image
placeholder predicts the caption's first token) and 0 on padding, on labels that are image
placeholders, and across document boundaries; ``position_ids`` restart at every document.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence

import numpy as np
import torch

from .batch import PackedBatch
from .common import SkipCounter
from .images import ImageDecodeError, ImageRef, preprocess
from .sources import Document
from .tokenizer import MM1Tokenizer


@dataclass
class TokenDoc:
    """A document (or a chunk of one) as tokens: image runs expanded to V placeholders."""

    tokens: List[int]
    images: List[ImageRef]
    kind: str
    where: str

    def __len__(self) -> int:
        return len(self.tokens)


def tokenize(doc: Document, tok: MM1Tokenizer, seq_length: int, max_images: int,
             tokens_per_image: int) -> List[TokenDoc]:
    """``doc`` -> chunks of at most ``seq_length`` tokens and ``max_images`` images."""
    texts = [i for i in doc.items if isinstance(i, str)]
    encoded = iter(tok.encode_batch(texts)) if len(texts) > 1 else iter(map(tok.encode, texts))
    image_run = [tok.image_token_id] * tokens_per_image
    chunks: List[TokenDoc] = []
    tokens: List[int] = []
    images: List[ImageRef] = []

    def flush():
        nonlocal tokens, images
        if tokens:
            chunks.append(TokenDoc(tokens, images, doc.kind, doc.where))
        tokens, images = [], []

    for n, item in enumerate(doc.items):
        if isinstance(item, ImageRef):
            if len(tokens) + tokens_per_image > seq_length or len(images) == max_images:
                flush()
            tokens.extend(image_run)
            images.append(item)
            continue
        ids = next(encoded) + ([tok.eos_id] if n == len(doc.items) - 1 else [])
        if doc.kind == "captions" and len(tokens) + len(ids) > seq_length:
            ids = ids[: seq_length - len(tokens) - 1] + [tok.eos_id]  # a pair is never split
        while ids:
            room = seq_length - len(tokens)
            if room == 0:
                flush()
                room = seq_length
            tokens.extend(ids[:room])
            ids = ids[room:]
    if not isinstance(doc.items[-1], str):
        tokens.append(tok.eos_id)  # a document ending on an image still ends with </s>
        if len(tokens) > seq_length:
            tokens.pop()
    flush()
    return chunks


@dataclass
class Bin:
    docs: List[TokenDoc] = field(default_factory=list)
    tokens: int = 0
    images: int = 0

    def fits(self, doc: TokenDoc, seq_length: int, max_images: int) -> bool:
        return (self.tokens + len(doc) <= seq_length
                and self.images + len(doc.images) <= max_images)

    def add(self, doc: TokenDoc) -> None:
        self.docs.append(doc)
        self.tokens += len(doc)
        self.images += len(doc.images)


def first_fit(bins: List[Bin], doc: TokenDoc, seq_length: int, max_images: int,
              max_bins: int) -> bool:
    """Put ``doc`` in the first open bin it fits, or a new bin while fewer than ``max_bins``
    are open. False when it fits nowhere (the window is full)."""
    for b in bins:
        if b.fits(doc, seq_length, max_images):
            b.add(doc)
            return True
    if len(bins) < max_bins:
        bins.append(Bin())
        bins[-1].add(doc)
        return True
    return False


@dataclass
class PackedRow:
    """One sequence, with its images decoded: a row of a ``PackedBatch`` (numpy until collated;
    small torch ops pay per-call overhead and large ones contend for threads with the trainer)."""

    tokens: np.ndarray  # [S] int64
    labels: np.ndarray  # [S] int64
    loss_mask: np.ndarray  # [S] float32
    position_ids: np.ndarray  # [S] int64
    doc_ids: np.ndarray  # [S] int32
    num_images: int
    doc_lengths: List[int]


def materialize(docs: Sequence[TokenDoc], tok: MM1Tokenizer, seq_length: int,
                pixels: np.ndarray, skips: SkipCounter) -> PackedRow:
    """Decode the images of one planned sequence into ``pixels`` ([>= its images, 3, P, P],
    filled from the front) and lay out its tokens. A document with an image that does not
    decode is dropped (counted as ``corrupt_image``); the documents after it move up, so the
    sequence only gets shorter and the limits still hold."""
    kept: List[TokenDoc] = []
    image_size = pixels.shape[-1]
    num_images = 0
    for doc in docs:
        try:
            for i, ref in enumerate(doc.images):
                preprocess(ref.read(), image_size, f"{ref.path}:{ref.name}",
                           out=pixels[num_images + i])
        except (ImageDecodeError, OSError) as err:
            skips.skip("corrupt_image", doc.where, str(err))
            continue
        kept.append(doc)
        num_images += len(doc.images)
    S = seq_length
    tokens = np.full(S, tok.pad_id, dtype=np.int64)
    position_ids = np.zeros(S, dtype=np.int64)
    doc_ids = np.full(S, -1, dtype=np.int32)
    same_doc_next = np.zeros(S, dtype=bool)
    offset = 0
    for d, doc in enumerate(kept):
        n = len(doc)
        tokens[offset:offset + n] = doc.tokens
        position_ids[offset:offset + n] = np.arange(n)
        doc_ids[offset:offset + n] = d
        same_doc_next[offset:offset + n - 1] = True
        offset += n
    labels = np.full(S, tok.pad_id, dtype=np.int64)
    labels[:-1] = tokens[1:]
    loss_mask = (same_doc_next & (labels != tok.image_token_id)).astype(np.float32)
    return PackedRow(tokens, labels, loss_mask, position_ids, doc_ids, num_images,
                     [len(d) for d in kept])


def collate(rows: Sequence[PackedRow], pixels: np.ndarray) -> PackedBatch:
    """Stack rows into a ``PackedBatch``; ``pixels`` holds the rows' images in order."""
    def stack(name):
        return torch.from_numpy(np.stack([getattr(r, name) for r in rows]))

    num_images = sum(r.num_images for r in rows)
    return PackedBatch(
        tokens=stack("tokens"), labels=stack("labels"), loss_mask=stack("loss_mask"),
        position_ids=stack("position_ids"), doc_ids=stack("doc_ids"),
        images=torch.from_numpy(pixels[:num_images]),
        images_per_sequence=torch.tensor([r.num_images for r in rows], dtype=torch.int64),
    )


def document_mask(doc_lengths_B: Sequence[Sequence[int]], seq_length: int) -> torch.Tensor:
    """[B, 1, S, S] bool block-diagonal causal mask built from each sequence's document lengths
    (padding after the last document forms one more block), for checking ``doc_ids``."""
    B = len(doc_lengths_B)
    mask = torch.zeros(B, 1, seq_length, seq_length, dtype=torch.bool)
    causal = torch.ones(seq_length, seq_length, dtype=torch.bool).tril()
    for b, lengths in enumerate(doc_lengths_B):
        start = 0
        for n in list(lengths) + [seq_length - sum(lengths)]:
            mask[b, 0, start:start + n, start:start + n] = causal[:n, :n]
            start += n
    return mask
