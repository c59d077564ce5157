"""CPU time of the N-event chain search (retrieval/events.py) against candidates per event.

    OMP_NUM_THREADS=1 python -m bench.events_dp [--sizes 1000,10000,100000] [--events 2,3,5]

Random candidates: T per event, times uniform over an hour in 50 videos, one window of 30 s for
every gap; the clock is ``time.process_time`` (CPU time of this process, one thread), so the
machine's load does not inflate it; the cyclic GC is off during the timed call (with it on, its
rescans of the hundreds of thousands of live candidates add up to ~50% at T = 100k). Prints one line per (N, T) and the chains found.
"""

from __future__ import annotations

import argparse
import gc
import random
import time


def main(argv=None) -> None:
    from mergeseek.retrieval.events import chain_events
    from mergeseek.retrieval.search import Hit

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--events", default="2,3,5")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    for t in map(int, args.sizes.split(",")):
        for n in map(int, args.events.split(",")):
            events = [[Hit(rng.random(), f"V{rng.randrange(50)}", e * 10**7 + i, rng.uniform(0, 3600), "", e * 10**7 + i)
                       for i in range(t)] for e in range(n)]
            gc.collect()
            gc.disable()  # the programme's own work: the cyclic GC rescanning 10^5-10^6 live candidates is not it
            t0 = time.process_time()
            chains = chain_events(events, 30.0)
            cpu = time.process_time() - t0
            gc.enable()
            print(f"N={n} T={t}: {cpu * 1e3:.1f} ms CPU (process_time, 1 thread), {len(chains)} chains")


if __name__ == "__main__":
    main()
