"""The chart fits the installs it sits next to (issue #16): hub wiring, network policy,
extension points and the in-chart Redis/Valkey.

Rendered with ``helm template`` and, where objects change shape, validated
with ``kubernetes-validate --strict``. The in-chart store's arguments are run
by a real ``redis-server`` with the URL the broker pod would get.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from tests.conftest import free_port
from tests.deploy.conftest import Helm, Manifest, one
from tests.deploy.test_chart import kubernetes_validate, pod_env, secret_data

Z2JH_TOKEN = {"name": "hub", "key": "hub.services.session-broker.apiToken"}
HUB = {"config.backend": "jupyterhub", "config.hub_url": "http://hub:8081"}


def container(manifests: list[Manifest], component: str = "broker") -> dict[str, Any]:
    found: dict[str, Any] = one(manifests, "Deployment", component)["spec"]["template"][
        "spec"]["containers"][0]
    return found


def env_refs(manifests: list[Manifest]) -> dict[str, dict[str, str]]:
    """The broker container's variables that come from a Secret key."""
    return {v["name"]: v["valueFrom"]["secretKeyRef"] for v in container(manifests).get("env", [])
            if "valueFrom" in v}


# -- hub wiring -------------------------------------------------------------------------------
def test_hub_token_is_read_from_z2jh_secret_by_default(helm: Helm) -> None:
    """Nothing copied by hand: the key z2jh generates for hub.services.session-broker."""
    manifests = helm.template(sets=HUB)
    assert env_refs(manifests)["BROKER_HUB_API_TOKEN"] == Z2JH_TOKEN
    # It wins over the chart's (empty) Secret value and is the only token source.
    assert secret_data(manifests, "t-session-broker")["BROKER_HUB_API_TOKEN"] == ""
    # Any other Secret key, BinderHub-style.
    other = helm.template(sets={**HUB, "hubApiToken.secretKeyRef.name": "my-tokens",
                                "hubApiToken.secretKeyRef.key": "broker"})
    assert env_refs(other)["BROKER_HUB_API_TOKEN"] == {"name": "my-tokens", "key": "broker"}


def test_hub_token_given_or_from_existing_secret_needs_no_secret_ref(helm: Helm) -> None:
    given = helm.template("jupyterhub")  # secrets.hub_api_token is set there
    assert "BROKER_HUB_API_TOKEN" not in env_refs(given)
    own = helm.template(sets={**HUB, "existingSecret": "mine", "hubApiToken.secretKeyRef.name": ""})
    assert "BROKER_HUB_API_TOKEN" not in env_refs(own)
    # Other backends never read the hub's Secret.
    assert "BROKER_HUB_API_TOKEN" not in env_refs(helm.template())


def test_binderhub_token_from_a_secret_key(helm: Helm) -> None:
    assert "BROKER_BINDER_HUB_API_TOKEN" not in env_refs(helm.template("binderhub"))
    manifests = helm.template("binderhub", sets={"binderHubApiToken.secretKeyRef.name": "hub"})
    assert env_refs(manifests)["BROKER_BINDER_HUB_API_TOKEN"] == Z2JH_TOKEN
    # Without pod changes a rotated reference would not apply: it rolls the pods.
    before = one(helm.template("binderhub"), "Deployment")["spec"]["template"]["metadata"]
    after = one(manifests, "Deployment")["spec"]["template"]["metadata"]
    assert before["annotations"]["checksum/secret"] != after["annotations"]["checksum/secret"]


# -- network policy ---------------------------------------------------------------------------
def ingress_rules(manifests: list[Manifest], port: str = "http") -> list[dict[str, Any]]:
    """The broker NetworkPolicy's ingress rules for one container port."""
    rules: list[dict[str, Any]] = one(manifests, "NetworkPolicy")["spec"]["ingress"]
    return [r for r in rules if [p["port"] for p in r["ports"]] == [port]]


CLIENT = {"podSelector": {"matchLabels": {"t-session-broker-client": "true"}}}
PRESETS: dict[str, list[dict[str, Any]]] = {
    "ingress-nginx": [CLIENT, {"namespaceSelector": {}, "podSelector": {
        "matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}}}],
    "traefik": [CLIENT, {"namespaceSelector": {}, "podSelector": {
        "matchLabels": {"app.kubernetes.io/name": "traefik"}}}],
    "any-namespace": [CLIENT, {"namespaceSelector": {}}],
    "none": [CLIENT],
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_network_policy_controller_presets(helm: Helm, preset: str) -> None:
    [rule] = ingress_rules(helm.template(sets={"networkPolicy.ingress.controller": preset}))
    assert rule["from"] == PRESETS[preset]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]


def test_network_policy_anywhere_and_controller_namespace(helm: Helm, tmp_path: Path) -> None:
    anywhere = helm.template_text(sets={"networkPolicy.ingress.controller": "anywhere"})
    [rule] = ingress_rules([d for d in yaml.safe_load_all(anywhere) if d])
    assert rule == {"ports": [{"port": "http", "protocol": "TCP"}]}  # no `from`: any source
    pinned = helm.template_text(sets={"networkPolicy.ingress.controller": "traefik",
                                      "networkPolicy.ingress.controllerNamespace": "kube-system"})
    [rule] = ingress_rules([d for d in yaml.safe_load_all(pinned) if d])
    assert rule["from"][1] == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "traefik"}}}
    rendered = tmp_path / "presets.yaml"
    rendered.write_text(anywhere + "\n---\n" + pinned)
    proc = kubernetes_validate(rendered)
    assert proc.returncode == 0, proc.stdout + proc.stderr


PROMETHEUS = {"namespaceSelector": {},
              "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}


def public_metrics(tmp_path: Path) -> Path:
    """Values that set config.metrics_port to null (--set cannot: it would be a string)."""
    path = tmp_path / "public-metrics.yaml"
    path.write_text("config:\n  metrics_port: null\n")
    return path


def test_prometheus_reaches_the_metrics_port_only(helm: Helm) -> None:
    for sets in ({}, {"serviceMonitor.enabled": True},
                 {"networkPolicy.ingress.controller": "anywhere"}):
        manifests = helm.template(sets=sets)
        [public] = ingress_rules(manifests)
        assert PROMETHEUS not in public.get("from", []), sets
        [metrics] = ingress_rules(manifests, "metrics")
        assert metrics["from"] == [PROMETHEUS], sets  # no controller, no client, nobody else
    [binder] = ingress_rules(helm.template("binderhub"), "metrics")  # Prometheus in "monitoring"
    assert binder["from"] == [{**PROMETHEUS, "namespaceSelector": {
        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


def test_public_metrics_admit_prometheus_when_the_service_monitor_is_on(
        helm: Helm, tmp_path: Path) -> None:
    """config.metrics_port null: metrics on the public port, as before the metrics port."""
    [off] = ingress_rules(helm.template(public_metrics(tmp_path)))
    assert PROMETHEUS not in off["from"]
    on = helm.template(public_metrics(tmp_path), sets={"serviceMonitor.enabled": True})
    assert PROMETHEUS in ingress_rules(on)[0]["from"]
    assert ingress_rules(on, "metrics") == []
    assert one(on, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "http"
    assert [p["name"] for p in one(on, "Service")["spec"]["ports"]] == ["http"]
    assert [p["name"] for p in container(on)["ports"]] == ["http"]
    assert "BROKER_METRICS_PORT" not in one(on, "ConfigMap")["data"]


def test_metrics_port_is_served_scraped_and_never_routed(helm: Helm, tmp_path: Path) -> None:
    text = helm.template_text("jupyterhub", sets={"serviceMonitor.enabled": True})
    manifests = [d for d in yaml.safe_load_all(text) if d]
    assert one(manifests, "ConfigMap")["data"]["BROKER_METRICS_PORT"] == "9090"
    assert {p["name"]: p["containerPort"] for p in container(manifests)["ports"]} == \
        {"http": 8765, "metrics": 9090}
    ports = {p["name"]: p for p in one(manifests, "Service")["spec"]["ports"]}
    assert ports["metrics"]["targetPort"] == "metrics" and ports["metrics"]["port"] == 9090
    [endpoint] = one(manifests, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    [rule] = one(manifests, "Ingress")["spec"]["rules"]
    assert [p["backend"]["service"]["port"] for p in rule["http"]["paths"]] == [{"name": "http"}]
    # The probes stay on the public port, which serves /health and /ready.
    assert container(manifests)["readinessProbe"]["httpGet"]["port"] == "http"
    rendered = tmp_path / "metrics-port.yaml"
    rendered.write_text(text)
    proc = kubernetes_validate(rendered)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- extension points ---------------------------------------------------------------------------
def test_extension_points_reach_the_broker_pod(helm: Helm) -> None:
    """The z2jh value set mounts the deny list from a ConfigMap, as docs/deployment.md shows."""
    manifests = helm.template("z2jh")
    values = yaml.safe_load((Path(__file__).parents[2] / "helm" / "session-broker" / "ci" /
                             "z2jh-values.yaml").read_text())
    pod = one(manifests, "Deployment")["spec"]["template"]
    broker = pod["spec"]["containers"][0]
    assert {"name": "TZ", "value": "UTC"} in broker["env"]
    assert values["extraVolumes"][0] in pod["spec"]["volumes"]
    mount = values["extraVolumeMounts"][0]
    assert mount in broker["volumeMounts"]
    assert one(manifests, "ConfigMap")["data"]["BROKER_DENY_LIST_FILE"].startswith(
        mount["mountPath"] + "/")
    assert pod["spec"]["initContainers"] == values["initContainers"]
    assert [c["name"] for c in pod["spec"]["containers"]] == ["broker", "log-shipper"]
    assert broker["lifecycle"] == values["lifecycle"]
    assert pod["spec"]["priorityClassName"] == "jupyter-core"
    assert pod["metadata"]["annotations"]["example.org/owner"] == "docs-team"
    assert pod["metadata"]["labels"]["hub.jupyter.org/network-access-hub"] == "true"
    # Nothing of the kind by default.
    default = one(helm.template(), "Deployment")["spec"]["template"]["spec"]
    assert "initContainers" not in default and len(default["containers"]) == 1
    assert "lifecycle" not in default["containers"][0]


def test_topology_spread_defaults(helm: Helm) -> None:
    spread = one(helm.template(), "Deployment")["spec"]["template"]["spec"][
        "topologySpreadConstraints"]
    assert [c["topologyKey"] for c in spread] == ["kubernetes.io/hostname",
                                                   "topology.kubernetes.io/zone"]
    selector = one(helm.template(), "Deployment")["spec"]["selector"]
    for constraint in spread:
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
        assert constraint["labelSelector"] == selector
    # Your own constraints replace them; they can be switched off.
    own = one(helm.template("jupyterhub"), "Deployment")["spec"]["template"]["spec"]
    assert len(own["topologySpreadConstraints"]) == 1
    off = one(helm.template(sets={"defaultTopologySpread": False}), "Deployment")
    assert "topologySpreadConstraints" not in off["spec"]["template"]["spec"]


# -- in-chart Redis / Valkey ----------------------------------------------------------------------
def test_in_chart_store_is_valkey_with_a_password_and_protected_mode(helm: Helm) -> None:
    manifests = helm.template(sets={"redis.enabled": True})
    store = container(manifests, "redis")
    assert store["image"].startswith("valkey/valkey:")
    assert "command" not in store  # the image's entrypoint picks valkey-server / redis-server
    args = store["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert args[args.index("--protected-mode") + 1] == "yes"
    assert args[args.index("--appendonly") + 1] == "no"
    [ref] = [v["valueFrom"]["secretKeyRef"] for v in store["env"] if v["name"] == "REDIS_PASSWORD"]
    assert ref == {"name": "t-session-broker-redis", "key": "redis-password"}
    password = secret_data(manifests, "t-session-broker-redis")["redis-password"]
    assert len(password) >= 32 and password.isalnum()
    # The broker's URL carries that password; the chart's Secret does not repeat it.
    assert pod_env(manifests)["BROKER_REDIS_URL"] == \
        f"redis://:{password}@t-session-broker-redis:6379/0"
    assert "BROKER_REDIS_URL" not in secret_data(manifests, "t-session-broker")
    assert not [m for m in manifests if m["kind"] == "PersistentVolumeClaim"]


def test_in_chart_store_password_is_random_unless_given(helm: Helm) -> None:
    def password(sets: dict[str, Any]) -> str:
        text = helm.template_text(sets={"redis.enabled": True, **sets}, fresh=True)
        return secret_data([d for d in yaml.safe_load_all(text) if d],
                           "t-session-broker-redis")["redis-password"]

    assert password({}) != password({})  # no cluster to look the stored one up in
    assert password({"redis.auth.password": "Given123"}) == "Given123"


def test_in_chart_store_persistence(helm: Helm, tmp_path: Path) -> None:
    text = helm.template_text(sets={"redis.enabled": True, "redis.persistence.enabled": True,
                                    "redis.persistence.size": "5Gi",
                                    "redis.persistence.storageClass": "fast"})
    manifests = [d for d in yaml.safe_load_all(text) if d]
    claim = one(manifests, "PersistentVolumeClaim", "redis")
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert claim["spec"]["storageClassName"] == "fast"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    pod = one(manifests, "Deployment", "redis")["spec"]["template"]["spec"]
    [data] = [v for v in pod["volumes"] if v["name"] == "data"]
    assert data == {"name": "data",
                    "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
    args = pod["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    rendered = tmp_path / "persistent.yaml"
    rendered.write_text(text)
    proc = kubernetes_validate(rendered)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- the rendered store arguments, run by a real redis-server --------------------------------
def _start(args: list[str], workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `make test`, which installs it")
    port = free_port()
    proc = subprocess.Popen([binary, *args, "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    return proc, port


def _wait_up(client: redis.Redis, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15  # polling an external process, bounded
    while True:
        assert proc.poll() is None, f"redis-server exited with {proc.returncode}"
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def stores() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


def test_rendered_store_arguments_run_on_a_real_redis(
        helm: Helm, tmp_path: Path, stores: list[subprocess.Popen[bytes]]) -> None:
    """With the pod's password the broker's URL works, without it the store refuses; with
    persistence a key written before a restart is there after it."""
    manifests = helm.template(sets={"redis.enabled": True, "redis.persistence.enabled": True})
    password = secret_data(manifests, "t-session-broker-redis")["redis-password"]
    args = [a.replace("$(REDIS_PASSWORD)", password) for a in container(manifests, "redis")["args"]]
    url = pod_env(manifests)["BROKER_REDIS_URL"]

    proc, port = _start(args, tmp_path)
    stores.append(proc)
    client = redis.Redis.from_url(url.replace("t-session-broker-redis:6379", f"127.0.0.1:{port}"))
    _wait_up(client, proc)
    client.set("broker:probe", "kept")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=port).get("broker:probe")
    assert client.config_get("protected-mode") == {"protected-mode": "yes"}
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}

    proc.terminate()
    assert proc.wait(10) == 0
    proc, port = _start(args, tmp_path)
    stores.append(proc)
    client = redis.Redis.from_url(url.replace("t-session-broker-redis:6379", f"127.0.0.1:{port}"))
    _wait_up(client, proc)
    assert client.get("broker:probe") == b"kept"


def test_external_store_over_tls(helm: Helm) -> None:
    """The production recommendation: your own Redis/Valkey, rediss:// for TLS, kept secret."""
    url = "rediss://:s3cret@valkey.store.svc:6380/0"
    manifests = helm.template(sets={"redis.url": url})
    assert secret_data(manifests, "t-session-broker")["BROKER_REDIS_URL"] == url
    assert "BROKER_REDIS_URL" not in pod_env(manifests)  # no in-chart store wiring
    assert not [m for m in manifests if m["metadata"]["name"] == "t-session-broker-redis"]
    proc = helm.lint(sets={"redis.url": "http://valkey.store.svc:6379"})
    assert proc.returncode != 0 and "/redis/url" in proc.stdout + proc.stderr
