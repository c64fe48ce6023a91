"""The process's GC settings once started (sidecar.app.settle_gc)."""
from __future__ import annotations

import gc

from sidecar.app import YOUNG_GC_THRESHOLD, settle_gc


def test_settle_gc_freezes_start_up_and_raises_only_the_young_threshold():
    before = gc.get_threshold()
    try:
        settle_gc()
        assert gc.get_threshold() == (YOUNG_GC_THRESHOLD, *before[1:])
        assert YOUNG_GC_THRESHOLD > before[0]
        assert gc.get_freeze_count() > 0            # start-up's objects are out of every pass

        class Node:
            pass
        a, b = Node(), Node()
        a.peer, b.peer = b, a                        # a cycle: still collected, when a pass runs
        del a, b
        assert gc.collect(0) >= 2
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
