"""The three MM1 sources, each an endless, resumable stream of ``Document``s.

  captions     tar shards, img2dataset layout: ``key.jpg`` (any image extension) with the caption
               in ``key.txt`` or in the ``caption``/``text`` field of ``key.json``
  interleaved  tar shards, one ``key.json`` per document with its images in the same shard;
               the JSON is a list of entries (a string, ``{"type": "text", "text": ...}``,
               ``{"type": "image", "image": "<member>"}``, ``{"text": ...}``, ``{"image": ...}``),
               or ``{"content": [entries]}``, or OBELICS's parallel ``{"texts": [...],
               "images": [...]}`` lists (one of the two is null at each position). An image
               reference names a member of the shard, either in full or as the extension of the
               document's key (``"0.png"`` for ``key.0.png``).
  text         JSONL files (``{"text": ...}`` per line) or plain text files (one document each)

A source's position is (epoch, file, sample, byte offset): enough to continue exactly where it
stopped. Files are visited in an order shuffled per epoch by the seed. A sample that cannot be
used (no caption, no image, a reference to an image the shard lacks, bad JSON) is skipped and
counted; a source with no usable sample in a whole pass over its files stops with its files named.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

from .common import DataError, SkipCounter
from .images import IMAGE_EXTENSIONS, ImageRef
from .shards import JsonlFile, TarShard

Item = Union[str, ImageRef]


@dataclass
class Document:
    kind: str  # "captions" | "interleaved" | "text"
    items: List[Item]  # text and images in reading order
    where: str  # "shard:key" or "file:line", for messages

    @property
    def images(self) -> List[ImageRef]:
        return [i for i in self.items if isinstance(i, ImageRef)]


@dataclass
class Position:
    epoch: int = 0
    file: int = 0  # index into this epoch's file order
    sample: int = 0
    offset: int = 0  # byte offset (JSONL files)

    def as_dict(self) -> Dict[str, int]:
        return dict(epoch=self.epoch, file=self.file, sample=self.sample, offset=self.offset)


@dataclass
class Source:
    name: str
    files: List[str]
    seed: int
    skips: SkipCounter
    pos: Position = field(default_factory=Position)

    def __post_init__(self) -> None:
        if not self.files:
            raise DataError(f"data.{self.name}: no files")
        self._reader = None  # (epoch, file index, reader)
        self._orders: Dict[int, List[int]] = {}

    # -- position ---------------------------------------------------------------------------
    def position(self) -> Dict[str, int]:
        return self.pos.as_dict()

    def seek(self, position: Dict[str, int]) -> None:
        self.pos = Position(**position)

    def file_order(self, epoch: int) -> List[int]:
        if epoch not in self._orders:
            order = list(range(len(self.files)))
            random.Random(f"{self.seed}:{self.name}:{epoch}").shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def current_file(self) -> str:
        return self.files[self.file_order(self.pos.epoch)[self.pos.file]]

    # -- reading ----------------------------------------------------------------------------
    def next(self) -> Document:
        """The next usable document (endless: wraps to a new epoch at the end)."""
        files_without_doc = 0
        while True:
            if self.pos.file >= len(self.files):
                self.pos = Position(self.pos.epoch + 1)
            doc, done = self._read_one()
            if doc is not None:
                return doc
            if done:
                self.pos = Position(self.pos.epoch, self.pos.file + 1)
                files_without_doc += 1
                # a usable file is reached within 2n - 1 finished files (the rest of this
                # epoch, then the next epoch's order up to it); 2n means there is none
                if files_without_doc >= 2 * len(self.files):
                    raise DataError(
                        f"data.{self.name}: no usable sample in a whole pass over its "
                        f"{len(self.files)} files ({', '.join(self.files[:3])}"
                        f"{', ...' if len(self.files) > 3 else ''}); skipped so far: "
                        f"{self.skips.as_dict()}")

    def _reader_for_position(self):
        key = (self.pos.epoch, self.pos.file)
        if self._reader is None or self._reader[0] != key:
            if self._reader is not None and isinstance(self._reader[1], JsonlFile):
                self._reader[1].close()
            self._reader = (key, self._open(self.current_file()))
        return self._reader[1]

    def _open(self, path: str):
        if not os.path.isfile(path):
            raise DataError(f"data.{self.name}: shard disappeared: {path}")
        return TarShard(path, self.skips)

    def _read_one(self):
        """(document or None, whether the current file is finished)."""
        shard = self._reader_for_position()
        if self.pos.sample >= len(shard):
            return None, True
        key, members = shard.samples[self.pos.sample]
        self.pos.sample += 1
        return self.parse(shard, key, members), False

    def parse(self, shard: TarShard, key: str, members: dict) -> Optional[Document]:
        raise NotImplementedError


class CaptionSource(Source):
    def parse(self, shard, key, members):
        where = f"{shard.path}:{key}"
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        if image is None:
            self.skips.skip("missing_image", where, f"no image member (has {sorted(members)})")
            return None
        caption = _caption(shard, members, where, self.skips)
        if caption is None:
            return None
        return Document("captions", [shard.image_ref(image), caption], where)


def _caption(shard, members, where, skips) -> Optional[str]:
    text = None
    if "txt" in members:
        text = shard.read(members["txt"]).decode("utf-8", errors="replace")
    elif "json" in members:
        meta = _load_json(shard.read(members["json"]), where, skips)
        if meta is None:
            return None
        text = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
    if not isinstance(text, str) or not text.strip():
        skips.skip("empty_caption", where, "caption has no text")
        return None
    return text.strip()


def _load_json(raw: bytes, where: str, skips: SkipCounter):
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        skips.skip("bad_json", where, str(err))
        return None


class InterleavedSource(Source):
    def parse(self, shard, key, members):
        where = f"{shard.path}:{key}"
        if "json" not in members:
            if not all(ext.split(".")[-1] in IMAGE_EXTENSIONS for ext in members):
                self.skips.skip("missing_json", where, f"no .json member (has {sorted(members)})")
            return None  # an image-only group: images referenced by another key's document
        raw = _load_json(shard.read(members["json"]), where, self.skips)
        entries = _entries(raw)
        if entries is None:
            self.skips.skip("bad_document", where, "expected a list of text/image entries")
            return None
        items: List[Item] = []
        for kind, value in entries:
            if kind == "text":
                if value.strip():
                    items.append(value)
                continue
            member = shard.members.get(value) or shard.members.get(f"{key}.{value}")
            if member is None:
                self.skips.skip("missing_image_ref", where, f"image {value!r} is not in the shard")
                return None
            items.append(shard.image_ref(member))
        if not any(isinstance(i, str) for i in items):
            self.skips.skip("empty_document", where, "no text")
            return None
        return Document("interleaved", items, where)


def _entries(raw) -> Optional[List[tuple]]:
    """Normalise the accepted JSON forms to [("text", str) | ("image", ref)]; None if invalid."""
    if isinstance(raw, dict) and isinstance(raw.get("texts"), list) \
            and isinstance(raw.get("images"), list):
        if len(raw["texts"]) != len(raw["images"]):
            return None
        raw = [{"text": t} if t is not None else {"image": i}
               for t, i in zip(raw["texts"], raw["images"]) if t is not None or i is not None]
    elif isinstance(raw, dict) and isinstance(raw.get("content"), list):
        raw = raw["content"]
    if not isinstance(raw, list):
        return None
    out = []
    for entry in raw:
        if isinstance(entry, str):
            out.append(("text", entry))
        elif isinstance(entry, dict) and isinstance(entry.get("image"), str) \
                and entry.get("type", "image") == "image":
            out.append(("image", entry["image"]))
        elif isinstance(entry, dict) and isinstance(entry.get("text"), str):
            out.append(("text", entry["text"]))
        else:
            return None
    return out


class TextSource(Source):
    """JSONL (``text`` field) or plain text files (``.txt`` and anything not ``.jsonl``)."""

    def _open(self, path: str):
        if not os.path.isfile(path):
            raise DataError(f"data.{self.name}: file disappeared: {path}")
        return JsonlFile(path) if path.endswith(".jsonl") else path

    def _read_one(self):
        reader = self._reader_for_position()
        where = f"{self.current_file()}:{self.pos.sample + 1}"
        if isinstance(reader, str):  # a plain text file: one document
            if self.pos.sample > 0:
                return None, True
            self.pos.sample = 1
            with open(reader, "r", encoding="utf-8", errors="replace") as handle:
                text = handle.read()
            if not text.strip():
                self.skips.skip("empty_text", where, "file has no text")
                return None, True
            return Document("text", [text], where), False
        line, self.pos.offset = reader.read_line(self.pos.offset)
        if line is None:
            return None, True
        self.pos.sample += 1
        if not line.strip():
            return None, False
        record = _load_json(line, where, self.skips)
        text = record.get("text") if isinstance(record, dict) else None
        if record is not None and (not isinstance(text, str) or not text.strip()):
            self.skips.skip("empty_text", where, "no text field or empty text")
            return None, False
        return (Document("text", [text], where) if record is not None else None), False


SOURCE_CLASSES = {"interleaved": InterleavedSource, "captions": CaptionSource, "text": TextSource}


def make_source(name: str, files: List[str], seed: int, skips: SkipCounter) -> Source:
    return SOURCE_CLASSES[name](name, files, seed, skips)
