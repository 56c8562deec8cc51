"""The 45/45/10 mixture: proportions within 1 point over 10,000 samples, deterministic by seed."""

from collections import Counter

import pytest

from mm1_moe.data.loader import MM1DataLoader
from mm1_moe.data.mixture import MixtureSchedule, apportion


@pytest.mark.parametrize("weights", [(0.45, 0.45, 0.10), (1 / 3, 1 / 3, 1 / 3), (0.7, 0.0, 0.3),
                                     (0.05, 0.9, 0.05)])
@pytest.mark.parametrize("seed", [0, 1234])
def test_proportions_over_10000_draws_within_one_point(weights, seed):
    schedule = MixtureSchedule(weights, seed)
    counts = Counter(schedule.source_at(n) for n in range(10_000))
    total = sum(weights)
    for i, w in enumerate(weights):
        assert abs(counts[i] / 10_000 - w / total) <= 0.01, (i, counts)
    if 0.0 in weights:
        assert counts[weights.index(0.0)] == 0


@pytest.mark.parametrize("start", [0, 137, 4_999, 9_000])
def test_any_window_of_10000_draws_within_one_point(start):
    """Not only from draw 0: a resumed run's next 10,000 draws keep the proportions too."""
    schedule = MixtureSchedule((0.45, 0.45, 0.10), 3)
    counts = Counter(schedule.source_at(n) for n in range(start, start + 10_000))
    for i, w in enumerate((0.45, 0.45, 0.10)):
        assert abs(counts[i] / 10_000 - w) <= 0.01


def test_deterministic_by_seed_and_random_access():
    a, b = MixtureSchedule((0.45, 0.45, 0.1), 5), MixtureSchedule((0.45, 0.45, 0.1), 5)
    order = [a.source_at(n) for n in range(3000)]
    assert order == [b.source_at(n) for n in range(3000)]
    assert [b.source_at(n) for n in (2999, 5, 1500)] == [order[2999], order[5], order[1500]]
    other = [MixtureSchedule((0.45, 0.45, 0.1), 6).source_at(n) for n in range(3000)]
    assert order != other
    assert len(set(order[:20])) > 1  # shuffled, not 450 of one source then 450 of the next


def test_apportion_is_exact_and_sums():
    assert apportion((0.45, 0.45, 0.10), 1000) == [450, 450, 100]
    assert sum(apportion((1, 1, 1), 1000)) == 1000
    assert apportion((1, 0, 0), 1000) == [1000, 0, 0]


def test_loader_draws_documents_in_proportion(tiny_spec):
    """Through the real pipeline (bundled shards, tokenization, packing): the documents drawn
    follow the weights within 1 point over the first 10,000."""
    loader = MM1DataLoader(tiny_spec)
    planner = loader.planner
    while planner.draws < 10_000:
        planner.next_window()
    counts = planner.docs_by_source
    total = sum(counts.values())
    for name, w in zip(("interleaved", "captions", "text"), tiny_spec.weights):
        assert abs(counts[name] / total - w) <= 0.01, counts
