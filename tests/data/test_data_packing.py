"""Packing: limits, token layout, loss masks, position ids, and the document mask checked
against the attention kernel's reference."""

import numpy as np
import pytest
import torch

from mm1_moe.data.images import ImageRef
from mm1_moe.data.loader import MM1DataLoader
from mm1_moe.data.packing import document_mask, tokenize
from mm1_moe.data.sources import Document
from mm1_moe.data.spec import DataSpec
from mm1_moe.data.tokenizer import load_tokenizer
from mm1_moe.kernels.reference.attention import (
    attention_mask_reference,
    attention_reference,
    doc_ids_from_cu_seqlens_reference,
)


def _batches(spec, n, micro=2):
    loader = MM1DataLoader(spec, micro_batch_size=micro)
    return loader, [next(loader) for _ in range(n)]


def _check_limits(batch, spec, tok):
    batch.validate(tok.image_token_id, spec.tokens_per_image)  # placeholders == V x images
    assert batch.tokens.shape[1] == spec.seq_length
    assert int(batch.images_per_sequence.max()) <= spec.max_images_per_sequence
    assert int((batch.doc_ids >= 0).sum(1).max()) <= spec.seq_length
    assert batch.images.shape[1:] == (3, spec.image_size, spec.image_size)
    assert batch.images.dtype == torch.float32


@pytest.mark.parametrize("shape", [dict(seq_length=4096, max_images_per_sequence=16,
                                        tokens_per_image=144, image_size=56),
                                   dict(seq_length=64, max_images_per_sequence=2,
                                        tokens_per_image=4, image_size=56),
                                   dict(seq_length=300, max_images_per_sequence=3,
                                        tokens_per_image=64, image_size=56)])
def test_packing_never_exceeds_tokens_or_images(shape):
    spec = DataSpec(seed=3, pack_window=4, **shape)
    loader, batches = _batches(spec, 6)
    for batch in batches:
        _check_limits(batch, spec, loader.tokenizer)
    assert loader.packing_efficiency > 0.5


def test_mm1_shape_packs_16_images_and_several_caption_pairs():
    spec = DataSpec(seq_length=4096, weights=(0, 1, 0), image_size=56, seed=1)
    loader, batches = _batches(spec, 2, micro=1)
    for batch in batches:
        assert int(batch.images_per_sequence[0]) == 16  # captions are short: images run out
        assert int(batch.doc_ids.max()) == 15  # 16 caption pairs, one document each
        starts = torch.nonzero(batch.position_ids[0] == 0).flatten()
        for s in starts[batch.doc_ids[0][starts] >= 0]:  # every pair opens with its image run
            assert bool((batch.tokens[0, s:s + 144] == loader.tokenizer.image_token_id).all())


def test_labels_loss_mask_and_positions(tiny_spec):
    loader, batches = _batches(tiny_spec, 4)
    tok = loader.tokenizer
    for batch in batches:
        for b in range(batch.tokens.shape[0]):
            tokens, labels = batch.tokens[b], batch.labels[b]
            doc, mask, pos = batch.doc_ids[b], batch.loss_mask[b], batch.position_ids[b]
            assert torch.equal(labels[:-1], tokens[1:])
            same_doc = torch.zeros_like(mask, dtype=torch.bool)
            same_doc[:-1] = (doc[:-1] == doc[1:]) & (doc[:-1] >= 0)
            expected = same_doc & (labels != tok.image_token_id) & (labels != tok.pad_id)
            assert torch.equal(mask.bool(), expected)
            assert not bool(mask[doc < 0].any())  # no loss on padding
            assert not bool(mask[labels == tok.image_token_id].any())  # nor on image labels
            for d in range(int(doc.max()) + 1):  # positions restart at every document
                where = doc == d
                assert torch.equal(pos[where], torch.arange(int(where.sum())))
            # the last image placeholder predicts the first caption token
            runs = torch.nonzero((tokens[:-1] == tok.image_token_id)
                                 & (tokens[1:] != tok.image_token_id)).flatten()
            for r in runs:
                assert mask[r] == 1


def test_document_mask_matches_the_attention_reference(tiny_spec):
    """Block-diagonal causal mask from each sequence's document lengths == the attention
    kernel's reference mask from doc_ids; packed attention == each document alone."""
    loader = MM1DataLoader(tiny_spec, micro_batch_size=2)
    plans = [loader.plan(g) for g in range(2)]
    batch = next(loader)
    lengths = [[len(d) for d in plan] for plan in plans]
    assert all(len(l) >= 2 for l in lengths)  # several documents per sequence
    S = tiny_spec.seq_length
    ours = document_mask(lengths, S)
    reference = attention_mask_reference(S, True, batch.doc_ids)
    assert torch.equal(ours, reference)
    for b, ls in enumerate(lengths):
        cu = torch.tensor(np.cumsum([0] + ls), dtype=torch.int32)
        assert torch.equal(doc_ids_from_cu_seqlens_reference(cu, S)[:sum(ls)],
                           batch.doc_ids[b][:sum(ls)])
        # a later pair never sees an earlier one
        assert not bool(ours[b, 0, ls[0]:ls[0] + ls[1], :ls[0]].any())
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, S, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    packed = attention_reference(q, k, v, causal=True, doc_ids_BS=batch.doc_ids)
    for b, ls in enumerate(lengths):
        start = 0
        for n in ls:
            alone = attention_reference(q[b:b + 1, start:start + n], k[b:b + 1, start:start + n],
                                        v[b:b + 1, start:start + n], causal=True)
            torch.testing.assert_close(packed[b:b + 1, start:start + n], alone)
            start += n


def _ref(i):
    return ImageRef("mem", f"{i}.jpg", data=b"")


def test_long_documents_are_chunked():
    tok = load_tokenizer(DataSpec().with_bundled_defaults().tokenizer)
    text = " ".join(["a red circle is a shape."] * 200)
    chunks = tokenize(Document("text", [text], "t"), tok, 64, 16, 4)
    assert len(chunks) > 1 and all(len(c) <= 64 for c in chunks)
    assert sum(len(c) for c in chunks) == len(tok.encode(text)) + 1
    assert chunks[-1].tokens[-1] == tok.eos_id
    items = []
    for i in range(20):
        items += [f"picture {i}.", _ref(i)]
    chunks = tokenize(Document("interleaved", items, "d"), tok, 64, 3, 8)
    assert all(len(c) <= 64 and len(c.images) <= 3 for c in chunks)
    assert sum(len(c.images) for c in chunks) == 20
    for c in chunks:  # an image run is never cut
        assert c.tokens.count(tok.image_token_id) == 8 * len(c.images)
    long_caption = " ".join(["blue"] * 200)
    (pair,) = tokenize(Document("captions", [_ref(0), long_caption], "c"), tok, 64, 16, 4)
    assert len(pair) == 64 and pair.tokens[:4] == [tok.image_token_id] * 4
    assert pair.tokens[-1] == tok.eos_id


def test_data_spec_from_config(configs_dir):
    import os

    from mm1_moe.config import load_config
    from mm1_moe.data.spec import data_spec_from_config

    config = load_config(os.path.join(configs_dir, "tiny-dense.yaml"))
    spec = data_spec_from_config(config)
    assert (spec.image_size, spec.tokens_per_image, spec.seq_length) == (56, 4, 64)
    assert spec.weights == (0.45, 0.45, 0.10) and spec.vocab_size == 256
    loader = MM1DataLoader(spec, micro_batch_size=2)
    next(loader).validate(loader.tokenizer.image_token_id, 4)
