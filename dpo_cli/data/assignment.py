"""Which annotator labels which pair (the web labeller, `collect-prefs --serve`): a seeded share of the pairs
goes to two annotators, for agreement, and the rest to one each, so no pair is labelled twice needlessly."""

from __future__ import annotations

import random


def assign(pair_ids: list[str], annotators: list[str], overlap: float, seed: int) -> dict[str, list[str]]:
    """annotator -> the pair ids they label, in their own seeded order. round(overlap x pairs) pairs (a seeded
    choice) go to two annotators (the pairs of annotators taking turns), the others to one (taking turns); a
    single annotator gets every pair. Every annotator's load differs from another's by at most one or two."""
    queues: dict[str, list[str]] = {name: [] for name in annotators}
    if len(annotators) == 1:
        queues[annotators[0]] = list(pair_ids)
    else:
        rng = random.Random(f"{seed}:assign")
        order = list(pair_ids)
        rng.shuffle(order)
        shared = round(overlap * len(order))
        duos = [(a, b) for i, a in enumerate(annotators) for b in annotators[i + 1 :]]
        rng.shuffle(duos)
        turn = 0
        for index, pair_id in enumerate(order):
            if index < shared:  # the least loaded duo of the next ones takes it
                first, second = min(duos[turn % len(duos) :] + duos[: turn % len(duos)], key=lambda d: len(queues[d[0]]) + len(queues[d[1]]))
                queues[first].append(pair_id)
                queues[second].append(pair_id)
                turn += 1
            else:
                queues[min(annotators, key=lambda name: len(queues[name]))].append(pair_id)  # the least loaded
    for name, queue in queues.items():
        random.Random(f"{seed}:order:{name}").shuffle(queue)
    return queues
