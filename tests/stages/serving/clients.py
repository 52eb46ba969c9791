"""Many clients at once against a real server: `concurrently(ask, keys)` runs ask(key) for every key on its own
thread, all started together, and returns {key: answer}; any client's exception fails the test with every error."""

from __future__ import annotations

import threading
from typing import Callable, Hashable, Iterable


def concurrently(ask: Callable, keys: Iterable[Hashable], timeout_s: float = 120.0) -> dict:
    got, errors = {}, []

    def worker(key):
        try:
            got[key] = ask(key)
        except Exception as e:  # collected and reported below
            errors.append(f"{key}: {e!r}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not errors, errors
    return got
