"""The Kubernetes and KServe manifests of docs/deployment.md, taken from the page itself, validated
with jsonschema against the vendored schemas (deploy/schemas/: KServe v0.20.0's CRDs, Kubernetes
v1.34.0's API), with unknown fields as errors, as `kubectl apply --validate=strict` reports them."""
import copy
import functools
import gzip
import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft4Validator, Draft202012Validator
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "deployment.md"
SCHEMAS = ROOT / "deploy" / "schemas"
KUBERNETES = SCHEMAS / "kubernetes-v1.34.0"
KSERVE = SCHEMAS / "kserve-v0.20.0"
KUBERNETES_KINDS = {("apps/v1", "Deployment"): "deployment-apps-v1.json", ("v1", "Service"): "service-v1.json",
                    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicy-networking-v1.json"}
KSERVE_KINDS = {("serving.kserve.io/v1beta1", "InferenceService"): "serving.kserve.io_inferenceservices.yaml.gz",
                ("serving.kserve.io/v1alpha1", "ServingRuntime"): "serving.kserve.io_servingruntimes.yaml.gz"}


def read(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


def doc_manifests(text: str) -> list[dict]:
    """Every YAML document of the page's ```yaml blocks."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", text, re.S | re.M)
    return [doc for block in blocks for doc in yaml.safe_load_all(block) if doc is not None]


@functools.cache
def kubernetes_definitions() -> dict:
    return json.loads(read(KUBERNETES / "_definitions.json.gz"))


@functools.cache
def kubernetes_validator(schema_file: str, definition: str | None = None) -> Draft202012Validator:
    """The validator of a Kubernetes kind (its schema file), or of one of the API's definitions."""
    definitions = kubernetes_definitions()
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    schema = (json.loads(read(KUBERNETES / schema_file)) if definition is None
              else {"$ref": f"{definitions['$id']}#/$defs/{definition}"})
    return Draft202012Validator(schema, registry=registry)


def strict(schema):
    """A CRD schema with unknown fields rejected: ``additionalProperties: false`` on each object
    that lists its properties, unless it keeps unknown fields (x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def kserve_validator(crd_file: str, version: str) -> Draft4Validator:
    """The validator of a KServe kind at ``version``: the CRD's openAPIV3Schema (OpenAPI 3.0's
    schema dialect, closest to draft 4), made strict."""
    crd = yaml.load(read(KSERVE / crd_file), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 2 MB
    [entry] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert entry["served"], f"{crd['metadata']['name']} {version} is not served"
    return Draft4Validator(strict(entry["schema"]["openAPIV3Schema"]))


def validation_errors(manifest: dict) -> list[str]:
    """Where and why ``manifest`` does not match its schema (empty: valid)."""
    key = (manifest.get("apiVersion"), manifest.get("kind"))
    if key in KUBERNETES_KINDS:
        found = list(kubernetes_validator(KUBERNETES_KINDS[key]).iter_errors(manifest))
    elif key in KSERVE_KINDS:
        version = key[0].split("/")[1]
        found = list(kserve_validator(KSERVE_KINDS[key], version).iter_errors(manifest))
        # a CRD's schema leaves metadata to the API server, which checks it as ObjectMeta
        meta = kubernetes_validator("", "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
        found += list(meta.iter_errors(manifest.get("metadata", {})))
    else:
        return [f"no vendored schema for {key}: add it to deploy/schemas/ and this test"]
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in found)


MANIFESTS = doc_manifests(DOCS.read_text())


def test_the_page_has_every_manifest():
    kinds = sorted(m["kind"] for m in MANIFESTS)
    assert kinds == ["Deployment", "InferenceService", "NetworkPolicy", "Service", "ServingRuntime"]


@pytest.mark.parametrize("manifest", MANIFESTS, ids=[f"{m['kind']}-{m['metadata']['name']}" for m in MANIFESTS])
def test_manifest_matches_its_schema(manifest):
    assert validation_errors(manifest) == []


def by_kind(kind: str) -> dict:
    [manifest] = [m for m in MANIFESTS if m["kind"] == kind]
    return copy.deepcopy(manifest)


def broken(kind: str, edit) -> dict:
    manifest = by_kind(kind)
    edit(manifest)
    return manifest


def container(manifest):
    spec = manifest["spec"]
    return (spec["template"]["spec"] if "template" in spec else spec)["containers"][0]


@pytest.mark.parametrize("kind, edit, where", [
    ("Deployment", lambda m: container(m)["ports"][0].update(port=8080), "spec/template/spec/containers/0/ports/0"),
    ("Deployment", lambda m: m["spec"].update(replicas="3"), "spec/replicas"),
    ("Deployment", lambda m: m["metadata"].update(labels={"app": ["x"]}), "metadata/labels/app"),
    ("Service", lambda m: m["spec"]["ports"][0].update(port="http"), "spec/ports/0/port"),
    ("NetworkPolicy", lambda m: m["spec"].update(ingres=[]), "spec"),
    ("InferenceService", lambda m: m["spec"]["predictor"]["model"].update(storageURI="s3://x"),
     "spec/predictor/model"),
    ("InferenceService", lambda m: m["spec"]["predictor"].update(minReplicas="2"), "spec/predictor/minReplicas"),
    ("InferenceService", lambda m: m["metadata"].update(name=7), "name"),
    ("ServingRuntime", lambda m: m["spec"]["supportedModelFormats"][0].update(autoselect=True),
     "spec/supportedModelFormats/0"),
    ("ServingRuntime", lambda m: container(m).update(image=5), "spec/containers/0/image"),
])
def test_a_broken_manifest_is_rejected(kind, edit, where):
    errors = validation_errors(broken(kind, edit))
    assert any(e.startswith(f"{where}:") for e in errors), errors


def test_an_unknown_kind_is_an_error():
    assert validation_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}})


def test_vendored_schemas_are_the_upstream_files():
    """The SHA-256 sums listed in deploy/schemas/README.md, of the files as they are here."""
    listed = re.findall(r"^\| `([^`]+)` \|(?: `[^`]+` \|)? `([0-9a-f]{64})` \|$", (SCHEMAS / "README.md").read_text(), re.M)
    files = {p.name: p for p in SCHEMAS.rglob("*") if p.is_file() and p.name != "README.md"}
    assert sorted(name for name, _ in listed) == sorted(files)
    for name, digest in listed:
        assert hashlib.sha256(read(files[name])).hexdigest() == digest, name
