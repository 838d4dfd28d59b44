"""Unstructured sparsity (compress.sparsity): OptG's straight-through scores, the global
re-allocation and sigmoid schedule shared with magnitude pruning, the export to exact zeros,
and the CSR kernels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress import sparsity


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def test_optg_score_gradient_is_the_weight_gradient_times_the_weight():
    net = _net()
    sp = sparsity.Sparsifier(net, "optg", 0.5, 10, 1)
    sp.reallocate(0.5)
    x = torch.randn(4, 3, 6, 6)
    net(x).square().sum().backward()
    for module, masked in sp.layers:
        w = sp.original(module)
        # dL/dW = dL/dW_eff * M, so dL/dW_eff is recoverable where M = 1; the score's gradient
        # there must be dL/dW_eff * W; where M = 0, W gets no task gradient at all.
        kept = masked.mask.bool()
        torch.testing.assert_close(masked.scores.grad[kept], (w.grad * w)[kept])
        assert (w.grad[~kept] == 0).all()


def test_pruned_weights_still_score_so_they_can_come_back():
    torch.manual_seed(3)
    lin = nn.Linear(6, 1, bias=False)
    sp = sparsity.Sparsifier(lin, "optg", 0.5, 10, 1)
    sp.reallocate(0.5)
    lin(torch.randn(8, 6)).sum().backward()
    pruned = ~sp.layers[0][1].mask.bool()
    assert (sp.layers[0][1].scores.grad[pruned] != 0).all()


@pytest.mark.parametrize("method", sparsity.METHODS)
def test_global_reallocation_prunes_the_lowest_share_across_layers(method):
    net = _net()
    sp = sparsity.Sparsifier(net, method, 0.9, 10, 1)
    if method == "optg":
        for s in sp.scores():
            s.data.normal_()
    crit = torch.cat([sp.criterion(m, k).flatten() for m, k in sp.layers])
    sp.reallocate(0.7)
    assert sp.sparsity() == pytest.approx(0.7, abs=1 / crit.numel())
    threshold = crit.sort().values[int(round(0.7 * crit.numel()))]
    for module, masked in sp.layers:
        c = sp.criterion(module, masked)  # after re-allocation (GMP has zeroed the pruned)
        if method == "optg":
            assert (c[masked.mask == 0] <= threshold).all() and (c[masked.mask == 1] >= threshold).all()
        else:  # magnitude: what is kept is at least the threshold; a pruned weight is set to zero
            assert (c[masked.mask == 1] >= threshold).all() and (sp.original(module)[masked.mask == 0] == 0).all()
    assert len({round(r, 3) for r in sp.per_layer()}) > 1  # rates differ per layer: one global ranking


def test_magnitude_initialised_scores_start_from_magnitude_prunings_masks_and_then_move():
    """``score_init="magnitude"``: the first re-allocation keeps what magnitude pruning keeps;
    the scores then accumulate the saliency, so a trained step can change the ranking."""
    optg, gmp = _net(), _net()
    sp_o = sparsity.Sparsifier(optg, "optg", 0.8, 10, 1, score_init="magnitude")
    sp_g = sparsity.Sparsifier(gmp, "gmp", 0.8, 10, 1)
    sp_o.reallocate(0.6)
    sp_g.reallocate(0.6)
    for (_, a), (_, b) in zip(sp_o.layers, sp_g.layers):
        assert torch.equal(a.mask, b.mask)
    first = [k.mask.clone() for _, k in sp_o.layers]
    opt = torch.optim.SGD([sp_o.score_group(50.0)], lr=50.0)
    for _ in range(5):
        opt.zero_grad()
        optg(torch.randn(16, 3, 6, 6)).square().sum().backward()
        opt.step()
    sp_o.reallocate(0.6)
    assert any(not torch.equal(m, k.mask) for m, (_, k) in zip(first, sp_o.layers))
    with pytest.raises(ValueError, match="score_init"):
        sparsity.Sparsifier(_net(), "optg", 0.5, 10, 1, score_init="random")


def test_the_schedule_ramps_on_a_sigmoid_and_the_score_rate_follows_it():
    sp = sparsity.Sparsifier(_net(), "optg", 0.9, 100, 3)
    assert sp.sparsity_at(0) < 1e-20 and sp.sparsity_at(50) == pytest.approx(0.45) and sp.sparsity_at(99) > 0.8999
    opt = torch.optim.SGD([sp.score_group(0.1)], lr=0.1)
    sp.before_step(50 * 3, opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert sp.sparsity() == pytest.approx(0.45, abs=1e-3)
    flat = sparsity.Sparsifier(_net(), "optg", 0.9, 100, 3, score_lr_ramp=False)
    opt = torch.optim.SGD([flat.score_group(0.1)], lr=0.1)
    flat.before_step(10 * 3, opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_export_leaves_exact_zeros_and_the_same_function():
    net = _net()
    sp = sparsity.Sparsifier(net, "gmp", 0.8, 10, 1)
    sp.reallocate(0.8)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        before = net(x)
    sp.export()
    assert sparsity.weight_sparsity(net) == pytest.approx(0.8, abs=0.01)
    assert all(not hasattr(m, "parametrizations") for m in net.modules())
    torch.testing.assert_close(net(x), before)
    sizes = sparsity.storage_bytes(net)
    assert sizes["csr_float32_int32"] < sizes["dense_float32"]


def test_csr_kernels_compute_the_same_function():
    net = _net()
    sp = sparsity.Sparsifier(net, "gmp", 0.9, 10, 1)
    sp.reallocate(0.9)
    sp.export()
    net.eval()
    x = torch.randn(3, 3, 6, 6)
    with torch.inference_mode():
        dense = net(x)
        csr = sparsity.with_csr_kernels(net)
        assert isinstance(csr[2], sparsity.CsrPointwise) and isinstance(csr[6], sparsity.CsrLinear)
        assert isinstance(csr[0], nn.Conv2d)  # no sparse kernel for a 3x3 convolution
        torch.testing.assert_close(csr(x), dense, atol=1e-5, rtol=1e-4)


def test_csr_kernels_leave_dense_layers_dense():
    """A layer a method kept dense (a classifier) would only be slower on CSR."""
    net = _net()
    sp = sparsity.Sparsifier(net, "gmp", 0.9, 10, 1, modules=[net[2]])
    sp.reallocate(0.9)
    sp.export()
    csr = sparsity.with_csr_kernels(net.eval())
    assert isinstance(csr[2], sparsity.CsrPointwise)
    assert isinstance(csr[6], nn.Linear)


def test_weight_decay_reaches_a_masked_weight():
    from models.pssnet.train import param_groups

    net = _net()
    sp = sparsity.Sparsifier(net, "optg", 0.5, 10, 1)
    decay, no_decay = param_groups(net, 1e-4)
    decayed = {id(p) for p in decay["params"]}
    assert all(id(sp.original(m)) in decayed for m, _ in sp.layers)
    assert not any(id(s) in decayed for s in sp.scores())


def test_sparse_training_resumes_to_the_same_weights_scores_and_masks(tmp_path, monkeypatch):
    """OptG's state is the network's (weights, scores, masks) and the optimiser's (the scores'
    momentum): interrupted after a save and rerun, training reaches exactly what an
    uninterrupted run reaches."""
    import numpy as np

    from models.pssnet.dense_train import TrainConfig, train
    from models.pssnet.nets import DenseSubnet, _init_weights, demo_spec
    from tests.conftest import assert_resumes_exactly

    spec = demo_spec("mobilenet_v1", 5)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(48, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, size=48).astype(np.int64)
    cfg = TrainConfig(steps=6, batch=16, lr=0.05, weight_decay=4e-5, seed=0, save_every=3, label_smoothing=0.1)

    def run(state):
        torch.manual_seed(0)
        net = DenseSubnet(spec, spec.min_cfg())
        _init_weights(net)
        sp = sparsity.Sparsifier(net, "optg", 0.8, epochs=6, steps_per_epoch=1, beta=2.0)
        return train(net, images, labels, cfg, state_path=state, extra_groups=[sp.score_group(cfg.lr)],
                     before_step=sp.before_step)

    assert_resumes_exactly(run, tmp_path / "state.pt", monkeypatch, saved_step=3)
    names = list(run(None).state_dict())
    assert any("scores" in k for k in names) and any("mask" in k for k in names)


def test_only_the_given_modules_are_masked_and_csr_timing_checks_the_function():
    net = _net()
    sp = sparsity.Sparsifier(net, "gmp", 0.9, 10, 1, modules=[net[2], net[6]])
    sp.reallocate(0.5)
    assert [m for m, _ in sp.layers] == [net[2], net[6]]
    assert not hasattr(net[0], "parametrizations")
    sp.export()
    speed = sparsity.dense_vs_csr_seconds(net.eval(), {1: torch.randn(1, 3, 6, 6), 4: torch.randn(4, 3, 6, 6)},
                                          rounds=1)
    assert set(speed) == {"batch_1", "batch_4"} and all(v["dense_ms"] > 0 and v["csr_ms"] > 0 for v in speed.values())
    assert isinstance(net[2], nn.Conv2d)  # timed on a copy: the network itself keeps its dense layers


def test_cfvit_linear_sparsity_fine_tune_resumes_and_writes_a_bundle_with_its_own_evaluation(tmp_path, monkeypatch):
    """``models.cfvit.sparse`` end to end on a tiny CF-ViT: the Linear layers but the classifier
    reach the target, an interrupted run resumes to the same weights, and the written bundle
    loads with the evaluation of the sparse network (not the dense one's)."""
    from safetensors.torch import load_file

    from models.cfvit import data, sparse, train
    from models.cfvit.checkpoint import load_ours

    small = {"train": 256, "val": 64, "test": 64}
    monkeypatch.setattr(data, "load", lambda name, split: data.synthetic_shapes(small[split], seed=len(split)))
    train.main(["--data", "shapes", "--steps", "4", "--batch", "16", "--out", str(tmp_path / "dense-run"),
                "--eval-every", "0", "--embed-dim", "32", "--depth", "2", "--heads", "2", "--limit-eval", "64",
                "--name", "t", "--pause-file", "", "--weights-dir", str(tmp_path / "weights")])
    bundle = tmp_path / "weights" / "t"
    args = [str(bundle), "--method", "optg", "--sparsity", "0.9", "--steps", "6", "--epochs", "3", "--batch", "16",
            "--save-every", "3", "--limit-eval", "64"]
    straight = sparse.main(args + ["--out", str(tmp_path / "straight")])

    real = sparse.progress

    def dies_at_step_5(items, **options):
        for i, item in enumerate(real(items, **options)):
            if i == 4:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(sparse, "progress", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        sparse.main(args + ["--out", str(tmp_path / "resumed")])
    monkeypatch.setattr(sparse, "progress", real)
    sparse.main(args + ["--out", str(tmp_path / "resumed")])
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    loaded = load_ours(tmp_path / "straight")
    masked = sparse.masked_linears(loaded.model)
    zeros = sum(int((m.weight == 0).sum()) for m in masked)
    assert zeros == pytest.approx(0.9 * sum(m.weight.numel() for m in masked), abs=1)
    assert straight["masked_sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert int((loaded.model.head.weight == 0).sum()) == 0  # the classifier stays dense
    assert round(loaded.meta["evaluation"]["test"]["accuracy_all_fine"], 4) == straight["accuracy"]["test"]["all_fine"]
    assert loaded.meta["sparsity"]["method"] == "optg" and straight["speed_1_thread"]["batch_32"]["csr_ms"] > 0

    # The weights' optimiser never sees a score: those learn by SGD alone, without decay.
    sp = sparsity.Sparsifier(loaded.model, "optg", 0.9, 3, 2, modules=sparse.masked_linears(loaded.model))
    in_adamw = {id(p) for g in sparse.weight_groups(loaded.model, sp, 0.05) for p in g["params"]}
    assert sp.scores() and not any(id(s) in in_adamw for s in sp.scores())
    assert all(id(sp.original(m)) in in_adamw for m, _ in sp.layers)
