"""Resume exactness and data-parallel sharding: a resumed run yields exactly the batches an
uninterrupted run yields; ranks split each global batch without overlap, the same global batch
for every layout."""

import json
from dataclasses import replace

import pytest
import torch

from mm1_moe.data.common import DataError
from mm1_moe.data.loader import MM1DataLoader


def _same(a, b):
    for name, x in a.as_dict().items():
        assert torch.equal(x, getattr(b, name)), name


def _rows(batch):
    """Each sequence as a hashable (tokens, its images) pair."""
    out, first = [], 0
    for b, n in enumerate(batch.images_per_sequence.tolist()):
        out.append((tuple(batch.tokens[b].tolist()),
                    tuple(batch.images[first:first + n].flatten()[::97].tolist())))
        first += n
    return out


@pytest.mark.parametrize("stop", [1, 3, 7])
def test_resume_after_n_batches_is_exact(tiny_spec, stop):
    """Interrupted at batch ``stop`` (mid-window for pack_window 8 and 2 sequences a batch),
    the state travels through JSON, and the next batches are identical."""
    reference = MM1DataLoader(tiny_spec, micro_batch_size=2)
    expected = [next(reference) for _ in range(stop + 6)]
    first = MM1DataLoader(tiny_spec, micro_batch_size=2)
    for n in range(stop):
        _same(next(first), expected[n])
    state = json.loads(json.dumps(first.state_dict()))
    resumed = MM1DataLoader(tiny_spec, micro_batch_size=2)
    resumed.load_state_dict(state)
    for n in range(stop, stop + 6):
        _same(next(resumed), expected[n])


def test_resume_inside_a_chunked_document_and_across_epochs(tiny_spec):
    """Short sequences cut interleaved documents into chunks, so a window can start in the
    middle of a document; 120 batches wrap the small bundled shards several times."""
    spec = replace(tiny_spec, seq_length=48, max_images_per_sequence=2, pack_window=3)
    reference = MM1DataLoader(spec, micro_batch_size=1)
    expected = [next(reference) for _ in range(130)]
    assert reference.planner.sources["interleaved"].pos.epoch >= 1
    loader = MM1DataLoader(spec, micro_batch_size=1)
    chunk_starts = 0
    for n in range(120):
        next(loader)
        state = loader.state_dict()
        chunk_starts += state["window_start"]["chunk"] > 0
        if n % 17 == 5:
            loader = MM1DataLoader(spec, micro_batch_size=1)
            loader.load_state_dict(state)
            for m in range(n + 1, n + 4):
                _same(next(loader), expected[m])
            loader = MM1DataLoader(spec, micro_batch_size=1)
            loader.load_state_dict(state)
    assert chunk_starts > 0  # the mid-document case was exercised


@pytest.mark.parametrize("dp_size,micro", [(2, 2), (4, 1), (2, 1), (4, 2)])
def test_ranks_split_the_global_batch_without_overlap(tiny_spec, dp_size, micro):
    G = 8
    single = MM1DataLoader(tiny_spec, micro_batch_size=micro, global_batch_size=G)
    steps = [[_rows(mb) for mb in single.next_step()] for _ in range(2)]
    ranks = [MM1DataLoader(tiny_spec, dp_rank=r, dp_size=dp_size, micro_batch_size=micro,
                           global_batch_size=G) for r in range(dp_size)]
    for step in steps:
        per_rank = [[_rows(mb) for mb in loader.next_step()] for loader in ranks]
        assert all(len(mbs) == G // dp_size // micro for mbs in per_rank)
        union = [row for mbs in per_rank for mb in mbs for row in mb]
        flat = [row for mb in step for row in mb]
        assert sorted(union) == sorted(flat)  # same global batch, nothing twice, nothing lost
        for r, mbs in enumerate(per_rank):  # the single process's micro-batch m on rank m % dp
            assert mbs == step[r::dp_size]


def test_resume_with_another_data_parallel_layout(tiny_spec):
    """A state saved at a step boundary on dp=2 resumes a dp=1 run on the same next step."""
    G = 4
    single = MM1DataLoader(tiny_spec, micro_batch_size=2, global_batch_size=G)
    steps = [[r for mb in single.next_step() for r in _rows(mb)] for _ in range(3)]
    ranks = [MM1DataLoader(tiny_spec, dp_rank=r, dp_size=2, micro_batch_size=1,
                           global_batch_size=G) for r in range(2)]
    for loader in ranks:
        list(loader.next_step())
    states = [loader.state_dict() for loader in ranks]
    assert states[0] == states[1]  # one rank's copy is enough
    resumed = MM1DataLoader(tiny_spec, micro_batch_size=2, global_batch_size=G)
    resumed.load_state_dict(states[1])
    for step in steps[1:]:
        assert [r for mb in resumed.next_step() for r in _rows(mb)] == step


def test_resume_refuses_changed_settings(tiny_spec):
    state = MM1DataLoader(tiny_spec).state_dict()
    other = MM1DataLoader(replace(tiny_spec, seq_length=96))
    with pytest.raises(DataError, match="seq_length 128 -> 96"):
        other.load_state_dict(state)


def test_next_step_checks_divisibility(tiny_spec):
    loader = MM1DataLoader(tiny_spec, dp_size=2, micro_batch_size=3)
    with pytest.raises(DataError, match="not divisible"):
        list(loader.next_step(8))
