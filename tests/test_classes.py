"""Classes by name in the core, the CLI and the API: ids, whole names, words of names."""
import httpx
import pytest

from cli import main as cli_main
from samplers import Registry
from samplers.classes import imagenet_class_names, match_classes, resolve_class
from samplers.modes import InvalidRequest
from tests.server_util import load_pipeline, serve, write_tiny_models

SHAPES = Registry().get("shapes1k").class_names


def test_words_match_every_class_that_has_them():
    green_rings = match_classes("green ring", SHAPES)
    assert len(green_rings) == 10 and all("green" in SHAPES[i] and "ring" in SHAPES[i] for i in green_rings)
    assert match_classes("Blue  Plain RING", SHAPES) == [SHAPES.index("blue plain ring")]
    assert match_classes("purple unicorn", SHAPES) == []
    assert resolve_class("207: red shaded triangle", SHAPES, 1000) == 207
    with pytest.raises(InvalidRequest, match="10 classes match") as err:
        resolve_class("green ring", SHAPES, 1000)
    assert len(err.value.allowed) == 10


def test_imagenet_names_come_from_the_package():
    names = imagenet_class_names()
    assert len(names) == 1000 and names[207] == "golden retriever"
    assert resolve_class("golden retriever", names, 1000) == 207
    assert 0 in match_classes("tench", names)


def test_cli_takes_class_names(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert cli_main(["sample", "--class", "blue plain ring", "--modes", "free", "--out", str(out), "--quiet"]) == 0
    assert "blue plain ring" not in capsys.readouterr().err
    assert cli_main(["sample", "--class", "green ring", "--modes", "free", "--out", str(out), "--quiet"]) == 0
    assert cli_main(["sample", "--class", "purple unicorn", "--out", str(out), "--quiet"]) == 2
    assert "no class named" in capsys.readouterr().err
    assert cli_main(["models", "--classes", "green ring"]) == 0
    printed = capsys.readouterr().out
    assert "730: green plain ring" in printed and "739: green speckled ring" in printed


def test_api_takes_class_name(tmp_path):
    server, engine = serve(load_pipeline(write_tiny_models(tmp_path)), max_rows=8)
    with server:
        r = httpx.get(f"{server.url}/generate", params={"class_name": "thing 3", "mode": "free", "seed": 1})
        assert r.status_code == 200 and r.headers["x-class-name"] == "thing 3"
        r = httpx.post(f"{server.url}/generate", json={"class_name": "thing", "mode": "free"})
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == "class_name"
        assert "10 classes match" in r.json()["detail"][0]["message"]
        r = httpx.get(f"{server.url}/generate", params={"class_name": "thing 3", "class": 3})
        assert r.status_code == 422 and "not both" in r.text
        r = httpx.get(f"{server.url}/compare", params={"class_name": "thing 4", "format": "json"})
        assert r.status_code == 200 and {im["class_id"] for im in r.json()["images"]} == {4}
    engine.close()
