"""Gradio UI, mounted on the FastAPI app at /ui: the four modes side by side, and live /stats.

It calls the same engine as the HTTP API (in-process), so its images share the running batch
with API traffic, pass the same checks and appear in /stats. Each mode shows a small grid of
seeds (the rate of right images, not one lucky draw), its relative compute and its own time.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from samplers.images import image_grid  # noqa: E402
from samplers.modes import MODES, MODES_TABLE, InvalidRequest  # noqa: E402
from server.engine import Engine, QueueFull  # noqa: E402

log = logging.getLogger("ccaserve.ui")

SEEDS_PER_MODE = 4  # a 2 x 2 grid per mode
PANEL_PX = 256

_CSS = """
.mode-image img { image-rendering: pixelated; }
#stats-box { font-size: 12px; }
"""

EXPLAINER = (
    "**CFG** (classifier-free guidance) runs the model twice per token, once with the class and once "
    "without, and mixes the two: twice the compute. **CCA** (condition contrastive alignment) is a "
    "fine-tune of the same model that samples without guidance, one forward pass per token, and aims to "
    "look as good as CFG. `free` is the base model unguided; `cca+cfg` guides the CCA model."
)


class InputError(Exception):
    """A mistake in the UI's inputs: shown in the panels, logged in one line."""


def parse_class(text: str | int | float | None, engine: Engine) -> int:
    """A class from '207', '207: red shaded triangle', a name, or words of one ('green ring' takes the
    first match)."""
    if text is None or str(text).strip() == "":
        raise InputError("pick a class (an id or a name)")
    try:
        return engine.pipeline.find_classes(str(text))[0]
    except InvalidRequest as e:
        raise InputError(str(e)) from None


def render_modes(engine: Engine, class_text: Any, seed: Any, cfg_scale: Any, cca_cfg_scale: Any, temperature: Any,
                 top_k: Any) -> list[Any]:
    """Each mode in turn (so each mode's time is its own), a grid of seeds per mode; one panel per
    mode of the table, a mode the model lacks says so. ``cfg_scale`` guides cfg, ``cca_cfg_scale``
    cca+cfg: each mode has its own best scale."""
    pipe = engine.pipeline
    try:
        class_id = parse_class(class_text, engine)
        results = {}
        for mode in pipe.modes:
            try:  # the engine's own check, the one the HTTP API gets: a bad value fails this call alone
                first = int(seed)
                scale = cca_cfg_scale if mode == "cca+cfg" else cfg_scale
                opts = pipe.options_for(mode, cfg_scale=float(scale), temperature=float(temperature),
                                        top_k=int(top_k))
                start = time.perf_counter()
                reqs = engine.submit_many([(class_id, mode, first + i, opts) for i in range(SEEDS_PER_MODE)])
            except (ValueError, TypeError, OverflowError) as e:
                raise InputError(str(e)) from None
            except QueueFull as e:
                raise InputError(f"the server is busy, try again shortly ({e})") from None
            images = [r.future.result(timeout=engine.request_timeout_s) for r in reqs]
            results[mode] = (images, time.perf_counter() - start)
    except InputError as e:
        log.warning("UI input rejected: %s", e)
        return [f"### ⚠ {e}", *[gr.update(value=None, label=f"{m}: not generated") for m in MODES]]
    out: list[Any] = []
    for mode in MODES:
        if mode not in results:
            out.append(gr.update(value=None, label=f"{mode}: not offered by {pipe.name} (no CCA model)"))
            continue
        images, seconds = results[mode]
        grid = image_grid([r.image for r in images], 2)
        side = max(grid.width, PANEL_PX)
        shown = grid.resize((side, side * grid.height // grid.width), Image.NEAREST)
        opts = images[0].options
        scale = f" s={opts.cfg_scale:g}" if opts.guided else ""
        out.append(gr.update(value=shown, label=f"{mode}{scale} · {opts.rows}x compute · {seconds:.2f} s"))
    title = (f"### {class_id}: {pipe.class_name(class_id)} · {pipe.name} ({pipe.family.name}) · seeds "
             f"{int(seed)}–{int(seed) + SEEDS_PER_MODE - 1}, one grid per mode; times are each mode's own, for its "
             f"{SEEDS_PER_MODE} images")
    return [title, *out]


def stats_markdown(engine: Engine) -> str:
    snap = engine.stats.snapshot()
    rows = ["| mode | images | images/s (last min) | tokens/s (last min) | median latency s | p95 latency s "
            "| compute per image |", "|---|---|---|---|---|---|---|"]
    for mode, b in {**snap["modes"], "all": snap["overall"]}.items():
        lat = b["latency_s"]
        cost = f"{MODES_TABLE[mode].rows_per_image}x" if mode in MODES_TABLE else "-"
        rows.append(f"| {mode} | {b['images']} | {b['images_per_s_last_minute']:.3f} | "
                    f"{b['tokens_per_s_last_minute']:.1f} | {lat['p50'] if lat['p50'] is not None else '-'} | "
                    f"{lat['p95'] if lat['p95'] is not None else '-'} | {cost} |")
    busy = ", ".join(f"{n} of {engine.max_rows} for the {role} weights" for role, n in engine.rows_in_use().items())
    occ = ", ".join(f"{v['mean_rows_per_step']} for the {k} weights" for k, v in snap["batch_occupancy"].items())
    sysinfo = snap["system"]
    rows.append("")
    rows.append(f"Waiting requests: {engine.queue_length()} (at most {engine.max_queue}). Batch rows busy now: "
                f"{busy}. Average rows per step: {occ or 'none yet'}. Device {sysinfo['device']}, memory "
                f"{sysinfo.get('rss_mb', '?')} MB, up {snap['uptime_s']:.0f} s.")
    return "\n".join(rows)


def _class_choices(engine: Engine) -> tuple[list[str], str]:
    pipe = engine.pipeline
    names = pipe.class_names or [pipe.class_name(i) for i in range(pipe.num_classes)]
    choices = [f"{i}: {n}" for i, n in enumerate(names)]
    return choices, choices[207] if len(choices) > 207 else choices[0]


def _model_line(engine: Engine) -> str:
    pipe = engine.pipeline
    return (f"**{pipe.name}**: {pipe.family.name} family, {pipe.image_size} px, {pipe.tokens_per_image} tokens in "
            f"{pipe.steps_per_image} steps; guidance: {pipe.guidance}.")


def build_ui(engines: Engine | dict[str, Engine]) -> gr.Blocks:
    engines = engines if isinstance(engines, dict) else {engines.pipeline.name: engines}
    first = next(iter(engines.values()))
    choices, default_class = _class_choices(first)
    with gr.Blocks(title="ccaserve: CCA vs CFG") as demo:
        gr.Markdown(f"## ccaserve · CCA vs CFG side by side\n{EXPLAINER}")
        with gr.Row():
            model = gr.Dropdown(list(engines), value=first.pipeline.name, label="model", scale=2,
                                elem_id="model-picker")
            class_box = gr.Dropdown(choices, value=default_class, label="class (type an id, a name or words)",
                                    filterable=True, allow_custom_value=True, scale=3)
            seed = gr.Number(value=0, precision=0, minimum=0, label="first seed", scale=1)
            cfg = gr.Slider(1.0, 10.0, value=first.pipeline.default_cfg_scale, step=0.25, label="cfg scale", scale=2)
            cca_cfg = gr.Slider(1.0, 10.0, value=first.pipeline.default_cca_cfg_scale, step=0.25,
                                label="cca+cfg scale", scale=2)
            temp = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="temperature", scale=2)
            topk = gr.Number(value=0, precision=0, minimum=0, label="top-k (0 = off)", scale=1)
        model_info = gr.Markdown(_model_line(first), elem_id="model-info")
        button = gr.Button("Generate the four modes", variant="primary", elem_id="generate-button")
        title = gr.Markdown("### Pick a class and press Generate", elem_id="heading")
        with gr.Row():
            images = [gr.Image(label=m, type="pil", height=300, elem_classes=["mode-image"], interactive=False,
                               elem_id=f"image-{m.replace('+', '-')}") for m in MODES]
        with gr.Accordion("live statistics (/stats)", open=True):
            stats = gr.Markdown(stats_markdown(first), elem_id="stats-box")

        def pick(name: str) -> Engine:
            return engines.get(name) or first

        def on_model(name: str) -> list[Any]:
            engine = pick(name)
            new_choices, new_default = _class_choices(engine)
            return [gr.update(choices=new_choices, value=new_default),
                    gr.update(value=engine.pipeline.default_cfg_scale),
                    gr.update(value=engine.pipeline.default_cca_cfg_scale), _model_line(engine)]

        model.change(on_model, model, [class_box, cfg, cca_cfg, model_info], api_name=False)
        inputs = [class_box, seed, cfg, cca_cfg, temp, topk]
        button.click(lambda name, *a: render_modes(pick(name), *a), [model, *inputs], [title, *images],
                     concurrency_limit=8, api_name="generate")
        for box in inputs:  # the heading describes the images shown, not inputs not yet generated
            box.change(lambda: "### Inputs changed: press Generate", None, title, show_progress="hidden",
                       api_name=False)
        timer = gr.Timer(2.0)
        timer.tick(lambda name: stats_markdown(pick(name)), model, stats, show_progress="hidden", api_name=False)
    return demo


# Gradio's queue polls for work every 1 ms when idle on Linux (8% of a core on this machine with
# nobody connected); 50 ms, its own Windows setting, makes an idle server idle at no visible cost.
IDLE_POLL_S = 0.05


def mount_ui(app: Any, engines: Engine | dict[str, Engine], path: str = "/ui") -> Any:
    demo = build_ui(engines)
    queue = getattr(demo, "_queue", None)
    if queue is not None and hasattr(queue, "sleep_when_free"):
        queue.sleep_when_free = IDLE_POLL_S
        queue.progress_update_sleep_when_free = max(queue.progress_update_sleep_when_free, 2 * IDLE_POLL_S)
    return gr.mount_gradio_app(app, demo, path=path, css=_CSS)
