from __future__ import annotations

from pathlib import Path

import pytest

from controller.catalog import CatalogError, EngineKind, load_catalog


def test_load_catalog(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[[models]]\nname = "a"\nmodel_path = "/w"\nengine_args = ["--x", "1"]\n'
        '[[models]]\nname = "b"\nengine = "openai"\n'
        'upstream_url = "http://h/v1"\nmin_replicas = 1\n'
    )
    catalog = load_catalog(path)
    assert catalog.names == ["a", "b"]
    a, b = catalog.models
    assert a.engine is EngineKind.VLLM and a.engine_args == ("--x", "1")
    assert b.engine is EngineKind.OPENAI and b.min_replicas == 1


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ('[[models]]\nname = "a"\n', "needs model_path"),
        ('[[models]]\nname = "a"\nengine = "openai"\n', "needs upstream_url"),
        (
            '[[models]]\nname = "a"\nmodel_path = "/w"\nmin_replicas = 3\nmax_replicas = 1\n',
            "min_replicas",
        ),
        (
            '[[models]]\nname = "a"\nmodel_path = "/w"\n'
            '[[models]]\nname = "a"\nmodel_path = "/w"\n',
            "duplicate",
        ),
        ('[[models]]\nname = "a"\nmodel_path = "/w"\ncolour = "red"\n', "colour"),
        ("[[models]\n", "not valid TOML"),
    ],
)
def test_bad_catalogs_name_the_problem(tmp_path: Path, text: str, complaint: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(CatalogError, match=complaint):
        load_catalog(path)


def test_missing_catalog(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog(tmp_path / "none.toml")
