"""Which annotator labels which pair: the overlap share, no pair twice in one queue, even loads, a ring of duos,
and stability when the team changes between runs."""

from __future__ import annotations

from collections import Counter

import pytest

from dpo_cli.data.assignment import assign

PAIRS = [f"{i}-0-1" for i in range(300)]


@pytest.mark.parametrize("team, overlap", [(["a"], 0.5), (["a", "b"], 0.2), (["a", "b", "c", "d", "e"], 0.1), ([f"n{i}" for i in range(20)], 0.3)])
def test_shares_loads_and_no_repeats(team, overlap):
    queues = assign(PAIRS, team, overlap, seed=1)
    times = Counter(pair for queue in queues.values() for pair in queue)
    assert set(times) == set(PAIRS) and all(len(set(queue)) == len(queue) for queue in queues.values())
    shared = round(overlap * len(PAIRS)) if len(team) > 1 else 0
    assert Counter(times.values()) == ({1: len(PAIRS)} if len(team) == 1 else {1: len(PAIRS) - shared, 2: shared})
    loads = [len(queue) for queue in queues.values()]
    assert max(loads) - min(loads) <= 2
    if len(team) > 2:  # shared pairs go to neighbours on the ring of names, each duo its share
        duos = Counter(tuple(sorted(name for name, queue in queues.items() if pair in queue)) for pair, n in times.items() if n == 2)
        ring = {tuple(sorted((a, b))) for a, b in zip(sorted(team), sorted(team)[1:] + sorted(team)[:1])}
        assert set(duos) == ring and min(duos.values()) >= shared // len(team) - 1


def test_the_order_names_are_given_in_does_not_matter_and_each_order_is_seeded():
    assert assign(PAIRS, ["b", "a", "c"], 0.2, 0) == assign(PAIRS, ["a", "b", "c"], 0.2, 0)
    queues = assign(PAIRS, ["a", "b"], 0.0, 0)
    assert queues["a"] != sorted(queues["a"]) and assign(PAIRS, ["a", "b"], 0.0, 1) != queues


def test_labels_already_given_stay_with_their_labellers_when_the_team_changes():
    before = assign(PAIRS, ["a", "b"], 0.1, 0)
    labelled = {pair: {"a"} for pair in before["a"][:40]} | {pair: {"b"} for pair in before["b"][:40]}
    after = assign(PAIRS, ["a", "b", "c"], 0.1, 0, labelled)
    assert all(pair in after["a"] for pair in before["a"][:40]) and all(pair in after["b"] for pair in before["b"][:40])
    times = Counter(pair for queue in after.values() for pair in queue)
    assert all(times[pair] == 1 for pair in labelled if pair not in {p for p, n in times.items() if n == 2})
    assert max(times.values()) <= 2 and len(after["c"]) > 50  # the newcomer takes a share of the rest
