"""The paper reproductions in examples/paper/ run at reduced size and write their outputs."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

SCRIPTS = Path(__file__).resolve().parent.parent / "examples" / "paper"


def _script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_toy_natural_gradient(tmp_path):
    _script("toy_natural_gradient").main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "toy_natural_gradient.png").stat().st_size > 0
    table = (tmp_path / "toy_natural_gradient.md").read_text()
    rows = [
        line for line in table.splitlines() if line.startswith("| linear") or "logistic" in line
    ]
    assert len(rows) == 4
    # h is affine in θ: Î₂ has no label noise, Î₁ has some
    for row in rows:
        variance_first_epoch = row.split("|")[5].strip()
        assert (variance_first_epoch == "0 ± 0") == ("Î₂" in row)


def test_digits_variance(tmp_path):
    _script("digits_variance").main(["--quick", "--out", str(tmp_path)])
    for name in ("sigmoid", "logsigmoid"):
        assert (tmp_path / f"digits_{name}.png").stat().st_size > 0
    table = (tmp_path / "digits_variance.md").read_text()
    assert table.count("| sigmoid |") == 4 and table.count("| logsigmoid |") == 5
