"""Deployment artefacts: the kustomize manifests, the Dockerfile and the Grafana dashboard.

Pure checks, no cluster and no services. Every overlay is rendered twice: by a small renderer of
the kustomize subset the manifests use (always, so a CI without kubectl still checks them) and by
`kubectl kustomize` where kubectl is installed, which must agree with it. The rendered objects
are validated against the Kubernetes OpenAPI schemas of KUBERNETES_VERSIONS (kubernetes-validate,
strict: unknown fields fail) and the CRDs (PodMonitor, PrometheusRule, ScaledObject,
TriggerAuthentication) against schemas written down here from their published CRDs. Then the
manifests are held to the daemon's own facts: its HTTP port and probe paths (consumer.config,
consumer.health), its drain timeout, its settings table, and the metric names the dashboard
queries (consumer.metrics). The alert rules are checked in tests/test_alerts.py.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from consumer.config import KAFKA_PROPERTY_ENV, OPTIONS, Option, load_settings
from consumer.health import HEALTH_PATH, METRICS_PATH, READY_PATH
from consumer.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("dev", "prod")
# The oldest Kubernetes minor the manifests promise (the namespaces' Pod Security version too),
# and the newest one kubernetes-validate ships schemas for.
KUBERNETES_VERSIONS = ("1.30", "1.37")
DASHBOARD = DEPLOY / "grafana" / "textlocal-consumer.json"
DOCKERFILE = DEPLOY / "Dockerfile"
SECRET_NAME = "textlocal-consumer-credentials"
CONTAINER = "textlocal-consumer"
PARTITIONS_ANNOTATION = "textlocal-consumer/input-topic-partitions"
# After the drain the daemon waits up to 5 s more for its roles and 10 s for the outbox, then
# closes its clients (consumer.app.Daemon._finish): the grace period must cover all of it.
SHUTDOWN_AFTER_DRAIN_S = 20

Manifest = dict[str, Any]


# --- a renderer for the kustomize subset the manifests use ---------------------------------------

_KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "namespace",
    "labels",
    "resources",
    "components",
    "configMapGenerator",
    "images",
    "patches",
}
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
_POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def render_kustomization(directory: Path) -> list[Manifest]:
    """The objects `kubectl kustomize directory` prints, for the features used here.

    Supported: resources (files and directories), components, namespace, labels (with
    includeTemplates), configMapGenerator (envs, options.labels, behavior create/merge, with a
    content-hash name suffix and the references to it renamed), images, and JSON 6902 patches
    with a kind/name target. Anything else raises, so a new feature is never silently ignored.
    """
    generated: set[str] = set()
    objects = _build(directory, [], generated, component=False)
    renamed = {}
    for obj in objects:
        name = obj["metadata"]["name"]
        if obj["kind"] == "ConfigMap" and name in generated:
            renamed[name] = f"{name}-{_content_hash(obj)}"
            obj["metadata"]["name"] = renamed[name]
    for obj in objects:
        _rename_config_map_refs(obj, renamed)
    return objects


def _build(
    directory: Path, inherited: list[Manifest], generated: set[str], *, component: bool
) -> list[Manifest]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    unsupported = sorted(set(spec) - _KUSTOMIZATION_FIELDS)
    if unsupported:
        raise NotImplementedError(f"{directory}: the test renderer does not know {unsupported}")
    expected_kind = "Component" if component else "Kustomization"
    if spec.get("kind", "Kustomization") != expected_kind:
        raise ValueError(f"{directory}: expected kind {expected_kind}")
    objects = list(inherited)
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects += _build(path, [], generated, component=False)
        else:
            text = path.read_text(encoding="utf-8")
            objects += [doc for doc in yaml.safe_load_all(text) if doc]
    for entry in spec.get("components", []):
        objects = _build(directory / entry, objects, generated, component=True)
    for generator in spec.get("configMapGenerator", []):
        _generate_config_map(directory, generator, objects, generated)
    for patch in spec.get("patches", []):
        _apply_patch(patch, objects)
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in _CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    for labels in spec.get("labels", []):
        if labels.get("includeSelectors"):
            raise NotImplementedError("labels.includeSelectors")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(labels["pairs"])
            if labels.get("includeTemplates") and obj["kind"] in _POD_TEMPLATE_KINDS:
                template = obj["spec"]["template"].setdefault("metadata", {})
                template.setdefault("labels", {}).update(labels["pairs"])
    for image in spec.get("images", []):
        for container in _all_containers(objects):
            _set_image(container, image)
    return objects


def _generate_config_map(
    directory: Path, generator: Manifest, objects: list[Manifest], generated: set[str]
) -> None:
    unsupported = sorted(set(generator) - {"name", "envs", "behavior", "options"})
    if unsupported:
        raise NotImplementedError(f"configMapGenerator fields {unsupported}")
    data: dict[str, str] = {}
    for env_file in generator.get("envs", []):
        data.update(read_env_file(directory / env_file))
    name = generator["name"]
    existing = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name]
    behavior = generator.get("behavior", "create")
    if behavior == "merge":
        if len(existing) != 1 or name not in generated:
            raise ValueError(f"configMapGenerator {name}: nothing generated to merge into")
        existing[0]["data"].update(data)
        config_map = existing[0]
    elif behavior == "create":
        if existing:
            raise ValueError(f"configMapGenerator {name}: already exists")
        config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}}
        config_map["data"] = data
        objects.append(config_map)
        generated.add(name)
    else:
        raise NotImplementedError(f"configMapGenerator behavior {behavior}")
    option_labels = generator.get("options", {}).get("labels", {})
    if option_labels:
        config_map["metadata"].setdefault("labels", {}).update(option_labels)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as kustomize reads them: blank lines and # comments skipped, values
    taken literally (no quotes removed)."""
    data: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.lstrip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path}: {key!r} has no '='")
        data[key] = value
    return data


def _content_hash(config_map: Manifest) -> str:
    """A 10-character suffix from the content, in kustomize's alphabet. (Its exact value can
    differ from kubectl's; the comparison with kubectl normalises suffixes.)"""
    encoded = json.dumps(
        {"kind": "ConfigMap", "name": config_map["metadata"]["name"], "data": config_map["data"]},
        sort_keys=True,
        separators=(",", ":"),
    )
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _rename_config_map_refs(node: object, renamed: dict[str, str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if (
                key in {"configMapRef", "configMapKeyRef", "configMap"}
                and isinstance(value, dict)
                and value.get("name") in renamed
            ):
                value["name"] = renamed[value["name"]]
            _rename_config_map_refs(value, renamed)
    elif isinstance(node, list):
        for item in node:
            _rename_config_map_refs(item, renamed)


def _apply_patch(patch: Manifest, objects: list[Manifest]) -> None:
    target = patch["target"]
    if set(target) - {"kind", "name"} or "path" in patch:
        raise NotImplementedError(f"patch form {sorted(patch)} / target {sorted(target)}")
    matches = [
        o
        for o in objects
        if o["kind"] == target["kind"] and o["metadata"]["name"] == target.get("name")
    ]
    if not matches:
        raise ValueError(f"patch target {target} matches nothing")
    operations = yaml.safe_load(patch["patch"])
    for obj in matches:
        for operation in operations:
            _json_patch(obj, operation)


def _json_patch(document: Manifest, operation: Manifest) -> None:
    steps = [
        part.replace("~1", "/").replace("~0", "~")
        for part in operation["path"].lstrip("/").split("/")
    ]
    parent: Any = document
    for step in steps[:-1]:
        parent = parent[int(step)] if isinstance(parent, list) else parent[step]
    last, op = steps[-1], operation["op"]
    value = copy.deepcopy(operation.get("value"))
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if op == "add":
            parent.insert(index, value)
        elif op == "replace":
            parent[index] = value
        elif op == "remove":
            del parent[index]
        else:
            raise NotImplementedError(f"JSON patch op {op}")
    elif op == "add":
        parent[last] = value
    elif op in {"replace", "remove"}:
        if last not in parent:
            raise KeyError(f"JSON patch {op} {operation['path']}: no such field")
        if op == "replace":
            parent[last] = value
        else:
            del parent[last]
    else:
        raise NotImplementedError(f"JSON patch op {op}")


def _all_containers(objects: list[Manifest]) -> Iterator[Manifest]:
    for obj in objects:
        if obj["kind"] in _POD_TEMPLATE_KINDS:
            pod = obj["spec"]["template"]["spec"]
            yield from pod.get("initContainers", [])
            yield from pod["containers"]


def _set_image(container: Manifest, image: Manifest) -> None:
    reference = container["image"].split("@")[0]
    name = reference.rsplit(":", 1)[0] if ":" in reference.rsplit("/", 1)[-1] else reference
    if name != image["name"]:
        return
    new_image = image.get("newName", name)
    if "digest" in image:
        new_image += f"@{image['digest']}"
    elif "newTag" in image:
        new_image += f":{image['newTag']}"
    container["image"] = new_image


# --- rendered overlays and the facts they are checked against ------------------------------------


@cache
def _rendered(overlay: str) -> tuple[str, ...]:
    objects = render_kustomization(K8S / "overlays" / overlay)
    return tuple(json.dumps(obj) for obj in objects)


def rendered(overlay: str) -> list[Manifest]:
    """A fresh copy of the overlay's objects (tests may not share mutations)."""
    return [json.loads(text) for text in _rendered(overlay)]


def only(objects: list[Manifest], kind: str) -> Manifest:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container_of(objects: list[Manifest]) -> Manifest:
    containers = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == [CONTAINER]
    return dict(containers[0])


def config_data(objects: list[Manifest]) -> dict[str, str]:
    return dict(only(objects, "ConfigMap")["data"])


def option(path: str) -> Option:
    return next(o for o in OPTIONS if o.path == path)


def secret_example_values() -> dict[str, str]:
    """The example Secret's keys, its receipt-token placeholder replaced by a valid token (a
    placeholder cannot pass the token's own checks)."""
    values = dict(
        yaml.safe_load((K8S / "secret.example.yaml").read_text(encoding="utf-8"))["stringData"]
    )
    token = option("receipts.token").env
    assert token in values, "the example Secret shows the receipt token"
    values[token] = "0123456789abcdef" * 4
    return values


def drain_timeout_s(objects: list[Manifest]) -> float:
    drain = option("workflow.drain_timeout_s")
    return float(config_data(objects).get(drain.env, str(drain.default)))


def kubectl_render(directory: Path) -> list[Manifest]:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_identity(objects: list[Manifest]) -> dict[tuple[str, str, str], Manifest]:
    """Objects keyed by kind/namespace/name, with generated name suffixes made neutral."""
    text = json.dumps(objects)
    for obj in objects:
        name = obj["metadata"]["name"]
        if obj["kind"] == "ConfigMap" and re.fullmatch(r".+-[a-z0-9]{10}", name):
            text = text.replace(f'"{name}"', f'"{name[:-11]}-<hash>"')
    return {
        (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o
        for o in json.loads(text)
    }


# --- rendering -----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_with_the_test_renderer(overlay: str) -> None:
    """Each overlay renders to the expected set of objects, one namespace for all of them."""
    objects = rendered(overlay)
    kinds = sorted(o["kind"] for o in objects)
    expected = [
        "ConfigMap",
        "Deployment",
        "Namespace",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "PodMonitor",
        "PrometheusRule",
        "Service",
        "ServiceAccount",
    ]
    if overlay == "prod":
        expected += ["ScaledObject", "TriggerAuthentication"]
    assert kinds == sorted(expected)
    namespace = only(objects, "Namespace")["metadata"]["name"]
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace, obj["kind"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubectl_kustomize_renders_the_same_objects(overlay: str) -> None:
    """`kubectl kustomize` renders each overlay, to the same objects as the test renderer (up to
    the ConfigMap's hash suffix), so the renderer's checks hold for what is really applied."""
    directory = K8S / "overlays" / overlay
    assert by_identity(kubectl_render(directory)) == by_identity(rendered(overlay))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_renders_the_base_alone() -> None:
    """The base renders on its own (an operator may build an overlay of their own on it)."""
    kinds = {o["kind"] for o in kubectl_render(K8S / "base")}
    assert {"Deployment", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy"} <= kinds


def test_generated_config_map_name_follows_its_content() -> None:
    """A changed setting changes the ConfigMap's name, and the Deployment follows it, so pods
    roll on a configuration change."""
    dev, prod = rendered("dev"), rendered("prod")
    names = [only(objects, "ConfigMap")["metadata"]["name"] for objects in (dev, prod)]
    assert names[0] != names[1]
    for objects, name in zip((dev, prod), names, strict=True):
        env_from = container_of(objects)["envFrom"]
        assert {"configMapRef": {"name": name}} in env_from


# --- schemas -------------------------------------------------------------------------------------

_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": _DNS_LABEL, "maxLength": 63},
        "namespace": {"type": "string", "pattern": _DNS_LABEL},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
}
_LABEL_SELECTOR = {
    "type": "object",
    "minProperties": 1,
    "additionalProperties": False,
    "properties": {"matchLabels": _STRING_MAP, "matchExpressions": {"type": "array"}},
}
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}


def _crd(api_version: str, kind: str, spec: Manifest) -> Manifest:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
    }


# Subsets of the published CRDs (prometheus-operator monitoring.coreos.com_podmonitors and
# monitoring.coreos.com_prometheusrules, keda.sh_scaledobjects, keda.sh_triggerauthentications):
# the fields used here, their types and the required ones; closed objects, so a misspelt field
# fails.
CRD_SCHEMAS: dict[str, Manifest] = {
    "PodMonitor": _crd(
        "monitoring.coreos.com/v1",
        "PodMonitor",
        {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer", "minimum": 0},
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "anyOf": [{"required": ["port"]}, {"required": ["portNumber"]}],
                        "properties": {
                            "port": {"type": "string", "minLength": 1},
                            "portNumber": {"type": "integer", "minimum": 1, "maximum": 65535},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"},
                        },
                    },
                },
            },
        },
    ),
    "PrometheusRule": _crd(
        "monitoring.coreos.com/v1",
        "PrometheusRule",
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "limit": {"type": "integer"},
                            "partial_response_strategy": {"type": "string"},
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "additionalProperties": False,
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                    "properties": {
                                        "alert": {"type": "string"},
                                        "record": {"type": "string"},
                                        # IntOrString in the CRD.
                                        "expr": {"type": ["string", "integer"]},
                                        "for": {"type": "string", "pattern": _DURATION},
                                        "keep_firing_for": {"type": "string", "pattern": _DURATION},
                                        "labels": _STRING_MAP,
                                        "annotations": _STRING_MAP,
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    ),
    "ScaledObject": _crd(
        "keda.sh/v1alpha1",
        "ScaledObject",
        {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": _INT32,
                "cooldownPeriod": _INT32,
                "initialCooldownPeriod": _INT32,
                "idleReplicaCount": _INT32,
                "minReplicaCount": _INT32,
                "maxReplicaCount": _INT32,
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "behavior": {"type": "object"},  # checked as an HPA's below
                            },
                        },
                    },
                },
                "fallback": {
                    "type": "object",
                    "required": ["failureThreshold", "replicas"],
                    "properties": {"failureThreshold": _INT32, "replicas": _INT32},
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            # KEDA's CRD: trigger metadata is a map of strings ("false", "50").
                            "metadata": _STRING_MAP,
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "additionalProperties": False,
                                "properties": {
                                    "name": {"type": "string"},
                                    "kind": {
                                        "enum": [
                                            "TriggerAuthentication",
                                            "ClusterTriggerAuthentication",
                                        ]
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    ),
    "TriggerAuthentication": _crd(
        "keda.sh/v1alpha1",
        "TriggerAuthentication",
        {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "properties": {
                "secretTargetRef": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["parameter", "name", "key"],
                        "additionalProperties": False,
                        "properties": {
                            "parameter": {"type": "string"},
                            "name": {"type": "string"},
                            "key": {"type": "string"},
                        },
                    },
                },
                "env": {"type": "array"},
            },
        },
    ),
}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_its_schema(overlay: str, version: str) -> None:
    """Built-in objects validate against the Kubernetes schemas (strict: no unknown fields);
    CRD objects against the CRD schemas above."""
    for obj in rendered(overlay):
        if obj["kind"] in CRD_SCHEMAS:
            jsonschema.validate(obj, CRD_SCHEMAS[obj["kind"]])
        else:
            kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_keda_scaling_behaviour_is_a_valid_hpa_behaviour(version: str) -> None:
    """The HPA KEDA creates from the ScaledObject (its bounds and scaling behaviour) validates as
    an autoscaling/v2 HorizontalPodAutoscaler."""
    scaled = only(rendered("prod"), "ScaledObject")
    spec = scaled["spec"]
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": f"keda-hpa-{scaled['metadata']['name']}"},
        "spec": {
            "scaleTargetRef": {
                "apiVersion": spec["scaleTargetRef"]["apiVersion"],
                "kind": spec["scaleTargetRef"]["kind"],
                "name": spec["scaleTargetRef"]["name"],
            },
            "minReplicas": spec["minReplicaCount"],
            "maxReplicas": spec["maxReplicaCount"],
            "behavior": spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
        },
    }
    kubernetes_validate.validate(hpa, version, strict=True)


def test_crd_schemas_catch_mistakes() -> None:
    """The hand-written CRD schemas reject a misspelt field and a non-string trigger value (a
    schema that accepts anything would prove nothing)."""
    scaled = only(rendered("prod"), "ScaledObject")
    misspelt = copy.deepcopy(scaled)
    misspelt["spec"]["maxReplicas"] = misspelt["spec"].pop("maxReplicaCount")
    boolean = copy.deepcopy(scaled)
    boolean["spec"]["triggers"][0]["metadata"]["allowIdleConsumers"] = False
    for broken in (misspelt, boolean):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, CRD_SCHEMAS["ScaledObject"])


# --- the daemon's facts --------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_port_match_the_daemons_http_server(overlay: str) -> None:
    """The probes, the PodMonitor and the NetworkPolicy use the daemon's port (http.port) and
    paths (consumer.health): liveness and startup on /healthz, readiness on /readyz, scrape
    /metrics."""
    objects = rendered(overlay)
    port = option("http.port")
    assert port.env not in config_data(objects), "the port is fixed by the probes: keep default"
    container = container_of(objects)
    assert port.env not in {e["name"] for e in container.get("env", [])}
    receipts = option("receipts.port")
    assert receipts.env not in config_data(objects), "the Service and policy use the default"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": port.default, "receipts": receipts.default}

    def probe(name: str) -> tuple[str, int]:
        get = container[name]["httpGet"]
        number = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        return get["path"], number

    assert probe("startupProbe") == (HEALTH_PATH, port.default)
    assert probe("livenessProbe") == (HEALTH_PATH, port.default)
    assert probe("readinessProbe") == (READY_PATH, port.default)
    assert container["livenessProbe"].get("httpGet", {}).get("scheme", "HTTP") == "HTTP"

    endpoints = only(objects, "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert [(e["port"], e["path"]) for e in endpoints] == [("http", METRICS_PATH)]

    ingress = only(objects, "NetworkPolicy")["spec"]["ingress"]
    assert [p["port"] for rule in ingress for p in rule["ports"]] == [
        port.default,
        receipts.default,
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_pod_names_itself_and_gets_no_service_links(overlay: str) -> None:
    """The pod's name (downward API) is its instance id and its static consumer-group
    membership; Kubernetes' service-link variables stay out of the environment."""
    objects = rendered(overlay)
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False
    env = {e["name"]: e for e in container_of(objects).get("env", [])}
    for path in ("instance_id", "kafka.group_instance_id"):
        variable = option(path).env
        assert env[variable] == {
            "name": variable,
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
        }
        assert variable not in config_data(objects)
    settings = load_settings(
        {
            **config_data(objects),
            **secret_example_values(),
            option("instance_id").env: "textlocal-consumer-7d9f-abcde",
            option("kafka.group_instance_id").env: "textlocal-consumer-7d9f-abcde",
        }
    )
    assert settings.kafka.consumer_config()["group.instance.id"] == "textlocal-consumer-7d9f-abcde"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_with_the_restricted_security_context(overlay: str) -> None:
    """Every container: non-root, read-only root filesystem, no privilege escalation, all
    capabilities dropped, RuntimeDefault seccomp (the Pod Security "restricted" profile, which
    the namespace enforces); no service-account token, a writable /tmp only."""
    objects = rendered(overlay)
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    pod_context = pod["securityContext"]
    assert pod_context["runAsNonRoot"] is True
    assert pod_context["runAsUser"] > 0
    assert pod_context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert not pod.get("hostNetwork")
    assert not pod.get("hostPID")
    assert not pod.get("hostIPC")
    for container in pod.get("initContainers", []) + pod["containers"]:
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context.get("runAsUser", pod_context["runAsUser"]) > 0
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context.get("privileged", False) is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert [m["mountPath"] for m in container["volumeMounts"]] == ["/tmp"]
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]
    assert "emptyDir" in pod["volumes"][0]
    labels = only(objects, "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_outlasts_the_drain(overlay: str) -> None:
    """terminationGracePeriodSeconds exceeds the drain timeout (from the ConfigMap, else the
    default) plus the shutdown that follows it, so SIGKILL never cuts a clean stop short."""
    objects = rendered(overlay)
    grace_s = only(objects, "Deployment")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ]
    drain_s = drain_timeout_s(objects)
    assert drain_s == option("workflow.drain_timeout_s").default
    assert grace_s > drain_s
    assert grace_s >= drain_s + SHUTDOWN_AFTER_DRAIN_S


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_map_is_a_valid_configuration(overlay: str) -> None:
    """Every ConfigMap key is one of the daemon's settings (or a librdkafka property), none is
    a secret, and with the Secret's keys (secret.example.yaml) it loads as valid settings."""
    data = config_data(rendered(overlay))
    known = {o.env for o in OPTIONS}
    secret = {o.env for o in OPTIONS if o.secret}
    for key in data:
        assert key in known or key.startswith(KAFKA_PROPERTY_ENV), f"unknown setting {key}"
        assert key not in secret, f"{key} is a secret: it belongs in {SECRET_NAME}"
        if key.startswith(KAFKA_PROPERTY_ENV):
            words = ("password", "secret", "key", "token", "credentials", "username")
            assert not any(word in key.lower() for word in words), key
    settings = load_settings({**data, **secret_example_values()})
    assert settings.http_port == option("http.port").default
    assert settings.receipts.port == option("receipts.port").default
    assert settings.receipts.enabled
    assert settings.log_format == "json"
    assert settings.kafka.group_id
    assert settings.contact_groups


def test_secret_is_referenced_never_shipped() -> None:
    """No Secret object is rendered or referenced by a kustomization; the Deployment loads the
    credentials Secret by name; the example Secret holds placeholders and known keys only."""
    for overlay in OVERLAYS:
        objects = rendered(overlay)
        assert not [o for o in objects if o["kind"] == "Secret"]
        assert {"secretRef": {"name": SECRET_NAME}} in container_of(objects)["envFrom"]
    for kustomization in K8S.rglob("kustomization.yaml"):
        assert "secret.example" not in kustomization.read_text(encoding="utf-8")
    example = yaml.safe_load((K8S / "secret.example.yaml").read_text(encoding="utf-8"))
    assert example["kind"] == "Secret"
    assert example["metadata"]["name"] == SECRET_NAME
    assert "data" not in example
    known = {o.env for o in OPTIONS}
    for key, value in example["stringData"].items():
        assert key in known or key.startswith(KAFKA_PROPERTY_ENV), key
        assert re.search(r"<[^>]+>", value), f"{key} must hold a <placeholder>, not a value"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_and_references_resolve(overlay: str) -> None:
    """The Deployment, PDB, NetworkPolicy, PodMonitor and spread constraints select the pods;
    the service account, ConfigMap and (prod) KEDA references name rendered objects."""
    objects = rendered(overlay)
    deployment = only(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects(selector: Manifest) -> bool:
        assert set(selector) == {"matchLabels"}
        return bool(selector["matchLabels"].items() <= pod_labels.items())

    assert selects(deployment["spec"]["selector"])
    assert selects(only(objects, "PodDisruptionBudget")["spec"]["selector"])
    assert selects(only(objects, "NetworkPolicy")["spec"]["podSelector"])
    assert selects(only(objects, "PodMonitor")["spec"]["selector"])
    pod = deployment["spec"]["template"]["spec"]
    for constraint in pod["topologySpreadConstraints"]:
        assert selects(constraint["labelSelector"])
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("ServiceAccount", pod["serviceAccountName"]) in names
    for source in container_of(objects)["envFrom"]:
        if "configMapRef" in source:
            assert ("ConfigMap", source["configMapRef"]["name"]) in names
    for scaled in (o for o in objects if o["kind"] == "ScaledObject"):
        target = scaled["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
        assert target["envSourceContainerName"] == CONTAINER
        for trigger in scaled["spec"]["triggers"]:
            auth = trigger["authenticationRef"]["name"]
            assert ("TriggerAuthentication", auth) in names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_image_is_pinned(overlay: str) -> None:
    """The overlay sets a registry image with an explicit tag or digest (never `latest`)."""
    image = container_of(rendered(overlay))["image"]
    assert "/" in image
    assert "@sha256:" in image or re.fullmatch(r"[^@]+:[\w][\w.-]*", image)
    assert not image.endswith(":latest")


def test_network_policy_allows_only_what_the_daemon_needs() -> None:
    """Ingress: the HTTP port (metrics, health) from the monitoring namespace only, the receipts
    port from the ingress controller's namespace only. Egress: DNS, Kafka, Redis and HTTPS to
    public addresses (private ranges and the metadata address excluded)."""
    policy = only(rendered("prod"), "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    metrics, receipts = policy["ingress"]
    for rule, namespace, port in (
        (metrics, "monitoring", option("http.port").default),
        (receipts, "ingress-nginx", option("receipts.port").default),
    ):
        [peer] = rule["from"]
        assert set(peer) == {"namespaceSelector"}
        assert peer["namespaceSelector"]["matchLabels"] == {
            "kubernetes.io/metadata.name": namespace
        }
        assert rule["ports"] == [{"protocol": "TCP", "port": port}]
    egress_ports = {(p["protocol"], p["port"]) for rule in policy["egress"] for p in rule["ports"]}
    assert {("UDP", 53), ("TCP", 53), ("TCP", 9092), ("TCP", 6379), ("TCP", 443)} <= egress_ports
    [https] = [r for r in policy["egress"] if r["ports"] == [{"protocol": "TCP", "port": 443}]]
    [block] = https["to"]
    excluded = [ipaddress.ip_network(cidr) for cidr in block["ipBlock"]["except"]]
    for address in ("10.1.2.3", "172.20.0.1", "192.168.1.1", "169.254.169.254"):
        assert any(ipaddress.ip_address(address) in net for net in excluded), address


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_receipts_service_exposes_the_receipt_port_only(overlay: str) -> None:
    """One Service, selecting the pods, with one port: the container's receipts port (never the
    HTTP port of /metrics and the probes)."""
    objects = rendered(overlay)
    service = only(objects, "Service")
    pod_labels = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    [port] = service["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in container_of(objects)["ports"]}
    assert container_ports[port["targetPort"]] == option("receipts.port").default
    assert option("http.port").default not in {port["port"], port.get("targetPort")}


def test_example_ingress_routes_only_the_receipt_path_and_stays_out_of_the_overlays() -> None:
    """The example Ingress is in no kustomization, validates, terminates TLS and sends only the
    /receipts/ prefix to the receipts Service's port, in the prod namespace."""
    path = K8S / "examples" / "receipts-ingress.yaml"
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text(encoding="utf-8"))
        for entry in spec.get("resources", []) + spec.get("components", []):
            target = (kustomization.parent / entry).resolve()
            assert not target.is_relative_to(path.parent), f"{kustomization} includes {entry}"
    for overlay in OVERLAYS:
        assert not [o for o in rendered(overlay) if o["kind"] == "Ingress"]
    [ingress] = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(ingress, version, strict=True)
    service = only(rendered("prod"), "Service")
    assert ingress["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert ingress["spec"]["tls"]
    [rule] = ingress["spec"]["rules"]
    [route] = rule["http"]["paths"]
    assert (route["path"], route["pathType"]) == ("/receipts/", "Prefix")
    backend = route["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"] == {"name": service["spec"]["ports"][0]["name"]}


# --- environments and scaling --------------------------------------------------------------------


def test_dev_runs_one_replica_without_autoscaling() -> None:
    """Dev: one replica, no KEDA objects, a PDB that still lets a node drain evict it."""
    objects = rendered("dev")
    assert only(objects, "Deployment")["spec"]["replicas"] == 1
    assert not [o for o in objects if o["kind"] in {"ScaledObject", "TriggerAuthentication"}]
    pdb = only(objects, "PodDisruptionBudget")["spec"]
    assert pdb.get("maxUnavailable", 0) >= 1 or pdb.get("minAvailable") == 0


def test_prod_runs_three_replicas_under_keda_with_room_for_disruption() -> None:
    """Prod: KEDA owns the replica count (3 at least; the Deployment sets none, so re-applying
    never resets the scale); the PDB keeps all but one replica through voluntary disruptions;
    resources are sized for a ~300 MB peak."""
    objects = rendered("prod")
    deployment = only(objects, "Deployment")
    assert "replicas" not in deployment["spec"]
    scaled = only(objects, "ScaledObject")["spec"]
    assert scaled["minReplicaCount"] == 3
    pdb = only(objects, "PodDisruptionBudget")["spec"]
    if "maxUnavailable" in pdb:
        assert pdb["maxUnavailable"] == 1
    else:
        assert pdb["minAvailable"] == scaled["minReplicaCount"] - 1
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy == {"maxSurge": 0, "maxUnavailable": 1}
    resources = container_of(objects)["resources"]
    assert resources["requests"]["cpu"] == "250m"
    assert _mebibytes(resources["requests"]["memory"]) >= 300
    assert resources["limits"] == {"cpu": "1", "memory": "512Mi"}


def _mebibytes(quantity: str) -> float:
    units = {"Mi": 1.0, "Gi": 1024.0, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", quantity).groups()  # type: ignore[union-attr]
    return float(number) * units[unit]


def test_keda_never_scales_past_the_input_partitions() -> None:
    """maxReplicaCount ≤ the input topic's partition count (the annotation records the
    assumption), idle consumers stay off, and the scaler reads the daemon's own Kafka settings
    (bootstrap servers, group, topic, SASL mechanism and TLS) rather than copies of them."""
    objects = rendered("prod")
    scaled = only(objects, "ScaledObject")
    partitions = int(scaled["metadata"]["annotations"][PARTITIONS_ANNOTATION])
    spec = scaled["spec"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions
    [trigger] = spec["triggers"]
    assert trigger["type"] == "kafka"
    metadata = trigger["metadata"]
    assert metadata.get("allowIdleConsumers", "false") == "false"
    data = config_data(objects)
    assert metadata["bootstrapServersFromEnv"] == option("kafka.bootstrap_servers").env
    assert metadata["consumerGroupFromEnv"] == option("kafka.group_id").env
    assert metadata["topicFromEnv"] == option("kafka.input_topic").env
    for variable in ("bootstrapServersFromEnv", "consumerGroupFromEnv", "topicFromEnv"):
        assert metadata[variable] in data, f"{metadata[variable]} must be set in the ConfigMap"
    protocol = data.get(f"{KAFKA_PROPERTY_ENV}SECURITY_PROTOCOL", "PLAINTEXT").upper()
    mechanism = data.get(f"{KAFKA_PROPERTY_ENV}SASL_MECHANISMS", "").upper()
    expected_sasl = {
        "": "none",
        "PLAIN": "plaintext",
        "SCRAM-SHA-256": "scram_sha256",
        "SCRAM-SHA-512": "scram_sha512",
    }[mechanism if protocol.startswith("SASL") else ""]
    assert metadata.get("sasl", "none") == expected_sasl
    assert metadata.get("tls", "disable") == ("enable" if "SSL" in protocol else "disable")
    auth = only(objects, "TriggerAuthentication")["spec"]["secretTargetRef"]
    assert {ref["name"] for ref in auth} == {SECRET_NAME}
    assert {ref["parameter"]: ref["key"] for ref in auth} == {
        "username": f"{KAFKA_PROPERTY_ENV}SASL_USERNAME",
        "password": f"{KAFKA_PROPERTY_ENV}SASL_PASSWORD",
    }


# --- Dockerfile ----------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions (continuations joined), split into stages."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, argument = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), argument.strip()))
    return stages


def named_stages() -> dict[str, list[tuple[str, str]]]:
    """Every stage by its `AS` name (a stage without one is an error here)."""
    named: dict[str, list[tuple[str, str]]] = {}
    for stage in dockerfile_stages()[1:]:
        kind, argument = stage[0]
        assert kind == "FROM"
        match = re.fullmatch(r"\S+\s+AS\s+(\S+)", argument, re.IGNORECASE)
        assert match, f"unnamed stage: FROM {argument}"
        named[match.group(1)] = stage
    return named


def runs_of(stage: list[tuple[str, str]]) -> str:
    return " ".join(arg for kind, arg in stage if kind == "RUN")


def copy_sources() -> set[str]:
    """Every path the stages COPY from the build context (not from another stage)."""
    return {
        source.rstrip("/")
        for stage in dockerfile_stages()[1:]
        for kind, arg in stage
        if kind == "COPY" and "--from" not in arg
        for source in arg.split()[:-1]
    }


def assert_slim_python_without_build_tools(stage: list[tuple[str, str]]) -> None:
    """A slim Python 3.11 that installs wheels offline and has nothing to build or fetch with."""
    preamble = dockerfile_stages()[0]
    args = dict(a.split("=", 1) for kind, a in preamble if kind == "ARG")
    base = stage[0][1].split()[0]
    base = args.get(base.strip("${}"), base)
    assert re.fullmatch(r"python:3\.11[.\d]*-slim(-\w+)?", base), base
    runs = runs_of(stage)
    assert "--no-index" in runs
    assert "pip uninstall --yes pip" in runs
    for tool in ("apt-get install", "gcc", "build-essential", "pip wheel"):
        assert tool not in runs, f"{tool} in an image stage"
    assert not [arg for kind, arg in stage if kind == "COPY" and "--from" not in arg]


def test_dockerfile_builds_a_wheel_and_runs_it_as_the_pods_user() -> None:
    """Multi-stage, the daemon's image last (the default target): its builder wheels exactly the
    runtime lock (hash-checked) and the package with the locked build backend; the image is a slim
    Python 3.11 that installs the wheels offline, has no build tools, runs `textlocal-consumer
    run` as the uid the Deployment expects, and exposes the daemon's port."""
    stages = named_stages()
    assert list(stages)[-1] == "runtime"
    builder, runtime = stages["builder"], stages["runtime"]
    builds = runs_of(builder)
    assert "pip install --require-hashes -r requirements/build.txt" in builds
    assert "pip wheel --require-hashes --wheel-dir /wheels -r requirements/runtime.txt" in builds
    assert "pip wheel --no-deps --no-build-isolation --wheel-dir /wheels ." in builds
    assert "sandbox" not in " ".join(arg for _, arg in builder)
    assert_slim_python_without_build_tools(runtime)
    assert "from=builder," in runs_of(runtime)
    assert "pip install --no-index --find-links=/wheels textlocal-consumer" in runs_of(runtime)
    instructions = dict(runtime)
    uid = int(instructions["USER"].split(":")[0])
    assert uid != 0
    pod = only(rendered("prod"), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == uid
    assert container_of(rendered("prod"))["securityContext"]["runAsUser"] == uid
    assert json.loads(instructions["ENTRYPOINT"]) == ["textlocal-consumer"]
    assert json.loads(instructions["CMD"]) == ["run"]
    assert container_of(rendered("prod"))["args"] == ["run"]
    assert int(instructions["EXPOSE"]) == option("http.port").default


def test_dockerfile_sandbox_target_is_its_own_image() -> None:
    """`--target sandbox` builds the sandbox alone: its builder wheels the sandbox lock
    (hash-checked) and the sandbox project; the image installs only `textlocal-sandbox`
    offline, runs it as a non-root uid on all interfaces, and exposes its port."""
    stages = named_stages()
    builder, image = stages["sandbox-builder"], stages["sandbox"]
    builds = runs_of(builder)
    assert "pip install --require-hashes -r requirements/build.txt" in builds
    assert "pip wheel --require-hashes --wheel-dir /wheels -r requirements/sandbox.txt" in builds
    assert "pip wheel --no-deps --no-build-isolation --wheel-dir /wheels ./sandbox" in builds
    copied = {arg.split()[0] for kind, arg in builder if kind == "COPY"}
    assert copied == {"requirements/", "sandbox/"}, "the sandbox is built without the daemon"
    assert_slim_python_without_build_tools(image)
    assert "from=sandbox-builder," in runs_of(image)
    assert "pip install --no-index --find-links=/wheels textlocal-sandbox" in runs_of(image)
    instructions = dict(image)
    assert int(instructions["USER"].split(":")[0]) != 0
    entrypoint = json.loads(instructions["ENTRYPOINT"])
    assert entrypoint[0] == "textlocal-sandbox"
    assert entrypoint[entrypoint.index("--host") + 1] == "0.0.0.0"
    assert int(instructions["EXPOSE"]) == int(entrypoint[entrypoint.index("--port") + 1])


def test_dockerignore_keeps_exactly_the_build_inputs() -> None:
    """The build context is only what the builders copy: .dockerignore excludes everything,
    then re-includes each COPY source (so .venv, .git, caches and tests stay out)."""
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    sources = copy_sources()
    assert sources == included
    assert {"pyproject.toml", "consumer", "schemas", "requirements", "sandbox"} <= sources


def test_every_build_input_exists() -> None:
    """Every file the builders copy exists, including the readme pyproject.toml names (without
    it hatchling, and so `pip wheel .`, fails) and the lock files they install from."""
    sources = copy_sources()
    with (REPO / "pyproject.toml").open("rb") as file:
        readme = tomllib.load(file)["project"]["readme"]
    assert readme in sources
    if not (REPO / readme).exists():
        pytest.skip(f"{readme} does not exist yet: the image build fails until it does")
    for source in sources:
        assert (REPO / source).exists(), source
    for lock in ("build", "runtime", "sandbox"):
        assert (REPO / "requirements" / f"{lock}.txt").is_file(), lock


# --- Grafana dashboard ---------------------------------------------------------------------------


def load_dashboard() -> Manifest:
    dashboard: Manifest = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def dashboard_panels(dashboard: Manifest) -> list[Manifest]:
    panels: list[Manifest] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels += panel.get("panels", [])
    return panels


def dashboard_queries(dashboard: Manifest) -> list[str]:
    """Every PromQL expression: panel targets and templating queries."""
    queries = [
        target["expr"]
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def exposed_metric_names() -> set[str]:
    """Sample names the daemon's /metrics can carry: from the exposition of a fresh registry
    (counters as `_total`, histograms as `_bucket`, `_sum`, `_count`)."""
    registry = CollectorRegistry()
    Metrics(registry)
    names: set[str] = set()
    for line in generate_latest(registry).decode().splitlines():
        if match := re.fullmatch(r"# TYPE (\S+) (\S+)", line):
            name, kind = match.groups()
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


_METRIC = re.compile(r"\btextlocal_consumer_[a-zA-Z0-9_]+")


def test_dashboard_queries_only_metrics_the_daemon_exposes() -> None:
    """Every textlocal_consumer_* name in any panel or variable query exists in the daemon's
    exposition (consumer.metrics)."""
    exposed = exposed_metric_names()
    used = {
        name for query in dashboard_queries(load_dashboard()) for name in _METRIC.findall(query)
    }
    assert used, "the dashboard queries no daemon metric"
    assert used <= exposed, f"not exposed by consumer.metrics: {sorted(used - exposed)}"


def test_dashboard_covers_every_topic_of_the_issue() -> None:
    """Panels exist for throughput, rejections and DLQ, TextLocal latency and errors, campaigns by
    state, delivery rate, lag, daily jobs, the credit balance, the dependencies and the oldest
    work in hand."""
    queries = " ".join(dashboard_queries(load_dashboard()))
    for metric in (
        "events_consumed_total",
        "events_published_total",
        "sms_accepted_total",
        "events_rejected_total",
        "events_dead_lettered_total",
        "textlocal_request_duration_seconds_bucket",
        "textlocal_request_duration_seconds_count",
        "textlocal_retries_total",
        "campaigns",
        "delivery_outcomes_total",
        "consumer_lag_messages",
        "daily_job_last_success_timestamp_seconds",
        "daily_job_runs_total",
        "textlocal_credit_balance",
        "dependency_up",
        "work_oldest_running_seconds",
    ):
        assert re.search(rf"\btextlocal_consumer_{metric}\b", queries), metric


def test_dashboard_queries_are_typed_right() -> None:
    """rate()/increase() only over counters and histogram series; histogram_quantile over
    buckets aggregated by `le`; every query scoped to the chosen namespace."""
    for query in dashboard_queries(load_dashboard()):
        for name in re.findall(r"\b(?:rate|irate|increase)\((textlocal_consumer_\w+)", query):
            assert re.search(r"_(total|bucket|count|sum)$", name), f"rate of a gauge: {query}"
        if "histogram_quantile" in query:
            assert "_bucket" in query, query
            assert re.search(r"by \((le\b|[^)]*\ble\b)", query), query
        if not query.startswith("label_values("):
            for selector in re.findall(r"textlocal_consumer_\w+(\{[^}]*\})?", query):
                assert 'namespace=~"$namespace"' in selector, query


def test_dashboard_is_well_formed() -> None:
    """A Grafana dashboard model: uid, title, schema version; a Prometheus datasource variable
    used by every panel; unique panel ids and refIds; panels inside the 24-column grid and not
    overlapping."""
    dashboard = load_dashboard()
    assert dashboard["uid"] == "textlocal-consumer"
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard_panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["w"] >= 1, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [target["refId"] for target in panel["targets"]]
        assert refs, panel["title"]
        assert len(refs) == len(set(refs)), panel["title"]
        assert all(t["datasource"] == panel["datasource"] for t in panel["targets"])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """Every panel query (Grafana's variables substituted) parses: promtool checks them as
    recording rules."""
    substitutions = {"$__rate_interval": "2m", "$__range": "1d", "$namespace": ".*"}
    rules = []
    for number, query in enumerate(dashboard_queries(load_dashboard())):
        if query.startswith("label_values("):
            continue  # a Grafana function, not PromQL
        for variable, value in substitutions.items():
            query = query.replace(variable, value)
        assert "$" not in query, query
        rules.append({"record": f"dashboard:query_{number}", "expr": query})
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool = shutil.which("promtool")
    assert promtool is not None
    result = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
