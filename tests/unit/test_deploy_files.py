"""docker-compose.yml and the Dockerfile must stay consistent with the code they run.

No Docker engine runs on the build machines, so these are parsed, not executed.
"""

from pathlib import Path
import re

import yaml

from streams.cli import build_parser
from streams.settings import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_compose_has_the_stack_and_the_stages():
    assert {"kafka", "postgres", "sqs", "seed", "migrate", "bridge", "worker"} <= set(SERVICES)
    # The worker never migrates (its role needs only DML): the one-shot migrate runs first.
    assert SERVICES["worker"]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")
    assert SERVICES["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"


def test_every_long_running_service_has_a_health_check():
    for name in ("kafka", "postgres", "sqs", "bridge", "worker"):
        assert SERVICES[name]["healthcheck"]["test"], name


def test_commands_are_real_streams_commands():
    parser = build_parser()
    for name in ("seed", "migrate", "bridge", "worker"):
        parser.parse_args(SERVICES[name]["command"])  # exits on an unknown command
        health = SERVICES.get(name, {}).get("healthcheck", {}).get("test", [])
        if health[:2] == ["CMD", "streams"]:
            parser.parse_args(health[2:])


def test_environment_names_are_settings():
    fields = {f"STREAMS_{name.upper()}" for name in Settings.model_fields}
    for name in ("seed", "migrate", "bridge", "worker"):
        env = SERVICES[name]["environment"]
        assert env, name
        unknown = {k for k in env if k.startswith("STREAMS_")} - fields
        assert not unknown, (name, unknown)


def test_kafka_version_matches_the_local_stack_pom():
    pom = (REPO / "dev" / "streams_dev" / "stack" / "poms" / "kafka" / "pom.xml").read_text()
    pom_version = re.search(r"<artifactId>kafka_2\.13</artifactId>\s*<version>([^<]+)</version>", pom).group(1)
    assert SERVICES["kafka"]["image"] == f"apache/kafka:{pom_version}"


def test_dockerfile_runs_the_cli_and_ships_what_it_reads():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["streams"]' in dockerfile
    for path in ("requirements.lock", "streams", "schemas", "data"):
        assert re.search(rf"^COPY {path}\b", dockerfile, re.M), path
    seed_file = SERVICES["seed"]["command"][1]
    assert seed_file.startswith("/app/") and (REPO / seed_file.removeprefix("/app/")).exists()
