"""Reading WebDataset-style tar shards and text files, tolerating damage.

A tar shard groups members into samples by key, as WebDataset and img2dataset do: the key is the
member path up to the first dot of its file name, the extension is the rest (``00042.jpg`` ->
key ``00042``, extension ``jpg``; ``doc7.0.png`` -> ``doc7``, ``0.png``). Samples keep the order
in which their keys first appear.

Damage is skipped and counted, never fatal: an empty or unreadable shard yields no samples; a
truncated shard yields the samples whose bytes are all present.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from typing import Dict, List, Optional

from .common import SkipCounter
from .images import ImageRef


@dataclass
class TarMember:
    name: str
    offset: int  # byte offset of the data in an uncompressed tar
    size: int
    data: Optional[bytes] = None  # inline bytes (compressed tars)


def split_key(name: str):
    """``dir/00042.seg.jpg`` -> (``dir/00042``, ``seg.jpg``)."""
    folder, base = os.path.split(name)
    key, _, ext = base.partition(".")
    return (os.path.join(folder, key) if folder else key), ext.lower()


class TarShard:
    """The member index of one tar file: ``samples`` is a list of (key, {ext: TarMember})."""

    def __init__(self, path: str, skips: SkipCounter):
        self.path = path
        self.members: Dict[str, TarMember] = {}
        self.samples: List[tuple] = []
        compressed = not _is_plain_tar(path)
        try:
            handle = tarfile.open(path, "r:*")
        except (tarfile.TarError, OSError, EOFError) as err:
            kind = "empty_shard" if os.path.getsize(path) == 0 else "unreadable_shard"
            skips.skip(kind, path, f"{type(err).__name__}: {err}")
            return
        with handle:
            self._index(handle, compressed, skips)
        if not self.samples:
            skips.skip("empty_shard", path, "no samples")

    def _index(self, handle: tarfile.TarFile, compressed: bool, skips: SkipCounter) -> None:
        file_size = os.path.getsize(self.path)
        groups: Dict[str, Dict[str, TarMember]] = {}
        while True:
            try:
                info = handle.next()
            except (tarfile.TarError, OSError, EOFError) as err:
                skips.skip("truncated_shard", self.path,
                           f"{type(err).__name__}: {err} after {len(self.members)} members")
                break
            if info is None:
                # tarfile ends quietly at a header cut short; a complete tar has an
                # end-of-archive marker (two zero blocks) after its last member
                if not compressed and file_size - handle.offset < 2 * tarfile.BLOCKSIZE:
                    skips.skip("truncated_shard", self.path,
                               f"no end-of-archive marker after {len(self.members)} members")
                break
            if not info.isfile():
                continue
            if not compressed and info.offset_data + info.size > file_size:
                skips.skip("truncated_shard", self.path,
                           f"member {info.name} ends past the end of the file")
                break
            data = None
            if compressed:
                try:
                    data = handle.extractfile(info).read()
                except (tarfile.TarError, OSError, EOFError) as err:
                    skips.skip("truncated_shard", self.path, f"{info.name}: {err}")
                    break
            member = TarMember(info.name, info.offset_data, info.size, data)
            self.members[info.name] = member
            key, ext = split_key(info.name)
            groups.setdefault(key, {})[ext] = member
        self.samples = list(groups.items())

    def read(self, member: TarMember) -> bytes:
        return self.image_ref(member).read()

    def image_ref(self, member: TarMember) -> ImageRef:
        return ImageRef(self.path, member.name, member.offset, member.size, member.data)

    def __len__(self) -> int:
        return len(self.samples)


def _is_plain_tar(path: str) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(3)
    # gzip, bzip2 and xz magic numbers; anything else is read as an uncompressed tar
    return not (head[:2] == b"\x1f\x8b" or head == b"BZh" or head == b"\xfd7z")


class JsonlFile:
    """Line-by-line reading from a byte offset (resumable without rescanning the file)."""

    def __init__(self, path: str):
        self.path = path
        self._handle = open(path, "rb")

    def read_line(self, offset: int):
        """(line bytes or None at the end, offset after the line)."""
        self._handle.seek(offset)
        line = self._handle.readline()
        return (line if line else None), offset + len(line)

    def close(self) -> None:
        self._handle.close()
