"""Live progress, JSON logs, plots, guidance and the `fimhooks` command (issue 4)."""

import io
import json
import math
import subprocess
import sys

import pytest
import torch
from cases import make_input, make_loss, make_model, make_target
from reference import per_input_reference

import fimhooks
from fimhooks.show.cli import main
from fimhooks.show.demo import CONSOLE_WIDTH, LOG_NAME, console_summary, run_demo
from fimhooks.show.jsonlog import VERSION, read_log
from fimhooks.show.progress import postfix

matplotlib_image = pytest.importorskip("matplotlib.image")


def train(monitor, model, loss_fn, x, steps):
    for _ in monitor.progress(range(steps), disable=True):
        output = model(x)
        loss = loss_fn(output, make_target(loss_fn, output))
        with monitor:
            loss.backward()


def test_guidance_matches_spec_section_4_decomposition():
    """Inputs needed = (L/M + D) / (target² ‖F‖²) with L, D from the brute force."""
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp", n=7)
    monitor = fimhooks.FisherMonitor(model, loss_fn, mc_samples=2)
    train(monitor, model, loss_fn, x, 1)
    monitor.remove()
    est, target = monitor.estimates(), 0.1
    stats = est.layer_statistics(target)
    per_input = per_input_reference(model, loss_fn, x)
    for layer, names in {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}.items():
        label = sum(per_input["v1"][n].mean(0).sum() for n in names).item()
        data = sum(per_input["exact"][n].var(0).sum() for n in names).item()
        for estimator, label_noise in [("I1", label), ("exact", 0.0)]:
            fisher = torch.cat([est.fisher(estimator)[n].flatten() for n in names])
            expected = (label_noise / 2 + data) / (target**2 * fisher.square().sum().item())
            got = stats[layer][estimator]["inputs_needed"]
            assert math.isclose(got, expected, rel_tol=1e-8), (layer, estimator)
            # at that many inputs the docs/math.md §4 variance gives exactly the target rse
            rse = math.sqrt((label_noise / 2 + data) / got) / fisher.norm().item()
            assert math.isclose(rse, target, rel_tol=1e-8)
        assert stats[layer]["I1"]["draws_suggested"] == max(1, math.ceil(label / data))


class FakeWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def test_json_log_has_one_documented_line_per_collected_step():
    loss_fn, out, _ = make_loss("bernoulli")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    monitor = fimhooks.FisherMonitor(model, loss_fn, every=2)
    buffer, writer = io.StringIO(), FakeWriter()
    log = monitor.log_to(buffer, writer)
    train(monitor, model, loss_fn, x, 5)
    log.close()
    train(monitor, model, loss_fn, x, 2)  # closed: nothing more is written
    records = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["backward"] for r in records] == [1, 3, 5]
    last = records[-1]
    assert last["version"] == VERSION and last["inputs"] == 3 * len(x)
    assert set(last) == {
        "version", "step", "backward", "inputs", "skipped", "time", "estimators",
        "granularity", "target_rse", "rse_bins", "layers",
    }  # fmt: skip
    assert last["granularity"] == "token"  # one observation per input
    assert list(last["layers"]) == ["0", "2"]
    layer = last["layers"]["0"]
    assert {"module", "params", "recommended", "zero_v2", "I1", "I2", "exact"} <= set(layer)
    assert layer["recommended_granularity"] == "token"  # input is the same, batch noisier
    assert layer["module"] == "Linear"
    assert set(layer["I1"]) == {
        "trace", "rse", "label_share", "data_share", "inputs_needed", "draws_suggested",
        "rse_histogram", "rse_by_granularity", "vectors_by_granularity", "rse_at_same_cost",
    }  # fmt: skip
    rse = layer["I1"]["rse_by_granularity"]
    assert rse["token"] == pytest.approx(rse["input"]) and rse["batch"] > rse["input"]
    assert layer["I1"]["vectors_by_granularity"] == {"token": 1, "input": 1, "batch": 1}
    assert len(layer["I1"]["rse_histogram"]) == len(last["rse_bins"]) - 1
    assert sum(layer["exact"]["rse_histogram"]) <= layer["params"]
    assert ("fimhooks/0/I1/trace", layer["I1"]["trace"], 3) in writer.scalars


def test_progress_postfix_names_traces_and_worst_layer():
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("sigmoid_mlp", out), make_input("sigmoid_mlp")
    monitor = fimhooks.FisherMonitor(model, loss_fn)
    seen = list(monitor.progress(range(3), disable=True))
    assert seen == [0, 1, 2]
    train(monitor, model, loss_fn, x, 1)
    values = postfix(monitor.live_estimates())
    assert set(values) == {"tr I1", "tr I2", "tr exact", "worst rse"}
    stats = monitor.estimates().layer_statistics()
    worst = max(stats, key=lambda layer: max(stats[layer][e]["rse"] for e in ("I1", "I2", "exact")))
    assert values["worst rse"].endswith(f" in layer {worst}")


def table_of(markdown: str) -> dict:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0]: dict(zip(header, row)) for row in rows}


def test_demo_end_to_end_report_matches_estimates(tmp_path):
    monitor = run_demo("breast_cancer", epochs=1, out=tmp_path, progress=False)
    for name in ["traces.png", "rse.png", "noise_shares.png", "rse_distribution.png"]:
        image = matplotlib_image.imread(tmp_path / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") == 4
    table = table_of((tmp_path / "report.md").read_text())
    stats = monitor.estimates().layer_statistics()
    assert list(table) == list(stats)
    for layer, row in table.items():
        for e in ("I1", "I2", "exact"):
            for key in ("trace", "rse"):
                assert math.isclose(float(row[f"{key} {e}"]), stats[layer][e][key], rel_tol=1e-5)
            assert int(row[f"inputs for 5% {e}"]) == math.ceil(stats[layer][e]["inputs_needed"])
        assert row["recommended"] == stats[layer]["recommended"]
    records = read_log(tmp_path / LOG_NAME)
    assert records[-1]["inputs"] == monitor.estimates().num_inputs
    for name in ["traces.png", "report.md"]:
        (tmp_path / name).unlink()
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "traces.png").exists() and (tmp_path / "report.md").exists()
    printed = console_summary(monitor.estimates())
    assert max(map(len, printed.splitlines())) <= CONSOLE_WIDTH  # fits a 1280-pixel window
    header, _, *rows = printed.splitlines()[1 : 3 + len(stats)]
    names = header.replace("tr ", "tr_").replace("rse ", "rse_").replace("label ", "label_").split()
    console = {row.split()[0]: dict(zip(names, row.split())) for row in rows}
    assert list(console) == list(stats)
    for layer, row in console.items():
        assert row["best"] == stats[layer]["recommended"]
        assert math.isclose(float(row["rse_I1"]), stats[layer]["I1"]["rse"], rel_tol=1e-2)


def test_demo_prints_the_table_that_fits_the_window(tmp_path, capsys):
    assert main(["demo", "--epochs", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    *table, _, report = capsys.readouterr().out.splitlines()  # then a blank line, the path
    assert "rse exact" in table[1] and "best" in table[1]
    assert max(map(len, table)) <= CONSOLE_WIDTH and report.startswith("Report: ")
    assert (tmp_path / "report.md").exists()


@pytest.mark.parametrize("value", ["abc", "0", "-3", "1.5"])
def test_cli_says_what_epochs_expects(value, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--epochs", value])
    err = capsys.readouterr().err
    assert f"--epochs: expected a positive integer, got '{value}'" in err


def test_cli_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ["(default: digits)", "(default: 20)", "(default: fimhooks-demo)"]:
        assert default in text


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--epochs", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "positive integer" in err
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fimhooks: error: cannot read log") and "\n" not in err
    (tmp_path / LOG_NAME).write_text('{"version": 1}\nnot json\n')
    assert main(["report", str(tmp_path)]) == 1
    assert f"{LOG_NAME}:1: not a fimhooks log record (version 1; missing" in capsys.readouterr().err


def test_a_log_cut_short_by_a_killed_run_keeps_its_intact_records(tmp_path, capsys):
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    monitor = fimhooks.FisherMonitor(model, loss_fn)
    log = monitor.log_to(tmp_path / LOG_NAME)
    train(monitor, model, loss_fn, x, 3)
    log.close()
    intact = (tmp_path / LOG_NAME).read_text()
    (tmp_path / LOG_NAME).write_text(intact + intact.splitlines()[-1][:40])  # killed mid-line
    with pytest.warns(RuntimeWarning, match=r":4: the last record is cut short .* the 3 records"):
        assert len(read_log(tmp_path / LOG_NAME)) == 3
    lines = intact.splitlines()
    (tmp_path / LOG_NAME).write_text("\n".join([lines[0], "not json", lines[1]]))
    with pytest.raises(ValueError, match=":2: not JSON"):
        read_log(tmp_path / LOG_NAME)


def test_python_dash_m_runs_the_command():
    done = subprocess.run(
        [sys.executable, "-m", "fimhooks", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "demo" in done.stdout and "report" in done.stdout
