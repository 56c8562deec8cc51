"""The bundled dataset: small, reproducible, and learnable (each caption is a function of its
image's content, so a model that sees images can caption them and one that does not cannot)."""

import io
import json
import os
import tarfile
from collections import defaultdict

import numpy as np
import pytest

from mm1_moe.data.bundled import (
    BACKGROUND,
    COLOURS,
    caption,
    cell_center,
    generate,
    parse_caption,
    Shape,
)
from mm1_moe.data.spec import BUNDLED_DIR, bundled_dir


def _caption_samples(root):
    samples = []
    for name in sorted(os.listdir(root)):
        if not name.startswith("captions-"):
            continue
        with tarfile.open(os.path.join(root, name)) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in sorted({n.split(".")[0] for n in members}):
            samples.append((members[f"{key}.jpg"], members[f"{key}.txt"].decode(),
                            json.loads(members[f"{key}.json"])))
    return samples


@pytest.fixture(scope="module")
def samples():
    return _caption_samples(bundled_dir())


def test_bundled_data_is_in_the_repo_and_small():
    assert os.path.exists(os.path.join(BUNDLED_DIR, "tokenizer.json")), \
        "run scripts/make_bundled_data.py"
    total = sum(os.path.getsize(os.path.join(BUNDLED_DIR, f)) for f in os.listdir(BUNDLED_DIR))
    assert total < 2_000_000


def test_captions_describe_the_pixels(samples):
    """Every shape a caption names is in the image, in its colour and cell; every other cell
    is background."""
    from PIL import Image

    assert len(samples) >= 200
    for jpg, text, meta in samples:
        shapes = [Shape(**s) for s in meta["shapes"]]
        assert caption(shapes) == text and parse_caption(text) == shapes
        pixels = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), dtype=np.int32)
        for cell in range(9):
            x, y = (int(v) for v in cell_center(cell))
            centre = pixels[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(0)
            named = [s for s in shapes if s.cell == cell]
            expected = COLOURS[named[0].colour] if named else BACKGROUND
            assert np.abs(centre - np.array(expected)).max() < 45, (text, cell, centre)


def test_same_caption_same_content_different_pixels(samples):
    by_caption = defaultdict(list)
    for jpg, text, meta in samples:
        by_caption[text].append((jpg, meta["shapes"]))
    repeated = [v for v in by_caption.values() if len(v) > 1]
    for group in repeated:
        assert all(shapes == group[0][1] for _, shapes in group)
    # a caption cannot be guessed without the image: most captions are unique
    assert len(by_caption) > 0.8 * len(samples)


def test_generator_is_deterministic(tmp_path):
    """Regenerating gives the same captions, documents, text and tokenizer as the committed
    copy (image bytes depend on the Pillow build, so they are compared as pixels)."""
    from PIL import Image

    generate(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(f for f in os.listdir(BUNDLED_DIR)
                                                  if f != "README.md")
    for name in ("text.jsonl", "tokenizer.json"):
        assert (tmp_path / name).read_bytes() == open(os.path.join(BUNDLED_DIR, name),
                                                      "rb").read()
    for name in os.listdir(BUNDLED_DIR):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(os.path.join(BUNDLED_DIR, name)) as a, \
                tarfile.open(tmp_path / name) as b:
            assert a.getnames() == b.getnames()
            for m in a.getmembers():
                x, y = a.extractfile(m).read(), b.extractfile(m.name).read()
                if m.name.endswith((".jpg", ".png")):
                    px = [np.asarray(Image.open(io.BytesIO(d)), dtype=np.int32) for d in (x, y)]
                    assert np.abs(px[0] - px[1]).max() <= 8
                else:
                    assert x == y, m.name


def test_inspect_reports_counts_samples_and_packing(tmp_path, configs_dir):
    from mm1_moe.data.inspect import inspect
    from mm1_moe.data.spec import DataSpec

    spec = DataSpec(seq_length=512, tokens_per_image=16, image_size=56)
    report = inspect(os.path.join(BUNDLED_DIR, "captions-000000.tar"), num_sequences=4,
                     spec=spec)
    assert "documents: 128 usable, 0 skipped" in report
    assert "sample 0: [image 000000.jpg 64x64]" in report
    assert "packing efficiency" in report and "images per sequence" in report
    assert "<image>x16" in report
    report = inspect(os.path.join(configs_dir, "tiny-dense.yaml"), num_sequences=4)
    assert "interleaved" in report and "packing: the mixture" in report
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for name, data in [("a.jpg", b"not an image"), ("a.txt", b"a red circle."),
                           ("b.jpg", b""), ("b.txt", b"")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    report = inspect(str(bad), num_sequences=1, spec=spec)
    assert "1 do not decode" in report and "empty_caption" in report


def test_installs_without_the_repo_copy_generate_it_on_first_use(tmp_path, monkeypatch):
    from mm1_moe.data import spec as spec_module

    monkeypatch.setattr(spec_module, "BUNDLED_DIR", str(tmp_path / "absent"))
    monkeypatch.setenv("MM1_MOE_DATA_CACHE", str(tmp_path / "cache"))
    root = spec_module.bundled_dir()
    assert root.startswith(str(tmp_path / "cache")) and os.path.exists(
        os.path.join(root, "tokenizer.json"))
    assert spec_module.bundled_dir() == root  # generated once
