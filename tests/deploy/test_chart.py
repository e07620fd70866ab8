"""The Helm chart: lint, render, validate against Kubernetes, and refuse bad values.

Each CI value set in ``helm/session-broker/ci/`` (plus the defaults) is
linted with ``helm lint --strict``, rendered with ``helm template``, validated
with ``kubernetes-validate --strict`` for the chart's oldest and a current
Kubernetes, linted with yamllint, and its broker environment is fed to the
real ``Settings`` model. Every file in ``invalid/`` must make ``helm lint``
fail with the message in its header.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import SecretStr

from broker.settings import Settings
from tests.deploy.conftest import (
    BIN,
    CHART,
    KUBE_VERSIONS,
    ROOT,
    VALUE_SETS,
    Helm,
    Manifest,
    broker_env,
    find,
    one,
)

HERE = Path(__file__).parent
INVALID = sorted((HERE / "invalid").glob("*.yaml"))
SETS = ["default", *VALUE_SETS]
CRD_SCHEMAS = {"ServiceMonitor": HERE / "servicemonitor.schema.json",
               "PrometheusRule": HERE / "prometheusrule.schema.json"}
SECRET_ENV = {f"BROKER_{name.upper()}" for name, f in Settings.model_fields.items()
              if f.annotation is SecretStr}


def values_of(name: str) -> tuple[str, ...]:
    return () if name == "default" else (name,)


def kubernetes_validate(path: Path) -> subprocess.CompletedProcess[str]:
    args = [str(BIN / "kubernetes-validate"), "--strict", "--quiet"]
    for version in KUBE_VERSIONS:
        args += ["-k", version]
    return subprocess.run([*args, str(path)], capture_output=True, text=True, timeout=120)


# -- lint, render, validate ----------------------------------------------------------------
@pytest.mark.parametrize("name", SETS)
def test_helm_lint_strict_passes(helm: Helm, name: str) -> None:
    proc = helm.lint(*values_of(name))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("name", SETS)
def test_rendered_manifests_pass_kubernetes_validate_strict(helm: Helm, name: str,
                                                            tmp_path: Path) -> None:
    rendered = tmp_path / f"{name}.yaml"
    rendered.write_text(helm.template_text(*values_of(name)))
    proc = kubernetes_validate(rendered)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Kinds kubernetes-validate has no schema for are only warned about: they
    # must be the CRDs checked by test_custom_resources_match_their_schema.
    unknown = set(re.findall(r"Couldn't find schema for kind (\w+)", proc.stdout + proc.stderr))
    assert unknown <= set(CRD_SCHEMAS), f"unvalidated kinds: {unknown - set(CRD_SCHEMAS)}"


@pytest.mark.parametrize("name", SETS)
def test_rendered_manifests_pass_yamllint(helm: Helm, name: str, tmp_path: Path) -> None:
    rendered = tmp_path / f"{name}.yaml"
    rendered.write_text(helm.template_text(*values_of(name)))
    proc = subprocess.run([str(BIN / "yamllint"), "--strict", "-f", "parsable",
                           "-c", str(HERE / "yamllint.yaml"), str(rendered)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_validators_reject_broken_manifests(helm: Helm, tmp_path: Path) -> None:
    """The two validators are strict enough to matter: a misspelled field and bad YAML fail."""
    manifests = helm.template()
    deployment = one(manifests, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump(deployment))
    assert kubernetes_validate(typo).returncode != 0

    untidy = tmp_path / "untidy.yaml"
    untidy.write_text("---\nkind: ConfigMap   \nkind: Secret\n")
    proc = subprocess.run([str(BIN / "yamllint"), "--strict", "-c", str(HERE / "yamllint.yaml"),
                           str(untidy)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0


@pytest.mark.parametrize("name", SETS)
def test_custom_resources_match_their_schema(helm: Helm, name: str) -> None:
    manifests = helm.template(*values_of(name))
    for manifest in manifests:
        if manifest["kind"] in CRD_SCHEMAS:
            jsonschema.validate(manifest, json.loads(CRD_SCHEMAS[manifest["kind"]].read_text()))


def test_service_monitor_scrapes_the_broker_service(helm: Helm) -> None:
    manifests = helm.template("binderhub")
    monitor = one(manifests, "ServiceMonitor")
    bad = json.loads(json.dumps(monitor))
    bad["spec"]["endpoints"][0]["scrapeTimout"] = "5s"
    with pytest.raises(jsonschema.ValidationError):  # the CRD schema is strict
        jsonschema.validate(bad, json.loads(CRD_SCHEMAS["ServiceMonitor"].read_text()))
    service = one(manifests, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["jupyter"]}
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


# -- what each value set renders -------------------------------------------------------------
EXPECTED_KINDS: dict[str, tuple[set[str], set[str]]] = {
    # name: (kinds that must be there, kinds that must not)
    "default": ({"Deployment", "Service", "ConfigMap", "Secret", "ServiceAccount", "NetworkPolicy",
                 "PodDisruptionBudget", "Pod"},
                {"Ingress", "HorizontalPodAutoscaler", "ServiceMonitor"}),
    "jupyterhub": ({"Deployment", "Service", "Ingress", "NetworkPolicy", "PodDisruptionBudget"},
                   {"HorizontalPodAutoscaler", "ServiceMonitor"}),
    "binderhub": ({"Deployment", "HorizontalPodAutoscaler", "ServiceMonitor", "NetworkPolicy",
                   "PrometheusRule"},
                  {"Ingress", "PersistentVolumeClaim"}),
    # Several upstreams (secrets.upstreams), two replicas over the in-chart Redis.
    "federation": ({"Deployment", "Service", "ConfigMap", "Secret", "NetworkPolicy",
                    "PodDisruptionBudget"},
                   {"Ingress", "HorizontalPodAutoscaler", "ServiceMonitor"}),
    "local": ({"Deployment", "Service", "ConfigMap", "Secret"},
              {"Ingress", "HorizontalPodAutoscaler", "NetworkPolicy", "PodDisruptionBudget",
               "ServiceMonitor"}),
    "z2jh": ({"Deployment", "Service", "Ingress", "NetworkPolicy", "ServiceMonitor",
              "PrometheusRule", "PersistentVolumeClaim", "Secret"},
             {"HorizontalPodAutoscaler"}),
}


def test_every_value_set_has_expectations() -> None:
    assert set(SETS) == set(EXPECTED_KINDS)


@pytest.mark.parametrize("name", SETS)
def test_value_set_renders_the_expected_objects(helm: Helm, name: str) -> None:
    kinds = {m["kind"] for m in helm.template(*values_of(name))}
    present, absent = EXPECTED_KINDS[name]
    assert present <= kinds, f"missing {present - kinds}"
    assert not (absent & kinds), f"unexpected {absent & kinds}"


@pytest.mark.parametrize("name", SETS)
def test_chart_environment_is_accepted_by_the_broker(helm: Helm, name: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The ConfigMap + Secret a pod gets parse into a valid Settings matching the values."""
    manifests = helm.template(*values_of(name))
    env = {**broker_env(manifests), **pod_env(manifests)}
    values = yaml.safe_load(VALUE_SETS[name].read_text()) if name in VALUE_SETS else {}
    existing = values.get("existingSecret")
    for key in [k for k in os.environ if k.startswith("BROKER_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.host == "0.0.0.0"
    config = values.get("config", {})
    assert settings.backend == config.get("backend", "local")
    for key, value in config.items():
        assert getattr(settings, key) == value, key
    redis = values.get("redis", {})
    if redis.get("url"):
        assert settings.redis_url == redis["url"]
    elif redis.get("enabled"):
        password = secret_data(manifests, "t-session-broker-redis")["redis-password"]
        assert len(password) >= 32
        assert settings.redis_url == f"redis://:{password}@t-session-broker-redis:6379/0"
    else:
        assert settings.redis_url == ""
    # A secret key is always there (generated unless given), so Redis setups start.
    assert len(settings.secret_key.get_secret_value()) >= 32
    given = values.get("secrets", {}).get("secret_key")
    if given:
        assert settings.secret_key.get_secret_value() == given
    # The pod loads the operator's Secret after the chart's, so its keys win.
    env_from = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    refs = [next(iter(e.values()))["name"] for e in env_from]
    assert refs == ["t-session-broker", "t-session-broker", *([existing] if existing else [])]


@pytest.mark.parametrize("name", SETS)
def test_secrets_never_reach_the_configmap(helm: Helm, name: str) -> None:
    manifests = helm.template(*values_of(name))
    data = one(manifests, "ConfigMap")["data"]
    assert not SECRET_ENV & set(data), "a secret setting is in the ConfigMap"
    secret_keys = set(one(manifests, "Secret")["data"])
    assert secret_keys >= SECRET_ENV
    # Nothing secret appears in clear text anywhere in the rendered output.
    values = yaml.safe_load(VALUE_SETS[name].read_text()) if name in VALUE_SETS else {}
    clear = [v for v in values.get("secrets", {}).values() if v]
    if values.get("redis", {}).get("url"):
        clear.append(values["redis"]["url"])
        assert "BROKER_REDIS_URL" in secret_keys and "BROKER_REDIS_URL" not in data
    text = helm.template_text(*values_of(name))
    for value in clear:
        assert value not in text


def secret_data(manifests: list[Manifest], name: str) -> dict[str, str]:
    """The decoded data of the rendered Secret called ``name``."""
    [secret] = [m for m in manifests if m["kind"] == "Secret" and m["metadata"]["name"] == name]
    return {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}


def pod_env(manifests: list[Manifest]) -> dict[str, str]:
    """The broker container's own ``env`` as the kubelet resolves it.

    A ``secretKeyRef`` to a Secret the chart renders reads it; one to a Secret
    the chart does not own (z2jh's "hub") stands in as ``<name>/<key>``.
    ``$(VAR)`` references to earlier variables are expanded, as Kubernetes does.
    """
    container = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    rendered = {m["metadata"]["name"] for m in manifests if m["kind"] == "Secret"}
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "valueFrom" in var:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = (secret_data(manifests, ref["name"])[ref["key"]]
                                if ref["name"] in rendered else f"{ref['name']}/{ref['key']}")
        else:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], var["value"])
    return env


def test_configmap_holds_every_config_value(helm: Helm) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    data = one(helm.template(), "ConfigMap")["data"]
    assert set(data) == {f"BROKER_{k.upper()}" for k in values["config"]}
    # Lists are comma-joined, numbers never in exponent notation.
    data = one(helm.template("local"), "ConfigMap")["data"]
    assert data["BROKER_LOCAL_SERVER_ARGS"] == (
        "--ServerApp.shutdown_no_activity_timeout=1800,"
        "--MappingKernelManager.cull_idle_timeout=600")
    assert data["BROKER_WS_MAX_MESSAGE_SIZE"] == "67108864"
    assert one(helm.template("jupyterhub"), "ConfigMap")["data"]["BROKER_SPAWN_TIMEOUT"] == "300.5"


def _pod_annotations(manifests: list[Manifest]) -> dict[str, str]:
    return dict(one(manifests, "Deployment")["spec"]["template"]["metadata"]["annotations"])


def test_checksums_roll_pods_on_config_and_secret_changes(helm: Helm) -> None:
    base = _pod_annotations(helm.template())
    assert base == _pod_annotations(helm.template(sets={"replicas": 1}))  # stable across renders
    config = _pod_annotations(helm.template(sets={"config.max_sessions": 7}))
    assert config["checksum/config"] != base["checksum/config"]
    assert config["checksum/secret"] == base["checksum/secret"]
    secret = _pod_annotations(helm.template(sets={"secrets.admin_token": "rotated"}))
    assert secret["checksum/secret"] != base["checksum/secret"]
    assert secret["checksum/config"] == base["checksum/config"]


@pytest.mark.parametrize("name", SETS)
def test_pods_meet_the_restricted_pod_security_standard(helm: Helm, name: str) -> None:
    for manifest in helm.template(*values_of(name)):
        if manifest["kind"] == "Deployment":
            pod = manifest["spec"]["template"]["spec"]
        elif manifest["kind"] == "Pod":
            pod = manifest["spec"]
        else:
            continue
        where = f"{manifest['kind']}/{manifest['metadata']['name']}"
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        assert pod["automountServiceAccountToken"] is False, where
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, where
            assert ctx["capabilities"]["drop"] == ["ALL"], where
            assert ctx["readOnlyRootFilesystem"] is True, where
            assert "resources" in container, where


def test_broker_probes_use_health_and_ready(helm: Helm) -> None:
    container = one(helm.template(), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["ports"] == [{"name": "http", "containerPort": 8765, "protocol": "TCP"},
                                  {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    # The broker gives each readiness check 3 s; the probe must wait longer.
    assert container["readinessProbe"]["timeoutSeconds"] > 3


def test_replicas_and_autoscaling(helm: Helm) -> None:
    deployment = one(helm.template("jupyterhub"), "Deployment")
    assert deployment["spec"]["replicas"] == 3
    manifests = helm.template("binderhub")
    assert "replicas" not in one(manifests, "Deployment")["spec"]  # the HPA owns it
    hpa = one(manifests, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(manifests, "Deployment")["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    redis = one(manifests, "Deployment", component="redis")
    assert redis["spec"]["replicas"] == 1
    assert one(manifests, "Service", component="redis")["metadata"]["name"] == \
        "t-session-broker-redis"


def test_ingress_routes_to_the_service_with_websocket_timeouts(helm: Helm) -> None:
    manifests = helm.template("jupyterhub")
    ingress = one(manifests, "Ingress")
    service = one(manifests, "Service")
    [rule] = ingress["spec"]["rules"]
    assert rule["host"] == "broker.example.org"
    [path] = rule["http"]["paths"]
    assert path["backend"]["service"] == {"name": service["metadata"]["name"],
                                          "port": {"name": "http"}}
    annotations = ingress["metadata"]["annotations"]
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600


def test_network_policy_allows_only_ingress_controller_dns_redis_and_upstream(helm: Helm) -> None:
    manifests = helm.template("binderhub")
    policy = one(manifests, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "broker"
    ingress, metrics = policy["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]
    # The metrics port is Prometheus's alone (test_chart_ops.py has the details).
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert [p["podSelector"] for p in metrics["from"]] == [
        {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}]
    peers = ingress["from"]
    assert {"podSelector": {"matchLabels": {"t-session-broker-client": "true"}}} in peers
    assert any(p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name")
               == "ingress-nginx" for p in peers)
    egress = policy["spec"]["egress"]
    dns, redis, upstream = egress
    assert "to" not in dns and {p["port"] for p in dns["ports"]} == {53}
    assert redis["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"
    assert redis["ports"] == [{"port": 6379, "protocol": "TCP"}]
    assert upstream["to"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "binderhub"}}}]
    # Every egress rule is bounded by a destination or by port 53.
    for rule in egress:
        assert rule.get("to") or {p["port"] for p in rule["ports"]} == {53}
    # Redis accepts broker pods only and connects nowhere.
    redis_policy = one(manifests, "NetworkPolicy", component="redis")
    [redis_in] = redis_policy["spec"]["ingress"]
    assert redis_in["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == \
        "broker"
    assert redis_policy["spec"]["egress"] == []


def test_grafana_dashboard_configmap_ships_the_dashboard_file(helm: Helm) -> None:
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["panels"]
    assert not find(helm.template(), "ConfigMap", component="dashboard")
    configmap = one(helm.template("binderhub"), "ConfigMap", component="dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["session-broker.json"]) == dashboard


NOTES_EXPECTED: dict[str, list[str]] = {
    "default": ["Backend: local", "in-process memory", "port-forward service/t-session-broker",
                "admin API (/api/v1/admin/...) is off"],
    "jupyterhub": ["Backend: jupyterhub (http://hub:8081)", "Store:   Redis", "Replicas: 3",
                   "https://broker.example.org/"],
    "binderhub": ["Backend: binderhub", "Redis (in-chart valkey/valkey, not persistent",
                  "Replicas: 2-10 (HPA)", "must reach BinderHub"],
    "local": ["Backend: local", "Replicas: 1", "config.public_url is empty"],
    "federation": ["Backend: federation of several upstreams", "Replicas: 2",
                   "Store:   Redis"],
    "z2jh": ["Backend: jupyterhub (http://hub:8081)", "Redis (in-chart valkey/valkey, persistent)",
             "Hub token: key hub.services.session-broker.apiToken of Secret hub"],
}


@pytest.mark.parametrize("name", SETS)
def test_notes_render_and_say_what_was_deployed(helm: Helm, name: str) -> None:
    """NOTES.txt is not rendered by `helm template`; a client-side dry-run install renders it."""
    args = ["install", "t", str(CHART), "--dry-run=client", "--namespace", "jupyter",
            *Helm._value_args(values_of(name), None)]
    proc = helm.run(*args)
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    for line in NOTES_EXPECTED[name]:
        assert line in notes, f"{line!r} not in NOTES:\n{notes}"
    assert "hub.jupyter.org/network-access-hub" not in notes  # the jupyterhub set labels its pods


def test_notes_remind_to_label_pods_for_z2jh(helm: Helm, tmp_path: Path) -> None:
    values = tmp_path / "hub.yaml"
    values.write_text(yaml.safe_dump({"config": {"backend": "jupyterhub", "hub_url": "http://hub"},
                                      "secrets": {"hub_api_token": "t"}}))
    proc = helm.run("install", "t", str(CHART), "--dry-run=client", "--values", str(values))
    assert proc.returncode == 0, proc.stderr
    assert 'hub.jupyter.org/network-access-hub: "true"' in proc.stdout.split("NOTES:", 1)[1]


# -- helm test -------------------------------------------------------------------------------
class _Ready(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/ready" else 404)
        self.end_headers()
        self.wfile.write(b'{"ok": true}')

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def ready_server() -> Iterator[tuple[str, type[_Ready]]]:
    handler = type("Handler", (_Ready,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_helm_test_pod_checks_ready(helm: Helm,
                                    ready_server: tuple[str, type[_Ready]]) -> None:
    """The test pod's script, run here against a fake /ready: 200 passes, 503 fails."""
    pod = one(helm.template(), "Pod", component="test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["metadata"]["labels"]["t-session-broker-client"] == "true"
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["READY_URL"] == "http://t-session-broker:80/ready"
    assert container["image"] == one(helm.template(), "Deployment")["spec"]["template"]["spec"][
        "containers"][0]["image"]
    command = [sys.executable, *container["command"][1:]]
    url, handler = ready_server
    run_env = {**os.environ, "READY_URL": f"{url}/ready", "TIMEOUT": "1"}
    assert subprocess.run(command, env=run_env, capture_output=True, timeout=30).returncode == 0
    handler.status = 503
    proc = subprocess.run(command, env=run_env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "not ready: 503" in proc.stderr


# -- refusing bad values ---------------------------------------------------------------------
def _expectations(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^# (lint|template): (.+)$", path.read_text(), flags=re.M))


def test_there_are_invalid_value_files() -> None:
    assert len(INVALID) >= 5
    for path in INVALID:
        assert "lint" in _expectations(path), f"{path.name} has no '# lint:' expectation"


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_values_fail_helm_lint(helm: Helm, path: Path) -> None:
    proc = helm.lint(path)
    assert proc.returncode != 0, f"helm lint accepted {path.name}"
    assert _expectations(path)["lint"] in proc.stdout + proc.stderr


@pytest.mark.parametrize("path", [p for p in INVALID if "template" in _expectations(p)],
                         ids=lambda p: p.stem)
def test_templates_refuse_invalid_values_with_a_clear_message(helm: Helm, path: Path) -> None:
    """Even without the schema (--skip-schema-validation) the templates refuse, and say why."""
    proc = helm.run("template", "t", str(CHART), "--skip-schema-validation", "--values", str(path))
    assert proc.returncode != 0
    assert _expectations(path)["template"] in proc.stderr


def test_templates_refuse_a_drain_longer_than_the_grace_period(helm: Helm) -> None:
    proc = helm.run("template", "t", str(CHART), "--set", "config.shutdown_drain=45")
    assert proc.returncode != 0
    assert "must stay below terminationGracePeriodSeconds" in proc.stderr
    ok = helm.run("template", "t", str(CHART), "--set", "config.shutdown_drain=45",
                  "--set", "terminationGracePeriodSeconds=60")
    assert ok.returncode == 0, ok.stderr


# -- the schema itself ---------------------------------------------------------------------
def _walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    for key, prop in schema.get("properties", {}).items():
        yield f"{path}.{key}".lstrip("."), prop
        yield from _walk(prop, f"{path}.{key}")


def test_schema_describes_every_value_and_allows_no_unknown_keys() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    undescribed = [path for path, prop in _walk(schema) if not prop.get("description")]
    assert not undescribed, f"values without a description: {undescribed}"
    open_objects = [path for path, prop in _walk(schema)
                    if "properties" in prop and prop.get("additionalProperties") is not False]
    assert not open_objects, f"objects accepting unknown keys: {open_objects}"


def test_every_default_value_is_in_the_schema() -> None:
    """values.yaml holds nothing the schema does not describe (helm lint checks types)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    described = {path for path, _ in _walk(schema)}
    open_prefixes = {path for path, prop in _walk(schema) if "properties" not in prop}

    def leaves(node: Any, path: str = "") -> Iterator[str]:
        if isinstance(node, dict) and path not in open_prefixes:
            for key, value in node.items():
                yield from leaves(value, f"{path}.{key}".lstrip("."))
        else:
            yield path

    missing = [p for p in leaves(values) if p not in described]
    assert not missing, f"values.yaml keys missing from the schema: {missing}"


def test_generated_secret_key_is_random_unless_given(helm: Helm) -> None:
    def key(sets: dict[str, Any]) -> str:
        # Fresh renders: without a cluster to look the stored key up, each one draws a new key.
        text = helm.template_text(sets=sets, fresh=True)
        data = one([d for d in yaml.safe_load_all(text) if d], "Secret")["data"]
        return base64.b64decode(data["BROKER_SECRET_KEY"]).decode()

    first, second = key({}), key({})
    assert len(first) == 64 and first != second
    assert key({"secrets.secret_key": "given-key"}) == "given-key"


def test_chart_files_live_in_the_repository() -> None:
    """The value sets and invalid cases the checks rely on exist (a rename would skip them)."""
    assert {"jupyterhub", "binderhub", "local"} <= set(VALUE_SETS)
    assert (ROOT / "scripts" / "setup.d" / "helm.sh").exists()
