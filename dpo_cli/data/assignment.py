"""Which annotator labels which pair (the web labeller, `collect-prefs --serve`): a seeded share of the pairs
goes to two annotators, for agreement, and the rest to one each, so no pair is labelled twice needlessly."""

from __future__ import annotations

import random


def assign(pair_ids: list[str], annotators: list[str], overlap: float, seed: int, labelled: dict[str, set[str]] | None = None) -> dict[str, list[str]]:
    """annotator -> the pair ids they label, in their own seeded order.

    round(overlap x pairs) pairs (a seeded choice) go to two annotators, neighbours on a ring of the names
    (sorted: the order they are listed in does not matter), so each duo shares enough pairs for its agreement
    to mean something; the other pairs go to one annotator, the least loaded. A single annotator gets every
    pair. `labelled`: pair id -> who has labelled it already (a restart, perhaps with more or fewer
    annotators): those labels stay theirs, and no pair is handed to more annotators than it needs."""
    names = sorted(annotators)
    queues: dict[str, list[str]] = {name: [] for name in names}
    if len(names) == 1:
        queues[names[0]] = list(pair_ids)
    else:
        rng = random.Random(f"{seed}:assign")
        order = list(pair_ids)
        rng.shuffle(order)
        shared = set(order[: round(overlap * len(order))])
        duos = [(names[i], names[(i + 1) % len(names)]) for i in range(len(names) if len(names) > 2 else 1)]
        done = {pair_id: sorted(set(by) & set(names)) for pair_id, by in (labelled or {}).items()}
        for pair_id in order:  # labels already given count first
            for name in done.get(pair_id, []):
                queues[name].append(pair_id)
        load = lambda name: len(queues[name])  # noqa: E731
        turn = 0
        for pair_id in order:
            wanted = 2 if pair_id in shared else 1
            have = done.get(pair_id, [])
            if len(have) >= wanted:
                continue
            if wanted == 2 and not have:  # the duos take turns: each shares about as many pairs
                first, second = duos[turn % len(duos)]
                turn += 1
                queues[first].append(pair_id)
                queues[second].append(pair_id)
            else:
                queues[min((name for name in names if name not in have), key=load)].append(pair_id)
    for name, queue in queues.items():
        random.Random(f"{seed}:order:{name}").shuffle(queue)
    return queues
