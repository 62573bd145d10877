"""Gradio UI, mounted on the FastAPI app at /ui: the four modes side by side, and live /stats.

It calls the same engine as the HTTP API (in-process), so its images share the running batch
with API traffic and appear in /stats.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from server.engine import Engine, QueueFull  # noqa: E402

_CSS = """
.mode-image img { image-rendering: pixelated; }
#stats-box { font-size: 12px; }
"""


def parse_class(text: str | int | float | None, engine: Engine) -> int:
    """A class from '207', '207: red shaded triangle' or a name such as 'red shaded triangle'."""
    pipe = engine.pipeline
    if text is None or str(text).strip() == "":
        raise gr.Error("pick a class (an id or a name)")
    s = str(text).strip()
    head = s.split(":", 1)[0].strip()
    if head.lstrip("-").isdigit():
        class_id = int(head)
    else:
        names = [n.lower() for n in (pipe.class_names or [])]
        key = s.lower()
        matches = [i for i, n in enumerate(names) if n == key] or [i for i, n in enumerate(names) if key in n]
        if not matches:
            raise gr.Error(f"no class named {s!r}")
        class_id = matches[0]
    return class_id  # its range is checked by the engine on submit, as for every caller


def render_modes(engine: Engine, class_text: Any, seed: float, cfg_scale: float, temperature: float,
                 top_k: float) -> list[Any]:
    """Submit every mode at once (they batch together), wait, and caption each with its cost."""
    pipe = engine.pipeline
    class_id = parse_class(class_text, engine)
    try:  # the engine's own check, the one the HTTP API gets: a bad value is this call's error alone
        seed = int(seed)
        requests = engine.submit_many([
            (class_id, mode, seed, pipe.options_for(mode, cfg_scale=float(cfg_scale), temperature=float(temperature),
                                                    top_k=int(top_k)))
            for mode in pipe.modes])
    except (ValueError, TypeError, OverflowError) as e:
        raise gr.Error(str(e)) from None
    except QueueFull as e:
        raise gr.Error(f"the server is busy: {e}") from None
    out: list[Any] = []
    for req in requests:
        r = req.future.result(timeout=engine.request_timeout_s)
        shown = r.image.resize((256, 256), Image.NEAREST) if r.image.width < 256 else r.image
        scale = "" if r.options.cfg_scale == 1 else f" · s={r.options.cfg_scale:g}"
        label = f"{r.mode} · {r.latency_s:.2f} s · {r.rows_x_steps} rows×steps{scale}"
        out.append(gr.update(value=shown, label=label))
    title = f"### {class_id}: {pipe.class_name(class_id)} — seed {seed}"
    return [title, *out]


def stats_markdown(engine: Engine) -> str:
    snap = engine.stats.snapshot()
    rows = ["| mode | images | img/s (1 min) | tok/s (1 min) | p50 s | p95 s | rows×steps / img |",
            "|---|---|---|---|---|---|---|"]
    for mode, b in {**snap["modes"], "all": snap["overall"]}.items():
        lat = b["latency_s"]
        rows.append(f"| {mode} | {b['images']} | {b['images_per_s_last_minute']:.3f} | "
                    f"{b['tokens_per_s_last_minute']:.1f} | {lat['p50'] if lat['p50'] is not None else '-'} | "
                    f"{lat['p95'] if lat['p95'] is not None else '-'} | {b['rows_x_steps_per_image'] or '-'} |")
    occ = ", ".join(f"{k}: {v['mean_rows_per_step']} rows/step" for k, v in snap["batch_occupancy"].items())
    sysinfo = snap["system"]
    rows.append("")
    rows.append(f"queue {engine.queue_length()}/{engine.max_queue} · rows in use {engine.rows_in_use()} · "
                f"occupancy {occ or '-'} · {sysinfo['device']}, rss {sysinfo.get('rss_mb', '?')} MB · "
                f"uptime {snap['uptime_s']:.0f} s")
    return "\n".join(rows)


def build_ui(engine: Engine) -> gr.Blocks:
    pipe = engine.pipeline
    names = pipe.class_names or [pipe.class_name(i) for i in range(pipe.num_classes)]
    choices = [f"{i}: {n}" for i, n in enumerate(names)]
    default_class = choices[207] if len(choices) > 207 else choices[0]
    with gr.Blocks(title="ccaserve: CCA vs CFG") as demo:
        gr.Markdown(f"## ccaserve · {pipe.name} · {pipe.image_size}px · CCA vs CFG side by side\n"
                    "`free` and `cca` cost one row per step, `cfg` and `cca+cfg` two (cond + uncond).")
        with gr.Row():
            class_box = gr.Dropdown(choices, value=default_class, label="class (type an id or a name)",
                                    filterable=True, allow_custom_value=True, scale=3)
            seed = gr.Number(value=0, precision=0, minimum=0, label="seed", scale=1)
            cfg = gr.Slider(1.0, 10.0, value=pipe.default_cfg_scale, step=0.25, label="CFG scale", scale=2)
            temp = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="temperature", scale=2)
            topk = gr.Number(value=0, precision=0, minimum=0, label="top-k (0 = off)", scale=1)
        button = gr.Button("Generate the four modes", variant="primary", elem_id="generate-button")
        title = gr.Markdown()
        with gr.Row():
            images = [gr.Image(label=m, type="pil", height=260, elem_classes=["mode-image"], interactive=False,
                               elem_id=f"image-{m.replace('+', '-')}") for m in pipe.modes]
        with gr.Accordion("live /stats", open=True):
            stats = gr.Markdown(stats_markdown(engine), elem_id="stats-box")
        button.click(lambda *a: render_modes(engine, *a), [class_box, seed, cfg, temp, topk], [title, *images],
                     concurrency_limit=8, api_name="generate")
        timer = gr.Timer(2.0)
        timer.tick(lambda: stats_markdown(engine), None, stats, show_progress="hidden")
    return demo


def mount_ui(app: Any, engine: Engine, path: str = "/ui") -> Any:
    return gr.mount_gradio_app(app, build_ui(engine), path=path, css=_CSS)
