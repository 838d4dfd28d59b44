"""bench.cls_pareto's judgement of rows: the test-accuracy front, and the planner's view of the
served rows (by time, then validation accuracy)."""

from __future__ import annotations

import torch

from bench.cls_pareto import CHOICE_SIZES, as_served, mark_front, nonzero_mflops, served_runner


def _row(name, ms, top1, val, served=True):
    return {"name": name, "ms_b32": ms, "top1": top1, "val": val, "served": served}


def test_front_and_planner_view():
    rows = [_row("a", 10, 70, 0.69), _row("b", 20, 80, 0.79), _row("c", 15, 75, 0.80),
            _row("d", 30, 79, 0.78), _row("e", 12, 90, 0.95, served=False)]
    mark_front(rows)
    front = {r["name"] for r in rows if r["front"]}
    assert front == {"a", "e"}  # the unserved e beats everything slower than it on test
    planner = {r["name"]: r["planner"] for r in rows if r["served"]}
    # fastest first: a kept; c (faster than b, better on val) kept; b and d no better on val than c
    assert planner == {"a": "kept", "c": "kept", "b": "dominated", "d": "dominated"}
    assert "planner" not in rows[-1]


def test_nonzero_flops_drop_each_zero_weight_once_per_output_position():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 8 * 8, 2, bias=False))
    with torch.no_grad():
        net[0].weight[0].zero_()  # 27 weights, each used at 8 x 8 positions
        net[2].weight[1, :10] = 0  # 10 weights, used once
    dense = (4 * 27 * 64 + 2 * 256) / 1e6
    assert abs(nonzero_mflops(net, dense, 8) - (dense - (27 * 64 + 10) / 1e6)) < 1e-12


def test_an_unserved_variant_is_timed_in_the_served_layout():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(5, 7, 1)).eval()
    x = torch.rand(4, 3, 9, 9)
    with torch.inference_mode():
        want = net(x)
        run = as_served(net)
        got = run(x)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in net.parameters() if p.dim() == 4)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want)


def test_an_unserved_variant_runs_on_the_engine_the_server_would_choose():
    """--engine auto: the variant is measured on torch and every installed engine and served by
    the fastest at batch 32; whichever it is, it computes the same logits."""
    from models.common import engines

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 13, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(13, 7, 1),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    x = torch.rand(max(CHOICE_SIZES), 3, 12, 12)
    with torch.inference_mode():
        want = net(x)
    run, engine = served_runner(net, "auto", x)
    assert engine in {"torch", *engines.installed()}
    with torch.inference_mode():
        torch.testing.assert_close(run(x), want, atol=1e-4, rtol=1e-4)
    run, engine = served_runner(net, "torch", x)
    assert engine == "torch"
