"""Serving statistics: per mode and overall, over the last minute and since start.

Latency percentiles are over the most recent images (bounded memory); counters are exact.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

WINDOW_S = 60.0
_KEEP = 20000  # recent image records kept for windows and percentiles


@dataclass
class ImageRecord:
    t: float
    mode: str
    latency_s: float
    queue_wait_s: float
    rows_x_steps: int
    tokens: int
    rows: int  # rows the image used at its start (1, or 2 for guided modes)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return round(s[lo] + (s[hi] - s[lo]) * (k - lo), 4)


class Stats:
    def __init__(self, modes: list[str]):
        self.modes = list(modes)
        self.start = time.time()
        self._lock = threading.Lock()
        self._images: deque[ImageRecord] = deque(maxlen=_KEEP)
        self._requests = {m: 0 for m in self.modes}
        self._image_count = {m: 0 for m in self.modes}
        self._token_count = {m: 0 for m in self.modes}
        self._rows_x_steps = {m: 0 for m in self.modes}
        self._errors: dict[str, int] = {}
        self._steps: deque[tuple[float, str, int]] = deque(maxlen=_KEEP)  # (t, model, rows in the step)
        self._step_count: dict[str, int] = {}
        self._row_sum: dict[str, int] = {}

    # ---- recording (engine and HTTP layer) --------------------------------------------------
    def request(self, mode: str) -> None:
        with self._lock:
            self._requests[mode] += 1

    def error(self, status: int | str) -> None:
        with self._lock:
            self._errors[str(status)] = self._errors.get(str(status), 0) + 1

    def image(self, rec: ImageRecord) -> None:
        with self._lock:
            self._images.append(rec)
            self._image_count[rec.mode] += 1
            self._token_count[rec.mode] += rec.tokens
            self._rows_x_steps[rec.mode] += rec.rows_x_steps

    def step(self, model: str, rows: int) -> None:
        with self._lock:
            self._steps.append((time.time(), model, rows))
            self._step_count[model] = self._step_count.get(model, 0) + 1
            self._row_sum[model] = self._row_sum.get(model, 0) + rows

    # ---- reading --------------------------------------------------------------------------
    def snapshot(self) -> dict:
        now = time.time()
        with self._lock:
            images = list(self._images)
            steps = list(self._steps)
            counts = (dict(self._requests), dict(self._image_count), dict(self._token_count),
                      dict(self._rows_x_steps), dict(self._errors), dict(self._step_count), dict(self._row_sum))
        requests, n_images, n_tokens, rxs, errors, step_count, row_sum = counts
        uptime = max(now - self.start, 1e-9)
        window = min(WINDOW_S, uptime)

        def block(mode: str | None) -> dict:
            recs = [r for r in images if mode is None or r.mode == mode]
            recent = [r for r in recs if now - r.t <= WINDOW_S]
            keys = [mode] if mode else self.modes
            total_images = sum(n_images[k] for k in keys)
            lat = [r.latency_s for r in recs]
            wait = [r.queue_wait_s for r in recs]
            return {
                "requests": sum(requests[k] for k in keys),
                "images": total_images,
                "tokens": sum(n_tokens[k] for k in keys),
                "images_per_s_last_minute": round(len(recent) / window, 4),
                "tokens_per_s_last_minute": round(sum(r.tokens for r in recent) / window, 2),
                "images_per_s_since_start": round(total_images / uptime, 4),
                "tokens_per_s_since_start": round(sum(n_tokens[k] for k in keys) / uptime, 2),
                "latency_s": {"p50": _percentile(lat, 0.5), "p95": _percentile(lat, 0.95),
                              "p99": _percentile(lat, 0.99)},
                "queue_wait_s": {"p50": _percentile(wait, 0.5), "p95": _percentile(wait, 0.95),
                                 "p99": _percentile(wait, 0.99)},
                "rows_x_steps_per_image": round(sum(rxs[k] for k in keys) / total_images, 2) if total_images else None,
                "rows_per_image": round(sum(r.rows for r in recs) / len(recs), 3) if recs else None,
            }

        recent_steps = [s for s in steps if now - s[0] <= WINDOW_S]
        occupancy = {
            model: {"steps": step_count[model], "mean_rows_per_step": round(row_sum[model] / step_count[model], 2),
                    "mean_rows_per_step_last_minute": _mean([r for _, m, r in recent_steps if m == model])}
            for model in step_count
        }
        return {
            "uptime_s": round(uptime, 1),
            "window_s": WINDOW_S,
            "overall": block(None),
            "modes": {m: block(m) for m in self.modes},
            "batch_occupancy": occupancy,
            "errors": errors,
            "system": system_info(),
        }


def _mean(values: list[int]) -> float | None:
    return round(sum(values) / len(values), 2) if values else None


def system_info() -> dict:
    info: dict = {"device": "cuda" if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
                  "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_allocated_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
        info["gpu_memory_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith(("VmRSS", "VmHWM")):
                    key = "rss_mb" if line.startswith("VmRSS") else "peak_rss_mb"
                    info[key] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return info


def prometheus(snapshot: dict) -> str:
    """The /stats snapshot in Prometheus text exposition format."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict, float | None]]) -> None:
        lines.append(f"# HELP ccaserve_{name} {help_text}")
        lines.append(f"# TYPE ccaserve_{name} {kind}")
        for labels, value in samples:
            if value is None:
                continue
            label = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"ccaserve_{name}{{{label}}} {value}" if label else f"ccaserve_{name} {value}")

    modes = snapshot["modes"]
    metric("requests_total", "counter", "Requests accepted, by mode.",
           [({"mode": m}, b["requests"]) for m, b in modes.items()])
    metric("images_total", "counter", "Images generated, by mode.",
           [({"mode": m}, b["images"]) for m, b in modes.items()])
    metric("tokens_total", "counter", "Image tokens generated, by mode.",
           [({"mode": m}, b["tokens"]) for m, b in modes.items()])
    metric("images_per_second", "gauge", "Images per second over the last minute.",
           [({"mode": m}, b["images_per_s_last_minute"]) for m, b in modes.items()])
    metric("tokens_per_second", "gauge", "Tokens per second over the last minute.",
           [({"mode": m}, b["tokens_per_s_last_minute"]) for m, b in modes.items()])
    for q in ("p50", "p95", "p99"):
        metric(f"latency_seconds_{q}", "gauge", f"Request latency {q} (recent images).",
               [({"mode": m}, b["latency_s"][q]) for m, b in modes.items()])
        metric(f"queue_wait_seconds_{q}", "gauge", f"Queue wait {q} (recent images).",
               [({"mode": m}, b["queue_wait_s"][q]) for m, b in modes.items()])
    metric("rows_x_steps_per_image", "gauge", "Cost: KV-cache rows x decoding steps per image.",
           [({"mode": m}, b["rows_x_steps_per_image"]) for m, b in modes.items()])
    metric("batch_rows_per_step", "gauge", "Mean rows per decoding step (batch occupancy), by model.",
           [({"model": k}, v["mean_rows_per_step"]) for k, v in snapshot["batch_occupancy"].items()])
    metric("errors_total", "counter", "Error responses, by status.",
           [({"status": k}, v) for k, v in snapshot["errors"].items()])
    metric("uptime_seconds", "gauge", "Seconds since the server started.", [({}, snapshot["uptime_s"])])
    sysinfo = snapshot["system"]
    metric("process_resident_memory_mb", "gauge", "Resident memory of the server process.",
           [({}, sysinfo.get("rss_mb"))])
    return "\n".join(lines) + "\n"
