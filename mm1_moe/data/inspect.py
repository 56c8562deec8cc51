"""``mm1-moe data inspect <shard | folder | config>``: what a data source holds and how it packs.

For a shard (tar of captions or interleaved documents, JSONL or text file) or a folder of them:
per file its kind, usable and skipped samples (with the reason), image decoding, a few decoded
samples; then the file(s) packed alone (packing efficiency = fraction of non-padding tokens,
images per sequence). For a YAML config: the configured mixture, packed as training would pack it.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import replace
from typing import List, Optional, Sequence

from .common import DataError, SkipCounter
from .images import ImageDecodeError, ImageRef
from .loader import MM1DataLoader
from .sources import SOURCE_CLASSES, Document
from .spec import SOURCES, DataSpec, data_spec_from_config, resolve_paths
from .tokenizer import MM1Tokenizer, load_tokenizer

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
TEXT_SUFFIXES = (".jsonl", ".txt")


def inspect(target: str, overrides: Sequence[str] = (), num_samples: int = 3,
            num_sequences: int = 16, tokenizer: Optional[str] = None,
            spec: Optional[DataSpec] = None) -> str:
    """The report for ``target`` (a shard, a folder of shards, or a YAML config) as text.
    ``spec`` sets the packing shape for shards (default: MM1's 4096 tokens, 16 images x 144)."""
    if target.endswith((".yaml", ".yml")):
        return _inspect_config(target, overrides, num_samples, num_sequences)
    if os.path.isdir(target):
        files = sorted(os.path.join(target, f) for f in os.listdir(target)
                       if f.endswith(SHARD_SUFFIXES + TEXT_SUFFIXES))
        if not files:
            raise DataError(f"{target}: no shards (.tar) or text files (.jsonl, .txt) in it")
    elif os.path.isfile(target):
        files = [target]
    else:
        raise DataError(f"no such file or folder: {target}")
    spec = spec or DataSpec()
    if tokenizer:
        spec = replace(spec, tokenizer=tokenizer)
    spec = spec.with_bundled_defaults()
    tok = load_tokenizer(spec.tokenizer)
    lines, by_kind = [], {name: [] for name in SOURCES}
    for path in files:
        kind = detect_kind(path)
        by_kind[kind].append(path)
        lines += _scan_file(path, kind, tok, num_samples)
    for kind, paths in by_kind.items():
        if paths:
            weights = tuple(1.0 if k == kind else 0.0 for k in SOURCES)
            lines += _packing_report(replace(spec, weights=weights, **{kind: paths}), tok,
                                     num_sequences, f"{kind} packed alone")
    return "\n".join(lines)


def _inspect_config(path: str, overrides, num_samples: int, num_sequences: int) -> str:
    from ..config import load_config

    config = load_config(path, list(overrides))
    spec = data_spec_from_config(config).with_bundled_defaults()
    source = getattr(config.data, "source", "synthetic_text")
    lines = [f"config {path}: data.source = {source}"]
    if source != "mm1_mixture":
        lines.append("  (training uses the generated text stream; below is the mixture that "
                     "data.source: mm1_mixture would read)")
    tok = load_tokenizer(spec.tokenizer, spec.vocab_size)
    lines.append(f"  tokenizer {spec.tokenizer}: {tok.vocab_size} tokens")
    for name, weight in zip(SOURCES, spec.weights):
        lines.append(f"  {name:<12} weight {weight:.2f}  {spec.paths(name)}")
    for name, weight in zip(SOURCES, spec.weights):
        if weight > 0:
            for file in resolve_paths(spec.paths(name), name)[:1]:
                lines += _scan_file(file, name, tok, num_samples)
    lines += _packing_report(spec, tok, num_sequences, "the mixture")
    return "\n".join(lines)


def detect_kind(path: str) -> str:
    """captions / interleaved / text, from the suffix and (for tars) the first samples."""
    if path.endswith(TEXT_SUFFIXES):
        return "text"
    if not path.endswith(SHARD_SUFFIXES):
        raise DataError(f"{path}: not a shard (.tar) or text file (.jsonl, .txt)")
    from .shards import TarShard

    shard = TarShard(path, SkipCounter(log_first=0))
    for _, members in shard.samples[:20]:
        if "json" in members and not any(e in members for e in ("txt", "jpg", "jpeg", "png",
                                                                 "webp")):
            try:
                raw = json.loads(shard.read(members["json"]).decode("utf-8", errors="replace"))
            except json.JSONDecodeError:
                continue
            if isinstance(raw, list) or (isinstance(raw, dict) and (
                    "texts" in raw or "content" in raw)):
                return "interleaved"
    return "captions"


def _scan_file(path: str, kind: str, tok: MM1Tokenizer, num_samples: int) -> List[str]:
    """Counts over every sample of one file and a few decoded samples."""
    skips = SkipCounter(log_first=0)
    source = SOURCE_CLASSES[kind](kind, [path], 0, skips)
    docs, images, corrupt, token_counts, shown = 0, 0, 0, [], []
    note = ""
    while True:
        try:
            doc = source.next()
        except DataError as err:  # nothing usable in the whole file
            note = f"  no usable document: {err}"
            break
        if source.pos.epoch > 0:  # wrapped around: every sample has been seen
            break
        docs += 1
        token_counts.append(sum(len(tok.encode(i)) for i in doc.items if isinstance(i, str)))
        rendered, bad = _render_document(doc, skips)
        images += len(doc.images)
        corrupt += bad
        if len(shown) < num_samples:
            shown.append(rendered)
    size = os.path.getsize(path)
    lines = [f"{kind} file {path} ({size:,} bytes)",
             f"  documents: {docs} usable, {skips.total() - corrupt} skipped at reading"
             + (f" {skips.as_dict()}" if skips.total() else "")]
    if kind != "text":
        lines.append(f"  images: {images}, of which {corrupt} do not decode")
    if token_counts:
        lines.append(f"  text tokens per document: mean {sum(token_counts) / docs:.1f}, "
                     f"max {max(token_counts)}")
    lines += [f"  sample {i}: {text}" for i, text in enumerate(shown)]
    return lines + ([note] if note else [])


def _render_document(doc: Document, skips: SkipCounter):
    """(one-line rendering, number of images that do not decode)."""
    from PIL import Image

    parts, bad = [], 0
    for item in doc.items:
        if isinstance(item, ImageRef):
            try:
                image = Image.open(io.BytesIO(item.read()))
                image.load()
                parts.append(f"[image {os.path.basename(item.name)} {image.size[0]}x"
                             f"{image.size[1]}]")
            except (OSError, SyntaxError, ValueError, ImageDecodeError) as err:
                bad += 1
                skips.skip("corrupt_image", f"{item.path}:{item.name}", str(err))
                parts.append(f"[image {os.path.basename(item.name)}: DOES NOT DECODE]")
        else:
            text = " ".join(item.split())
            parts.append(repr(text if len(text) <= 160 else text[:157] + "..."))
    return " ".join(parts), bad


def _packing_report(spec: DataSpec, tok: MM1Tokenizer, num_sequences: int,
                    title: str) -> List[str]:
    per_sequence, first = [], None
    try:
        loader = MM1DataLoader(spec, micro_batch_size=1, tokenizer=tok,
                               skips=SkipCounter(log_first=0))
        for _ in range(num_sequences):
            batch = next(loader)
            per_sequence.append(int(batch.images_per_sequence[0]))
            first = batch if first is None else first
    except DataError as err:
        return [f"packing: {title}: cannot pack: {err}"]
    histogram = Counter(per_sequence)
    stats = loader.stats()
    text_share = loader.text_tokens_yielded / max(1, loader.sequences_yielded * spec.seq_length)
    lines = [
        f"packing: {title}, {num_sequences} sequences of {spec.seq_length} tokens, <= "
        f"{spec.max_images_per_sequence} images x {spec.tokens_per_image} tokens",
        f"  packing efficiency {stats['packing_efficiency']:.1%} (non-padding tokens); "
        f"tokens with loss {text_share:.1%}",
        f"  images per sequence: mean {sum(per_sequence) / len(per_sequence):.2f}, min "
        f"{min(per_sequence)}, max {max(per_sequence)}; histogram "
        + ", ".join(f"{k}: {histogram[k]}" for k in sorted(histogram)),
        f"  documents planned (with the packing look-ahead): {stats['documents_drawn']}",
    ]
    if stats["skipped"]:
        lines.append(f"  skipped: {stats['skipped']}")
    lines.append("  sequence 0: " + render_tokens(first.tokens[0].tolist(), tok,
                                                  spec.tokens_per_image, 600))
    return lines


def render_tokens(tokens: List[int], tok: MM1Tokenizer, tokens_per_image: int,
                  max_chars: int = 0) -> str:
    """Decoded tokens with each image's placeholder run shown as ``<image>x144`` and padding
    as ``<pad>xN``."""
    out, text, i = [], [], 0
    while i < len(tokens):
        t = tokens[i]
        if t in (tok.image_token_id, tok.pad_id):
            j = i
            while j < len(tokens) and tokens[j] == t:
                j += 1
            if text:
                out.append(tok.decode(text))
                text = []
            name = "<image>" if t == tok.image_token_id else "<pad>"
            out.append(f"{name}x{j - i}")
            i = j
            continue
        text.append(t)
        i += 1
    if text:
        out.append(tok.decode(text))
    rendered = " ".join(out)
    if max_chars and len(rendered) > max_chars:
        rendered = rendered[: max_chars - 3] + "..."
    return rendered


def run_inspect(args) -> int:
    """The ``mm1-moe data inspect`` command: prints the report (a DataError or ConfigError goes
    to the CLI's error boundary: one line, exit 2). ``args``: target, overrides, samples,
    sequences, tokenizer, seq_length, max_images, tokens_per_image, image_size (the last four
    shape the packing of shards)."""
    shape = {k: getattr(args, k, None) for k in ("seq_length", "tokens_per_image", "image_size")}
    shape["max_images_per_sequence"] = getattr(args, "max_images", None)
    spec = DataSpec(**{k: v for k, v in shape.items() if v is not None})
    print(inspect(args.target, getattr(args, "overrides", ()) or (),
                  num_samples=args.samples, num_sequences=args.sequences,
                  tokenizer=getattr(args, "tokenizer", None), spec=spec))
    return 0
