"""Timing shared by the bench tools: side-by-side medians on a shared machine."""

import statistics
import time


def interleaved_medians(thunks: dict, repeats: int) -> dict:
    """{key: (median wall seconds, median process CPU seconds)} of each thunk over `repeats` rounds,
    every round calling every thunk once in turn (after one warm-up call each), so that load changes
    on a shared machine hit all alike. CPU time (all threads of this process) counts the work done,
    which waiting for a contended core does not inflate; spinning threads do inflate it."""
    for thunk in thunks.values():
        thunk()
    times = {key: [] for key in thunks}
    for _ in range(repeats):
        for key, thunk in thunks.items():
            wall, cpu = time.perf_counter(), time.process_time()
            thunk()
            times[key].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {key: tuple(statistics.median(column) for column in zip(*t)) for key, t in times.items()}
