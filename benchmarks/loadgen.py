"""A bounded HTTP load generator for a running ccaserve server (fixed duration and concurrency).

Each client loops: send a request, wait for the answer, send the next, until the duration ends.
Used by ``benchmarks/load_test.py`` and ``ccaserve bench --url``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class LoadResult:
    label: str
    concurrency: int
    duration_s: float
    images_per_request: int
    statuses: Counter = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)  # per mode, successful requests
    images: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # transport errors by exception name
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        def pct(vals: list[float], q: float) -> float | None:
            if not vals:
                return None
            s = sorted(vals)
            return round(s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))], 4)

        per_mode = {m: {"images": self.images[m], "images_per_s": round(self.images[m] / self.wall_s, 3),
                        "latency_s": {"p50": pct(v, 0.5), "p95": pct(v, 0.95), "p99": pct(v, 0.99)}}
                    for m, v in self.latencies.items()}
        total = sum(self.images.values())
        return {"label": self.label, "concurrency": self.concurrency, "duration_s": self.duration_s,
                "wall_s": round(self.wall_s, 2), "images_per_request": self.images_per_request,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "transport_errors": dict(self.errors), "images": total,
                "images_per_s": round(total / self.wall_s, 3) if self.wall_s else 0.0, "modes": per_mode}


async def run_load(url: str, *, concurrency: int, duration_s: float, modes: list[str], classes: list[int],
                   n: int = 1, label: str = "", seed: int = 0, timeout_s: float = 300.0,
                   extra_params: dict[str, Any] | None = None) -> LoadResult:
    """``concurrency`` closed-loop clients for ``duration_s``; client i cycles through ``modes``
    starting at i, so a mix stays balanced. Requests in flight at the end are awaited."""
    result = LoadResult(label or ",".join(modes), concurrency, duration_s, n)
    rng = random.Random(seed)
    deadline = time.perf_counter() + duration_s
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:

        async def one_client(i: int) -> None:
            k = i
            while time.perf_counter() < deadline:
                mode = modes[k % len(modes)]
                k += 1
                body = {"class": rng.choice(classes), "mode": mode, "seed": rng.randrange(2**40), "n": n,
                        **(extra_params or {})}
                start = time.perf_counter()
                try:
                    r = await client.post("/generate", json=body)
                except httpx.HTTPError as e:
                    result.errors[type(e).__name__] += 1
                    await asyncio.sleep(0.1)
                    continue
                result.statuses[r.status_code] += 1
                if r.status_code == 200:
                    result.latencies.setdefault(mode, []).append(time.perf_counter() - start)
                    result.images[mode] += len(r.json()["images"])
                elif r.status_code == 503:  # overloaded: back off as told
                    await asyncio.sleep(min(5.0, float(r.headers.get("retry-after", 1))))

        start = time.perf_counter()
        await asyncio.gather(*(one_client(i) for i in range(concurrency)))
        result.wall_s = time.perf_counter() - start
    return result


def load(url: str, **kwargs: Any) -> LoadResult:
    return asyncio.run(run_load(url, **kwargs))


def server_stats(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/stats", timeout=30).json()
