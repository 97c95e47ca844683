"""The sync's pure functions in one process: ranks' packed buffers, gathered or summed, unpack
to the sums of all their inputs (dense sums, factors, a rank without inputs)."""

import dataclasses

import pytest
import torch

from fimhooks.distributed import Buffers, agree, describe, fits, pack, unpack
from fimhooks.fisher.diagonal_terms import batch_sums, rank_one_batch_sums

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


def _collective(sent: list, layout, rank: int) -> Buffers:
    """The buffers of ``rank`` after the collective of every rank's ``sent`` ``[size]``."""
    buffers = Buffers(layout, rank, torch.device("cpu"))
    if layout.gather:
        buffers.sent[0] = sent[rank]
        buffers.received.copy_(torch.stack(sent[:rank] + sent[rank + 1 :]))
        buffers.add_dense()
    else:
        buffers.received.copy_(sum(sent))
    return buffers


@pytest.mark.parametrize("gather", [False, True], ids=["summed", "gathered"])
@pytest.mark.parametrize("alias", [False, True], ids=["curved", "piecewise_linear"])
@pytest.mark.parametrize("width_in", [2, 40], ids=["dense", "factors"])
def test_collected_buffers_unpack_to_the_sums_over_all_inputs(alias, width_in, gather):
    sizes = [3, 0, 2]  # rank 1 saw no input
    parts = [_inputs(n, 10 * r, alias, width_in) for r, n in enumerate(sizes)]
    steps = [_sums(*part) if n else {} for part, n in zip(parts, sizes)]
    descriptions = [describe(s) for s in steps]
    layout = agree(descriptions, ["torch.float64"] * 3, ["weight", "bias"], len(sizes), HEADER)
    layout = dataclasses.replace(layout, gather=gather)
    assert all(fits(d, torch.float64, layout) for d in descriptions)
    assert len(layout.factors["weight"]) == (width_in == 40)
    sent = []
    for rank, step in enumerate(steps):
        buffer = torch.full((layout.size,), float("nan"), dtype=torch.float64)
        pack(layout.places(buffer), [1.0] * HEADER, step, layout, 0 if gather else rank)
        sent.append(buffer)  # every number is written
    expected, first_rank = _together(parts, alias), {}
    for rank in range(len(sizes)):
        buffers = _collective(sent, layout, rank)
        got = unpack(buffers.summed, buffers.factors, layout)
        assert buffers.summed.head[:HEADER].tolist() == [3.0] * HEADER
        for name, sums in expected.items():
            got_dense = got[name].dense()
            assert got_dense.keys() == sums.keys()
            for key, value in sums.items():
                torch.testing.assert_close(got_dense[key], value, rtol=1e-12, atol=0)
                same = first_rank.setdefault((name, key), got_dense[key])
                assert torch.equal(same, got_dense[key])  # the same bits on every rank


def test_the_collective_moving_fewer_numbers_is_chosen():
    """Two ranks of factors: gathered (half); many ranks of dense sums: reduced."""
    wide = describe(_sums(*_inputs(2, 0, False, 40)))
    assert agree([wide] * 2, ["torch.float64"] * 2, ["weight", "bias"], 2, HEADER).gather
    narrow = describe(_sums(*_inputs(2, 0, False, 2)))
    assert not agree([narrow] * 8, ["torch.float64"] * 8, ["weight", "bias"], 8, HEADER).gather


def test_a_rank_with_more_inputs_or_new_terms_does_not_fit():
    small = describe(_sums(*_inputs(2, 0, False, 40)))
    layout = agree([small, small], ["torch.float64"] * 2, ["weight", "bias"], 2, HEADER)
    more = describe(_sums(*_inputs(3, 0, False, 40)))
    assert not fits(more, torch.float64, layout)  # more rows than the layout's
    assert not fits(small, torch.float64, agree([()], ["torch.float32"], [], 2, HEADER))
    assert fits((), torch.float64, layout)  # a rank without inputs
