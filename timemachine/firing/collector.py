"""How the cyclic garbage collector runs in a firing node, so its passes never hold
the reactor for long.

CPython's full collection walks every tracked object not frozen: with a due window
of 200,000 `Job`s held, each pass took 50-65 ms, several per window load. Three
things keep it short and rare:

* the executor holds its window as rows (`timemachine.domain.jobs.job_row`), which the
  collector stops tracking: a pass walks only the containers holding them (~1-10 ms
  with 200,000 held, instead of 50-65);
* `settle_collector` collects once and freezes what the node built while it opens,
  before any due window loads: the ~100k objects that live as long as the process
  leave the collector's sight, and that one pass (~20-30 ms) holds back no firing;
* a full pass comes after `FULL_PASS_EVERY` younger passes instead of CPython's 10.
  Taking in 200,000 due jobs runs ~70 of them, so a start-up load sees no full pass
  at all, and a later load (a gained shard, a reload) rarely one: at 100, most
  reloads of 200,000 jobs met one (5-14 ms); at 1,000, none in eight.

Nothing is frozen after start-up: freezing while serving would also freeze what is
in use then (deliveries, connections), and a cycle among such objects, once garbage,
would never be collected. Raising the threshold only delays cyclic garbage: young
passes still collect most of it at once, and full passes still come. Firing 20,000
jobs at 1,000/s left 1,624 objects for a full pass to reclaim (~0.1 per fire).
"""

from __future__ import annotations

import gc

# Generation-1 collections between full ones; CPython's default is 10. One comes
# after ~7,000 new tracked objects (net of those freed), so a full pass after ~7
# million: taking in a window keeps ~3 per job (row, key, heap entry).
FULL_PASS_EVERY = 1000


def settle_collector() -> None:
    """Collect once, freeze what survives, and space out the full passes.

    Called once per process by the node, after it has built its long-lived parts and
    before it loads any due window.
    """
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_PASS_EVERY)
