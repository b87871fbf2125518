"""deploy/k8s must be valid Kubernetes and KEDA, and keep the project's operating rules.

No cluster runs on the build machines, so nothing is applied: core kinds are checked with
``kubernetes-validate --strict`` against the Kubernetes JSON schemas it bundles, KEDA
ScaledObjects against deploy/k8s/keda-scaledobject.schema.json, and the rules (non-root,
read-only root, probes, resources, partition cap, no keys in the bridge) are read from
the YAML. Each check also rejects a broken fixture, so a check that passes everything is
caught.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SCHEMA = json.loads((K8S / "keda-scaledobject.schema.json").read_text())

# Kubernetes versions to validate against; both are bundled by kubernetes-validate 1.37.0
# (`kubernetes-validate --help` shows its default, the newest). 1.30 is the oldest we target.
K8S_VERSIONS = ("1.30.0", "1.37.0")

# API groups kubernetes-validate has no schema for (it only warns and exits 0 on them):
# KEDA's CRDs, checked with our own schema, and kustomize's config, which is not a resource.
NOT_CORE = ("keda.sh/", "kustomize.config.k8s.io/")

POD_KINDS = {
    "Deployment": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}


def _docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


MANIFESTS = sorted(p for p in K8S.rglob("*.yaml"))
DOCS = {path: _docs(path) for path in MANIFESTS}
ALL = [doc for docs in DOCS.values() for doc in docs]


def _is_core(doc: dict) -> bool:
    return not doc["apiVersion"].startswith(NOT_CORE)


CORE_FILES = [path for path, docs in DOCS.items() if all(_is_core(d) for d in docs)]
SCALED_OBJECTS = [d for d in ALL if d["kind"] == "ScaledObject"]


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _of_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in ALL if d["kind"] == kind}


def _pod_spec(doc: dict) -> dict:
    spec = doc
    for key in POD_KINDS[doc["kind"]]:
        spec = spec[key]
    return spec


def _workloads() -> list[dict]:
    return [d for d in ALL if d["kind"] in POD_KINDS]


CONFIG = _of_kind("ConfigMap")["streams-config"]["data"]


def _kubernetes_validate(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "kubernetes-validate"
    if not exe.exists():
        pytest.fail(f"{exe} is missing: install the dev dependency kubernetes-validate==1.37.0")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)


# --- (a) core kinds: kubernetes-validate --strict ---------------------------------------


def test_the_manifests_are_found_and_no_file_mixes_core_and_crd_kinds():
    assert len(CORE_FILES) >= 8 and len(SCALED_OBJECTS) >= 3, MANIFESTS
    for path, docs in DOCS.items():
        kinds = {_is_core(d) for d in docs}
        assert len(kinds) == 1, f"{_rel(path)} mixes core and CRD kinds: the core check would skip it whole"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_manifests_pass_kubernetes_validate_strict(version):
    result = _kubernetes_validate("--strict", "-k", version, *map(str, CORE_FILES))
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    # An unknown kind only warns and exits 0: make sure every document was really checked.
    assert "Couldn't find schema" not in report, report
    assert report.count(" passed for resource ") == sum(len(DOCS[p]) for p in CORE_FILES), report


def test_kubernetes_validate_rejects_an_unknown_field():
    result = _kubernetes_validate("--strict", "-k", K8S_VERSIONS[0], str(FIXTURES / "broken-deployment.yaml"))
    assert result.returncode != 0, result.stdout + result.stderr
    assert "replica" in result.stdout + result.stderr


def test_kustomizations_list_existing_files_but_never_the_job_or_the_secret_placeholders():
    listed = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        (doc,) = _docs(kustomization)
        for resource in doc["resources"]:
            path = (kustomization.parent / resource).resolve()
            assert path.exists(), (_rel(kustomization), resource)
            listed.add(path)
    assert K8S / "migrate-job.yaml" not in listed, "the migration Job runs before the workers, on its own"
    assert K8S / "common" / "secrets.yaml" not in listed, "re-applying must not overwrite real Secrets"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed: kustomize rendering not checked")
@pytest.mark.parametrize("overlay", [".", "split"])
def test_kustomizations_render_only_known_files(overlay, tmp_path):
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Job", "streams-migrate") not in names, "the migration Job must run before, not with, the workers"
    assert not any(k == "Secret" for k, _ in names), "re-applying must not overwrite real Secrets with placeholders"
    assert ("ConfigMap", "streams-config") in names
    assert ("CronJob", "streams-key-seal") in names and ("ServiceAccount", "streams-key-custodian") in names
    workers = {n for k, n in names if k == "Deployment"} - {"streams-bridge"}
    assert workers == ({"streams-worker"} if overlay == "." else {"streams-mask", "streams-sink"})
    core = tmp_path / "core.yaml"
    core.write_text(yaml.safe_dump_all([d for d in docs if _is_core(d)]))
    result = _kubernetes_validate("--strict", "-k", K8S_VERSIONS[0], str(core))
    assert result.returncode == 0 and "Couldn't find schema" not in result.stdout, result.stdout + result.stderr
    for doc in docs:
        if doc["kind"] == "ScaledObject":
            jsonschema.validate(doc, SCHEMA)


# --- (b, c) ScaledObjects: our schema ----------------------------------------------------


def test_the_scaledobject_schema_is_a_valid_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("doc", SCALED_OBJECTS, ids=lambda d: d["metadata"]["name"])
def test_scaledobjects_match_the_schema(doc):
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)


def test_the_schema_rejects_a_broken_scaledobject():
    (broken,) = _docs(FIXTURES / "broken-scaledobject.yaml")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(SCHEMA).validate(broken)
    errors = list(jsonschema.Draft202012Validator(SCHEMA).iter_errors(broken))
    text = " ".join(e.message for e in errors)
    assert "lagTreshold" in text and "maxReplicas" in text, text


def test_the_schema_rejects_unquoted_trigger_metadata():
    doc = json.loads(json.dumps(SCALED_OBJECTS[0]))
    doc["spec"]["triggers"][0]["metadata"]["allowIdleConsumers"] = False  # KEDA wants "false"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(SCHEMA).validate(doc)


# --- (d) semantics -----------------------------------------------------------------------


@pytest.mark.parametrize("doc", _workloads(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_pod_is_locked_down(doc):
    pod = _pod_spec(doc)
    ctx = pod["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["runAsUser"] == ctx["runAsGroup"] == ctx["fsGroup"] == 10001
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod.get("automountServiceAccountToken") is False
    for container in pod["containers"] + pod.get("initContainers", []):
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], container["name"]
        assert container["image"] == "streams:0.1.0" and container["imagePullPolicy"] == "IfNotPresent"
        res = container["resources"]
        assert set(res["requests"]) == set(res["limits"]) == {"cpu", "memory"}, container["name"]
        # Writable paths are emptyDirs: /tmp everywhere, the data dir wherever Faust may run.
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        if doc["kind"] == "Deployment":
            assert "emptyDir" in volumes[mounts[CONFIG["STREAMS_DATA_DIR"]]]


@pytest.mark.parametrize("doc", list(_of_kind("Deployment").values()), ids=lambda d: d["metadata"]["name"])
def test_every_long_running_pod_has_probes_port_and_scrape_annotations(doc):
    template = doc["spec"]["template"]
    (container,) = template["spec"]["containers"]
    port = int(CONFIG["STREAMS_METRICS_PORT"])
    assert {"name": "http", "containerPort": port, "protocol": "TCP"} in container["ports"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert template["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics",
    }


def test_commands_and_stages():
    deployments = _of_kind("Deployment")
    command = {name: d["spec"]["template"]["spec"]["containers"][0]["command"] for name, d in deployments.items()}
    assert command["streams-bridge"] == ["streams", "bridge"]
    for name in ("streams-worker", "streams-mask", "streams-sink"):
        assert command[name] == ["streams", "worker"], name
    stages = {
        name: {e["name"]: e.get("value") for e in d["spec"]["template"]["spec"]["containers"][0].get("env", [])}.get(
            "STREAMS_STAGES"
        )
        for name, d in deployments.items()
    }
    assert stages == {
        "streams-bridge": None,
        "streams-worker": "mask,sink",
        "streams-mask": "mask",
        "streams-sink": "sink",
    }
    (job,) = _of_kind("Job").values()
    assert _pod_spec(job)["containers"][0]["command"] == ["streams", "migrate"]
    assert _pod_spec(job)["restartPolicy"] == "Never"


def test_worker_and_bridge_resources_are_the_benchmarked_ones():
    def resources(name):
        return _pod_spec(_of_kind("Deployment")[name])["containers"][0]["resources"]

    for name in ("streams-worker", "streams-mask", "streams-sink"):
        assert resources(name) == {
            "requests": {"cpu": "500m", "memory": "256Mi"},
            "limits": {"cpu": "1", "memory": "512Mi"},
        }
    assert resources("streams-bridge") == {
        "requests": {"cpu": "250m", "memory": "128Mi"},
        "limits": {"cpu": "500m", "memory": "256Mi"},
    }
    for path in CORE_FILES:
        text = path.read_text()
        if "resources:" in text:
            assert "123 MiB" in text and "237 MiB" in text and "make bench" in text, _rel(path)


def test_the_bridge_mounts_no_keys_and_gets_no_database():
    bridge = _pod_spec(_of_kind("Deployment")["streams-bridge"])
    assert not any("secret" in v for v in bridge.get("volumes", [])), "the bridge needs no masking keys"
    (container,) = bridge["containers"]
    assert not any(m["mountPath"].startswith("/etc/streams/keys") for m in container.get("volumeMounts", []))
    env = {e["name"] for e in container.get("env", [])}
    assert "STREAMS_PG_DSN" not in env and "STREAMS_KEYS_JSON" not in env
    assert all("secretRef" not in src for src in container.get("envFrom", [])), "no whole Secret as env"


def test_no_pod_holds_a_keyring_and_the_maskers_run_per_user_key_mode():
    """Per-user key mode (docs/privacy.md): both KMS keys named in the config, no key file,
    no keys Secret mounted or referenced anywhere."""
    assert CONFIG["STREAMS_KMS_KEY_ID"] and CONFIG["STREAMS_KMS_MAC_KEY_ID"]
    assert CONFIG["STREAMS_KMS_KEY_ID"] != CONFIG["STREAMS_KMS_MAC_KEY_ID"]
    assert not {"STREAMS_KEYS_FILE", "STREAMS_KEYS_JSON", "STREAMS_DEV_KEYS", "STREAMS_KMS_ENDPOINT"} & set(CONFIG)
    for doc in _workloads():
        pod = _pod_spec(doc)
        assert not any("secret" in v for v in pod.get("volumes", [])), doc["metadata"]["name"]
        for container in pod["containers"]:
            assert not any(m["mountPath"].startswith("/etc/streams/keys") for m in container.get("volumeMounts", []))
            assert not {"STREAMS_KEYS_FILE", "STREAMS_KEYS_JSON"} & {e["name"] for e in container.get("env", [])}
    for name in ("streams-worker", "streams-mask"):
        (container,) = _pod_spec(_of_kind("Deployment")[name])["containers"]
        assert {"configMapRef": {"name": "streams-config"}} in container["envFrom"], name
        assert "mask" in {e["name"]: e.get("value") for e in container["env"]}["STREAMS_STAGES"], name


def test_secrets_are_placeholders_and_referenced_keys_exist():
    secrets = _of_kind("Secret")
    assert set(secrets) == {"streams-secrets"}
    for secret in secrets.values():
        assert "data" not in secret, "placeholders go in stringData, never real base64 data"
        for value in secret["stringData"].values():
            assert "REPLACE_ME" in value
    for doc in _workloads():
        for container in _pod_spec(doc)["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]["stringData"], (doc["metadata"]["name"], ref)
            for src in container.get("envFrom", []):
                assert src["configMapRef"]["name"] == "streams-config"


def test_the_configmap_has_the_documented_settings():
    assert CONFIG == CONFIG | {
        "STREAMS_RAW_TOPIC": "logins.raw",
        "STREAMS_MASKED_TOPIC": "logins.masked",
        "STREAMS_DLQ_TOPIC": "logins.dlq",
        "STREAMS_TOPIC_PARTITIONS": "6",
        "STREAMS_SQS_QUEUE": "login-queue",
        "STREAMS_METRICS_PORT": "8080",
        "STREAMS_DATA_DIR": "/var/lib/streams",
        "STREAMS_LOG_FORMAT": "json",
    }
    assert {"STREAMS_KAFKA_BOOTSTRAP", "STREAMS_SQS_REGION"} <= set(CONFIG)
    assert all(isinstance(v, str) for v in CONFIG.values()), "ConfigMap data values must be strings"


def test_scaledobjects_follow_the_partitions_and_the_consumer_group():
    partitions = int(CONFIG["STREAMS_TOPIC_PARTITIONS"])
    app_id = CONFIG.get("STREAMS_APP_ID", "streams")
    group = {  # each stage has its own group (issue 18): <app_id>-mask, <app_id>-sink
        "streams-worker": f"{app_id}-mask",
        "streams-mask": f"{app_id}-mask",
        "streams-sink": f"{app_id}-sink",
    }
    input_topic = {
        "streams-worker": CONFIG["STREAMS_RAW_TOPIC"],
        "streams-mask": CONFIG["STREAMS_RAW_TOPIC"],
        "streams-sink": CONFIG["STREAMS_MASKED_TOPIC"],
    }
    deployments = _of_kind("Deployment")
    targets = set()
    for so in SCALED_OBJECTS:
        spec = so["spec"]
        target = spec["scaleTargetRef"]["name"]
        targets.add(target)
        assert target in deployments and "replicas" not in deployments[target]["spec"], "KEDA owns replicas"
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions, so["metadata"]["name"]
        for trigger in spec["triggers"]:
            meta = trigger["metadata"]
            assert meta["bootstrapServers"] == CONFIG["STREAMS_KAFKA_BOOTSTRAP"]
            assert meta["consumerGroup"] == group[target]
            assert meta["topic"] == input_topic[target]
            assert meta.get("allowIdleConsumers", "false") == "false"
    assert targets == set(input_topic)


def test_disruption_budgets_cover_every_deployment():
    budgets = _of_kind("PodDisruptionBudget")
    for name, deployment in _of_kind("Deployment").items():
        assert budgets[name]["spec"]["selector"] == deployment["spec"]["selector"], name
        assert "maxUnavailable" in budgets[name]["spec"], name


def test_nothing_names_a_namespace():
    for path, docs in DOCS.items():
        for doc in docs:
            assert "namespace" not in doc.get("metadata", {}) and "namespace" not in doc, _rel(path)


# --- the key custodian's schedule (`streams keys seal`) ----------------------------------


def _cron_period(schedule: str) -> int | None:
    """Seconds between runs of an every-N-minutes schedule (``*/N * * * *``); None otherwise."""
    minute, *rest = schedule.split()
    if rest != ["*", "*", "*", "*"]:
        return None
    if minute == "*":
        return 60
    if minute.startswith("*/") and minute[2:].isdigit() and 60 % int(minute[2:]) == 0:
        return int(minute[2:]) * 60
    return None


def _seal_cronjob_problems(cron: dict) -> list[str]:
    """What keeps a CronJob from running `streams keys seal` safely on a schedule."""
    from streams.cli import build_parser

    problems = []
    spec = cron["spec"]
    period = _cron_period(spec["schedule"])
    if period is None:
        return ["schedule is not every N minutes"]
    if spec.get("concurrencyPolicy") != "Forbid":
        problems.append("concurrencyPolicy must be Forbid (one run at a time)")
    job = spec["jobTemplate"]["spec"]
    # A run ends (or is ended) before the next is due, and a missed start is not made up later.
    if not job.get("activeDeadlineSeconds", period) < period:
        problems.append("activeDeadlineSeconds must end a run before the next is due")
    if not spec.get("startingDeadlineSeconds", period) < period:
        problems.append("startingDeadlineSeconds must be under the period")
    pod = _pod_spec(cron)
    if pod.get("restartPolicy") != "Never":
        problems.append("restartPolicy must be Never (the Job's backoff retries)")
    (container,) = pod["containers"]
    if container["command"][:3] != ["streams", "keys", "seal"]:
        return [*problems, "the command is not `streams keys seal`"]
    args = build_parser().parse_args(container["command"][1:])
    if not args.max_batches or args.every is not None:
        problems.append("each run must be bounded (--max-batches) and one run per Job (no --every)")
    # Exit 1 (rows that do not open) and 2 (settings, KMS, schema) fail the Job at once; 75
    # (PostgreSQL unreachable) is retried.
    rules = job.get("podFailurePolicy", {}).get("rules", [])
    fail_now = {
        v
        for r in rules
        if r["action"] == "FailJob" and r["onExitCodes"]["operator"] == "In"
        for v in r["onExitCodes"]["values"]
    }
    if fail_now != {1, 2} or job.get("backoffLimit", 6) < 1:
        problems.append("exits 1 and 2 must fail the Job at once, 75 be retried (backoffLimit >= 1)")
    return problems


def test_the_seal_cronjob_runs_keys_seal_bounded_one_at_a_time_and_fails_only_what_needs_a_person():
    assert _seal_cronjob_problems(_of_kind("CronJob")["streams-key-seal"]) == []


def test_the_cronjob_checks_reject_a_broken_cronjob():
    (broken,) = _docs(FIXTURES / "broken-cronjob.yaml")
    assert _seal_cronjob_problems(broken) == [
        "concurrencyPolicy must be Forbid (one run at a time)",
        "activeDeadlineSeconds must end a run before the next is due",
        "startingDeadlineSeconds must be under the period",
        "each run must be bounded (--max-batches) and one run per Job (no --every)",
        "exits 1 and 2 must fail the Job at once, 75 be retried (backoffLimit >= 1)",
    ]
    assert _seal_cronjob_problems({**broken, "spec": {**broken["spec"], "schedule": "7 * * * *"}}) == [
        "schedule is not every N minutes"
    ]
    result = _kubernetes_validate("--strict", "-k", K8S_VERSIONS[0], str(FIXTURES / "broken-cronjob.yaml"))
    assert result.returncode != 0 and "concurencyPolicy" in result.stdout + result.stderr


def test_the_key_custodian_has_identities_of_its_own():
    cron = _of_kind("CronJob")["streams-key-seal"]
    pod = _pod_spec(cron)
    account = _of_kind("ServiceAccount")[pod["serviceAccountName"]]
    assert account["automountServiceAccountToken"] is False
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith(":role/streams-key-custodian")
    others = [d for d in _workloads() if d is not cron]
    assert all(_pod_spec(d).get("serviceAccountName") != account["metadata"]["name"] for d in others)
    # Its database login is its own Secret key, used by no other workload.
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    dsn_key = env["STREAMS_PG_DSN"]["valueFrom"]["secretKeyRef"]["key"]
    assert dsn_key == "STREAMS_KEY_CUSTODIAN_PG_DSN"
    for doc in others:
        for c in _pod_spec(doc)["containers"]:
            refs = {e.get("valueFrom", {}).get("secretKeyRef", {}).get("key") for e in c.get("env", [])}
            assert dsn_key not in refs, doc["metadata"]["name"]
    assert not {"STREAMS_AWS_ACCESS_KEY_ID", "STREAMS_AWS_SECRET_ACCESS_KEY"} & set(env), "KMS rights: its pod identity"
