"""deploy/: the Kubernetes manifests, checked by real validators and by what a schema cannot see.

- Every manifest validates against the Kubernetes OpenAPI schemas that kubernetes-validate bundles (offline),
  in strict mode (an unknown field is an error), for the oldest and the newest Kubernetes version we support.
- The RayCluster validates against KubeRay's CRD schema (tests/deploy/schemas/kuberay/, vendored) with jsonschema,
  made strict the same way.
- The kustomizations render with ``kubectl kustomize`` (kustomize built into kubectl). Those tests skip where
  kubectl is missing, except under CI (``CI`` or ``PRUNER_CI_REQUIRE_KUBECTL`` set), where they fail.
- :func:`problems` checks what ties the manifests together: ports, grace periods, memory, selectors, the
  volume, the job store against replicas and access modes, the Secret's keys, the Ray address.
Each validator is also shown a broken copy and must name what is wrong.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service import server

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "base"
RAYCLUSTER = DEPLOY / "overlays" / "ray" / "raycluster.yaml"
SECRET_EXAMPLE = DEPLOY / "secret.example.yaml"
KUBERAY_SCHEMA = Path(__file__).parent / "schemas" / "kuberay" / "raycluster-v1.json"

KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
"""The oldest version the manifests need (the preStop ``sleep`` action is on by default from 1.30) and the newest
kubernetes-validate knows."""

VARIANTS = {"default": DEPLOY, "sqlite": DEPLOY / "overlays" / "sqlite", "ray": DEPLOY / "overlays" / "ray"}
"""Each kustomization a user applies (docs/deploy.md)."""

IMAGE_UID = 10001
"""The image's user (Dockerfile: useradd --uid 10001)."""

Doc = dict[str, Any]


# ---------------------------------------------------------------------------------------------------------------
# loading and rendering


def load(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def base_docs() -> list[Doc]:
    """The base's manifests as written, without kustomize."""
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return [d for name in kustomization["resources"] for d in load(BASE / name)]


@functools.cache
def _kubectl() -> str | None:
    return shutil.which("kubectl")


def kubectl() -> str:
    found = _kubectl()
    if found is None:
        if os.environ.get("CI") or os.environ.get("PRUNER_CI_REQUIRE_KUBECTL"):
            pytest.fail("kubectl is not installed, and CI must render the kustomizations (install kubectl)")
        pytest.skip("kubectl is not installed: the kustomizations are not rendered")
    return found


@functools.cache
def _render(path: Path) -> tuple[str, ...]:
    done = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {path} failed: {done.stderr}"
    return tuple(json.dumps(d) for d in yaml.safe_load_all(done.stdout) if d)


def render(variant: str) -> list[Doc]:
    """What ``kubectl apply -k`` would send for a variant (a fresh copy each call); "base" is the files as written."""
    if variant == "base":
        return base_docs()
    return [json.loads(d) for d in _render(VARIANTS[variant])]


def one(docs: list[Doc], kind: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def maybe(docs: list[Doc], kind: str) -> Doc | None:
    found = [d for d in docs if d["kind"] == kind]
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------------------------
# the validators


def kubernetes_errors(doc: Doc, version: str) -> str | None:
    """None when ``doc`` is valid for that Kubernetes version, else where and what (kubernetes-validate, strict)."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(str(p) for p in e.path)}: {e.message}"
    return None


def strict(schema: Any) -> Any:
    """A CRD schema with unknown fields refused, as ``kubectl apply``'s strict field validation refuses them."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        out.get("type") == "object"
        and isinstance(out.get("properties"), dict)
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def _raycluster_validator() -> jsonschema.Draft7Validator:
    schema = strict(json.loads(KUBERAY_SCHEMA.read_text()))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def raycluster_errors(doc: Doc) -> list[str]:
    """Where and what, for each error of a RayCluster against KubeRay's CRD schema."""
    errors = sorted(_raycluster_validator().iter_errors(doc), key=lambda e: list(map(str, e.path)))
    return [f"{'.'.join(str(p) for p in e.path)}: {e.message}" for e in errors]


# ---------------------------------------------------------------------------------------------------------------
# what a schema cannot check

_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(text: str | int) -> int:
    """Bytes of a Kubernetes memory quantity (``8Gi``, ``512M``, ``1073741824``)."""
    match = re.fullmatch(r"(\d+)(|k|M|G|T|Ki|Mi|Gi|Ti)", str(text))
    if match is None:
        raise ValueError(f"not a memory quantity this check reads: {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


def _env(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def _value(env: dict[str, Doc], name: str) -> str | None:
    entry = env.get(name)
    return None if entry is None else entry.get("value")


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def problems(docs: list[Doc], secret: Doc | None = None) -> list[str]:
    """What is inconsistent between the manifests of one variant; empty when nothing is."""
    out: list[str] = []
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = next(c for c in pod["containers"] if c["name"] == "server")
    env = _env(container)

    if not _selects(deployment["spec"]["selector"]["matchLabels"], labels):
        out.append("the Deployment's selector does not select its own pod template's labels")

    # ports: the container's, the server's address, the probes', the Service's
    ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    port = ports.get("grpc")
    if port is None:
        out.append("the server container has no port named grpc")
    address = _value(env, "ONNX_PRUNER_ADDRESS")
    if address is None or int(address.rsplit(":", 1)[1]) != port:
        out.append(f"ONNX_PRUNER_ADDRESS {address!r} does not listen on the container port {port}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        got = container.get(probe)
        if got is None or "grpc" not in got:
            out.append(f"the server container has no gRPC {probe}")
        elif got["grpc"]["port"] != port:
            out.append(f"the {probe} checks port {got['grpc']['port']}, the server listens on {port}")
    service = one(docs, "Service")
    if not _selects(service["spec"]["selector"], labels):
        out.append("the Service's selector does not select the Deployment's pods")
    for p in service["spec"]["ports"]:
        target = p.get("targetPort", p["port"])
        resolved = ports.get(target) if isinstance(target, str) else target
        if resolved != port:
            out.append(f"the Service's targetPort {target!r} is not the server's port {port}")

    # stopping: SIGTERM after the preStop sleep, then the server's grace, then about 5 s to exit
    grace = float(_value(env, "ONNX_PRUNER_GRACE") or 30)
    period = pod.get("terminationGracePeriodSeconds", 30)
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    if not period >= pre_stop + grace + 10:
        out.append(
            f"terminationGracePeriodSeconds {period} < preStop sleep {pre_stop} + ONNX_PRUNER_GRACE {grace:g} + 10:"
            " the kubelet would SIGKILL the server before its grace is over"
        )
    liveness = container.get("livenessProbe", {})
    if liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3) <= period:
        out.append(
            "the livenessProbe gives up within terminationGracePeriodSeconds: a stopping server (NOT_SERVING)"
            " would be killed before its grace is over"
        )

    # memory: every job slot at its limit must fit in the container with room for the server
    limits = container.get("resources", {}).get("limits", {})
    requests = container.get("resources", {}).get("requests", {})
    if "memory" not in limits or "cpu" not in limits or "memory" not in requests or "cpu" not in requests:
        out.append("the server container needs cpu and memory requests and limits")
    else:
        memory = quantity(limits["memory"])
        job_memory = int(_value(env, "ONNX_PRUNER_JOB_MEMORY_LIMIT") or 0)
        max_jobs = int(_value(env, "ONNX_PRUNER_MAX_JOBS") or 0)
        if job_memory <= 0:
            out.append("ONNX_PRUNER_JOB_MEMORY_LIMIT is not set: one big job could OOM-kill the whole pod")
        elif max_jobs < 1:
            out.append("ONNX_PRUNER_MAX_JOBS is not set: the default is the node's core count, not the CPU limit")
        elif not max_jobs * job_memory < memory:
            out.append(
                f"ONNX_PRUNER_MAX_JOBS {max_jobs} x ONNX_PRUNER_JOB_MEMORY_LIMIT {job_memory} is not below the"
                f" container memory limit {limits['memory']} ({memory}): the kernel would OOM-kill the pod first"
            )

    # security: the image's user, non-root, a read-only root with a writable /tmp
    security = pod.get("securityContext", {})
    if security.get("runAsUser") != IMAGE_UID or not security.get("runAsNonRoot"):
        out.append(f"the pod must run as the image's non-root user {IMAGE_UID}")
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    if not container.get("securityContext", {}).get("readOnlyRootFilesystem"):
        out.append("the server's root filesystem is not read-only")
    if "emptyDir" not in volumes.get(mounts.get("/tmp", ""), {}):
        out.append("/tmp is not an emptyDir: the read-only root leaves the server nowhere to write")
    runtime = _value(env, "ONNX_PRUNER_RUNTIME_DIR") or "/tmp"
    if not any(runtime == m or runtime.startswith(m.rstrip("/") + "/") for m in mounts):
        out.append(f"ONNX_PRUNER_RUNTIME_DIR {runtime} is on the read-only root")

    # the job store: artifacts on the claimed volume; SQLite alone, PostgreSQL shared
    artifacts = _value(env, "ONNX_PRUNER_ARTIFACTS")
    claim = volumes.get(mounts.get(artifacts or "", ""), {}).get("persistentVolumeClaim", {}).get("claimName")
    pvc = maybe(docs, "PersistentVolumeClaim")
    if claim is None or pvc is None or pvc["metadata"]["name"] != claim:
        out.append(f"ONNX_PRUNER_ARTIFACTS {artifacts} is not the mount of the PersistentVolumeClaim")
    store = env.get("ONNX_PRUNER_JOB_STORE", {})
    sqlite = "value" in store and str(store["value"]).startswith("sqlite:")
    modes = set(pvc["spec"]["accessModes"]) if pvc else set()
    hpa = maybe(docs, "HorizontalPodAutoscaler")
    if sqlite:
        if deployment["spec"].get("replicas", 1) != 1 or hpa is not None:
            out.append("the SQLite job store needs exactly one replica and no HorizontalPodAutoscaler")
        if modes != {"ReadWriteOnce"}:
            out.append(f"the SQLite job store needs a ReadWriteOnce volume, not {sorted(modes)}")
        if deployment["spec"].get("strategy", {}).get("type") != "Recreate":
            out.append("the SQLite job store needs the Recreate strategy (one pod holds the volume at a time)")
        if not str(store["value"]).startswith(f"sqlite:///{artifacts}/"):
            out.append(f"the SQLite database {store['value']} is not on the artifacts volume {artifacts}")
    else:
        if "valueFrom" not in store:
            out.append("ONNX_PRUNER_JOB_STORE is neither SQLite nor a PostgreSQL URL from a Secret")
        if "ReadWriteMany" not in modes:
            out.append(f"replicas sharing PostgreSQL need a ReadWriteMany artifacts volume, not {sorted(modes)}")
    replica = env.get("ONNX_PRUNER_REPLICA_ID", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    if replica != "metadata.name":
        out.append("ONNX_PRUNER_REPLICA_ID does not come from the pod's name (downward API)")
    if "valueFrom" not in env.get("ONNX_PRUNER_TOKEN", {}):
        out.append("ONNX_PRUNER_TOKEN does not come from a Secret")

    # the PodDisruptionBudget and the HorizontalPodAutoscaler act on this Deployment
    pdb = maybe(docs, "PodDisruptionBudget")
    if pdb is None or not _selects(pdb["spec"]["selector"]["matchLabels"], labels):
        out.append("the PodDisruptionBudget does not select the Deployment's pods")
    if hpa is not None:
        target = hpa["spec"]["scaleTargetRef"]
        if (target["kind"], target["name"]) != ("Deployment", deployment["metadata"]["name"]):
            out.append(f"the HorizontalPodAutoscaler scales {target['kind']}/{target['name']}, not this Deployment")
        if hpa["spec"].get("minReplicas", 1) < 2 and pdb is not None and "minAvailable" in pdb["spec"]:
            out.append("a PodDisruptionBudget with minAvailable and one replica blocks every node drain")

    # the Secret holds every key the Deployment reads
    if secret is not None:
        for name, entry in env.items():
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref is None:
                continue
            keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
            if ref["name"] != secret["metadata"]["name"] or ref["key"] not in keys:
                out.append(f"{name} reads {ref['name']}/{ref['key']}, which the Secret does not hold")

    # Ray: the server's address is the RayCluster head's client port, and both run one image (Ray Client)
    ray = maybe(docs, "RayCluster")
    if ray is not None:
        head = ray["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        client = {p.get("name"): p["containerPort"] for p in head.get("ports", [])}.get("client", 10001)
        wanted = f"ray://{ray['metadata']['name']}-head-svc:{client}"
        if _value(env, "ONNX_PRUNER_EXECUTOR") != "ray" or _value(env, "ONNX_PRUNER_RAY_ADDRESS") != wanted:
            out.append(f"with a RayCluster the server needs ONNX_PRUNER_EXECUTOR=ray, ONNX_PRUNER_RAY_ADDRESS={wanted}")
        images = {head["image"]} | {
            c["image"] for g in ray["spec"].get("workerGroupSpecs", []) for c in g["template"]["spec"]["containers"]
        }
        if images != {container["image"]}:
            out.append(f"the server ({container['image']}) and Ray ({sorted(images)}) must run one image")
    return out


# ---------------------------------------------------------------------------------------------------------------
# tests: schemas


def test_every_base_manifest_is_in_the_kustomization() -> None:
    listed = set(yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert {d["kind"] for d in base_docs()} == {
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    }


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifest_files_validate_against_the_kubernetes_schemas(version: str) -> None:
    docs = [*base_docs(), *load(SECRET_EXAMPLE)]
    assert [e for d in docs if (e := kubernetes_errors(d, version))] == []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_kustomizations_validate(variant: str, version: str) -> None:
    docs = render(variant)
    core = [d for d in docs if d["kind"] != "RayCluster"]
    assert [e for d in core if (e := kubernetes_errors(d, version))] == []
    assert [e for d in docs if d["kind"] == "RayCluster" for e in raycluster_errors(d)] == []
    # the Ray cluster only where asked for
    assert (maybe(docs, "RayCluster") is not None) == (variant == "ray")


def test_raycluster_validates_against_the_kuberay_schema() -> None:
    (doc,) = load(RAYCLUSTER)
    assert doc["apiVersion"] == "ray.io/v1"
    assert raycluster_errors(doc) == []


def test_the_overlays_change_what_they_say() -> None:
    sqlite = render("sqlite")
    deployment = one(sqlite, "Deployment")
    env = _env(deployment["spec"]["template"]["spec"]["containers"][0])
    assert env["ONNX_PRUNER_JOB_STORE"] == {
        "name": "ONNX_PRUNER_JOB_STORE",
        "value": "sqlite:////var/lib/onnx-pruner/jobs.db",
    }
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert maybe(sqlite, "HorizontalPodAutoscaler") is None
    assert one(sqlite, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]
    default = render("default")
    assert one(default, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    # the kustomization's label reaches every object, never the selectors (they are immutable once applied)
    for doc in default:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "onnx-pruner"
    assert "app.kubernetes.io/part-of" not in one(default, "Deployment")["spec"]["selector"]["matchLabels"]


def _set(path: str, value: Any) -> Callable[[Doc], None]:
    """A mutation setting ``a.b.0.c`` to ``value`` (``None`` deletes; a key ``old>new`` renames)."""

    def mutate(doc: Doc) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if ">" in last:
            old, new = last.split(">")
            node[new] = node.pop(old)
        elif value is None:
            del node[last]
        else:
            node[int(last) if isinstance(node, list) else last] = value

    return mutate


C0 = "spec.template.spec.containers.0"


@pytest.mark.parametrize(
    ("file", "mutate", "named"),
    [
        (BASE / "deployment.yaml", _set(f"{C0}.ports.0.containerPort", "50051"), "containerPort"),
        (BASE / "deployment.yaml", _set(f"{C0}.readinessProbe>readinessProbes", None), "'readinessProbes'"),
        (BASE / "deployment.yaml", _set(f"{C0}.livenessProbe.grpc.port", None), "'port' is a required property"),
        (BASE / "hpa.yaml", _set("spec.minReplicas", "two"), "minReplicas"),
        (BASE / "pdb.yaml", _set("spec.selector.matchLabel", {"app": "x"}), "'matchLabel'"),
        (BASE / "service.yaml", _set("spec.ports", {"port": 50051}), "spec.ports: {'port': 50051} is not of type"),
    ],
    ids=["port-as-string", "misspelt-probe", "probe-without-port", "replicas-as-string", "bad-selector", "ports-map"],
)
def test_kubernetes_validate_names_what_is_broken(file: Path, mutate: Callable[[Doc], None], named: str) -> None:
    (doc,) = load(file)
    assert kubernetes_errors(doc, KUBERNETES_VERSIONS[-1]) is None
    broken = copy.deepcopy(doc)
    mutate(broken)
    error = kubernetes_errors(broken, KUBERNETES_VERSIONS[-1])
    assert error is not None and named in error, error


def test_kubernetes_validate_knows_which_version_has_a_field() -> None:
    # the preStop sleep action came in 1.29 (alpha, off by default; on from 1.30): 1.27's schema refuses it
    (doc,) = load(BASE / "deployment.yaml")
    error = kubernetes_errors(doc, "1.27.0")
    assert error is not None and "lifecycle.preStop" in error and "'sleep'" in error, error


R_WORKERS = "spec.workerGroupSpecs.0"


@pytest.mark.parametrize(
    ("mutate", "named"),
    [
        (_set("spec.headGroupSpec.rayStartParams.num-cpus", 0), "headGroupSpec.rayStartParams.num-cpus: 0 is not"),
        (_set(f"{R_WORKERS}.replicas>replica", None), "'replica' was unexpected"),
        (_set(f"{R_WORKERS}.template.spec.containers.0.resources.limits.memory", [12]), "limits.memory"),
        (_set("spec.headGroupSpec.template", None), "'template' is a required property"),
    ],
    ids=["param-not-a-string", "misspelt-field", "bad-quantity", "head-without-template"],
)
def test_the_kuberay_schema_names_what_is_broken(mutate: Callable[[Doc], None], named: str) -> None:
    (doc,) = load(RAYCLUSTER)
    broken = copy.deepcopy(doc)
    mutate(broken)
    errors = raycluster_errors(broken)
    assert any(named in e for e in errors), errors


# ---------------------------------------------------------------------------------------------------------------
# tests: consistency


@pytest.mark.parametrize("variant", ["base", *sorted(VARIANTS)])
def test_the_manifests_agree_with_each_other(variant: str) -> None:
    (secret,) = load(SECRET_EXAMPLE)
    assert problems(render(variant), secret) == []


def _in_deployment(path: str, value: Any) -> Callable[[list[Doc]], None]:
    return lambda docs: _set(path, value)(one(docs, "Deployment"))


def _env_value(name: str, value: str) -> Callable[[list[Doc]], None]:
    def mutate(docs: list[Doc]) -> None:
        _env(one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0])[name]["value"] = value

    return mutate


def _secret_key(name: str, key: str) -> Callable[[list[Doc]], None]:
    def mutate(docs: list[Doc]) -> None:
        env = _env(one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0])
        env[name]["valueFrom"]["secretKeyRef"]["key"] = key

    return mutate


def _tmp_on_host_path(docs: list[Doc]) -> None:
    volumes = one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    (tmp,) = [v for v in volumes if v["name"] == "tmp"]
    tmp["hostPath"] = {"path": "/tmp"}
    del tmp["emptyDir"]


def _in(kind: str, path: str, value: Any) -> Callable[[list[Doc]], None]:
    return lambda docs: _set(path, value)(one(docs, kind))


@pytest.mark.parametrize(
    ("variant", "mutate", "named"),
    [
        ("base", _in_deployment(f"{C0}.readinessProbe.grpc.port", 50052), "readinessProbe checks port 50052"),
        ("base", _in("Service", "spec.ports.0.targetPort", "http"), "targetPort 'http'"),
        ("base", _env_value("ONNX_PRUNER_ADDRESS", "0.0.0.0:8080"), "ONNX_PRUNER_ADDRESS '0.0.0.0:8080'"),
        ("base", _in_deployment("spec.template.spec.terminationGracePeriodSeconds", 35), "terminationGracePeriod"),
        ("base", _env_value("ONNX_PRUNER_GRACE", "60"), "ONNX_PRUNER_GRACE 60"),
        ("base", _in_deployment(f"{C0}.livenessProbe.failureThreshold", 3), "livenessProbe gives up"),
        ("base", _env_value("ONNX_PRUNER_JOB_MEMORY_LIMIT", str(4 * 2**30)), "is not below the container memory"),
        ("base", _in_deployment(f"{C0}.resources.limits.memory", "6Gi"), "limit 6Gi"),
        ("base", _in("PodDisruptionBudget", "spec.selector.matchLabels", {"app": "pruner"}), "PodDisruptionBudget"),
        ("base", _in("HorizontalPodAutoscaler", "spec.scaleTargetRef.name", "pruner"), "scales Deployment/pruner"),
        ("base", _in("PersistentVolumeClaim", "spec.accessModes", ["ReadWriteOnce"]), "ReadWriteMany"),
        ("base", _env_value("ONNX_PRUNER_ARTIFACTS", "/data"), "ONNX_PRUNER_ARTIFACTS /data"),
        ("base", _in_deployment("spec.template.spec.securityContext.runAsUser", 0), "non-root user 10001"),
        ("base", _tmp_on_host_path, "/tmp is not an emptyDir"),
        ("base", _secret_key("ONNX_PRUNER_TOKEN", "bearer"), "onnx-pruner/bearer"),
        ("sqlite", _in_deployment("spec.replicas", 2), "exactly one replica"),
        ("sqlite", _in("PersistentVolumeClaim", "spec.accessModes", ["ReadWriteMany"]), "ReadWriteOnce volume"),
        ("ray", _env_value("ONNX_PRUNER_RAY_ADDRESS", "ray://ray-head:10001"), "onnx-pruner-ray-head-svc:10001"),
        ("ray", _in_deployment(f"{C0}.image", "onnx-pruner:latest"), "must run one image"),
    ],
)
def test_the_consistency_check_names_what_is_wrong(
    variant: str, mutate: Callable[[list[Doc]], None], named: str
) -> None:
    (secret,) = load(SECRET_EXAMPLE)
    docs = render(variant)
    mutate(docs)
    found = problems(docs, secret)
    assert any(named in p for p in found), found


def test_every_setting_is_a_server_flag() -> None:
    """Each ONNX_PRUNER_* the manifests set is a flag of ``python -m service`` (flags and variables share names)."""
    flags = {o for a in server._parser()._actions for o in a.option_strings}
    if "--job-store" not in flags:
        pytest.skip("this server has no job store flags yet (issue 19: the jobs API adds them)")
    names = {
        e["name"]
        for variant in ("base", "sqlite", "ray")
        for e in one(render(variant), "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    if "--executor" not in flags:
        names -= {"ONNX_PRUNER_EXECUTOR", "ONNX_PRUNER_RAY_ADDRESS"}
    # the token is read from the environment only (never a flag: it would show in `ps`)
    flag = {n: "--" + n.removeprefix("ONNX_PRUNER_").lower().replace("_", "-") for n in names - {"ONNX_PRUNER_TOKEN"}}
    unknown = sorted(n for n, f in flag.items() if f not in flags)
    assert unknown == []
