"""Several engines serving one model: replicas on several devices behind the same API.

``EnginePool`` looks like an ``Engine`` to the app and the UI. Each request (all its images) goes
to the replica with the most free rows after its queue, so work spreads where capacity is; the
replicas share one ``Stats`` (the model's /stats and /metrics) and ``devices()`` reports each one.
An image is the same on any replica of the same weights and dtype (seeded per image).
"""

from __future__ import annotations

from collections.abc import Sequence

from samplers.modes import SamplingOptions

from .engine import Engine, QueueFull, Request, SingleImageCalls


class EnginePool(SingleImageCalls):
    def __init__(self, engines: Sequence[Engine]):
        if not engines:
            raise ValueError("an engine pool needs at least one engine")
        names = {e.pipeline.name for e in engines}
        if len(names) != 1:
            raise ValueError(f"replicas must serve one model, got {sorted(names)}")
        self.engines = list(engines)
        self.pipeline = self.engines[0].pipeline
        self.stats = self.engines[0].stats
        self.max_rows = sum(e.max_rows for e in self.engines)
        self.max_queue = sum(e.max_queue for e in self.engines)
        self.request_timeout_s = self.engines[0].request_timeout_s
        self._owner: dict[int, Engine] = {}

    def _load(self, engine: Engine) -> float:
        """Rows that would be free if everything queued were admitted (higher = emptier)."""
        return engine.max_rows - sum(engine.rows_in_use().values()) / max(1, len(engine.decoders)) \
            - 2 * engine.queue_length()

    def submit_many(self, items: list[tuple[int, str, int, SamplingOptions]]) -> list[Request]:
        """All images of one request to one replica: the emptiest that takes them; QueueFull only
        when none does."""
        last: QueueFull | None = None
        for engine in sorted(self.engines, key=self._load, reverse=True):
            try:
                reqs = engine.submit_many(items)
            except QueueFull as e:
                last = e
                continue
            for r in reqs:
                self._owner[id(r)] = engine
                r.future.add_done_callback(self._forget(id(r)))
            return reqs
        raise last if last is not None else QueueFull(1)

    def _forget(self, key: int):  # noqa: ANN202 - a future callback
        return lambda _future: self._owner.pop(key, None)

    def cancel(self, req: Request) -> None:
        engine = self._owner.get(id(req))
        if engine is not None:
            engine.cancel(req)

    def queue_length(self) -> int:
        return sum(e.queue_length() for e in self.engines)

    def rows_in_use(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for e in self.engines:
            for role, n in e.rows_in_use().items():
                total[role] = total.get(role, 0) + n
        return total

    def devices(self) -> list[dict[str, object]]:
        """Each replica: its device, rows in use, queue, images it finished."""
        return [d for e in self.engines for d in e.devices()]

    def close(self) -> None:
        for e in self.engines:
            e.close()


__all__ = ["EnginePool"]
