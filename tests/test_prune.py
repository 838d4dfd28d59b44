"""CLR-RNF filter pruning (compress.prune): cross-layer widths and the k-reciprocal choice of
filters, checked against the method's own loop written out literally."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compress import prune


def _literal_rnf_bounds(w: torch.Tensor, m: int) -> tuple[set[int], set[int]]:
    """The method's loop, as written: S = row-normalised exp(-D), N_k(i) the k largest of
    row i, I_k the intersection over i, k from m up until |I_k| >= m. Returns (I_{k-1}, I_k):
    RNF keeps all of the first and fills from the second."""
    flat = w.flatten(1).double()
    d = torch.cdist(flat, flat).pow(2)
    s = torch.exp(-d)
    s = s / s.norm(dim=1, keepdim=True)
    n = len(w)

    def nearest(i: int, k: int) -> set[int]:  # row i's k largest, itself first
        return set(sorted(range(n), key=lambda j: (j != i, -float(s[i, j]), j))[:k])

    def intersection(k: int) -> set[int]:
        return set.intersection(*(nearest(i, k) for i in range(n)))

    k = m
    while len(intersection(k)) < m:
        k += 1
    return intersection(k - 1), intersection(k)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 14), frac=st.floats(0.1, 1.0))
def test_rnf_keeps_what_the_literal_loop_keeps(seed: int, n: int, frac: float) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, 3, 2, 2, generator=g) * 0.5
    m = max(1, round(frac * n))
    kept = set(prune.rnf_select(w, m, torch.Generator().manual_seed(1)).tolist())
    sure, allowed = _literal_rnf_bounds(w, m)
    assert len(kept) == m and sure <= kept <= allowed


def test_rnf_keeps_typical_filters_and_drops_outliers_where_l1_keeps_them():
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(1, 16, generator=g)
    typical = centre + 0.05 * torch.randn(12, 16, generator=g)
    outliers = 4.0 * torch.randn(4, 16, generator=g)
    w = torch.cat([typical, outliers]).view(16, 4, 2, 2)
    rnf = set(prune.rnf_select(w, 8).tolist())
    l1 = set(prune.l1_select(w, 8).tolist())
    assert rnf <= set(range(12))
    assert {12, 13, 14, 15} <= l1


def test_clr_prunes_costly_layers_more_and_keeps_all_at_zero():
    torch.manual_seed(0)
    w = torch.randn(32, 16, 3, 3)
    assert prune.clr_keep_counts([w, w.clone()], [1.0, 1.0], 1.0, 0.0) == [32, 32]
    cheap, costly = prune.clr_keep_counts([w, w.clone()], [1.0, 4.0], 1.0, 0.5)
    assert costly < cheap
    assert prune.clr_keep_counts([w, w.clone()], [1.0, 4.0], 0.0, 0.5) == [16, 16]  # lam 0: plain magnitude
    with pytest.raises(ValueError):
        prune.clr_keep_counts([w], [1.0, 2.0], 1.0, 0.5)


def test_clr_for_flops_is_the_widest_network_within_the_target():
    torch.manual_seed(1)
    weights = [torch.randn(c, 8, 3, 3) for c in (16, 32, 64)]
    costs = [1.0, 2.0, 4.0]

    def flops(widths: list[int]) -> float:
        return float(sum(c * w for c, w in zip(costs, widths)))

    target = 0.5 * flops([16, 32, 64])
    widths, ratio = prune.clr_for_flops(weights, costs, 1.0, flops, target)
    assert flops(widths) <= target
    assert flops(prune.clr_keep_counts(weights, costs, 1.0, max(0.0, ratio - 0.01))) > target
    assert prune.clr_for_flops(weights, costs, 1.0, flops, 1e9) == ([16, 32, 64], 0.0)


def test_aligned_widths_are_multiples_within_the_layer_and_still_fit_the_target():
    assert prune.aligned([3, 12, 13, 60, 64, 5], [16, 32, 64, 62, 64, 6], 8) == [8, 16, 16, 56, 64, 6]
    assert prune.aligned([5, 7], [10, 10], 1) == [5, 7]
    with pytest.raises(ValueError):
        prune.aligned([5], [10], 0)
    torch.manual_seed(2)
    weights = [torch.randn(c, 8, 3, 3) for c in (16, 40, 96)]
    costs = [1.0, 2.0, 4.0]

    def flops(widths: list[int]) -> float:
        return float(sum(c * w for c, w in zip(costs, widths)))

    for share in (0.3, 0.5, 0.8):
        target = share * flops([16, 40, 96])
        widths, ratio = prune.clr_for_flops(weights, costs, 1.0, flops, target, align=8)
        assert flops(widths) <= target and all(w % 8 == 0 for w in widths)
        # a little less pruning and the rounded network no longer fits: the widest that does
        wider = prune.aligned(prune.clr_keep_counts(weights, costs, 1.0, max(0.0, ratio - 0.01)), [16, 40, 96], 8)
        assert wider == widths or flops(wider) > target


def test_every_selector_returns_sorted_distinct_indices_and_refuses_bad_counts():
    w = torch.randn(10, 4, 3, 3)
    for name, select in prune.SELECTORS.items():
        idx = select(w, 4, torch.Generator().manual_seed(0))
        assert idx.tolist() == sorted(set(idx.tolist())) and len(idx) == 4 and idx.max() < 10, name
        with pytest.raises(ValueError):
            select(w, 11, None)
        with pytest.raises(ValueError):
            select(w, 0, None)


def _mbv1_subnet(seed: int = 0):
    from models.pssnet.calibrate import recalibrate_bn
    from models.pssnet.nets import PssSupernet, demo_spec, extract_subnet

    torch.manual_seed(seed)
    spec = demo_spec("mobilenet_v1", 7)
    dense = extract_subnet(PssSupernet(spec), spec.max_cfg())
    recalibrate_bn(dense, [torch.randn(8, 3, 32, 32) for _ in range(2)])  # BN statistics of its own
    return dense.eval()


def test_cutting_with_every_filter_in_any_order_changes_nothing():
    """Channel surgery moves every tensor that follows a filter (its BN entries, the next
    depth-wise filter and BN, the next point-wise inputs, the classifier's inputs): keeping
    all filters in a shuffled order must compute the same function."""
    from models.pssnet.prune import cut, prunable_convs

    net = _mbv1_subnet()
    g = torch.Generator().manual_seed(3)
    order = [torch.randperm(c.out_channels, generator=g) for c in prunable_convs(net)]
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(cut(net, order)(x), net(x), atol=1e-5, rtol=1e-4)


def test_pruning_to_a_flops_target_fits_it_and_runs():
    from models.pssnet.nets import widths_flops
    from models.pssnet.prune import prunable_convs, prune_to_flops

    net = _mbv1_subnet(1)
    full = widths_flops(net.spec, net.widths, net.resolution)
    x = torch.randn(4, 3, 32, 32)
    for name in prune.SELECTORS:
        small, ratio = prune_to_flops(net, 0.7 * full, prune.SELECTORS[name], torch.Generator().manual_seed(0))
        assert 0.6 * full < widths_flops(small.spec, small.widths, small.resolution) <= 0.7 * full and 0 < ratio < 1
        widths = [c.out_channels for c in prunable_convs(small)]
        assert all(1 <= w <= c.out_channels for w, c in zip(widths, prunable_convs(net)))
        with torch.inference_mode():
            assert small(x).shape == (4, 7)
    # widths rounded to multiples of 8 (whichever filters are chosen): the target still holds
    eights, _ = prune_to_flops(net, 0.7 * full, prune.SELECTORS["l1"], align=8)
    assert widths_flops(eights.spec, eights.widths, eights.resolution) <= 0.7 * full
    assert all(c.out_channels % 8 == 0 or c.out_channels == full_c.out_channels
               for c, full_c in zip(prunable_convs(eights), prunable_convs(net)))
    with torch.inference_mode():
        assert eights(x).shape == (4, 7)


def test_fine_tuning_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Interrupted after its last save and rerun, fine-tuning continues from the saved state to
    exactly the weights an uninterrupted run reaches (same batches, augmentation, optimizer
    and learning-rate state)."""
    import numpy as np

    from models.pssnet.dense_train import TrainConfig, train
    from tests.conftest import assert_resumes_exactly

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 7, size=64).astype(np.int64)
    cfg = TrainConfig(steps=6, batch=16, lr=0.01, weight_decay=5e-4, seed=0, save_every=3, warmup_steps=2)
    assert_resumes_exactly(lambda state: train(_mbv1_subnet(2), images, labels, cfg, state_path=state),
                           tmp_path / "state.pt", monkeypatch, saved_step=3)


def test_training_reports_its_loss_and_batch_accuracy(monkeypatch, capsys):
    """Every REPORT_EVERY steps (and at the end) the loop prints the mean training loss and
    batch accuracy since its last report: a run stuck at chance shows it while it runs."""
    import math
    import re

    import numpy as np

    from models.pssnet import dense_train

    monkeypatch.setattr(dense_train, "REPORT_EVERY", 2)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(48, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 7, size=48).astype(np.int64)
    cfg = dense_train.TrainConfig(steps=5, batch=8, lr=0.01, seed=0, save_every=100)
    dense_train.train(_mbv1_subnet(2), images, labels, cfg, desc="probe")
    lines = re.findall(r"\[probe\] step (\d+): training loss ([\d.]+), batch top-1 ([\d.]+) % \(last (\d+) images\)",
                       capsys.readouterr().err)
    assert [int(s) for s, *_ in lines] == [2, 4, 5]
    assert [int(n) for *_, n in lines] == [16, 16, 8]
    assert all(0 < float(loss) < 10 * math.log(7) and 0 <= float(acc) <= 100 for _s, loss, acc, _n in lines)


def test_bf16_autocast_training_runs_products_in_bf16_and_keeps_float32_weights():
    """``bf16_autocast``: the convolutions see and return bf16 (the speed), while the weights
    the optimiser updates, and so the network written, stay float32."""
    import numpy as np
    import torch

    from models.pssnet import dense_train

    net = _mbv1_subnet(2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    seen: list[torch.dtype] = []
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 7, size=16).astype(np.int64)
    cfg = dense_train.TrainConfig(steps=2, batch=8, lr=0.01, seed=0, save_every=100, bf16_autocast=True)
    dense_train.train(net, images, labels, cfg, desc="bf16")
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items() if v.is_floating_point())
