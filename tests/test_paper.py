"""The paper reproductions in examples/paper/ run at reduced size and write their outputs."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

SCRIPTS = Path(__file__).resolve().parent.parent / "examples" / "paper"


@pytest.fixture(autouse=True)
def _scripts_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))  # the scripts import their figures module


def _script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table(text):
    """The first Markdown table of ``text`` as a list of ``{column: cell}``."""
    lines = [line for line in text.split("\n\n")[0].splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in row.strip("|").split("|")))) for row in lines[2:]]


def test_toy_natural_gradient(tmp_path):
    _script("toy_natural_gradient").main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "toy_natural_gradient.png").stat().st_size > 0
    rows = _table((tmp_path / "toy_natural_gradient.md").read_text())
    assert [(r["problem"], r["estimator"]) for r in rows] == [
        ("linear regression", "Î₁"),
        ("linear regression", "Î₂"),
        ("logistic regression", "Î₁"),
        ("logistic regression", "Î₂"),
    ]
    # h is affine in θ: Î₂ has no label noise at all, Î₁ has some
    for row in rows:
        assert (row["Σ variance, epoch 1"] == "0 ± 0") == (row["estimator"] == "Î₂")


def test_digits_variance(tmp_path):
    _script("digits_variance").main(["--quick", "--out", str(tmp_path)])
    for name in ("sigmoid", "logsigmoid"):
        assert (tmp_path / f"digits_{name}.png").stat().st_size > 0
    rows = _table((tmp_path / "digits_variance.md").read_text())
    layers = {name: [r for r in rows if r["network"] == name] for name in ("sigmoid", "logsigmoid")}
    assert [len(v) for v in layers.values()] == [4, 5]
    for network_rows in layers.values():  # v₂ = 0 on the last layer only
        assert [r["std Î₂"] == "0" for r in network_rows] == [False] * (len(network_rows) - 1) + [
            True
        ]
