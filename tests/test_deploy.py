"""Deployment files: the Grafana dashboard queries only metrics the server exports, a real
Prometheus scrapes a real server with deploy/prometheus.yml, and the compose, Kubernetes and
Docker files agree with the server's port, probes and settings.  No Docker needed."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import REPO

DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "anytime.json"
PROMETHEUS_YML = DEPLOY / "prometheus.yml"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
ALWAYS_THERE = {"instance", "job"}  # labels Prometheus adds to every scraped series


# --------------------------------------------------------------------------- exported names

def exported_series() -> dict[str, set[str]]:
    """Sample name -> label names, for every sample the server's registry can export
    (``_total``, ``_bucket``/``_sum``/``_count``, ``_created`` included).  Labelled metrics
    export nothing until a child exists, so one child of each is created first."""
    from prometheus_client.metrics import MetricWrapperBase

    from service.metrics import Metrics

    metrics = Metrics()
    for wrapper in vars(metrics).values():
        if isinstance(wrapper, MetricWrapperBase) and wrapper._labelnames:
            wrapper.labels(*["x"] * len(wrapper._labelnames))
    series: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and templating query of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    out: list[tuple[str, str]] = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                out.append((f"panel {p.get('title')!r} {t.get('refId')}", t["expr"]))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((f"variable {var['name']!r}", q))
    return out


# --------------------------------------------------------------------------- a small PromQL reader

FUNCTIONS = {
    # aggregations
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
    # functions used on dashboards
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "vector", "scalar", "abs",
    "clamp", "clamp_min", "clamp_max", "round", "ceil", "floor", "sqrt", "exp", "ln", "log2", "log10", "time",
    "timestamp", "absent", "absent_over_time", "avg_over_time", "max_over_time", "min_over_time",
    "sum_over_time", "count_over_time", "quantile_over_time", "last_over_time", "changes", "resets",
    "label_replace", "label_join", "sort", "sort_desc",
    # Grafana templating
    "label_values", "query_result", "metrics", "label_names",
}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
            "unless", "inf", "nan"}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}")
MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)")
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def parse_promql(expr: str) -> tuple[set[str], set[str], dict[str, set[str]], set[str]]:
    """(metric names, function names, metric -> matcher label names, grouping label names).
    Enough PromQL for dashboards: selectors, matchers, ranges, grouping, binary operators."""
    # Label values may contain anything: keep matcher names, blank the values.
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # [5m], [$__rate_interval], subqueries [1h:1m]
    matchers: dict[str, set[str]] = {}
    for m in SELECTOR.finditer(text):
        matchers.setdefault(m.group(1) or "", set()).update(l for l, _ in MATCHER.findall(m.group(2)))
    text = SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", text)
    grouping: set[str] = set()
    for m in GROUPING.finditer(text):
        grouping.update(x.strip() for x in m.group(2).split(",") if x.strip())
    text = GROUPING.sub(" ", text)
    if text.lstrip().startswith("label_values("):  # Grafana: label_values(metric, label)
        args = text.strip()[len("label_values("):-1].split(",")
        grouping.add(args[-1].strip())
        text = "label_values(" + ",".join(args[:-1]) + ")"
    metrics, functions = set(), set()
    for m in IDENT.finditer(text):
        word = m.group(0)
        if re.match(r"\s*\(", text[m.end():]):
            functions.add(word)
        elif word.lower() not in KEYWORDS and not re.fullmatch(r"\d[\w.]*", word):
            metrics.add(word)
    return metrics, functions, matchers, grouping


def test_promql_reader() -> None:
    metrics, functions, matchers, grouping = parse_promql(
        'histogram_quantile(0.99, sum by (le, rung) (rate(anytime_x_bucket{model=~"$model",rung!="a,b"}'
        '[$__rate_interval]))) / on(model) group_left sum(up) or vector(0)')
    assert metrics == {"anytime_x_bucket", "up"}
    assert functions == {"histogram_quantile", "sum", "rate", "vector"}
    assert matchers == {"anytime_x_bucket": {"model", "rung"}}
    assert grouping == {"le", "rung", "model"}
    assert parse_promql("label_values(anytime_ready, model)")[::3] == ({"anytime_ready"}, {"model"})


# --------------------------------------------------------------------------- dashboard

def test_dashboard_queries_name_only_exported_metrics() -> None:
    series = exported_series()
    queries = dashboard_queries()
    assert len(queries) >= 15
    problems: list[str] = []
    used: set[str] = set()
    for where, expr in queries:
        metrics, functions, matchers, grouping = parse_promql(expr)
        if not metrics:
            problems.append(f"{where}: no metric in {expr!r}")
        if unknown := functions - FUNCTIONS:
            problems.append(f"{where}: unknown functions {sorted(unknown)}")
        for name in metrics - series.keys():
            problems.append(f"{where}: {name} is not exported by service/metrics.py")
        known = [n for n in metrics if n in series]
        labels = set().union(*(series[n] for n in known)) | ALWAYS_THERE if known else set()
        for name, names in matchers.items():
            if name in series and (bad := names - series[name] - ALWAYS_THERE):
                problems.append(f"{where}: {name} has no label(s) {sorted(bad)}")
        if known and (bad := grouping - labels):
            problems.append(f"{where}: grouping by {sorted(bad)}, which no metric of the query has")
        used |= metrics
    assert not problems, "\n".join(problems)
    # The panels the dashboard is for.
    required = {"anytime_request_duration_seconds_bucket", "anytime_deadline_met_total",
                "anytime_deadline_missed_total", "anytime_shed_total", "anytime_patches_total",
                "anytime_budget_chosen_sum", "anytime_budget_chosen_count", "anytime_queue_depth",
                "anytime_predicted_wait_seconds", "anytime_cpu_utilization_ratio", "anytime_gpu_utilization_ratio",
                "anytime_slowdown_ratio"}
    assert required <= used, sorted(required - used)
    assert any(n.startswith("anytime_predicted_patch_psnr_decibels") for n in used)


def test_dashboard_is_provisioned_with_its_datasource() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    uids = {d["uid"] for d in ds if d["type"] == "prometheus"}
    assert uids and all(d["url"] == "http://prometheus:9090" for d in ds)

    def walk(panels: list[dict]):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))

    panels = list(walk(dash["panels"]))
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        if p["type"] != "row":
            assert p["datasource"]["uid"] in uids and p["targets"], p["title"]
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/anytime.yml").read_text())["providers"]
    compose = yaml.safe_load(COMPOSE.read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{providers[0]['options']['path']}:ro" in mounts


@pytest.mark.slow  # the real app with every bundled model, int8 rungs included
def test_app_metrics_endpoint_exports_the_dashboard_families() -> None:
    """The running app (in process) exposes the same families as the registry."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app()) as client:
        r = client.get("/metrics")
        if r.status_code == 404:
            pytest.skip("GET /metrics is not served yet")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
    # Every family has a "# TYPE" line, with or without samples yet.
    families = set(re.findall(r"^# TYPE (\S+) \S+$", text, flags=re.M))
    for where, expr in dashboard_queries():
        for name in parse_promql(expr)[0]:
            family = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in families or family in families, f"{where}: {name} is not on /metrics"


# --------------------------------------------------------------------------- real Prometheus

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _wait(what: str, check, timeout: float, procs: list[subprocess.Popen]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"{p.args[0]} exited with {p.returncode} while waiting for {what}")
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def scrape_config_for(target: str) -> dict:
    """deploy/prometheus.yml with the anytime job's target replaced, nothing else changed."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = [j for j in config["scrape_configs"] if j["job_name"] == "anytime"]
    assert len(jobs) == 1
    jobs[0]["static_configs"] = [{"targets": [target]}]
    return config


def test_scrape_config_targets_the_compose_service() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "anytime"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scrape_interval", config["global"]["scrape_interval"]) == "5s"
    assert job["static_configs"][0]["targets"] == ["anytime:8000"]
    assert "anytime" in yaml.safe_load(COMPOSE.read_text())["services"]
    promtool = shutil.which("promtool")
    if promtool:
        r = subprocess.run([promtool, "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_prometheus_scrapes_the_server(tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (Debian: apt-get install prometheus)")
    port, prom_port = _free_port(), _free_port()
    # One family without its int8 rungs: the series and the dashboard's queries are the same for
    # every family, and the whole bundled set took 40 s of the suite to start.
    env = {**os.environ, "ANYTIME_PORT": str(port), "ANYTIME_HOST": "127.0.0.1", "ANYTIME_TORCH_THREADS": "1",
           "ANYTIME_DRAIN_WINDOW_S": "0", "ANYTIME_FAMILIES": '["pssnet"]', "ANYTIME_PSSNET_INT8": "false",
           "ANYTIME_PSSNET_ENGINE": "torch"}
    server_log, prom_log = open(tmp_path / "server.log", "wb"), open(tmp_path / "prometheus.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env,
                              stdout=server_log, stderr=subprocess.STDOUT)
    procs = [server]
    try:
        url = f"http://127.0.0.1:{port}"
        # Ready (warmed up and calibrated): the steady state that Prometheus scrapes.
        _wait("the server's /readyz", lambda: httpx.get(f"{url}/readyz", timeout=1).status_code == 200, 60, procs)
        r = httpx.get(f"{url}/metrics", timeout=5)
        assert r.status_code == 200, (f"GET /metrics answered {r.status_code}: {r.text[:500]}\n"
                                      f"{(tmp_path / 'server.log').read_text(errors='replace')[-3000:]}")

        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump(scrape_config_for(f"127.0.0.1:{port}")))
        prom = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                                cwd=tmp_path, stdout=prom_log, stderr=subprocess.STDOUT)
        procs.append(prom)
        api = f"http://127.0.0.1:{prom_port}/api/v1"

        def target_up():
            targets = httpx.get(f"{api}/targets", timeout=2).json()["data"]["activeTargets"]
            ours = [t for t in targets if t["labels"]["job"] == "anytime"]
            if not ours:
                return False
            assert ours[0]["scrapeUrl"] == f"{url}/metrics", ours
            if ours[0]["health"] == "down":
                pytest.fail(f"scrape failed: {ours[0]['lastError']}")
            return ours[0]["health"] == "up"

        def query(q: str) -> list:
            body = httpx.get(f"{api}/query", params={"query": q}, timeout=2).json()
            assert body["status"] == "success", body
            return body["data"]["result"]

        _wait("the anytime target to be up", target_up, 30, procs)
        up = query('up{job="anytime"}')
        assert [s["value"][1] for s in up] == ["1"]
        names = httpx.get(f"{api}/label/__name__/values", timeout=2).json()["data"]
        ours = {n for n in names if n.startswith("anytime_")}
        assert ours, names
        assert ours <= exported_series().keys(), sorted(ours - exported_series().keys())
        if "anytime_ready" in ours:
            assert query("anytime_ready"), "anytime_ready scraped but not queryable"
        # Every dashboard query is valid PromQL for this Prometheus (Grafana variables filled in).
        for where, expr in dashboard_queries():
            if expr.startswith("label_values("):
                continue
            q = expr.replace("$__rate_interval", "1m").replace("$model", ".*")
            body = httpx.get(f"{api}/query", params={"query": q}, timeout=2).json()
            assert body["status"] == "success", f"{where}: {body.get('error')}"
    finally:
        for p in reversed(procs):
            _stop(p)
        server_log.close()
        prom_log.close()


# --------------------------------------------------------------------------- compose, k8s, Dockerfile

def test_compose_service_matches_the_image() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    svc = compose["services"]["anytime"]
    assert svc["build"]["context"] == ".." and (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    assert any(str(p).endswith(":8000") for p in svc["ports"])
    assert any("/readyz" in part for part in svc["healthcheck"]["test"])  # --wait means serving
    prom = compose["services"]["prometheus"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]


def _k8s_docs() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                docs[doc["kind"]] = doc
    return docs


def test_k8s_manifests(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _k8s_docs()
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"} <= docs.keys()
    dep, cm = docs["Deployment"], docs["ConfigMap"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["ports"][0]["containerPort"] == int(cm["data"]["ANYTIME_PORT"]) == 8000
    assert c["envFrom"][0]["configMapRef"]["name"] == cm["metadata"]["name"]
    labels = dep["spec"]["selector"]["matchLabels"]
    assert labels.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert docs["Service"]["spec"]["selector"] == labels
    hpa = docs["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    # Every ConfigMap key is a setting the server reads, with a value it accepts.
    from service.config import Settings

    for key, value in cm["data"].items():
        assert key.startswith("ANYTIME_") and key[len("ANYTIME_"):].lower() in Settings.model_fields, key
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("ANYTIME_CONFIG", raising=False)
    settings = Settings()
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    # Stopping: preStop sleeps while endpoints update, then the drain window and timeout, all
    # within the grace period; a PodDisruptionBudget covers the same pods.
    assert c["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    pre_stop_s = float(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + settings.drain_window_s + settings.drain_timeout_s
    pdb = docs["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"] == labels and pdb["spec"]["maxUnavailable"] == 1
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S.glob("*.yaml")
                                                        if p.name != "kustomization.yaml")


def test_dockerfile_essentials() -> None:
    text = (REPO / "Dockerfile").read_text()
    lines = [l.strip() for l in text.splitlines()]
    users = [l.split()[1] for l in lines if l.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert "EXPOSE 8000" in lines and "ANYTIME_HOST=0.0.0.0" in text
    assert re.search(r"HEALTHCHECK .*\n?.*/healthz", text)
    assert "ARG TORCH_VARIANT=cpu" in lines and "download.pytorch.org/whl/${TORCH_VARIANT}" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "runs", "data"} <= set(ignored)
    # every package the project installs is copied in (else `pip install .` leaves it out
    # without a word, and e.g. the anytime-serve command fails in the image)
    import tomllib

    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for pattern in packages["include"]:
        name = pattern.rstrip("*")
        assert f"COPY {name}/ {name}/" in lines, name


# --------------------------------------------------------------------------- every manifest, validated

K8S_VERSION = "1.30"  # the oldest Kubernetes these manifests promise to work on (docs/DEPLOY.md)
CRD_SCHEMAS = REPO / "tests" / "k8s_schemas"
SCRAPE_LABELS = {"namespace", "pod", "container", "endpoint", "service"}  # what a PodMonitor scrape adds


def all_k8s_docs() -> list[tuple[str, dict]]:
    """(file, document) for every manifest under deploy/k8s, overlays included."""
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((str(path.relative_to(K8S)), doc))
    return out


def kserve_problems(data, type_name: str, where: str) -> list[str]:
    """Check a KServe resource against the KServe SDK's generated models (made from the
    CRDs' OpenAPI schemas; nested Kubernetes types come from the Kubernetes client's):
    every key must be a field of its type, recursively."""
    import kserve.models
    import kubernetes.client.models

    if type_name.startswith("list["):
        return [p for i, item in enumerate(data) for p in kserve_problems(item, type_name[5:-1], f"{where}[{i}]")] \
            if isinstance(data, list) else [f"{where}: expected a list"]
    if type_name.startswith("dict("):
        return [] if isinstance(data, dict) else [f"{where}: expected a mapping"]
    cls = getattr(kserve.models, type_name, None) or getattr(kubernetes.client.models, type_name, None)
    if cls is None:  # str, int, bool, object, a quantity ...
        return []
    if not isinstance(data, dict):
        return [f"{where}: expected an object ({type_name})"]
    by_key = {v: k for k, v in cls.attribute_map.items()}
    problems = []
    for key, value in data.items():
        if key not in by_key:
            problems.append(f"{where}.{key}: not a field of {type_name}")
        else:
            problems += kserve_problems(value, cls.openapi_types[by_key[key]], f"{where}.{key}")
    return problems


def test_every_k8s_manifest_validates_against_its_schema() -> None:
    """Built-in kinds against the Kubernetes JSON schemas (kubernetes-validate, strict: an
    unknown field fails); KServe's kinds against its SDK's models; KEDA's ScaledObject and
    the Prometheus Operator's PodMonitor against our transcription of their CRDs."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is a dev dependency")
    import jsonschema

    kserve_kinds = {"InferenceService": "V1beta1InferenceService", "ServingRuntime": "V1alpha1ServingRuntime"}
    seen = set()
    problems: list[str] = []
    for where, doc in all_k8s_docs():
        kind = doc["kind"]
        seen.add(kind)
        if kind == "Kustomization":
            continue
        if kind in kserve_kinds:
            pytest.importorskip("kserve", reason="kserve is a dev dependency")
            problems += kserve_problems(doc, kserve_kinds[kind], f"{where} {kind}")
            continue
        schema = next(CRD_SCHEMAS.glob(f"{kind.lower()}.{doc['apiVersion'].replace('/', '-')}.json"), None)
        if schema is not None:
            for e in jsonschema.Draft202012Validator(json.loads(schema.read_text())).iter_errors(doc):
                problems.append(f"{where} {kind} {'.'.join(map(str, e.path))}: {e.message}")
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{where} {kind}: {e.message} at {'.'.join(map(str, e.path))}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{where}: no schema for {doc['apiVersion']} {kind}")
    assert not problems, "\n".join(problems)
    assert {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ScaledObject",
            "PodMonitor", "InferenceService", "ServingRuntime"} <= seen


def test_validation_catches_a_misspelt_field() -> None:
    """The checks above can fail: a typo in each kind of manifest is reported."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is a dev dependency")
    import jsonschema

    docs = {doc["kind"]: doc for _where, doc in all_k8s_docs()}
    dep = json.loads(json.dumps(docs["Deployment"]))
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    so = json.loads(json.dumps(docs["ScaledObject"]))
    so["spec"]["maxReplicas"] = 3
    schema = json.loads((CRD_SCHEMAS / "scaledobject.keda.sh-v1alpha1.json").read_text())
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(so))
    if pytest.importorskip("kserve", reason="kserve is a dev dependency"):
        isvc = json.loads(json.dumps(docs["InferenceService"]))
        isvc["spec"]["predictor"]["model"]["protocolVersoin"] = "v2"
        assert kserve_problems(isvc, "V1beta1InferenceService", "isvc")


def test_scaling_rules_name_exported_metrics_and_target_the_deployment() -> None:
    docs = {doc["kind"]: doc for _where, doc in all_k8s_docs()}
    so, dep, pm = docs["ScaledObject"], docs["Deployment"], docs["PodMonitor"]
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                            "name": dep["metadata"]["name"]}
    series = exported_series()
    names = set()
    for trigger in so["spec"]["triggers"]:
        assert trigger["type"] == "prometheus" and float(trigger["metadata"]["threshold"]) > 0
        metrics, functions, matchers, grouping = parse_promql(trigger["metadata"]["query"])
        assert metrics and not functions - FUNCTIONS, trigger
        for name in metrics:
            assert name in series, f"{trigger['name']}: {name} is not exported by service/metrics.py"
            assert not matchers.get(name, set()) - series[name] - ALWAYS_THERE - SCRAPE_LABELS, (name, matchers)
        names |= metrics
    assert {"anytime_degraded_total", "anytime_shed_total"} <= names  # quality given up, shed rate
    # the PodMonitor scrapes the deployment's pods on its named port
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= ports
    overlay = yaml.safe_load((K8S / "keda" / "kustomization.yaml").read_text())
    assert ".." in overlay["resources"] and "$patch: delete" in overlay["patches"][0]["patch"]
    assert "kind: HorizontalPodAutoscaler" in overlay["patches"][0]["patch"]


def test_kserve_runtime_speaks_v2_and_drains_within_its_grace_period() -> None:
    from service.config import Settings

    docs = {doc["kind"]: doc for _where, doc in all_k8s_docs()}
    rt, isvc = docs["ServingRuntime"], docs["InferenceService"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == rt["metadata"]["name"] and model["protocolVersion"] in rt["spec"]["protocolVersions"]
    assert model["modelFormat"]["name"] in {f["name"] for f in rt["spec"]["supportedModelFormats"]}
    (c,) = rt["spec"]["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert all(k[len("ANYTIME_"):].lower() in Settings.model_fields for k in env)
    assert c["ports"][0]["containerPort"] == int(env["ANYTIME_PORT"]) == c["readinessProbe"]["httpGet"]["port"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    drain = float(c["lifecycle"]["preStop"]["exec"]["command"][1]) + float(env["ANYTIME_DRAIN_WINDOW_S"]) + \
        float(env["ANYTIME_DRAIN_TIMEOUT_S"])
    assert isvc["spec"]["predictor"]["terminationGracePeriodSeconds"] > drain
    assert c["securityContext"]["runAsNonRoot"] is True


def test_every_bundled_weight_file_ships_in_the_package() -> None:
    """The image and a pip install serve what ``make serve`` serves: every file under
    ``models/*/weights/`` (variants in sub-folders included) matches the package-data
    patterns of pyproject.toml, expanded as setuptools does (``**`` spans folders).  The
    pruned and compact variants were once left out of the image this way."""
    import glob

    import tomllib

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["models"]
    root = REPO / "models"
    shipped = {Path(p) for pattern in patterns for p in glob.glob(str(root / pattern), recursive=True)}
    bundled = {p for p in root.glob("*/weights/**/*") if p.is_file()}
    assert bundled and bundled <= shipped, sorted(str(p.relative_to(REPO)) for p in bundled - shipped)
