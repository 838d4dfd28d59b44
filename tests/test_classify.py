"""POST /classify through the runtime: a CF-ViT (tiny, random weights, a made-up validation
curve) and a PSS-Net-shaped stand-in with three subnets of known cost.  These check the
serving path (budget -> eta or subnet, batching, exits, errors), not model quality; the
bundled models' quality is measured by their own commands and manifests."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from models.cfvit.model import create_model
from models.cfvit.serving import CfVitModel
from service.app import create_app
from service.families.arm import ArmFamily
from service.families.cfvit import CfVitFamily
from service.families.pssnet import PssNetFamily
from service.config import Settings
from tests.conftest import FAST_START, synthetic_photo, wait_ready, wait_until


def tiny_cfvit() -> CfVitModel:
    torch.manual_seed(0)
    net = create_model("cf_tiny_glyphs", num_classes=10, embed_dim=32, depth=4, num_heads=2)
    classes = [f"c{i}" for i in range(10)]
    full = CfVitModel(net, name="cf-test", classes=classes, curve=[])
    curve = [{"eta": e, "exit_rate": x, "expected_flops": full.flops_coarse + (1 - x) * full.flops_fine_increment,
              "accuracy": a} for e, x, a in [(0.0, 1.0, 0.5), (0.5, 0.6, 0.7), (0.9, 0.2, 0.8), (1.01, 0.0, 0.82)]]
    return CfVitModel(net, name="cf-test", classes=classes, curve=curve)


@dataclass
class FakeRung:
    index: int
    name: str
    flops: float
    params: int
    accuracy: float
    cfg: dict
    val_accuracy: float | None = None
    dominated: bool = False
    method: str = "pss-net"
    variant: dict | None = None


class FakePssNet:
    """The serving interface of models.pssnet.serving.PssNetModel, with three linear 'subnets'
    whose outputs tell which one ran."""

    name = "pss-test"
    input_size = 16
    classes = ["a", "b", "c"]

    def __init__(self) -> None:
        self.rungs = [FakeRung(i, n, f, 1000 * (i + 1), acc, {"resolution": 16, "width": i})
                      for i, (n, f, acc) in enumerate([("min", 30.0, 0.6), ("f60", 60.0, 0.7), ("max", 100.0, 0.8)])]
        self.batches: list[tuple[int, int]] = []
        self.engine_choices: dict = {}

    def choose_engines(self, engine: str, sizes, rounds: int = 5) -> dict:
        return {}  # its 'subnets' are not networks: they stay on their one engine

    @property
    def ladder(self) -> list[FakeRung]:
        return [r for r in self.rungs if not r.dominated]

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        im = Image.fromarray(rgb).resize((16, 16))
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)

    def forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        self.batches.append((index, len(x)))
        logits = torch.zeros(len(x), 3)
        logits[:, index] = 5.0  # subnet i answers class i
        return logits


@pytest.fixture(scope="module")
def setup(bundled_model):
    pss = FakePssNet()
    app = create_app(Settings(**FAST_START),
                     families=[ArmFamily(bundled_model), PssNetFamily(pss), CfVitFamily(tiny_cfvit())])
    with TestClient(app) as c:
        wait_ready(c)
        yield c, pss


def _png(side: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_photo(side, side)).save(buf, format="PNG")
    return buf.getvalue()


def _post(c: TestClient, **params):
    return c.post("/classify", content=_png(), headers={"content-type": "image/png"}, params=params)


def test_pssnet_budget_picks_the_largest_subnet_that_fits(setup) -> None:
    """In FLOPs (the paper's convention): the largest subnet within budget x the largest's."""
    c, _ = setup
    for budget, subnet in (("1", "max"), ("0.7", "f60"), ("0.6", "f60"), ("0.59", "min"), ("0", "min")):
        r = _post(c, model="pss-test", budget=budget, budget_unit="flops", top_k=2)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["rung"]["name"] == subnet and r.headers["x-anytime-rung"] == subnet
        assert body["predictions"][0]["label"] == "abc"[["min", "f60", "max"].index(subnet)]
        assert len(body["predictions"]) == 2 and body["flops_full"] == 2e8  # 100 MFLOPs of MACs, in FLOPs
    pinned = _post(c, model="pss-test", rung="min").json()
    assert pinned["rung"]["cfg"] == {"resolution": 16, "width": 0} and pinned["budget"] == "rung:min"
    assert _post(c, model="pss-test", rung="nope").status_code == 422
    assert _post(c, model="pss-test", eta="0.5").status_code == 422


def test_pssnet_time_budgets_climb_the_rungs_that_are_not_dominated() -> None:
    """In time: rungs ordered by their predicted time per image; a rung slower than another
    and no more accurate on validation is dominated, never chosen, and listed so."""
    from models.pssnet.serving import PssNetModel
    from service.bundled import bundled

    model = PssNetModel.from_checkpoint(bundled("pssnet"), int8=False)
    fam = PssNetFamily(model)
    names = [r.name for r in fam.ladder]  # min ... top, by FLOPs and by val accuracy
    # a made-up host where the second rung is slower than the third: it is dominated
    ms = {n: 1.0 + i for i, n in enumerate(names)}
    ms[names[1]] = ms[names[2]] + 0.5
    fam.calibrated(lambda batches: sum(n * ms.get(key, 100.0) / 1000 for key, n in batches), 32)
    chosen = [p.key for p in fam.by_time]
    assert names[1] not in chosen and chosen == [n for n in names if n != names[1]]
    top = ms[names[-1]]
    for budget in (0.0, 0.3, 0.5, 0.8, 1.0):
        plan = fam.plan(None, budget, "time")
        assert ms[plan.key] <= max(budget * top, ms[names[0]]) + 1e-9
        better = [n for n in chosen if ms[n] <= budget * top and ms[n] > ms[plan.key]]
        assert not better, (budget, plan.key, better)
    listed = {r.name: r for r in fam.rungs()}
    assert listed[names[1]].dominated and not listed[names[2]].dominated
    assert fam.plan(None, 0.5, "flops").key == fam.plan(None, 0.5, "flops").subnet  # fp32 in FLOPs


def test_cfvit_budget_maps_to_eta_and_reports_the_exit(setup) -> None:
    c, _ = setup
    coarse = _post(c, model="cf-test", rung="coarse").json()
    assert coarse["rung"]["exit_stage"] == "coarse" and coarse["rung"]["eta"] == 0.0
    assert coarse["flops"] < coarse["flops_full"]
    fine = _post(c, model="cf-test", rung="fine").json()
    assert fine["rung"]["exit_stage"] == "fine" and fine["flops"] == fine["flops_full"]
    m = next(s for s in c.app.state.services if s.name == "cf-test").family.model
    between = (m.expected_flops(0.5) + m.expected_flops(0.9)) / 2 / m.flops_full  # eta 0.5 fits, 0.9 does not
    low = _post(c, model="cf-test", budget=f"{between:.6f}").json()
    assert low["rung"]["eta"] == 0.5 and low["flops_expected"] <= between * low["flops_full"]
    assert low["expected_accuracy"] == 0.7
    assert _post(c, model="cf-test", eta="0.9").json()["rung"]["eta"] == 0.9
    text = c.get("/metrics").text
    assert 'anytime_exits_total{model="cf-test",stage="coarse"}' in text
    assert "anytime_expected_accuracy_ratio_bucket" in text


def test_deadlines_shed_and_models_listing(setup) -> None:
    c, _ = setup
    assert _post(c, model="cf-test", deadline_ms="0.01").status_code == 429
    ok = _post(c, model="cf-test", deadline_ms="10000")
    assert ok.status_code == 200 and ok.json()["decision"] == "deadline"
    listed = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
    assert {"arm-fsrcnn-demo", "pss-test", "cf-test"} <= set(listed)
    assert listed["pss-test"]["endpoint"] == "/classify" and len(listed["pss-test"]["rungs"]) == 3
    # calibrated: a fake this small may fit a zero per-item slope on a loaded host, never a zero batch
    assert listed["cf-test"]["cost_model"]["rungs"]["cfvit"]["predicted_full_batch_ms"] > 0
    assert _post(c, model="nope").status_code == 422
    assert _post(c, model="pss-test", top_k="4").status_code == 422  # only 3 classes
    bad = c.post("/classify", content=b"not an image", headers={"content-type": "image/png"})
    assert bad.status_code == 400


def test_concurrent_requests_at_one_subnet_share_a_forward_pass(setup) -> None:
    """Queue several requests behind a busy worker: they run as one batch."""
    c, pss = setup
    svc = next(s for s in c.app.state.services if s.name == "pss-test")
    import threading

    gate = threading.Event()
    from service.executor import Job

    svc.runtime.executor.submit(Job([], 0.0, finish=lambda _: gate.wait(10)))
    wait_until(lambda: svc.runtime.executor.depth == 0, what="the worker taking the gate job")  # it holds it now
    results = []
    threads = [threading.Thread(target=lambda: results.append(_post(c, model="pss-test", rung="max")))
               for _ in range(4)]
    pss.batches.clear()
    for t in threads:
        t.start()
    wait_until(lambda: svc.runtime.executor.depth >= 4, timeout=10, what="four requests queued behind the gate")
    gate.set()
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [200] * 4
    assert pss.batches == [(2, 4)]


def test_bundled_classifiers_serve_through_classify(bundled_model) -> None:
    """The real bundled models (when they have been trained and committed) through the
    default configuration: loading, calibration, one request at the bottom and top rung."""
    from service import registry
    from service.config import bundled

    if bundled("pssnet") is None and bundled("cfvit") is None:
        pytest.skip("no bundled classification weights under models/pssnet/weights or models/cfvit/weights")
    settings = Settings(**{**FAST_START, "pssnet_checkpoint": bundled("pssnet"), "cfvit_checkpoint": bundled("cfvit"),
                           "pssnet_int8": False})  # the int8 rungs: tests/test_int8_rungs.py
    settings.families = ["pssnet", "cfvit"]
    adapters = registry.load(settings)
    app = create_app(settings, families=adapters)
    with TestClient(app) as c:
        wait_ready(c, timeout=120)
        for a in adapters:
            lo = _post(c, model=a.model.name, budget="0", budget_unit="flops").json()
            hi = _post(c, model=a.model.name, budget="1", budget_unit="flops").json()
            assert lo["flops_expected"] <= hi["flops_expected"] and hi["flops_expected"] == hi["flops_full"]
            assert 0 < lo["predictions"][0]["probability"] <= 1 and lo["predictions"][0]["label"] in a.model.classes


def test_a_time_budget_a_rounding_below_a_rungs_share_still_buys_that_rung() -> None:
    """A client that computes a budget from the rounded ms /v1/models lists can land a hair
    below a rung's exact share of the top's time; within TIME_BUDGET_TOLERANCE it still fits."""
    from service.family import TIME_BUDGET_TOLERANCE

    fam = PssNetFamily(FakePssNet())
    per_batch = {"min": 1.0, "f60": 2.0, "max": 4.0}  # seconds per full batch of 4 items
    fam.calibrated(lambda batches: sum(per_batch[k] * n / 4 for k, n in batches), 4)
    assert fam.plan(None, 0.5).key == "f60"
    assert fam.plan(None, 0.5 * (1 - TIME_BUDGET_TOLERANCE / 2)).key == "f60"
    assert fam.plan(None, 0.5 * (1 - 2 * TIME_BUDGET_TOLERANCE)).key == "min"
    assert fam.plan(None, 1.0).key == "max"
