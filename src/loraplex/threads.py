"""How many CPU threads a process's torch ops use: the cores this process may run on, a budget when
processes share a host, and a tuner that moves a training run's thread count to what is fastest now.

Why: torch's OpenMP pool splits every op over all its threads and waits for the slowest. When
another process takes a core, the thread on that core is preempted for a scheduler slice, and every
op waits for it: `loraplex train` on 2 cores ran 13x slower next to one busy process, where the fair
share is 2x. Fewer threads than cores loses a little when the machine is quiet and avoids the
collapse when it is not; which is faster depends on what else runs, and that changes during a run,
so the training loop measures instead of guessing (Tuner). bench/contention.py measures all of it.

What it does not do: pin threads to cores, or schedule other processes (the web app's training
jobs run at a lower priority: web/jobs.py).
"""

from __future__ import annotations

import os
from typing import Any

ENV = "LORAPLEX_THREADS"  # a budget set by whoever starts this process (the web app for its jobs, a user)
# torch's own variable: a user who sets it to budget threads expects every loop to keep to it (before,
# training's tuner measured 2 of 2 cores under OMP_NUM_THREADS=1). LORAPLEX_THREADS wins where both are set.
OMP_ENV = "OMP_NUM_THREADS"


def cores() -> int:
    """The CPUs this process may run on (its affinity mask: taskset, cgroup cpusets), not the
    machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def budget() -> int | None:
    """The thread count $LORAPLEX_THREADS sets, else $OMP_NUM_THREADS; None when neither is set to a
    positive integer (OpenMP's lists such as "2,1" count as unset)."""
    for name in (ENV, OMP_ENV):
        raw = os.environ.get(name, "").strip()
        if raw.isdigit() and int(raw) > 0:
            return int(raw)
    return None


class Tuner:
    """Picks a training loop's thread count by measuring tokens/s, and keeps measuring.

    Each candidate count (all cores, one fewer, half) runs `probe` steps, and the fastest runs
    until the next probe round, `period` steps later; the period doubles (up to `max_period`)
    while the choice stays the same, and a round starts at once when the chosen count's speed
    falls below `drop` of what it measured (something else started running). On 2 cores, 32
    steps: quiet, 521 tok/s measured vs 514 with 2 threads fixed; next to a busy process, 330 vs
    162 with 2 threads fixed and 369 with 1 (bench/contention.py has the current figures).

        tuner = Tuner(threads=cores())
        for step in ...:
            torch.set_num_threads(tuner.threads)
            t = time.perf_counter(); ...; tuner.observe(tokens, time.perf_counter() - t)
    """

    def __init__(self, threads: int, probe: int = 2, period: int = 16, max_period: int = 256, drop: float = 0.6):
        self.candidates = sorted({threads, max(1, threads - 1), max(1, threads // 2)}, reverse=True)
        self.probe, self.period, self.max_period, self.drop = probe, period, max_period, drop
        self.speeds: dict[int, float] = {}
        self.threads = self.candidates[0]
        self._queue = list(self.candidates) if len(self.candidates) > 1 else []
        self._samples: list[float] = []
        self._until_round = self._first_period = period
        self._choice = 0
        self._chosen_speed = 0.0
        self.switches = 0

    def observe(self, tokens: int, seconds: float) -> None:
        """One step's real tokens and wall time (the thread count it ran with is `threads`)."""
        speed = tokens / max(seconds, 1e-9)
        if self._queue:  # probing: `probe` steps on each candidate
            self._samples.append(speed)
            if len(self._samples) >= self.probe:
                self.speeds[self._queue.pop(0)] = sorted(self._samples)[len(self._samples) // 2]
                self._samples = []
                if self._queue:
                    self._use(self._queue[0])
                else:
                    self._choose()
            return
        if len(self.candidates) == 1:
            return
        self._samples = (self._samples + [speed])[-self.probe :]
        slow = len(self._samples) == self.probe and max(self._samples) < self.drop * self._chosen_speed
        self._until_round -= 1
        if slow or self._until_round <= 0:
            self._queue = list(self.candidates)
            self._samples = []
            self._use(self._queue[0])

    def _choose(self) -> None:
        best = max(self.speeds, key=lambda n: self.speeds[n])
        self.period = min(self.period * 2, self.max_period) if best == self._choice else self._first_period
        self._choice = best
        self._chosen_speed = self.speeds[best]
        self._until_round = self.period
        self._use(best)

    def _use(self, n: int) -> None:
        if n != self.threads:
            self.threads = n
            self.switches += 1


def summary(tuner: Tuner | None, now: int) -> dict[str, Any]:
    """What the run's CPU threads were, for the manifest and the closing line."""
    if tuner is None:
        return {"mode": "fixed", "threads": now, "text": f"{now} thread{'s' * (now > 1)} (fixed)"}
    speeds = {str(n): round(v, 1) for n, v in sorted(tuner.speeds.items())}
    text = f"{tuner.threads} of {cores()} cores (thread count measured, {tuner.switches} switches)"
    return {"mode": "measured", "threads": tuner.threads, "switches": tuner.switches, "tok_s": speeds, "text": text}
