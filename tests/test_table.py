"""The summary table (``fimhooks.show.table``): its columns and the legend of those shown."""

from cases import make_input, make_loss, make_model, make_target

import fimhooks


def summary(estimators, **options):
    loss_fn, out, _ = make_loss("categorical")
    model, x = make_model("tanh_mlp", out), make_input("tanh_mlp")
    monitor = fimhooks.FisherMonitor(model, loss_fn, estimators=estimators, **options)
    with monitor:
        output = model(x)
        loss_fn(output, make_target(loss_fn, output)).backward()
    monitor.remove()
    return monitor.estimates().summary()


def test_the_summary_legend_explains_only_the_columns_shown():
    alone, with_exact = summary(("I1",)), summary(("I1", "exact"))
    assert "label share" not in alone and "M:" not in alone
    assert "label share I1" in with_exact and "label share:" in with_exact
    for text in (alone, with_exact):
        assert "bias" not in text and "tight" not in text and "zero v2" not in text
    empirical = summary(("exact", "EF"))
    assert "bias EF" in empirical and "bias EF:" in empirical and "label share" not in empirical
    bounded = summary(("I1", "exact"), bounds=True)
    assert "tight I1" in bounded and "\ntight:" in bounded


def test_the_summary_lists_the_layers_in_model_order():
    rows = summary(("I1",)).splitlines()[3:]
    assert [row.split()[0] for row in rows[:2]] == ["0", "2"]
