"""The family contract: a toy family of a few dozen lines gets the whole serving path with no
other change, every real family keeps the contract, and the runtime never branches on a
family's name."""

from __future__ import annotations

import ast
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from pydantic import Field

from service.app import create_app
from service.body import Upload, read_limited
from service.config import Settings
from service.family import Answer, Endpoint, RequestParams, Rung, ServedFamily
from bench.server import free_port
from tests.conftest import FAST_START, wait_ready


# ---- the toy family: everything it takes to serve a new model ------------------------------

class ToyParams(RequestParams):
    scale: float = Field(1.0, description="multiply the input by this first")


@dataclass(frozen=True)
class ToyPlan:
    rung: str
    flops: float
    flops_full: float = 1e4


class Toy(ServedFamily):
    """Doubles a JSON list of numbers ('big', 50 ms a batch) or returns it ('small', 2 ms)."""

    family, endpoint, flops_convention = "toy", Endpoint("/toy", "Scale a vector", ToyParams), "1 per element"
    uses = frozenset({"scale"})
    name = "toy-1"
    seconds = {"small": 0.002, "big": 0.05}

    def batch_keys(self): return {k: k for k in self.seconds}
    def example(self, key, n): return torch.zeros(n, 2)
    def forward(self, key, batch):
        time.sleep(self.seconds[key])
        return batch * (2 if key == "big" else 1)
    async def read(self, request, params, limit): return Upload(await read_limited(request, limit), {})
    def decode(self, upload, params, settings): return torch.tensor(json.loads(upload.data)) * params.scale
    def plan(self, work, budget, unit): return self.top(work) if budget >= 1 else self.bottom(work)
    def top(self, work): return ToyPlan("big", 1e4)
    def bottom(self, work): return ToyPlan("small", 1e3)
    def batches(self, plan): return [(plan.rung, 1)]
    def prepare(self, work, plan): return [(plan.rung, work[None])]
    def finish(self, work, plan, outputs): return outputs[0][0]
    def respond(self, work, decision, result, params, request):
        p = decision.plan
        return Answer({"values": result.tolist()}, p.rung, p.flops, p.flops_full)
    def rungs(self): return [Rung("small", 1e3, 0), Rung("big", 1e4, 0)]


# ---- what it gets ------------------------------------------------------------------------

SETTINGS = {**FAST_START, "families": [], "batch_max_items": 16}


def post(client, body: list, **query) -> httpx.Response:
    return client.post("/toy", content=json.dumps(body), params=query)


def test_a_toy_family_gets_the_whole_serving_path() -> None:
    with TestClient(create_app(Settings(**SETTINGS), families=[Toy()])) as c:
        assert c.post("/toy", content="[1]").status_code in (200, 503)  # warming up or ready
        wait_ready(c)
        r = post(c, [1, 2], deadline_ms=500)  # deadline planning: the top rung fits
        assert r.status_code == 200 and r.json()["values"] == [2.0, 4.0], r.text
        h = r.headers
        assert (h["x-anytime-rung"], h["x-anytime-model"], h["x-anytime-flops"]) == ("big", "toy-1", "10000")
        assert float(h["x-anytime-compute-ms"]) >= 50 and r.json()["flops_convention"] == "1 per element"
        small = post(c, [1, 2], deadline_ms=40)  # big does not fit: the planner steps down
        assert small.status_code == 200 and small.headers["x-anytime-rung"] == "small", small.text
        assert post(c, [3], scale=2, budget=1).json()["values"] == [12.0]  # its own parameter
        shed = post(c, [1], deadline_ms=1)
        assert shed.status_code == 429 and int(shed.headers["retry-after"]) >= 1
        assert post(c, [1], zz=1).status_code == 422 and post(c, [1], scale="x").status_code == 422
        listed = c.get("/v1/models").json()["models"]
        assert [(m["name"], m["endpoint"], [r["name"] for r in m["rungs"]]) for m in listed] == \
            [("toy-1", "/toy", ["small", "big"])]
        assert listed[0]["ready"] and listed[0]["cost_model"]["rungs"]["big"]["fixed_ms"] >= 40  # timed at start-up
        spec = c.get("/openapi.json").json()["paths"]
        assert "/toy" in spec and "scale" in {p["name"] for p in spec["/toy"]["post"]["parameters"]}
        metrics = c.get("/metrics").text
        assert 'anytime_requests_total{code="200",endpoint="/toy"' in metrics
        assert 'anytime_shed_total{model="toy-1",reason="deadline"}' in metrics
        assert c.get("/readyz").status_code == 200 and "/superresolve" not in spec  # ARM is off


def test_the_toy_family_batches_concurrent_requests() -> None:
    """Requests that arrive while a batch runs share the next forward pass (a real server:
    the requests really are concurrent)."""
    app = create_app(Settings(**SETTINGS), families=[Toy()])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            wait_ready(c, timeout=30)
            results: list[int] = []
            workers = [threading.Thread(target=lambda: results.append(post(c, [1], budget=1).status_code))
                       for _ in range(12)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            assert results == [200] * 12
            text = c.get("/metrics").text
            count = float(next(line.split()[-1] for line in text.splitlines() if line.startswith(
                'anytime_batch_items_count{model="toy-1",rung="big"}')))
            assert count < 12  # some requests shared a forward pass
    finally:
        server.should_exit = True
        thread.join(10)


# ---- every real family keeps the contract -------------------------------------------------

@pytest.fixture(scope="module")
def real_families(bundled_model) -> list[ServedFamily]:
    from service import registry
    from service.families.arm import ArmFamily

    settings = Settings(**{**FAST_START, "families": ["pssnet", "cfvit", "seqtr"], "pssnet_checkpoint": None})
    settings.pssnet = type(settings.pssnet)()  # the bundled PSS-Net too
    settings.cfvit = type(settings.cfvit)()
    settings.seqtr = type(settings.seqtr)()
    return [ArmFamily(bundled_model), *registry.load(settings)]


def test_every_real_family_keeps_the_contract(real_families) -> None:
    assert {f.family for f in real_families} == {"arm", "pssnet", "cfvit", "seqtr"}
    for f in real_families:
        assert isinstance(f, ServedFamily) and f.endpoint.path.startswith("/")
        assert f.uses <= set(f.endpoint.params.model_fields), f.family  # it uses parameters its endpoint takes
        assert "multiply-accumulates" in f.flops_convention  # FLOPs, with what they count named
        rungs = f.rungs()
        assert rungs and all(r.flops >= 0 for r in rungs) and all(isinstance(r.describe(), dict) for r in rungs)
        for key in f.batch_keys():  # each batched forward runs on its example, batch in, batch out
            out = f.forward(key, f.example(key, 2))
            first = out[0] if isinstance(out, tuple) else out
            assert first.shape[0] == 2, (f.family, key)
        json.dumps(f.describe())  # /v1/models can carry it


def test_plans_are_monotone_in_the_budget(real_families) -> None:
    """A larger budget never buys a cheaper plan (the planner's bisection relies on it)."""
    from service.families.arm import SrWork
    from models.common.synthetic import synthetic_photo
    from service import imageio

    rgb = synthetic_photo(96, 128, seed=3)
    for f in real_families:
        work = SrWork(imageio.Decoded(rgb, rgb / 255.0, None, False, 8), f.model.analyse(rgb), "image/png") \
            if f.family == "arm" else None
        flops = [f.plan(work, b, "flops").flops for b in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)]
        assert flops == sorted(flops) and f.bottom(work).flops <= flops[0] and f.top(work).flops >= flops[-1], \
            (f.family, flops)


def test_the_runtime_never_branches_on_a_family_name() -> None:
    """Family names appear only in the families' own modules (and the default list in config)."""
    service = Path(__file__).resolve().parents[1] / "service"
    names = {"arm", "pssnet", "cfvit", "seqtr", "ARM", "PSS-Net", "CF-ViT", "SeqTR"}
    for path in service.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                constants = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)]
                assert not names & {c for c in constants if isinstance(c, str)}, f"{path.name}:{node.lineno}"


# ---- the registry: any subset, nothing served twice ------------------------------------------

@pytest.mark.parametrize("families", [[], ["seqtr"], ["pssnet", "cfvit"], ["cfvit", "arm"]])
def test_the_server_starts_with_any_subset_of_families(families: list[str]) -> None:
    """Families are loaded by name from settings; any can be left out, ARM included."""
    settings = Settings(**{**FAST_START, "families": families})
    settings.pssnet, settings.cfvit, settings.seqtr = (type(s)() for s in (settings.pssnet, settings.cfvit,
                                                                            settings.seqtr))  # the bundled ones
    settings.pssnet.int8 = False  # 1.5 s a rung to build; tests/test_int8_rungs.py serves them
    paths = {"arm": "/superresolve", "pssnet": "/classify", "cfvit": "/classify", "seqtr": "/ground"}
    with TestClient(create_app(settings)) as c:
        wait_ready(c, timeout=120)
        listed = c.get("/v1/models").json()["models"]
        assert sorted({m["family"] for m in listed}) == sorted(families)
        spec = set(c.get("/openapi.json").json()["paths"])
        for family, path in paths.items():
            assert (path in spec) == any(paths[f] == path for f in families), (family, path)
        if "arm" not in families:
            assert c.post("/superresolve", content=b"x").status_code == 404


def test_what_cannot_be_served_is_refused_at_start_up() -> None:
    settings = Settings(**SETTINGS)

    class Other(Toy):
        endpoint = Endpoint("/toy", "Another description of the same path", ToyParams)
        name = "toy-2"

    class Metrics(Toy):
        endpoint = Endpoint("/metrics", "Shadows the server's own", ToyParams)
        name = "toy-3"

    for families, why in (([Toy(), Toy()], "share a name"), ([Toy(), Other()], "differently"),
                          ([Metrics()], "shadow")):
        with pytest.raises(ValueError, match=why):
            create_app(settings, families=families)
    with pytest.raises(ValueError, match="unknown families"):
        create_app(Settings(**{**SETTINGS, "families": ["toy"]}))
