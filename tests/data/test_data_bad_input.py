"""Every kind of bad input named in the issue gives a clear message (skip and count, or stop
with the path named), never a hang (the ``deadline`` fixture fails a test after 30 s)."""

from dataclasses import replace

import pytest

from mm1_moe.data.common import DataError
from mm1_moe.data.loader import MM1DataLoader
from mm1_moe.data.spec import DataSpec

pytestmark = pytest.mark.usefixtures("deadline")


def _captions_only(tiny_spec, paths):
    return replace(tiny_spec, captions=paths, weights=(0, 1, 0))


def _drain(loader, n=4):
    batches = [next(loader) for _ in range(n)]
    for b in batches:
        b.validate(loader.tokenizer.image_token_id, loader.spec.tokens_per_image)
    return batches


def test_missing_shard_path_stops_with_the_path(tiny_spec, tmp_path):
    missing = str(tmp_path / "nowhere-000.tar")
    with pytest.raises(DataError, match="no such file: .*nowhere-000.tar"):
        MM1DataLoader(_captions_only(tiny_spec, [missing]))
    with pytest.raises(DataError, match="matches no files"):
        MM1DataLoader(_captions_only(tiny_spec, [str(tmp_path / "none-*.tar")]))


def test_empty_shards_are_skipped_and_counted(tiny_spec, tmp_path, shards):
    zero = tmp_path / "zero.tar"
    zero.write_bytes(b"")
    empty = shards.write_tar(tmp_path / "empty.tar", [])
    good = shards.write_tar(tmp_path / "good.tar", shards.captions(5))
    loader = MM1DataLoader(_captions_only(tiny_spec, [str(zero), empty, good]))
    _drain(loader)
    assert loader.skips.counts["empty_shard"] >= 2


def test_only_empty_shards_stop_naming_the_source(tiny_spec, tmp_path, shards):
    empty = shards.write_tar(tmp_path / "empty.tar", [])
    with pytest.raises(DataError, match=r"data.captions: no usable sample .*empty.tar"):
        next(MM1DataLoader(_captions_only(tiny_spec, [empty])))


@pytest.mark.parametrize("where", ["mid_member", "at_a_header"])
def test_truncated_tar_keeps_what_is_complete(tiny_spec, tmp_path, shards, where):
    import tarfile

    full = shards.write_tar(tmp_path / "full.tar", shards.captions(20))
    raw = open(full, "rb").read()
    with tarfile.open(full) as tar:
        header = tar.getmembers()[21].offset  # tarfile stops quietly at a cut header
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[: len(raw) // 2 + 100] if where == "mid_member" else raw[:header])
    loader = MM1DataLoader(_captions_only(tiny_spec, [str(cut)]))
    _drain(loader)
    assert loader.skips.counts["truncated_shard"] >= 1
    assert "cut.tar" in loader.skips.examples["truncated_shard"][0]
    from mm1_moe.data.shards import TarShard
    from mm1_moe.data.common import SkipCounter

    assert 5 <= len(TarShard(str(cut), SkipCounter())) < 20


def test_corrupt_and_truncated_jpegs_are_skipped_and_counted(tiny_spec, tmp_path, shards):
    good = shards.jpeg()
    members = shards.captions(6)
    members[2] = ("000001.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg")
    members[6] = ("000003.jpg", good[: len(good) // 2])  # truncated
    path = shards.write_tar(tmp_path / "bad.tar", members)
    spec = replace(_captions_only(tiny_spec, [path]), max_images_per_sequence=6)
    loader = MM1DataLoader(spec, micro_batch_size=1)
    batch = next(loader)  # the first sequence holds all six pairs; two are dropped
    batch.validate(loader.tokenizer.image_token_id, spec.tokens_per_image)
    assert int(batch.images_per_sequence[0]) == 4
    assert loader.skips.counts["corrupt_image"] == 2
    text = loader.tokenizer.decode(batch.tokens[0].tolist(), skip_special=True)
    assert "caption zero zero." in text and "caption zero one." not in text
    assert any("000001" in e for e in loader.skips.examples["corrupt_image"])


def test_captions_without_text_are_skipped(tiny_spec, tmp_path, shards):
    jpg = shards.jpeg()
    members = shards.captions(3) + [
        ("empty1.jpg", jpg), ("empty1.txt", ""),
        ("empty2.jpg", jpg), ("empty2.txt", "   \n"),
        ("empty3.jpg", jpg), ("empty3.json", {"url": "x", "caption": None}),
        ("noimage.txt", "a caption without an image"),
    ]
    path = shards.write_tar(tmp_path / "c.tar", members)
    loader = MM1DataLoader(_captions_only(tiny_spec, [path]))
    _drain(loader)
    assert loader.skips.counts["empty_caption"] >= 3  # three per pass over the shard
    assert [e.split(":")[-2] for e in loader.skips.examples["empty_caption"]] == \
        ["empty1", "empty2", "empty3"]
    assert loader.skips.counts["missing_image"] >= 1


def test_interleaved_reference_to_an_absent_image(tiny_spec, tmp_path, shards):
    jpg = shards.jpeg()
    members = [
        ("ok.json", [{"type": "text", "text": "fine."}, {"type": "image", "image": "ok.0.jpg"}]),
        ("ok.0.jpg", jpg),
        ("broken.json", ["text", {"type": "image", "image": "broken.7.jpg"}]),
        ("obelics.json", {"texts": ["hello", None], "images": [None, "0.jpg"]}),
        ("obelics.0.jpg", jpg),
        ("garbled.json", "{not json"),
    ]
    path = shards.write_tar(tmp_path / "i.tar", members)
    spec = replace(tiny_spec, interleaved=[path], weights=(1, 0, 0))
    loader = MM1DataLoader(spec)
    _drain(loader)
    assert loader.skips.counts["missing_image_ref"] >= 1
    assert "broken.7.jpg" in loader.skips.examples["missing_image_ref"][0]
    assert loader.skips.counts["bad_json"] >= 1


def test_bad_text_lines_are_skipped(tiny_spec, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "good text."}\n{broken\n{"text": ""}\n{"other": 1}\n\n')
    plain = tmp_path / "p.txt"
    plain.write_text("a plain text document.")
    spec = replace(tiny_spec, text=[str(path), str(plain)], weights=(0, 0, 1))
    loader = MM1DataLoader(spec)
    _drain(loader)
    assert loader.skips.counts["bad_json"] >= 1 and loader.skips.counts["empty_text"] >= 2


def test_tokenizer_errors_name_the_file(tiny_spec, tmp_path):
    with pytest.raises(DataError, match="no such file: .*missing.json"):
        MM1DataLoader(replace(tiny_spec, tokenizer=str(tmp_path / "missing.json")))
    junk = tmp_path / "junk.json"
    junk.write_text("{}")
    with pytest.raises(DataError, match="junk.json"):
        MM1DataLoader(replace(tiny_spec, tokenizer=str(junk)))
    with pytest.raises(DataError, match="model.decoder.vocab_size is 100"):
        MM1DataLoader(replace(tiny_spec, vocab_size=100))


def test_sentencepiece_is_optional(tmp_path):
    pytest.importorskip("PIL")
    try:
        import sentencepiece  # noqa: F401
        pytest.skip("sentencepiece is installed")
    except ImportError:
        pass
    model = tmp_path / "sp.model"
    model.write_bytes(b"\x00")
    from mm1_moe.data.tokenizer import load_tokenizer

    with pytest.raises(DataError, match="pip install sentencepiece"):
        load_tokenizer(str(model))


def test_bad_spec_values():
    with pytest.raises(DataError, match="weights"):
        DataSpec(weights=(0.5, 0.5))
    with pytest.raises(DataError, match="cannot hold one image"):
        DataSpec(seq_length=100, tokens_per_image=144)


def test_bad_rank():
    with pytest.raises(DataError, match="dp_rank 2"):
        MM1DataLoader(DataSpec(), dp_rank=2, dp_size=2)


def test_a_shard_of_only_corrupt_images_stops_instead_of_yielding_padding(tiny_spec, tmp_path,
                                                                          shards):
    path = shards.write_tar(tmp_path / "all-bad.tar", [("a.jpg", b"\xff\xd8 garbage"),
                                                       ("a.txt", "a red circle.")])
    loader = MM1DataLoader(_captions_only(tiny_spec, [path]), micro_batch_size=4)
    with pytest.raises(DataError, match="lost every document .*all-bad.tar:a"):
        for _ in range(10):
            next(loader)


def test_a_damaged_input_met_again_counts_and_logs_once(caplog):
    """An epoch wrap or a reopened shard meets the same damaged input again."""
    from mm1_moe.data.common import SkipCounter

    skips = SkipCounter(log_first=3)
    with caplog.at_level("WARNING", logger="mm1_moe.data"):
        for _ in range(3):  # three epochs over the same shard
            skips.skip("corrupt_image", "a.tar:000001.jpg", "cannot identify image file")
        skips.skip("corrupt_image", "a.tar:000002.jpg", "cannot identify image file")
    assert skips.as_dict() == {"corrupt_image": 2} and skips.repeats == 2
    assert len([r for r in caplog.records if "000001" in r.getMessage()]) == 1
