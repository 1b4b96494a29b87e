"""How the quickstart shows its progress: each stage announced and timed, and the time left of a long loop."""

from __future__ import annotations

import time

from tqdm.auto import tqdm


def eta_text(elapsed: float, done: int, total: int) -> str:
    """'elapsed 1:05, about 2:10 left' at the rate so far."""
    left = elapsed / max(done, 1) * (total - done)
    return f"elapsed {tqdm.format_interval(elapsed)}, about {tqdm.format_interval(left)} left"


class Stopwatch:
    """Announces stages and records how long each took."""

    def __init__(self) -> None:
        self.start = time.time()
        self.times: dict[str, float] = {}
        self._name: str | None = None
        self._t0 = 0.0

    def stage(self, name: str, what: str) -> None:
        self.done()
        self._name, self._t0 = name, time.time()
        print(f"\n[{len(self.times) + 1}] {what}  (t = {time.time() - self.start:.0f} s)", flush=True)

    def done(self) -> None:
        if self._name is not None:
            self.times[self._name] = time.time() - self._t0
            print(f"    done in {self.times[self._name]:.1f} s", flush=True)
            self._name = None

    @property
    def total(self) -> float:
        return time.time() - self.start
