"""The batching engine: one background thread per loaded pipeline, continuous batching per step.

Requests are checked when submitted (``Pipeline.check_request``, the same check every caller
gets) and wait in a bounded queue. Before every step the loop admits as many as fit into the
KV cache of the weights their mode runs on (rows per image from ``samplers.modes``); then each
set of weights with work advances all its images by one step in one forward pass, so ``free`` and
``cfg`` images share the base model's pass and ``cca`` images the CCA model's. Finished images
leave through ``Pipeline.finish`` (each decoded on its own) on a finisher thread, so their VQ
decode overlaps the next steps of the others. Seeds make every image independent
of who shared its batch, to the pixel.

A failure while admitting or finishing one request fails that request alone; every request gets
exactly one answer.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from samplers.family import StepDecoder
from samplers.generate import ImageJob
from samplers.modes import InvalidRequest, SamplingOptions
from samplers.pipeline import ImageResult, Pipeline

from .stats import ImageRecord, Stats

log = logging.getLogger("ccaserve.engine")


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"the queue is full; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class RequestCancelled(Exception):
    pass


class RequestTimeout(Exception):
    pass


@dataclass(eq=False)
class Request:
    class_id: int
    mode: str
    seed: int
    options: SamplingOptions
    submitted: float = field(default_factory=time.perf_counter)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    job: ImageJob | None = None
    started: float | None = None
    cancelled: bool = False

    @property
    def rows(self) -> int:
        return self.options.rows


def _settle(future: concurrent.futures.Future, result: object = None, error: BaseException | None = None) -> None:
    """Resolve a future unless its client already gave up on it (then it is cancelled or done)."""
    if future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:  # cancelled concurrently by the waiting side
        pass


class SingleImageCalls:
    """One-image conveniences over the subclass's ``submit_many`` and ``cancel`` (an engine or a pool)."""

    def submit(self, class_id: int, mode: str, seed: int, options: SamplingOptions) -> Request:
        """Queue one image; returns a Request whose ``future`` resolves to an ImageResult.
        Raises ValueError for bad input and QueueFull when the queue is at its bound."""
        return self.submit_many([(class_id, mode, seed, options)])[0]

    def generate(self, class_id: int, mode: str, seed: int, options: SamplingOptions,
                 timeout: float | None = None) -> ImageResult:
        """Blocking convenience for in-process callers (the UI, benchmarks)."""
        req = self.submit(class_id, mode, seed, options)
        try:
            return req.future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            self.cancel(req)
            raise RequestTimeout(f"no result within {timeout} s") from None


class Engine(SingleImageCalls):
    """Continuous batching over a Pipeline's base and CCA models.

    ``max_rows``: rows per model per step (the KV cache size); ``max_queue``: requests waiting
    beyond that get QueueFull (HTTP 503); ``request_timeout_s``: a request not done by then fails.
    """

    def __init__(self, pipeline: Pipeline, max_rows: int = 64, max_queue: int = 256,
                 request_timeout_s: float = 300.0, stats: Stats | None = None):
        if max_rows < 2:
            raise ValueError("max_rows must be at least 2 (a guided image takes two rows)")
        self.pipeline = pipeline
        self.max_rows, self.max_queue, self.request_timeout_s = max_rows, max_queue, request_timeout_s
        self.stats = stats or Stats(pipeline.modes)
        self.decoders: dict[str, StepDecoder] = {
            role: pipeline.family.decoder(model, max_rows, compile=pipeline.compile)
            for role, model in pipeline.models.items()}
        self._pending: deque[Request] = deque()
        self._running: dict[str, list[Request]] = {k: [] for k in self.decoders}
        self._cond = threading.Condition()
        self._stop = False
        self._images_done = 0
        # Finished images are decoded here, off the stepping thread: the next steps of the other
        # images overlap the VQ decode (on a GPU, device work; on a CPU, the second core).
        self._finisher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"finish-{pipeline.name}")
        self._thread = threading.Thread(target=self._loop, name=f"engine-{pipeline.name}", daemon=True)
        self._thread.start()

    # ---- client side ------------------------------------------------------------------------
    def submit_many(self, items: list[tuple[int, str, int, SamplingOptions]]) -> list[Request]:
        """Queue several images all-or-nothing (a grid, a comparison): either all fit the queue or
        QueueFull is raised and none is queued."""
        reqs = []
        for class_id, mode, seed, options in items:
            if not isinstance(options, SamplingOptions):
                raise ValueError(f"options must be SamplingOptions, got {type(options).__name__}")
            mode = self.pipeline.check_request(class_id, mode, seed)
            self.pipeline.check_options(options)
            reqs.append(Request(int(class_id), mode, int(seed), options))
        if len(reqs) > self.max_queue:  # no wait would help: say so instead of "retry later"
            raise InvalidRequest("n", f"{len(reqs)} images in one request can never fit this server's queue of "
                                 f"{self.max_queue}", allowed=f"[1, {self.max_queue}]")
        with self._cond:
            if self._stop:
                raise RuntimeError("the engine is stopped")
            if len(self._pending) + len(reqs) > self.max_queue:
                raise QueueFull(self._retry_after())
            self._pending.extend(reqs)
            self._cond.notify()
        for mode in dict.fromkeys(req.mode for req in reqs):  # one request, however many images it asks for
            self.stats.request(mode)
        return reqs

    def cancel(self, req: Request) -> None:
        """Give up on a request (its client went away): it leaves the batch before the next step."""
        with self._cond:
            req.cancelled = True
            self._cond.notify()

    def queue_length(self) -> int:
        return len(self._pending)

    def devices(self) -> list[dict[str, object]]:
        """This engine's device, rows in use, queue and images finished (one entry; a pool lists its replicas)."""
        return [{"device": str(self.pipeline.gpt.device), "rows_in_use": self.rows_in_use(), "max_rows": self.max_rows,
                 "queue": self.queue_length(), "images": self._images_done}]

    def rows_in_use(self) -> dict[str, int]:
        return {k: d.rows_in_use for k, d in self.decoders.items()}

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)
        self._finisher.shutdown(wait=True)

    def _retry_after(self) -> int:
        # rough: how long the queue ahead takes at the recent image rate
        rate = self.stats.snapshot()["overall"]["images_per_s_last_minute"] or 1.0
        return max(1, min(60, int(len(self._pending) / rate) + 1))

    # ---- the loop ---------------------------------------------------------------------------
    def _admit(self) -> None:
        """FIFO per model: a request that does not fit holds back later ones of the same model,
        so guided requests are not starved by a stream of single-row ones."""
        blocked: set[str] = set()
        keep: deque[Request] = deque()
        now = time.perf_counter()
        try:
            while self._pending:
                req = self._pending.popleft()
                if req.cancelled or req.future.cancelled():
                    _settle(req.future, error=RequestCancelled("cancelled before it started"))
                    continue
                if now - req.submitted > self.request_timeout_s:
                    _settle(req.future, error=RequestTimeout(f"waited more than {self.request_timeout_s} s in the "
                                                             "queue"))
                    continue
                key = self.pipeline.weights_for(req.mode)
                decoder = self.decoders[key]
                if key in blocked or decoder.free_rows() < req.rows:
                    blocked.add(key)
                    keep.append(req)
                    continue
                try:
                    req.job = decoder.add(req.class_id, req.seed, req.options, tag=req)
                except Exception as e:  # this request alone: the others keep their place
                    log.warning("request rejected at admission: %s", e)
                    _settle(req.future, error=e if isinstance(e, ValueError) else RuntimeError("admission failed"))
                    continue
                req.started = now
                self._running[key].append(req)
        finally:
            keep.extend(self._pending)
            self._pending = keep

    def _drop_cancelled(self) -> None:
        now = time.perf_counter()
        for key, running in self._running.items():
            for req in list(running):
                timed_out = now - req.submitted > self.request_timeout_s
                gone = req.cancelled or req.future.cancelled()
                if gone or timed_out:
                    self.decoders[key].cancel(req.job)
                    running.remove(req)
                    _settle(req.future, error=RequestCancelled("cancelled") if gone
                            else RequestTimeout("request timed out"))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._pending and not any(self._running.values()):
                    self._cond.wait()
                if self._stop:
                    break
            try:
                with self._cond:
                    self._drop_cancelled()
                    self._admit()
                self._step_all()
            except Exception as e:  # a failed step fails its requests, never the loop
                log.exception("engine step failed")
                self._fail_running(e)

    def _step_all(self) -> None:
        finished: list[Request] = []
        for key, decoder in self.decoders.items():
            if not decoder.jobs:
                continue
            self.stats.step(key, decoder.rows_in_use)
            try:
                done = decoder.step()
            except Exception as e:  # a failed forward pass fails the images of these weights only
                log.exception("decoding step of %s failed", key)
                self._fail_running(e, keys=[key])
                continue
            for job in done:
                req: Request = job.tag
                self._running[key].remove(req)
                finished.append(req)
        for req in finished:
            self._finisher.submit(self._deliver, req)

    @torch.inference_mode()
    def _deliver(self, req: Request) -> None:
        try:
            result = self.pipeline.finish([req.job], req.mode, req.submitted, req.started)[0]
        except Exception:
            log.exception("finishing an image failed")
            _settle(req.future, error=RuntimeError("decoding the image failed"))
            return
        self.stats.image(ImageRecord(time.time(), req.mode, result.latency_s, result.queue_wait_s,
                                     result.rows_x_steps, len(result.tokens), result.rows))
        self._images_done += 1
        _settle(req.future, result)

    def _fail_running(self, error: Exception, keys: list[str] | None = None) -> None:
        with self._cond:
            for key, running in self._running.items():
                if keys is not None and key not in keys:
                    continue
                for req in running:
                    try:
                        self.decoders[key].cancel(req.job)
                    finally:
                        _settle(req.future, error=RuntimeError(f"generation failed: {type(error).__name__}"))
                running.clear()
