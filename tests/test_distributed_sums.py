"""The sync's pure functions in one process: ranks' packed buffers, summed, unpack to the sums
of all their inputs (dense sums, factors, derived sums of squares, a rank without inputs)."""

import pytest
import torch

from fimhooks.diagonal_terms import batch_sums, rank_one_batch_sums
from fimhooks.distributed import agree, describe, fits, pack, unpack

HEADER = 7  # any length; the header is summed like the rest


def _terms(n: int, width: int, seed: int, alias: bool) -> dict:
    generator = torch.Generator().manual_seed(seed)
    exact = torch.rand(n, width, generator=generator, dtype=torch.float64)
    terms = {"exact": exact, "I1": torch.rand(n, width, generator=generator, dtype=torch.float64)}
    terms["v1"] = torch.rand(n, width, generator=generator, dtype=torch.float64)
    terms["I2"] = exact if alias else torch.rand(n, width, generator=generator, dtype=torch.float64)
    return terms


def _inputs(n: int, seed: int, alias: bool, width_in: int):
    """One rank's per-input output terms of a Linear layer and its inputs."""
    inputs = torch.randn(n, width_in, generator=torch.Generator().manual_seed(seed + 1))
    return _terms(n, 6, seed, alias), inputs.double()


def _sums(out_terms: dict, inputs) -> dict:
    """Batch sums of a weight (rank-one products) and of a bias (dense)."""
    return {"weight": rank_one_batch_sums(out_terms, inputs), "bias": batch_sums(out_terms)}


def _together(parts: list, alias: bool) -> dict:
    """The dense batch sums of one process on all ranks' inputs."""
    terms = {k: torch.cat([t[k] for t, _ in parts]) for k in ("exact", "I1", "v1", "I2")}
    if alias:
        terms["I2"] = terms["exact"]
    sums = _sums(terms, torch.cat([x for _, x in parts]))
    return {name: batch.dense() for name, batch in sums.items()}


@pytest.mark.parametrize("alias", [False, True], ids=["curved", "piecewise_linear"])
@pytest.mark.parametrize("width_in", [2, 40], ids=["dense", "factors"])
def test_summed_buffers_unpack_to_the_sums_over_all_inputs(alias, width_in):
    sizes = [3, 0, 2]  # rank 1 saw no input
    parts = [_inputs(n, 10 * r, alias, width_in) for r, n in enumerate(sizes)]
    steps = [_sums(*part) if n else {} for part, n in zip(parts, sizes)]
    descriptions = [describe(s) for s in steps]
    layout = agree(descriptions, ["torch.float64"] * 3, ["weight", "bias"], len(sizes))
    assert all(fits(d, torch.float64, layout) for d in descriptions)
    derivations = list(layout.factors["weight"].values())  # sums of squares: derived
    assert derivations == ([None, derivations[-1]] if width_in == 40 else [])
    assert width_in == 2 or derivations[-1] is not None
    total = torch.zeros(layout.size(HEADER, len(sizes)), dtype=torch.float64)
    for rank, step in enumerate(steps):
        buffer = torch.full_like(total, float("nan"))  # every number is written
        pack(buffer, [1.0] * HEADER, step, layout, rank, len(sizes))
        total += buffer
    got = unpack(total, layout, HEADER, len(sizes))
    expected = _together(parts, alias)
    assert total[:HEADER].tolist() == [3.0] * HEADER
    for name, sums in expected.items():
        dense = got[name].dense()
        assert dense.keys() == sums.keys()
        for key, value in sums.items():
            torch.testing.assert_close(dense[key], value, rtol=1e-12, atol=0)


def test_a_rank_with_more_inputs_or_new_terms_does_not_fit():
    small = describe(_sums(*_inputs(2, 0, False, 40)))
    layout = agree([small, small], ["torch.float64"] * 2, ["weight", "bias"], 2)
    more = describe(_sums(*_inputs(3, 0, False, 40)))
    assert not fits(more, torch.float64, layout)  # more rows than the layout's
    assert not fits(small, torch.float64, agree([{}], ["torch.float32"], [], 2))  # new names
    assert fits({}, torch.float64, layout)  # a rank without inputs
