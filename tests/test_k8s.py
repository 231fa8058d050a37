"""Checks of the Kubernetes manifests in k8s/: every overlay renders, every object is valid
against its schema, and the deployment rules of k8s/README.md hold.

- built-in kinds: Kubernetes 1.30 OpenAPI schemas shipped by `kubernetes-validate` (offline);
- RayCluster / RayJob: KubeRay v1.7.0 CRD schemas read from $KUBERAY_CRD_DIR
  (ray.io_rayclusters.yaml, ray.io_rayjobs.yaml), unknown fields rejected as the API server does;
- policy: requests/limits, GPU accounting, pinned images, no inline credentials, resumable
  RayJob, MLflow behind basic auth.

Each check is a function returning a list of problems, so the negative tests at the end can
show that it does reject a broken object.

    KUBERAY_CRD_DIR=../shared/schemas/kuberay-v1.7.0 python -m pytest tests/test_k8s.py -q
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
SECRET_EXAMPLES = K8S / "secrets"
OVERLAYS = sorted(
    p.name for p in (K8S / "overlays").glob("*") if (p / "kustomization.yaml").is_file()
)
KUBERNETES_VERSION = "1.30.0"  # oldest cluster version the manifests must be valid for
RAY_KINDS = {"RayCluster", "RayJob"}
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
SECRET_LIKE_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|KEY|ACCESS", re.IGNORECASE)
URI_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl not on PATH: cannot run `kubectl kustomize` to render k8s/overlays/*",
)


# ---------------------------------------------------------------------------------------------
# Rendering and walking the objects


@functools.cache
def render(overlay: str) -> tuple[dict, ...]:
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay}:\n{result.stderr}"
    return tuple(doc for doc in yaml.load_all(result.stdout, Loader=YAML_LOADER) if doc)


def object_id(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def pod_specs(node, path=""):
    """Every pod spec inside an object (Deployment template, Ray group template, submitter...)."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield path, node
        for key, value in node.items():
            yield from pod_specs(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from pod_specs(value, f"{path}[{i}]")


def containers(obj: dict):
    """(where, container) for every container and init container of an object."""
    for path, spec in pod_specs(obj):
        for field in ("initContainers", "containers"):
            for c in spec.get(field) or []:
                yield f"{object_id(obj)}{path}.{field}[{c.get('name')}]", c


def ray_cluster_specs(obj: dict):
    """(where, RayCluster spec) for a RayCluster or a RayJob embedding one."""
    if obj.get("kind") == "RayCluster":
        yield object_id(obj), obj.get("spec") or {}
    elif obj.get("kind") == "RayJob" and obj.get("spec", {}).get("rayClusterSpec"):
        yield f"{object_id(obj)}.rayClusterSpec", obj["spec"]["rayClusterSpec"]


def ray_groups(spec: dict):
    """(group name, group spec) of the head and every worker group."""
    yield "head", spec.get("headGroupSpec") or {}
    for group in spec.get("workerGroupSpecs") or []:
        yield group.get("groupName"), group


def ray_container(group: dict) -> dict:
    """The Ray container of a group's pod: KubeRay uses the first one."""
    return ((group.get("template") or {}).get("spec", {}).get("containers") or [{}])[0]


def secret_example_keys() -> dict[str, set[str]]:
    """Secret name -> keys, from k8s/secrets/NAME.env.example (the documented Secrets)."""
    secrets = {}
    for path in SECRET_EXAMPLES.glob("*.env.example"):
        lines = path.read_text().splitlines()
        keys = {
            ln.split("=", 1)[0].strip()
            for ln in lines
            if "=" in ln and not ln.lstrip().startswith("#")
        }
        secrets[path.name.removesuffix(".env.example")] = keys
    return secrets


def container_env(container: dict, objects) -> set[str]:
    """Names of the environment variables a container gets (env, envFrom ConfigMaps/Secrets)."""
    names = {e["name"] for e in container.get("env") or []}
    configmaps = {o["metadata"]["name"]: o for o in objects if o.get("kind") == "ConfigMap"}
    secrets = secret_example_keys()
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            data = configmaps.get(source["configMapRef"]["name"], {}).get("data") or {}
            names |= {prefix + k for k in data}
        if "secretRef" in source:
            names |= {prefix + k for k in secrets.get(source["secretRef"]["name"], set())}
    return names


def parse_quantity(value) -> float:
    """Kubernetes quantity ("500m", "16Gi", 2, "1e3") as a number, for comparisons only."""
    text = str(value)
    binary = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
    decimal = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
    for suffix, factor in binary.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    if text[-1:] in decimal:
        return float(text[:-1]) * decimal[text[-1]]
    return float(text)


def cli_flags(tokens: list[str]) -> dict[str, str | None]:
    """`--a=1 --b 2 --c` -> {"--a": "1", "--b": "2", "--c": None}."""
    flags, i = {}, 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--"):
            if "=" in token:
                key, value = token.split("=", 1)
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                key, value = token, tokens[i + 1]
                i += 1
            else:
                key, value = token, None
            flags[key] = value
        i += 1
    return flags


# ---------------------------------------------------------------------------------------------
# Schema validation


def kubernetes_schema_problems(objects) -> list[str]:
    """Built-in objects against the Kubernetes OpenAPI schemas, unknown fields rejected."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (ships the K8s schemas)"
    )
    problems = []
    for obj in objects:
        if obj.get("kind") in RAY_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = "/".join(str(p) for p in err.path)
            problems.append(f"{object_id(obj)} at {where or '/'}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError as err:
            problems.append(f"{object_id(obj)}: {err.message}")
    return problems


INT_FORMAT_BOUNDS = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# The CRD leaves the top-level metadata to the API server; this is the part a manifest sets.
OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": DNS_1035_LABEL, "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
}
SCHEMA_ONLY_KEYS = {"description", "default", "example", "externalDocs", "format", "nullable"}


def structural_to_jsonschema(node):
    """Translate a CRD structural schema (OpenAPI v3 + x-kubernetes-*) to plain JSON Schema.

    - an object without x-kubernetes-preserve-unknown-fields rejects fields it does not list
      (the API server prunes them, and `kubectl apply` with strict field validation refuses them);
    - x-kubernetes-int-or-string -> integer or string; format int32/int64 -> numeric bounds;
    - nullable -> null allowed; list-type set -> unique items; list-type map -> unique keys
      (custom keyword `x-list-map-keys`, registered in crd_validator);
    - x-kubernetes-validations (CEL) cannot be evaluated here and are dropped.
    """
    if isinstance(node, list):
        return [structural_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: structural_to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            out[key] = structural_to_jsonschema(value)
        elif key.startswith("x-kubernetes-") or key in SCHEMA_ONLY_KEYS:
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("type") == "integer" and node.get("format") in INT_FORMAT_BOUNDS:
        low, high = INT_FORMAT_BOUNDS[node["format"]]
        out["minimum"] = max(out.get("minimum", low), low)
        out["maximum"] = min(out.get("maximum", high), high)
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", OBJECT_META)
    if (
        node.get("type") == "object"
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if node.get("x-kubernetes-list-type") == "map":
        item_props = node.get("items", {}).get("properties", {})
        out["x-list-map-keys"] = [
            [k, item_props.get(k, {}).get("default")]
            for k in node.get("x-kubernetes-list-map-keys", [])
        ]
    return out


def _unique_map_keys(validator, keys_and_defaults, instance, schema):
    import jsonschema

    if not validator.is_type(instance, "array"):
        return
    seen = set()
    for item in instance:
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k, default) for k, default in keys_and_defaults)
        if key in seen:
            names = [k for k, _ in keys_and_defaults]
            yield jsonschema.ValidationError(
                f"duplicate entry for list-map key {names}={list(key)}"
            )
        seen.add(key)


def crd_dir() -> Path | None:
    value = os.environ.get("KUBERAY_CRD_DIR")
    if not value:
        return None
    for candidate in (Path(value), Path.cwd() / value, REPO / value):
        if all((candidate / f).is_file() for f in CRD_FILES.values()):
            return candidate.resolve()
    return None


def require_crd_dir() -> Path:
    directory = crd_dir()
    if directory is None:
        pytest.skip(
            "KubeRay CRD schemas not found: set KUBERAY_CRD_DIR to a directory with "
            f"{' and '.join(CRD_FILES.values())} (KubeRay v1.7.0)"
        )
    return directory


@functools.cache
def crd_validator(directory: Path, kind: str):
    jsonschema = pytest.importorskip("jsonschema", reason="pip install jsonschema")
    crd = yaml.load((directory / CRD_FILES[kind]).read_text(), Loader=YAML_LOADER)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = structural_to_jsonschema(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    schema["required"] = sorted(
        set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"}
    )
    schema["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/v1"}
    schema["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
    cls = jsonschema.validators.extend(
        jsonschema.Draft202012Validator, {"x-list-map-keys": _unique_map_keys}
    )
    cls.check_schema(schema)
    return cls(schema)


def crd_schema_problems(objects, directory: Path) -> list[str]:
    problems = []
    for obj in objects:
        if obj.get("kind") not in RAY_KINDS:
            continue
        for err in crd_validator(directory, obj["kind"]).iter_errors(obj):
            where = "/".join(str(p) for p in err.absolute_path)
            problems.append(f"{object_id(obj)} at {where or '/'}: {err.message}")
    return problems


# ---------------------------------------------------------------------------------------------
# Policy


def resource_problems(objects) -> list[str]:
    """Every container (and the Ray autoscaler) requests and limits CPU and memory, requests <=
    limits; Ray containers request exactly their limits (Ray sizes itself from the limits)."""
    problems = []

    def check(where, resources, equal=False):
        for kind in ("requests", "limits"):
            missing = {"cpu", "memory"} - set((resources or {}).get(kind) or {})
            if missing:
                problems.append(f"{where}: no {kind} for {sorted(missing)}")
        requests, limits = (
            (resources or {}).get("requests") or {},
            (resources or {}).get("limits") or {},
        )
        for name in sorted(set(requests) & set(limits)):
            try:
                request, limit = parse_quantity(requests[name]), parse_quantity(limits[name])
            except ValueError:
                problems.append(
                    f"{where}: malformed {name} quantity {requests[name]!r} or {limits[name]!r}"
                )
                continue
            if request > limit:
                problems.append(f"{where}: {name} request {requests[name]} > limit {limits[name]}")
            elif equal and request != limit:
                problems.append(
                    f"{where}: Ray container {name} request {requests[name]} != limit {limits[name]}"
                )

    for obj in objects:
        ray_containers = set()
        for where, spec in ray_cluster_specs(obj):
            ray_containers |= {id(ray_container(group)) for _, group in ray_groups(spec)}
            if spec.get("enableInTreeAutoscaling"):
                check(
                    f"{where}.autoscalerOptions",
                    (spec.get("autoscalerOptions") or {}).get("resources"),
                )
        for where, c in containers(obj):
            check(where, c.get("resources"), equal=id(c) in ray_containers)
    return problems


def gpu_problems(objects) -> list[str]:
    """A Ray group's nvidia.com/gpu limit equals its rayStartParams num-gpus, both or neither."""
    problems = []
    for obj in objects:
        for where, spec in ray_cluster_specs(obj):
            for name, group in ray_groups(spec):
                resources = ray_container(group).get("resources") or {}
                try:
                    limit = parse_quantity((resources.get("limits") or {}).get("nvidia.com/gpu", 0))
                    request = parse_quantity(
                        (resources.get("requests") or {}).get("nvidia.com/gpu", limit)
                    )
                    num_gpus = parse_quantity(
                        (group.get("rayStartParams") or {}).get("num-gpus", 0)
                    )
                except ValueError as err:
                    problems.append(f"{where} group {name}: malformed GPU count: {err}")
                    continue
                if limit != num_gpus:
                    problems.append(
                        f"{where} group {name}: nvidia.com/gpu limit {limit:g} != num-gpus {num_gpus:g}"
                    )
                if request != limit:
                    problems.append(
                        f"{where} group {name}: nvidia.com/gpu request {request:g} != limit {limit:g}"
                    )
    return problems


def image_problems(objects) -> list[str]:
    """Every image has a tag (or a digest) and the tag is not `latest`."""
    problems = []
    for obj in objects:
        images = [(where, c.get("image")) for where, c in containers(obj)]
        for where, spec in ray_cluster_specs(obj):
            if (spec.get("autoscalerOptions") or {}).get("image"):
                images.append((f"{where}.autoscalerOptions", spec["autoscalerOptions"]["image"]))
        for where, image in images:
            if not image:
                problems.append(f"{where}: no image")
                continue
            name, _, digest = image.partition("@")
            last = name.rsplit("/", 1)[-1]
            tag = last.split(":", 1)[1] if ":" in last else None
            if digest and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                problems.append(f"{where}: malformed digest in {image}")
            elif not digest and not tag:
                problems.append(f"{where}: image {image} has no tag")
            elif tag == "latest":
                problems.append(f"{where}: image {image} uses `latest`")
    return problems


def credential_problems(objects) -> list[str]:
    """Credentials only through Secrets: no secret-looking env var with an inline value, no
    secret-looking ConfigMap key, no URI with a password, no rendered Secret object."""
    problems = []
    for obj in objects:
        if obj.get("kind") == "Secret":
            problems.append(f"{object_id(obj)}: Secret rendered from the repository")
        if obj.get("kind") == "ConfigMap":
            for key, value in (obj.get("data") or {}).items():
                if SECRET_LIKE_NAME.search(key):
                    problems.append(f"{object_id(obj)}: secret-looking key {key} in a ConfigMap")
                if re.search(r"password\s*[=:]\s*\S", str(value), re.IGNORECASE):
                    problems.append(f"{object_id(obj)}: password in ConfigMap key {key}")
        for where, c in containers(obj):
            for env in c.get("env") or []:
                if SECRET_LIKE_NAME.search(env["name"]) and "value" in env:
                    problems.append(
                        f"{where}: env {env['name']} has an inline value; use secretKeyRef"
                    )
        for text in _strings(obj):
            if URI_WITH_PASSWORD.search(text):
                problems.append(f"{object_id(obj)}: URI with a password: {text[:60]}")
    return problems


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def reference_problems(objects) -> list[str]:
    """Referenced ConfigMaps are rendered; referenced Secrets (and their keys) are documented in
    k8s/secrets/NAME.env.example, which is what README tells the user to create."""
    problems = []
    configmaps = {o["metadata"]["name"] for o in objects if o.get("kind") == "ConfigMap"}
    secrets = secret_example_keys()
    for obj in objects:
        refs = []  # (kind, name, key or None)
        for _, c in containers(obj):
            for env in c.get("env") or []:
                source = env.get("valueFrom") or {}
                if "secretKeyRef" in source:
                    refs.append(
                        ("Secret", source["secretKeyRef"]["name"], source["secretKeyRef"]["key"])
                    )
                if "configMapKeyRef" in source:
                    refs.append(("ConfigMap", source["configMapKeyRef"]["name"], None))
            for source in c.get("envFrom") or []:
                if "secretRef" in source:
                    refs.append(("Secret", source["secretRef"]["name"], None))
                if "configMapRef" in source:
                    refs.append(("ConfigMap", source["configMapRef"]["name"], None))
        for _, spec in pod_specs(obj):
            for volume in spec.get("volumes") or []:
                if "configMap" in volume:
                    refs.append(("ConfigMap", volume["configMap"]["name"], None))
                if "secret" in volume:
                    refs.append(("Secret", volume["secret"]["secretName"], None))
        for kind, name, key in refs:
            if kind == "ConfigMap" and name not in configmaps:
                problems.append(f"{object_id(obj)}: ConfigMap {name} is not part of the overlay")
            if kind == "Secret" and name not in secrets:
                problems.append(
                    f"{object_id(obj)}: Secret {name} has no k8s/secrets/{name}.env.example"
                )
            elif kind == "Secret" and key and key not in secrets[name]:
                problems.append(
                    f"{object_id(obj)}: key {key} missing from k8s/secrets/{name}.env.example"
                )
    return problems


def rayjob_problems(objects) -> list[str]:
    """Each RayJob is a resumable batch job of the orchestrator on its own, cleaned-up cluster."""
    problems = []
    clusters = [o for o in objects if o.get("kind") == "RayCluster"]
    service_ports = {
        (o["metadata"]["name"], port.get("port"))
        for o in objects
        if o.get("kind") == "Service"
        for port in o.get("spec", {}).get("ports", [])
    }
    for job in (o for o in objects if o.get("kind") == "RayJob"):
        where, spec = object_id(job), job.get("spec") or {}
        if "generateName" in job.get("metadata", {}) or not job.get("metadata", {}).get("name"):
            problems.append(f"{where}: needs a fixed metadata.name (resume on retry)")
        if not spec.get("jobId"):
            problems.append(
                f"{where}: needs a fixed jobId (submission id), or a retry submits twice"
            )
        if spec.get("shutdownAfterJobFinishes") is not True:
            problems.append(f"{where}: shutdownAfterJobFinishes must be true")
        if (
            not isinstance(spec.get("ttlSecondsAfterFinished"), int)
            or spec["ttlSecondsAfterFinished"] <= 0
        ):
            problems.append(f"{where}: ttlSecondsAfterFinished must be a positive integer")
        if (
            not isinstance(spec.get("activeDeadlineSeconds"), int)
            or spec["activeDeadlineSeconds"] <= 0
        ):
            problems.append(f"{where}: activeDeadlineSeconds must be a positive integer")
        entrypoint = " ".join(str(spec.get("entrypoint", "")).split())
        if not entrypoint.startswith("python -m orchestrator "):
            problems.append(
                f"{where}: entrypoint must start with `python -m orchestrator`: {entrypoint!r}"
            )
        args = dict(t.split("=", 1) for t in entrypoint.split() if "=" in t)
        if not args.get("+sweep"):
            problems.append(f"{where}: entrypoint names no +sweep=")
        if args.get("cluster.address") != "auto":
            problems.append(f"{where}: entrypoint must attach with cluster.address=auto")
        tracking = urlparse(args.get("tracking.uri", ""))
        if tracking.scheme != "http" or (tracking.hostname, tracking.port) not in service_ports:
            problems.append(
                f"{where}: tracking.uri must be http://SERVICE:PORT of a Service in the overlay"
                f" (the MLflow server), not {args.get('tracking.uri')!r}"
            )
        storage = args.get("storage.path", "")
        if not (storage.startswith("s3://") or _on_shared_volume(storage, spec)):
            problems.append(
                f"{where}: storage.path must be s3://... or on a volume every Ray pod mounts,"
                f" so it outlives the cluster: {storage!r}"
            )
        if "clusterSelector" in spec or "rayClusterSpec" not in spec:
            problems.append(f"{where}: must embed rayClusterSpec (k8s/README.md, design choices)")
        elif len(clusters) == 1 and spec["rayClusterSpec"] != clusters[0].get("spec"):
            problems.append(
                f"{where}: rayClusterSpec differs from RayCluster {clusters[0]['metadata']['name']}"
                " (overlay `replacements` missing or before its patches?)"
            )
    return problems


def _on_shared_volume(path: str, job_spec: dict) -> bool:
    """Whether an absolute path lies on a PersistentVolumeClaim mounted by every Ray pod."""
    if not path.startswith("/"):
        return False
    groups = list(ray_groups(job_spec.get("rayClusterSpec") or {}))
    for _, group in groups:
        pod = (group.get("template") or {}).get("spec", {})
        claims = {v["name"] for v in pod.get("volumes") or [] if "persistentVolumeClaim" in v}
        mounts = ray_container(group).get("volumeMounts") or []
        if not any(
            m["name"] in claims and (path + "/").startswith(m["mountPath"].rstrip("/") + "/")
            for m in mounts
        ):
            return False
    return bool(groups)


def autoscaling_problems(objects) -> list[str]:
    problems = []
    for obj in objects:
        for where, spec in ray_cluster_specs(obj):
            if spec.get("enableInTreeAutoscaling") is not True:
                problems.append(f"{where}: enableInTreeAutoscaling must be true")
            for group in spec.get("workerGroupSpecs") or []:
                if group.get("minReplicas") != 0:
                    problems.append(
                        f"{where} group {group.get('groupName')}: minReplicas must be 0"
                    )
    return problems


MIN_RAY_FOR_TOKEN_AUTH = (2, 52, 0)  # KubeRay refuses authOptions.mode=token below it


def auth_problems(objects) -> list[str]:
    """Every Ray cluster, the RayJob's own included, has KubeRay's token authentication
    (authOptions.mode: token) on a Ray that supports it: a cluster without it runs the code of
    anyone who reaches its ports."""
    problems = []
    for obj in objects:
        for where, spec in ray_cluster_specs(obj):
            auth = spec.get("authOptions") or {}
            if auth.get("mode") != "token":
                problems.append(f"{where}: authOptions.mode must be token, got {auth.get('mode')}")
            if auth.get("enableK8sTokenAuth"):
                problems.append(f"{where}: authOptions.enableK8sTokenAuth: KubeRay refuses it in a "
                                "RayJob, and the RayJob copies this spec")
            version = tuple(int(p) for p in re.findall(r"\d+", str(spec.get("rayVersion", "")))[:3])
            if version < MIN_RAY_FOR_TOKEN_AUTH:
                problems.append(f"{where}: rayVersion {spec.get('rayVersion')} is below 2.52.0, "
                                "the first with token authentication")
    return problems


def mlflow_problems(objects) -> list[str]:
    """The MLflow server: Service mlflow:5000, basic auth, PostgreSQL from a Secret, S3 artifacts."""
    problems = []
    service = next(
        (o for o in objects if o.get("kind") == "Service" and o["metadata"]["name"] == "mlflow"),
        None,
    )
    if service is None or 5000 not in [p.get("port") for p in service["spec"].get("ports", [])]:
        problems.append("Service mlflow with port 5000 missing")
    servers = [
        (w, c)
        for o in objects
        if o.get("kind") == "Deployment"
        for w, c in containers(o)
        if (c.get("command") or [])[:1] == ["mlflow"]
        or "mlflow server" in " ".join(c.get("command") or [])
    ]
    if not servers:
        problems.append("no Deployment runs `mlflow server`")
    for where, c in servers:
        flags = cli_flags([str(t) for t in (c.get("command") or []) + (c.get("args") or [])])
        if flags.get("--app-name") != "basic-auth":
            problems.append(f"{where}: must run with --app-name basic-auth")
        if "--serve-artifacts" not in flags:
            problems.append(f"{where}: must run with --serve-artifacts")
        if not (flags.get("--artifacts-destination") or "").startswith("s3://"):
            problems.append(f"{where}: --artifacts-destination must be s3://...")
        if "--backend-store-uri" in flags:
            problems.append(f"{where}: backend store URI holds a password: pass it from a Secret")
        backend = next(
            (e for e in c.get("env") or [] if e["name"] == "MLFLOW_BACKEND_STORE_URI"), {}
        )
        if "secretKeyRef" not in (backend.get("valueFrom") or {}):
            problems.append(f"{where}: MLFLOW_BACKEND_STORE_URI must come from a secretKeyRef")
        needed = {
            "MLFLOW_S3_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "MLFLOW_AUTH_ADMIN_USERNAME",
            "MLFLOW_AUTH_ADMIN_PASSWORD",
            "MLFLOW_FLASK_SERVER_SECRET_KEY",
        }
        missing = needed - container_env(c, objects)
        if missing:
            problems.append(f"{where}: environment lacks {sorted(missing)}")
    return problems


def ray_env_problems(objects) -> list[str]:
    """Ray containers can log in to MLflow and reach the S3 bucket used as storage.path."""
    problems = []
    needed = {
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL_S3",
    }
    for obj in objects:
        for where, spec in ray_cluster_specs(obj):
            for name, group in ray_groups(spec):
                missing = needed - container_env(ray_container(group), objects)
                if missing:
                    problems.append(f"{where} group {name}: environment lacks {sorted(missing)}")
    return problems


POLICIES = [
    resource_problems,
    gpu_problems,
    image_problems,
    credential_problems,
    reference_problems,
    rayjob_problems,
    autoscaling_problems,
    auth_problems,
    mlflow_problems,
    ray_env_problems,
]


# ---------------------------------------------------------------------------------------------
# Tests on the shipped overlays


def test_overlays_are_discovered():
    assert {"gpu", "cpu-dev"} <= set(OVERLAYS), f"k8s/overlays/* holds {OVERLAYS}"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_distinct_named_objects(overlay):
    objects = render(overlay)
    ids = [(o.get("apiVersion"), o.get("kind"), o.get("metadata", {}).get("name")) for o in objects]
    assert objects and all(all(i) for i in ids), ids
    assert len(ids) == len(set(ids)), "duplicate objects"
    assert {"RayCluster", "RayJob", "Deployment", "Service"} <= {o["kind"] for o in objects}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_objects_match_kubernetes_schemas(overlay):
    assert kubernetes_schema_problems(render(overlay)) == []


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_objects_match_kuberay_crds(overlay):
    directory = require_crd_dir()
    objects = render(overlay)
    assert [o for o in objects if o["kind"] in RAY_KINDS], "nothing to validate"
    assert crd_schema_problems(objects, directory) == []


@needs_kubectl
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.__name__)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_policy(overlay, policy):
    assert policy(render(overlay)) == []


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_clusters_use_token_auth(overlay):
    """The long-lived RayCluster and the RayJob's own cluster both: KubeRay then makes the token
    Secret and gives it to every Ray container and to the job's submitter."""
    modes = {
        obj["kind"]: (spec.get("authOptions") or {}).get("mode")
        for obj in render(overlay)
        for _, spec in ray_cluster_specs(obj)
    }
    assert modes == {"RayCluster": "token", "RayJob": "token"}


@needs_kubectl
def test_gpu_overlay_has_a_gpu_worker_group():
    groups = [
        g
        for o in render("gpu")
        for _, spec in ray_cluster_specs(o)
        for g in spec.get("workerGroupSpecs", [])
    ]
    assert groups and all(float(g["rayStartParams"].get("num-gpus", 0)) >= 1 for g in groups)


@needs_kubectl
def test_cpu_dev_overlay_uses_no_gpu():
    rendered = yaml.safe_dump(list(render("cpu-dev")))
    assert "nvidia.com/gpu" not in rendered and "num-gpus" not in rendered
    assert {"postgres", "minio"} <= {
        o["metadata"]["name"] for o in render("cpu-dev") if o["kind"] == "StatefulSet"
    }


def test_dockerfile_base_image_matches_ray_version():
    dockerfile = (K8S / "Dockerfile").read_text()
    match = re.search(
        r"^ARG RAY_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-py311\S*$", dockerfile, re.MULTILINE
    )
    assert match, (
        "k8s/Dockerfile must default RAY_IMAGE to a pinned rayproject/ray:X.Y.Z-py311... tag"
    )
    cluster = yaml.safe_load((K8S / "base" / "raycluster.yaml").read_text())
    assert cluster["spec"]["rayVersion"] == match.group(1)
    assert "pip install" in dockerfile and ":latest" not in dockerfile


# ---------------------------------------------------------------------------------------------
# The checks can fail: broken objects are rejected


def _container(**overrides):
    container = {
        "name": "c",
        "image": "example.org/app:1.0",
        "resources": {
            "requests": {"cpu": "1", "memory": "1Gi"},
            "limits": {"cpu": "1", "memory": "1Gi"},
        },
    }
    container.update(overrides)
    return container


def _pod(**container_overrides):
    return [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p"},
            "spec": {"containers": [_container(**container_overrides)]},
        }
    ]


def _gpus(n):
    return {
        "requests": {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": n},
        "limits": {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": n},
    }


def _raycluster(worker_params, worker_resources):
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "example"},
        "spec": {
            "rayVersion": "2.60.0",
            "authOptions": {"mode": "token"},
            "enableInTreeAutoscaling": True,
            "autoscalerOptions": {"resources": _container()["resources"]},
            "headGroupSpec": {
                "rayStartParams": {},
                "template": {"spec": {"containers": [_container(name="ray-head")]}},
            },
            "workerGroupSpecs": [
                {
                    "groupName": "gpu",
                    "minReplicas": 0,
                    "maxReplicas": 2,
                    "rayStartParams": worker_params,
                    "template": {
                        "spec": {
                            "containers": [
                                _container(name="ray-worker", resources=worker_resources)
                            ]
                        }
                    },
                }
            ],
        },
    }


def _mlflow_deployment(args):
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "mlflow"},
            "spec": {
                "template": {
                    "spec": {"containers": [_container(command=["mlflow", "server"], args=args)]}
                }
            },
        }
    ]


GPU_CLUSTER = _raycluster({"num-gpus": "1"}, _gpus(1))


def _with_spec(cluster, **fields):
    """A copy of `cluster` with spec fields replaced (None: removed)."""
    changed = copy.deepcopy(cluster)
    for key, value in fields.items():
        changed["spec"].pop(key, None)
        if value is not None:
            changed["spec"][key] = value
    return changed


def _rayjob(cluster_spec):
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": "j"},
        "spec": {"entrypoint": "python -m orchestrator", "rayClusterSpec": cluster_spec},
    }


SECRET_ENV = [{"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]

ACCEPTED = {
    "container with requests and limits": (resource_problems, _pod()),
    "image pinned by digest": (image_problems, _pod(image="localhost:5000/app@sha256:" + "0" * 64)),
    "password from a secretKeyRef": (credential_problems, _pod(env=SECRET_ENV)),
    "num-gpus equal to the GPU limit": (gpu_problems, [GPU_CLUSTER]),
    "token auth on Ray 2.60": (auth_problems, [GPU_CLUSTER]),
}
REJECTED = {
    "container without limits": (
        resource_problems,
        _pod(resources={"requests": {"cpu": "1", "memory": "1Gi"}}),
        "no limits for ['cpu', 'memory']",
    ),
    "request above limit": (
        resource_problems,
        _pod(
            resources={
                "requests": {"cpu": "2", "memory": "1Gi"},
                "limits": {"cpu": "1", "memory": "1Gi"},
            }
        ),
        "cpu request 2 > limit 1",
    ),
    "untagged image": (image_problems, _pod(image="example.org/app"), "has no tag"),
    "latest image": (image_problems, _pod(image="example.org/app:latest"), "uses `latest`"),
    "registry port is no tag": (image_problems, _pod(image="localhost:5000/app"), "has no tag"),
    "malformed digest": (
        image_problems,
        _pod(image="example.org/app@sha256:abc"),
        "malformed digest",
    ),
    "inline password": (
        credential_problems,
        _pod(env=[{"name": "DB_PASSWORD", "value": "x"}]),
        "env DB_PASSWORD has an inline value",
    ),
    "password in a URI": (
        credential_problems,
        _pod(args=["--backend-store-uri", "postgresql://u:hunter2@db/mlflow"]),
        "URI with a password",
    ),
    "num-gpus above the GPU limit": (
        gpu_problems,
        [_raycluster({"num-gpus": "2"}, _gpus(1))],
        "nvidia.com/gpu limit 1 != num-gpus 2",
    ),
    "GPU limit without num-gpus": (
        gpu_problems,
        [_raycluster({}, _gpus(1))],
        "nvidia.com/gpu limit 1 != num-gpus 0",
    ),
    "num-gpus without GPU limit": (
        gpu_problems,
        [_raycluster({"num-gpus": "1"}, _container()["resources"])],
        "nvidia.com/gpu limit 0 != num-gpus 1",
    ),
    "cluster without authOptions": (
        auth_problems,
        [_with_spec(GPU_CLUSTER, authOptions=None)],
        "RayCluster/example: authOptions.mode must be token, got None",
    ),
    "cluster with auth disabled": (
        auth_problems,
        [_with_spec(GPU_CLUSTER, authOptions={"mode": "disabled"})],
        "authOptions.mode must be token, got disabled",
    ),
    "RayJob's cluster without authOptions": (
        auth_problems,
        [_rayjob(_with_spec(GPU_CLUSTER, authOptions=None)["spec"])],
        "RayJob/j.rayClusterSpec: authOptions.mode must be token",
    ),
    "Kubernetes-delegated auth": (
        auth_problems,
        [_with_spec(GPU_CLUSTER, authOptions={"mode": "token", "enableK8sTokenAuth": True})],
        "KubeRay refuses it in a RayJob",
    ),
    "token auth on a Ray without it": (
        auth_problems,
        [_with_spec(GPU_CLUSTER, rayVersion="2.51.1")],
        "rayVersion 2.51.1 is below 2.52.0",
    ),
    "MLflow without basic auth": (
        mlflow_problems,
        _mlflow_deployment(["--serve-artifacts"]),
        "must run with --app-name basic-auth",
    ),
}


@pytest.mark.parametrize("policy, objects", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_policy_accepts_valid_example(policy, objects):
    assert policy(objects) == []


@pytest.mark.parametrize("policy, objects, message", REJECTED.values(), ids=REJECTED.keys())
def test_policy_rejects_broken_example(policy, objects, message):
    assert message in " ".join(policy(objects))


def test_rayjob_policy_names_every_missing_setting():
    job = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": "j"},
        "spec": {"entrypoint": "python train.py", "rayClusterSpec": {}},
    }
    problems = " ".join(rayjob_problems([job]))
    for expected in (
        "jobId",
        "shutdownAfterJobFinishes",
        "ttlSecondsAfterFinished",
        "activeDeadlineSeconds",
        "python -m orchestrator",
        "tracking.uri",
        "storage.path",
    ):
        assert expected in problems


def test_rayjob_storage_path_must_outlive_the_cluster():
    cluster = copy.deepcopy(GPU_CLUSTER)
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "mlflow"},
        "spec": {"ports": [{"port": 5000}]},
    }
    job = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": "j"},
        "spec": {
            "jobId": "j",
            "entrypoint": "python -m orchestrator +sweep=s cluster.address=auto"
            " tracking.uri=http://mlflow:5000 storage.path=/shared/runs",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 60,
            "activeDeadlineSeconds": 60,
            "rayClusterSpec": cluster["spec"],
        },
    }
    assert "storage.path" in " ".join(rayjob_problems([cluster, service, job]))  # pod-local disk

    for _, group in ray_groups(cluster["spec"]):
        pod = group["template"]["spec"]
        pod["volumes"] = [{"name": "shared", "persistentVolumeClaim": {"claimName": "runs"}}]
        ray_container(group)["volumeMounts"] = [{"name": "shared", "mountPath": "/shared"}]
    assert rayjob_problems([cluster, service, job]) == []


def test_kubernetes_schema_rejects_unknown_field():
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [_container()]},
            },
        },
    }
    assert kubernetes_schema_problems([deployment]) == []
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    assert "'resource' was unexpected" in " ".join(kubernetes_schema_problems([deployment]))


def _misspell_ray_start_params(cluster):
    group = cluster["spec"]["workerGroupSpecs"][0]
    group["rayStartParam"] = group.pop("rayStartParams")


def _head_container(cluster):
    return cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


CRD_BREAKAGES = {
    "misspelled rayStartParams": (_misspell_ray_start_params, "'rayStartParam' was unexpected"),
    "auth mode not in the enum": (
        lambda c: c["spec"].update(authOptions={"mode": "Token"}),
        "authOptions/mode: 'Token' is not one of ['disabled', 'token']",
    ),
    "num-gpus as a number": (
        lambda c: c["spec"]["workerGroupSpecs"][0]["rayStartParams"].update({"num-gpus": 1}),
        "rayStartParams/num-gpus: 1 is not of type 'string'",
    ),
    "unknown container field": (
        lambda c: _head_container(c).update(imagePullPolicyy="Always"),
        "'imagePullPolicyy' was unexpected",
    ),
    "malformed quantity": (
        lambda c: _head_container(c)["resources"]["limits"].update(cpu="1.5.5"),
        "limits/cpu: '1.5.5' does not match",
    ),
    "duplicate container port": (
        lambda c: _head_container(c).update(ports=[{"containerPort": 1}, {"containerPort": 1}]),
        "duplicate entry",
    ),
    "int32 overflow": (
        lambda c: c["spec"]["workerGroupSpecs"][0].update(maxReplicas=2**31),
        "maxReplicas: 2147483648 is greater than the maximum",
    ),
    "name that is not a DNS-1035 label": (
        lambda c: c["metadata"].update(name="Example_1"),
        "metadata/name: 'Example_1' does not match",
    ),
}


@pytest.mark.parametrize("breakage, message", CRD_BREAKAGES.values(), ids=CRD_BREAKAGES.keys())
def test_crd_schema_rejects_broken_raycluster(breakage, message):
    directory = require_crd_dir()
    cluster = copy.deepcopy(GPU_CLUSTER)
    assert crd_schema_problems([cluster], directory) == []
    breakage(cluster)
    assert message in " ".join(crd_schema_problems([cluster], directory))
