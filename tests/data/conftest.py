"""Fixtures for the data-pipeline tests: small specs on the bundled data, and a writer of tar
shards (good or deliberately broken) into ``tmp_path``."""

import io
import json
import signal
import tarfile

import pytest

from mm1_moe.data.spec import DataSpec


@pytest.fixture
def tiny_spec() -> DataSpec:
    """The bundled data at the tiny configs' shapes (56 px images, 4 tokens each)."""
    return DataSpec(image_size=56, tokens_per_image=4, seq_length=128,
                    max_images_per_sequence=8, seed=7, pack_window=8, vocab_size=256)


def jpeg_bytes(colour=(200, 30, 30), size=(32, 24)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_tar(path, members) -> str:
    """``members``: [(name, bytes or str or JSON-able)] written in order."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            if isinstance(data, str):
                data = data.encode()
            elif not isinstance(data, bytes):
                data = json.dumps(data).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def caption_text(i: int) -> str:
    """Caption ``i`` in the bundled tokenizer's words (it has no digits)."""
    from mm1_moe.data.bundled import NUMBERS

    return f"caption {NUMBERS[i // 10]} {NUMBERS[i % 10]}."


def caption_members(count, first=0, colour=(200, 30, 30)):
    out = []
    for i in range(first, first + count):
        out += [(f"{i:06d}.jpg", jpeg_bytes(colour)), (f"{i:06d}.txt", caption_text(i))]
    return out


@pytest.fixture
def shards():
    """Helpers: ``shards.write_tar(path, members)``, ``shards.captions(n)``, ``jpeg(...)``."""

    class Helpers:
        pass

    h = Helpers()
    h.write_tar = write_tar
    h.captions = caption_members
    h.jpeg = jpeg_bytes
    return h


@pytest.fixture
def deadline():
    """Fail (instead of hanging) when the test runs past 30 s: bad input must never hang."""

    def expired(signum, frame):
        raise TimeoutError("data pipeline hung on bad input (30 s)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
