"""Timing shared by the bench tools: side-by-side medians on a shared machine."""

import statistics
import time


def timed(thunk) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call of `thunk`, on this process's clocks."""
    wall, cpu = time.perf_counter(), time.process_time()
    thunk()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved_medians(thunks: dict, repeats: int, timer=timed) -> dict:
    """{key: (median wall seconds, median process CPU seconds)} of each thunk over `repeats` rounds,
    every round calling every thunk once in turn (after one warm-up call each), so that load changes
    on a shared machine hit all alike. CPU time (all threads of the timed process) counts the work
    done, which waiting for a contended core does not inflate; spinning threads do inflate it.
    `timer(thunk)` gives one call's (wall, CPU) seconds: by default `timed`, in this process; thunks
    that run and time their work in another process return its (wall, CPU) seconds themselves and
    pass `timer=lambda thunk: thunk()`."""
    for thunk in thunks.values():
        thunk()
    times = {key: [] for key in thunks}
    for _ in range(repeats):
        for key, thunk in thunks.items():
            times[key].append(timer(thunk))
    return {key: tuple(statistics.median(column) for column in zip(*t)) for key, t in times.items()}
