"""pyvirtio.devices.balloon.pages: PageSet, the balloon's page sets at one bit per page."""

from __future__ import annotations

import itertools
import random

import pytest

from pyvirtio.devices.balloon.pages import CHUNK_PAGES, PageSet


def test_runs_change_the_set_as_a_set_would() -> None:
    """Random runs across chunk and byte edges, checked against a Python set."""
    rng = random.Random(7)
    for _ in range(200):
        pages = PageSet()
        reference: set[int] = set()
        for _ in range(rng.randrange(1, 25)):
            # Runs at chunk and byte edges, of every length class up to two chunks.
            edge = CHUNK_PAGES - rng.randrange(100)
            first = rng.choice([rng.randrange(3 * CHUNK_PAGES), edge, rng.randrange(200)])
            long = rng.randrange(2 * CHUNK_PAGES)
            count = rng.choice([0, 1, 7, 8, 9, 63, 64, 65, 512, 513, long])
            run = set(range(first, first + count))
            if rng.random() < 0.6:
                assert pages.add_run(first, count) == len(run - reference)
                reference |= run
            else:
                assert pages.discard_run(first, count) == len(run & reference)
                reference -= run
            assert len(pages) == len(reference)
        assert list(pages) == sorted(reference)
        for pfn in rng.sample(range(3 * CHUNK_PAGES), 40):
            assert (pfn in pages) == (pfn in reference)
        runs = pages.runs()
        assert [pfn for first, count in runs for pfn in range(first, first + count)] == sorted(
            reference
        )
        assert all(a + n < b for (a, n), (b, _) in itertools.pairwise(runs))
        assert PageSet(runs).runs() == runs


def test_runs_join_across_chunks() -> None:
    pages = PageSet([(CHUNK_PAGES - 3, 3), (CHUNK_PAGES, 5), (3 * CHUNK_PAGES, 1)])
    assert pages.runs() == [(CHUNK_PAGES - 3, 8), (3 * CHUNK_PAGES, 1)]


def test_a_whole_64_gib_guest_costs_two_mib_and_leaves_nothing_behind() -> None:
    pages = PageSet()
    all_pages = (64 << 30) // 4096
    assert pages.add_run(0, all_pages) == all_pages
    assert len(pages) == all_pages and pages.runs() == [(0, all_pages)]
    assert pages.nbytes == all_pages // 8 == 2 << 20
    assert pages.discard_run(1, all_pages - 2) == all_pages - 2
    assert pages.runs() == [(0, 1), (all_pages - 1, 1)]
    assert pages.nbytes == 2 * CHUNK_PAGES // 8  # the emptied chunks are gone
    pages.discard_run(0, all_pages)
    assert len(pages) == 0 and pages.nbytes == 0


def test_membership_of_anything_else_is_false() -> None:
    pages = PageSet([(0, 8)])
    assert 3 in pages
    assert -1 not in pages and "3" not in pages and 8 not in pages


def test_negative_runs_are_refused() -> None:
    with pytest.raises(ValueError, match="page run"):
        PageSet().add_run(-1, 2)
    with pytest.raises(ValueError, match="page run"):
        PageSet().discard_run(0, -2)
