"""The cycle collector in a serving process (``actors.heap``): the start-up heap frozen out of it,
and its pauses recorded per generation."""

from __future__ import annotations

import gc

from actors.heap import CollectorPauses, freeze_startup_heap


def test_a_frozen_start_up_heap_is_out_of_every_generation_and_new_objects_are_not() -> None:
    try:
        frozen = freeze_startup_heap()
        assert 0 < gc.get_freeze_count() <= frozen  # fewer once frozen objects die (other threads')
        later = [[] for _ in range(1000)]
        assert gc.get_freeze_count() <= frozen  # objects made after the freeze are not frozen ...
        assert any(x is later for x in gc.get_objects())  # ... but in a generation, collected as usual
    finally:
        gc.unfreeze()


def test_collector_pauses_are_recorded_per_generation() -> None:
    pauses = CollectorPauses(long_s=0.0).install()
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        gc.callbacks.remove(pauses._on_collect)
    got = pauses.as_dict()
    assert got["longest_ms"][0] > 0 and got["longest_ms"][2] > 0
    assert got["over_0ms"][0] >= 1 and got["over_0ms"][2] >= 1
    assert len(got["collections"]) == 3


def test_reading_the_pauses_does_not_deadlock_when_the_read_itself_sets_off_a_collection() -> None:
    import threading

    pauses = CollectorPauses().install()
    threshold = gc.get_threshold()
    read: list[dict] = []
    try:
        gc.set_threshold(1, 1, 1)  # every allocation may start a collection, in the reading thread too
        reader = threading.Thread(target=lambda: read.append(pauses.as_dict()), daemon=True)
        reader.start()
        reader.join(10)
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(pauses._on_collect)
    assert read, "as_dict never returned: the collection it set off waited on its lock"
    assert read[0]["collections"][0] > 0
