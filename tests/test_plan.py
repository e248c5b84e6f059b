"""The plan: default ranges, rank arithmetic, serialisation and rejected inputs (no model needed)."""

import re

import pytest

from cqil.errors import CqilError
from cqil.plan import Plan

P2 = Plan(32, 2, 12, 30)  # LLaMA-7B, the authors' S12 E30 P2
P4 = Plan(32, 4, 14, 30, bypass=3)  # S14 E30 P4, widest bypass


@pytest.mark.parametrize("num_layers, p, start, end, groups, depth", [
    (32, 2, 12, 30, 9, 23),   # the authors' LLaMA-7B settings
    (32, 4, 14, 30, 4, 20),
    (32, 1, 12, 30, 0, 32),   # p=1: the original model, no groups
    (80, 4, 30, 78, 12, 44),  # LLaMA-2-70B
    (80, 2, 30, 78, 24, 56),
    (40, 2, 16, 38, 11, 29),  # LLaMA-13B: 3L/8 = 15, moved up to an even range
    (6, 2, 4, 4, 0, 6),       # 3L/8 rounds up to end-1, so the range shrinks to empty
    (6, 4, 4, 4, 0, 6),
    (1, 2, 0, 0, 0, 1),
])
def test_default_range(num_layers, p, start, end, groups, depth):
    plan = Plan.default(num_layers, p)
    assert (plan.start, plan.end, len(plan.groups), plan.depth) == (start, end, groups, depth)
    assert plan.p == p and plan.bypass == 0 and plan.semantics == "once"


def test_default_passes_options_through():
    plan = Plan.default(32, 2, bypass=1, semantics="reference", replicate_outer=True)
    assert (plan.bypass, plan.semantics, plan.replicate_outer) == (1, "reference", True)


def test_groups():
    assert P2.groups == tuple((l, l + 1) for l in range(12, 30, 2))
    assert P4.groups == ((14, 15, 16, 17), (18, 19, 20, 21), (22, 23, 24, 25), (26, 27, 28, 29))
    assert Plan(32, 1, 0, 32).groups == ()
    assert Plan(32, 2, 10, 10).groups == ()


@pytest.mark.parametrize("plan, layer, rank, group", [
    (P2, 12, 0, 0), (P2, 13, 1, 0), (P2, 14, 0, 1), (P2, 29, 1, 8),
    (P2, 0, None, None), (P2, 11, None, None), (P2, 30, None, None), (P2, 31, None, None),
    (P4, 14, 0, 0), (P4, 17, 3, 0), (P4, 18, 0, 1), (P4, 27, 1, 3), (P4, 13, None, None),
    (Plan(32, 1, 12, 30), 15, None, None),   # p=1: every layer is an outer layer
    (Plan(32, 2, 12, 12), 12, None, None),   # empty range
])
def test_rank_and_group_of(plan, layer, rank, group):
    assert plan.rank_of(layer) == rank
    assert plan.group_of(layer) == group
    assert plan.in_range(layer) == (rank is not None)


@pytest.mark.parametrize("layer", [-1, 32, 100])
def test_layer_outside_model_rejected(layer):
    for query in (P2.rank_of, P2.group_of):
        with pytest.raises(CqilError, match=rf"layer {layer} is outside 0\.\.31"):
            query(layer)


@pytest.mark.parametrize("plan, rank, layers", [
    (P2, 0, (*range(12), *range(12, 30, 2), 30, 31)),
    (P2, 1, tuple(range(13, 30, 2))),
    (Plan(32, 2, 12, 30, replicate_outer=True), 1, (*range(12), *range(13, 30, 2), 30, 31)),
    (P4, 3, (17, 21, 25, 29)),
    (Plan(8, 1, 0, 0), 0, tuple(range(8))),
])
def test_layers_of(plan, rank, layers):
    assert plan.layers_of(rank) == layers


def test_layers_of_covers_every_layer_once():
    for plan in (P2, P4, Plan(80, 4, 30, 78)):
        owned = [l for r in range(plan.p) for l in plan.layers_of(r)]
        assert sorted(owned) == list(range(plan.num_layers))


@pytest.mark.parametrize("rank", [-1, 2])
def test_layers_of_bad_rank(rank):
    with pytest.raises(CqilError, match=rf"rank {rank} is outside 0\.\.1"):
        P2.layers_of(rank)


@pytest.mark.parametrize("p, d, expected", [
    (2, 0, [(), ()]),
    (2, 1, [(), (0,)]),
    (4, 1, [(), (0,), (1,), (2,)]),
    (4, 2, [(), (0,), (1, 0), (2, 1)]),
    (4, 3, [(), (0,), (1, 0), (2, 1, 0)]),
    (3, 2, [(), (0,), (1, 0)]),
])
def test_bypass_sources(p, d, expected):
    plan = Plan(32, p, 8, 8 + 4 * p, bypass=d)
    assert [plan.bypass_sources(i) for i in range(p)] == expected


@pytest.mark.parametrize("plan, expected", [
    (P2, ["broadcast"] + [f"all_reduce[{k}]" for k in range(9)]),
    (Plan(32, 2, 12, 30, bypass=1), ["broadcast"] + [c for k in range(9)
                                                     for c in (f"all_gather[{k}]", f"all_reduce[{k}]")]),
    (Plan(32, 2, 12, 30, replicate_outer=True), [f"all_reduce[{k}]" for k in range(9)]),
    (Plan(32, 1, 0, 0), []),
    (Plan(32, 4, 14, 14), []),
])
def test_collectives(plan, expected):
    assert plan.collectives() == expected


@pytest.mark.parametrize("plan", [
    P2, P4, Plan(32, 1, 0, 0), Plan(32, 2, 0, 32, bypass=1, semantics="reference", replicate_outer=True),
])
def test_dict_round_trip(plan):
    d = plan.to_dict()
    assert d == {"num_layers": plan.num_layers, "p": plan.p, "start": plan.start, "end": plan.end,
                 "bypass": plan.bypass, "semantics": plan.semantics,
                 "replicate_outer": plan.replicate_outer}
    back = Plan.from_dict(d)
    assert back == plan and back.groups == plan.groups


@pytest.mark.parametrize("d, message", [
    ({"num_layers": 32, "p": 2, "start": 12, "end": 30, "groups": []}, r"unknown keys \['groups'\]"),
    ({"num_layers": 32, "p": 2, "start": 12}, r"missing keys \['end'\]"),
])
def test_from_dict_rejects(d, message):
    with pytest.raises(CqilError, match=message):
        Plan.from_dict(d)


def test_plans_are_immutable_values():
    assert Plan(32, 2, 12, 30) == P2 and hash(Plan(32, 2, 12, 30)) == hash(P2)
    assert Plan(32, 2, 12, 30, bypass=1) != P2
    with pytest.raises(AttributeError):
        P2.p = 4


@pytest.mark.parametrize("plan, text", [
    (P2, "Plan(L=32, p=2, S12 E30, d=0, 9 groups, depth 32->23)"),
    (P4, "Plan(L=32, p=4, S14 E30, d=3/once, 4 groups, depth 32->20)"),
    (Plan(32, 2, 12, 30, bypass=1, semantics="reference", replicate_outer=True),
     "Plan(L=32, p=2, S12 E30, d=1/reference, 9 groups, depth 32->23, outer replicated)"),
    (Plan(32, 1, 0, 0), "Plan(L=32, p=1, no CQIL groups, depth 32)"),
])
def test_str(plan, text):
    assert str(plan) == text


def test_prefix_and_suffix():
    assert (P2.prefix, P2.suffix) == (tuple(range(12)), (30, 31))
    assert (Plan(8, 1, 0, 0).prefix, Plan(8, 1, 0, 0).suffix) == (tuple(range(8)), ())


# Every rejected input names the offending numbers.
@pytest.mark.parametrize("kwargs, fragments", [
    (dict(num_layers=32, p=2, start=12, end=34), ["start=12", "end=34", "num_layers=32"]),
    (dict(num_layers=32, p=2, start=-2, end=30), ["start=-2", "end=30", "num_layers=32"]),
    (dict(num_layers=32, p=2, start=20, end=10), ["start=20", "end=10"]),
    (dict(num_layers=32, p=2, start=13, end=30), ["end - start = 17", "p=2", "--start 14 --end 30",
                                                  "--start 13 --end 29"]),
    (dict(num_layers=32, p=4, start=12, end=30), ["end - start = 18", "p=4"]),
    (dict(num_layers=32, p=2, start=12, end=30, bypass=2), ["d=2", "p=2"]),
    (dict(num_layers=32, p=4, start=14, end=30, bypass=4), ["d=4", "p=4"]),
    (dict(num_layers=32, p=2, start=12, end=30, bypass=-1), ["d=-1"]),
    (dict(num_layers=32, p=0, start=12, end=30), ["p=0"]),
    (dict(num_layers=32, p=-2, start=12, end=30), ["p=-2"]),
    (dict(num_layers=0, p=1, start=0, end=0), ["num_layers=0"]),
    (dict(num_layers=32, p=2, start=12, end=30, semantics="both"), ["'both'", "once", "reference"]),
    (dict(num_layers=32, p=2.0, start=12, end=30), ["p must be an integer", "2.0"]),
    (dict(num_layers=32, p=2, start="12", end=30), ["start must be an integer", "'12'"]),
    (dict(num_layers=32.0, p=2, start=12, end=30), ["num_layers must be an integer", "32.0"]),
    (dict(num_layers=32, p=2, start=12, end=30, bypass=True), ["bypass must be an integer", "True"]),
])
def test_rejected(kwargs, fragments):
    with pytest.raises(CqilError) as info:
        Plan(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("num_layers, p, fragment", [
    (32, 0, "p=0"), (32, -1, "p=-1"), (32, 2.0, "p=2.0"), (32, "2", "p='2'"),
    (0, 2, "num_layers"), ("32", 2, "num_layers"),
])
def test_default_rejected(num_layers, p, fragment):
    with pytest.raises(CqilError, match=re.escape(fragment)):
        Plan.default(num_layers, p)


# -- the authors' HF config keys ----------------------------------------------------------------

@pytest.mark.parametrize("cqil_layers, d, expected", [
    ([[l, l + 1] for l in range(12, 30, 2)], 0, Plan(32, 2, 12, 30)),
    ([[l, l + 1] for l in range(12, 30, 2)], 1, Plan(32, 2, 12, 30, bypass=1)),
    ([list(range(l, l + 4)) for l in range(14, 30, 4)], 0, Plan(32, 4, 14, 30)),
    ([[17, 18, 19]], 2, Plan(32, 3, 17, 20, bypass=2)),
    ([], 0, Plan(32, 1, 0, 0)),
])
def test_from_authors_config(cqil_layers, d, expected):
    plan = Plan.from_authors_config(32, cqil_layers, d)
    assert plan == expected and plan.groups == expected.groups


def test_from_authors_config_options():
    plan = Plan.from_authors_config(32, [[12, 13]], 1, semantics="reference", replicate_outer=True)
    assert (plan.semantics, plan.replicate_outer) == ("reference", True)


@pytest.mark.parametrize("cqil_layers, d, fragments", [
    ([[12, 13], [15, 16]], 0, ["[[12, 13], [15, 16]]", "expected [[12, 13], [14, 15]]"]),  # a gap
    ([[12, 13], [14, 15, 16]], 0, ["[14, 15, 16]", "expected"]),                          # sizes differ
    ([[13, 12]], 0, ["[[13, 12]]", "expected [[13, 14]]"]),                               # out of order
    ([12, 13], 0, ["cqil_layers", "list of lists"]),                                      # flat list
    ([["a", "b"]], 0, ["cqil_layers", "list of lists"]),
    ([[30, 31], [32, 33]], 0, ["end=34", "num_layers=32"]),                               # beyond the model
    ([[12, 13]], 2, ["d=2", "p=2"]),
    ([[]], 0, ["cqil_layers"]),                                                           # an empty group
    ([[12, 13]], "x", ["'x'"]),                                                           # d not a number
    ([[12, 13]], None, ["None"]),
])
def test_from_authors_config_rejected(cqil_layers, d, fragments):
    with pytest.raises(CqilError) as info:
        Plan.from_authors_config(32, cqil_layers, d)
    for fragment in fragments:
        assert fragment in str(info.value)
