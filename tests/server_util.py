"""A real uvicorn server on 127.0.0.1 (random port) around tiny random-weight models saved to disk."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch  # noqa: E402
import uvicorn  # noqa: E402

from samplers import Pipeline, build_vq, save_pretrained  # noqa: E402
from server.app import ModelServer, create_app  # noqa: E402
from server.engine import Engine  # noqa: E402
from server.http import uvicorn_config  # noqa: E402
from tests.conftest import TINY_VQ, random_gpt  # noqa: E402


def write_tiny_models(folder: Path, block_size: int = 16) -> dict[str, Path]:
    torch.manual_seed(0)
    paths = {"gpt": folder / "gpt", "cca": folder / "cca", "cca_cfg": folder / "cca_cfg", "vq": folder / "vq"}
    save_pretrained(random_gpt(0, block_size=block_size), paths["gpt"])
    save_pretrained(random_gpt(1, block_size=block_size), paths["cca"])
    save_pretrained(random_gpt(2, block_size=block_size), paths["cca_cfg"])  # the model cca+cfg guides
    save_pretrained(build_vq(TINY_VQ), paths["vq"])
    return paths


def load_pipeline(paths: dict[str, Path], name: str = "tiny") -> Pipeline:
    pipe = Pipeline.from_checkpoints(str(paths["gpt"]), str(paths["vq"]), str(paths["cca"]),
                                     cca_cfg_ckpt=str(paths["cca_cfg"]), class_names=[f"thing {i}" for i in range(10)],
                                     default_cfg_scale=3.0)
    pipe.name = name
    return pipe


class LiveServer:
    def __init__(self, app, header_timeout_s: float = 10.0):
        self.server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", 0, "warning", header_timeout_s))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(pipe: Pipeline, ui: bool = False, header_timeout_s: float = 10.0,
          **engine_kwargs) -> tuple[LiveServer, Engine]:
    engine = Engine(pipe, **engine_kwargs)
    app = create_app(ModelServer({pipe.name: engine}))
    if ui:
        from ui.app import mount_ui

        mount_ui(app, engine)
    return LiveServer(app, header_timeout_s), engine
