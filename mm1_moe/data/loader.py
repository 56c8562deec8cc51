"""``MM1DataLoader``: packed MM1 micro-batches for one data-parallel rank, exactly resumable.

The global stream. Every rank computes the same packing plan, made from token counts only:
documents are drawn from the mixture and tokenized, then first-fit into windows of
``pack_window`` open sequences; a window closes when the next document fits none of its
sequences (that document opens the next window). The stream is dealt in blocks of
``micro_batch_size`` sequences: block ``b`` (counted from where the run started or resumed) goes
to rank ``b % dp_size``, and only that rank reads and decodes its images. So every
data-parallel layout sees the same global batch, split without overlap, the cost of images is
paid once, and every layout forms the same micro-batches as one process does: the loss (a mean
per micro-batch) and the MoE balance losses then do not depend on the layout. Dealing single
sequences round-robin instead moved the step-1 loss of tiny-mm1-moe (micro-batch 2) from
5.600783 in one process to 5.599941 at DP=2.

Resume. A window's start is a small snapshot: the number of mixture draws, each source's
position, and which chunk of the document in hand comes next. ``state_dict()`` holds the window
that contains the next unconsumed global sequence, its first global index, and that index;
``load_state_dict`` replays the window from its snapshot (tokens only) and continues. At an
optimizer-step boundary every rank's state is the same, so one rank's copy resumes any layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import numpy as np

from .batch import PackedBatch
from .common import DataError, SkipCounter
from .mixture import MixtureSchedule
from .packing import TokenDoc, collate, first_fit, materialize, tokenize
from .sources import Source, make_source
from .spec import SOURCES, DataSpec, resolve_paths
from .tokenizer import MM1Tokenizer, load_tokenizer

STATE_VERSION = 1
LOST_SEQUENCES_LIMIT = 16  # consecutive sequences emptied by undecodable images: stop


class Planner:
    """The packing plan of the global stream, one window of sequences at a time."""

    def __init__(self, spec: DataSpec, tok: MM1Tokenizer, sources: Dict[str, Source]):
        self.spec, self.tok, self.sources = spec, tok, sources
        self.schedule = MixtureSchedule(spec.weights, spec.seed)
        self.draws = 0
        self._pending: List[TokenDoc] = []  # unpacked chunks of the document in hand
        self._pending_start: dict = {}
        self._pending_index = 0  # index of _pending[0] among that document's chunks
        self.docs_by_source = {name: 0 for name in SOURCES}

    def snapshot(self) -> dict:
        if self._pending:
            return {**self._pending_start, "chunk": self._pending_index}
        return {"draws": self.draws, "chunk": 0,
                "sources": {n: s.position() for n, s in self.sources.items()}}

    def restore(self, snap: dict) -> None:
        self.draws = snap["draws"]
        for name, position in snap["sources"].items():
            self.sources[name].seek(position)
        self._pending = []
        if snap["chunk"]:
            self._fill()
            if snap["chunk"] >= len(self._pending):
                raise DataError("cannot resume: the data changed since the state was saved "
                                f"(document {self._pending_start} has fewer chunks)")
            self._pending = self._pending[snap["chunk"]:]
            self._pending_index = snap["chunk"]

    def _fill(self) -> None:
        while not self._pending:
            start = self.snapshot()
            name = SOURCES[self.schedule.source_at(self.draws)]
            self.draws += 1
            doc = self.sources[name].next()
            self.docs_by_source[name] += 1
            s = self.spec
            self._pending = tokenize(doc, self.tok, s.seq_length, s.max_images_per_sequence,
                                     s.tokens_per_image)
            self._pending_start = {"draws": start["draws"], "sources": start["sources"]}
            self._pending_index = 0

    def next_window(self):
        """(snapshot at the window's start, [docs of each sequence])."""
        start = self.snapshot()
        bins: list = []
        s = self.spec
        while True:
            self._fill()
            if not first_fit(bins, self._pending[0], s.seq_length, s.max_images_per_sequence,
                             s.pack_window):
                break
            self._pending.pop(0)
            self._pending_index += 1
        return start, [b.docs for b in bins]


@dataclass
class Window:
    start: dict
    first: int  # global index of its first sequence
    plans: List[List[TokenDoc]]

    @property
    def end(self) -> int:
        return self.first + len(self.plans)


class MM1DataLoader:
    """Iterate to get micro-batches (``PackedBatch``) of ``micro_batch_size`` sequences for
    ``dp_rank``; ``next_step()`` yields the micro-batches of one optimizer step."""

    def __init__(self, spec: DataSpec, dp_rank: int = 0, dp_size: int = 1,
                 micro_batch_size: int = 1, global_batch_size: Optional[int] = None,
                 tokenizer: Optional[MM1Tokenizer] = None,
                 skips: Optional[SkipCounter] = None):
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        self.spec = spec.with_bundled_defaults()
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.tokenizer = tokenizer or load_tokenizer(self.spec.tokenizer, self.spec.vocab_size)
        self.skips = skips if skips is not None else SkipCounter()
        self.files = {name: resolve_paths(self.spec.paths(name), name)
                      for name, w in zip(SOURCES, self.spec.weights) if w > 0}
        sources = {name: make_source(name, files, self.spec.seed, self.skips)
                   for name, files in self.files.items()}
        self.planner = Planner(self.spec, self.tokenizer, sources)
        self._window: Optional[Window] = None
        self._base, self._round = 0, 0  # see _take: sequences dealt since base = dp * round
        self.sequences_yielded = self.tokens_yielded = self.text_tokens_yielded = 0
        self._lost_in_a_row = 0

    # -- the global plan --------------------------------------------------------------------
    def _window_for(self, g: int) -> Window:
        if self._window is None:
            start, plans = self.planner.next_window()
            self._window = Window(start, 0, plans)
        while g >= self._window.end:
            start, plans = self.planner.next_window()
            self._window = Window(start, self._window.end, plans)
        if g < self._window.first:
            raise DataError(f"global sequence {g} is behind the plan (at {self._window.first})")
        return self._window

    def plan(self, g: int) -> List[TokenDoc]:
        """The documents of global sequence ``g`` (never decreasing ``g`` between calls)."""
        window = self._window_for(g)
        return window.plans[g - window.first]

    @property
    def cursor(self) -> int:
        """The next global sequence index not yet handed out on any rank's round."""
        return self._base + self.dp_size * self._round

    # -- batches ----------------------------------------------------------------------------
    def batch(self, global_indices: List[int]) -> PackedBatch:
        """Materialize the given global sequences (images decoded) as one micro-batch."""
        return self._materialize([self.plan(g) for g in global_indices])

    def _materialize(self, plans: List[List[TokenDoc]]) -> PackedBatch:
        s = self.spec
        planned_images = sum(len(d.images) for plan in plans for d in plan)
        pixels = np.empty((planned_images, 3, s.image_size, s.image_size), dtype=np.float32)
        rows, filled = [], 0
        for plan in plans:
            rows.append(materialize(plan, self.tokenizer, s.seq_length, pixels[filled:],
                                    self.skips))
            filled += rows[-1].num_images
        for plan, row in zip(plans, rows):
            self._check_not_all_lost(plan, row)
            self.sequences_yielded += 1
            self.tokens_yielded += sum(row.doc_lengths)
            self.text_tokens_yielded += int(row.loss_mask.sum())
        return collate(rows, pixels)

    def _check_not_all_lost(self, plan: List[TokenDoc], row) -> None:
        """Stop, rather than train on padding forever, when images keep failing to decode."""
        if plan and not row.doc_lengths:
            self._lost_in_a_row += 1
            if self._lost_in_a_row >= LOST_SEQUENCES_LIMIT:
                example = self.skips.examples.get("corrupt_image", ["?"])[-1]
                raise DataError(
                    f"{self._lost_in_a_row} sequences in a row lost every document to images "
                    f"that do not decode (e.g. {example}); skipped so far: "
                    f"{self.skips.as_dict()}")
        else:
            self._lost_in_a_row = 0

    def _take(self, count: int) -> List[int]:
        """This rank's next ``count`` global sequences (a whole number of micro-batches): of
        each ``dp_size`` consecutive blocks of ``micro_batch_size``, block ``dp_rank``."""
        mb = self.micro_batch_size
        if count % mb:
            raise DataError(f"take {count} sequences: not whole micro-batches of {mb}")
        first = self._base + self.dp_size * self._round
        self._round += count
        return [first + (block * self.dp_size + self.dp_rank) * mb + i
                for block in range(count // mb) for i in range(mb)]

    def __iter__(self) -> Iterator[PackedBatch]:
        return self

    def __next__(self) -> PackedBatch:
        return self.batch(self._take(self.micro_batch_size))

    def num_microbatches(self, global_batch_size: Optional[int] = None) -> int:
        G = global_batch_size or self.global_batch_size
        if G is None:
            raise DataError("next_step needs global_batch_size (here or in the constructor)")
        if G % (self.dp_size * self.micro_batch_size):
            raise DataError(f"global_batch_size {G} is not divisible by dp_size "
                            f"{self.dp_size} x micro_batch_size {self.micro_batch_size}")
        return G // (self.dp_size * self.micro_batch_size)

    def next_step(self, global_batch_size: Optional[int] = None) -> Iterator[PackedBatch]:
        """The micro-batches of the next optimizer step on this rank: global sequences
        [cursor, cursor + G), this rank's share, ``micro_batch_size`` at a time."""
        count = self.num_microbatches(global_batch_size)
        # plan the whole step now, so a state_dict() taken while it is consumed stays exact
        plans = [self.plan(g) for g in self._take(count * self.micro_batch_size)]
        return self._step(plans, count)

    def _step(self, plans, count: int) -> Iterator[PackedBatch]:
        mb = self.micro_batch_size
        for m in range(count):
            yield self._materialize(plans[m * mb:(m + 1) * mb])

    @property
    def packing_efficiency(self) -> float:
        """Fraction of the yielded tokens that are not padding."""
        total = self.sequences_yielded * self.spec.seq_length
        return self.tokens_yielded / total if total else 0.0

    # -- resume -----------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        s = self.spec
        return {"seed": s.seed, "weights": list(s.weights), "seq_length": s.seq_length,
                "max_images_per_sequence": s.max_images_per_sequence,
                "tokens_per_image": s.tokens_per_image, "pack_window": s.pack_window,
                "vocab": self.tokenizer.vocab_size,
                "files": {n: len(f) for n, f in self.files.items()}}

    def state_dict(self) -> dict:
        cursor = self.cursor
        window = self._window_for(cursor)
        return {"version": STATE_VERSION, "cursor": cursor, "window_first": window.first,
                "window_start": window.start, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data state version {state.get('version')} is not {STATE_VERSION}")
        saved, now = state["fingerprint"], self.fingerprint()
        changed = sorted(k for k in now if saved.get(k) != now[k])
        if changed:
            raise DataError("cannot resume exactly: data settings changed since the state was "
                            + "saved: " + ", ".join(f"{k} {saved.get(k)} -> {now[k]}"
                                                    for k in changed))
        self.planner.restore(state["window_start"])
        _, plans = self.planner.next_window()
        self._window = Window(state["window_start"], state["window_first"], plans)
        self._base, self._round = state["cursor"], 0

    def stats(self) -> dict:
        return {"sequences": self.sequences_yielded,
                "packing_efficiency": self.packing_efficiency,
                "documents_drawn": dict(self.planner.docs_by_source),
                "skipped": self.skips.as_dict()}
