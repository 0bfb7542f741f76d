"""docker-compose.yml, .env.example and the image: what `docker compose up` relies on.

The file checks need nothing; the rendering checks run `docker compose config` (the Compose plugin,
or a standalone docker-compose >= 1.28), which needs no Docker engine, and are skipped without one.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SECRET_NAME = re.compile(r"SECRET|PASSWORD|ACCESS_KEY|TOKEN")
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")  # ${NAME}, ${NAME:-default}, ${NAME:?error}
CORE = {"redis", "minio", "minio-init", "control"}


def env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs if not k.lstrip().startswith("#")}


def raw_services() -> dict[str, Any]:
    """The services as written (YAML anchors and merge keys resolved, nothing interpolated)."""
    return yaml.safe_load(COMPOSE.read_text())["services"]


# Files -------------------------------------------------------------------------------------------


def test_env_example_lists_every_variable_compose_reads():
    read = set(VARIABLE.findall(COMPOSE.read_text()))
    assert read, "docker-compose.yml reads no variable: where do its secrets come from?"
    assert read <= set(env_example()), f"missing from .env.example: {sorted(read - set(env_example()))}"


def test_compose_holds_no_secret_and_requires_one_from_the_env():
    for name, service in raw_services().items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]*\}", str(value)), (
                    f"{name}: {key} must be required from the environment (${{VAR:?message}}), not {value!r}"
                )


def test_env_example_holds_placeholders_only():
    secrets = {k: v for k, v in env_example().items() if SECRET_NAME.search(k) and "ACCESS_KEY" not in k}
    assert secrets
    for key, value in secrets.items():
        assert "change-me" in value, f"{key} in .env.example must be a placeholder, not {value!r}"


def test_image_runs_lorafleet_as_a_non_root_user_and_ships_no_secrets():
    dockerfile = ROOT.joinpath("Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users, "the image must switch to a non-root USER"
    assert users[-1] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["lorafleet"\]', dockerfile, re.MULTILINE)
    ignored = ROOT.joinpath(".dockerignore").read_text().split()
    assert {".env", ".venv", ".git"} <= set(ignored)


# Rendered by docker compose ----------------------------------------------------------------------


@functools.cache
def compose_command() -> tuple[str, ...] | None:
    """`docker compose` if the plugin is installed, else docker-compose >= 1.28 (profiles), else None."""
    docker = shutil.which("docker")
    if docker and _runs([docker, "compose", "version"]):
        return (docker, "compose")
    standalone = shutil.which("docker-compose")
    if standalone:
        done = subprocess.run([standalone, "version", "--short"], capture_output=True, text=True)
        numbers = re.findall(r"\d+", done.stdout)[:2]
        if done.returncode == 0 and len(numbers) == 2 and tuple(map(int, numbers)) >= (1, 28):
            return (standalone,)
    return None


def _runs(command: list[str]) -> bool:
    return subprocess.run(command, capture_output=True).returncode == 0


needs_compose = pytest.mark.skipif(
    compose_command() is None,
    reason="needs `docker compose` (the Compose plugin) or docker-compose >= 1.28; no Docker engine needed",
)


def compose_config(env_file: Path, profile: str | None) -> subprocess.CompletedProcess[str]:
    command = [*compose_command(), "--env-file", str(env_file), "-f", str(COMPOSE)]  # type: ignore[misc]
    if profile:
        command += ["--profile", profile]
    # The caller's shell must not change the result: compose reads LORAFLEET_* and COMPOSE_* from it.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAFLEET_", "COMPOSE_"))}
    return subprocess.run([*command, "config"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)


@functools.cache
def rendered(profile: str | None) -> dict[str, Any]:
    done = compose_config(ENV_EXAMPLE, profile)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)["services"]


def published(service: dict[str, Any]) -> set[str]:
    """`host_ip:published:target` of each port; Compose v2 writes long syntax, v1 short strings."""
    out = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.add(f"{port.get('host_ip', '')}:{port['published']}:{port['target']}")
        else:
            out.add(str(port).removesuffix("/tcp"))
    return out


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of each volume (source '' for an anonymous volume)."""
    out = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            out[volume["target"]] = volume.get("source", "")
        else:
            parts = str(volume).split(":")
            out[parts[1] if len(parts) > 1 else parts[0]] = parts[0] if len(parts) > 1 else ""
    return out


@needs_compose
@pytest.mark.parametrize(("profile", "worker"), [(None, None), ("gpu", "worker"), ("cpu", "worker-cpu")])
def test_each_profile_renders_with_the_example_env(profile, worker):
    services = rendered(profile)

    assert set(services) >= CORE | ({worker} if worker else set())
    for name in CORE:
        assert not services[name].get("profiles"), f"{name} must start with a plain `docker compose up`"
    if worker:
        assert services[worker]["profiles"] == [profile]


@needs_compose
def test_gpu_worker_reserves_one_nvidia_gpu_and_the_cpu_worker_none():
    gpu = rendered("gpu")["worker"]
    cpu = rendered("cpu")["worker-cpu"]

    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert int(devices[0]["count"]) == 1
    assert devices[0]["capabilities"] == ["gpu"]
    assert gpu["environment"]["LORAFLEET_DEVICE"] == "cuda"
    assert "deploy" not in cpu
    assert cpu["environment"]["LORAFLEET_DEVICE"] == "cpu"


@needs_compose
def test_redis_keeps_an_append_only_file_and_listens_on_6379_on_the_host():
    redis = rendered(None)["redis"]

    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert mounts(redis)["/data"] == "redis-data"  # the AOF survives `docker compose down`
    assert "127.0.0.1:6379:6379" in published(redis)  # `lorafleet submit` from the host


@needs_compose
@pytest.mark.parametrize(
    ("profile", "name"),
    [(None, "redis"), (None, "minio"), (None, "gateway"), ("gpu", "worker"), ("cpu", "worker-cpu")],
)
def test_long_running_services_have_health_checks(profile, name):
    check = rendered(profile)[name]["healthcheck"]

    assert check["test"][0] in ("CMD", "CMD-SHELL")
    assert not check.get("disable")


@needs_compose
@pytest.mark.parametrize(("profile", "name"), [(None, "control"), ("gpu", "worker"), ("cpu", "worker-cpu")])
def test_workers_and_control_get_their_settings_from_the_env_once_the_stack_is_up(profile, name):
    service = rendered(profile)[name]
    env, example = service["environment"], env_example()

    assert env["LORAFLEET_REDIS_URL"] == "redis://redis:6379/0"
    assert env["LORAFLEET_S3_ENDPOINT"] == "minio:9000"
    assert env["LORAFLEET_S3_SECURE"] == "0"
    for key in ("MODEL", "ADAPTERS", "S3_ACCESS_KEY", "S3_SECRET_KEY"):
        assert env[f"LORAFLEET_{key}"] == example[f"LORAFLEET_{key}"]
    if name == "control":  # flags, too: `lorafleet control --redis-url URL --store URI --model URI`
        command = service["command"]
        assert command[0] == "control"
        assert command[command.index("--redis-url") + 1] == env["LORAFLEET_REDIS_URL"]
        assert command[command.index("--store") + 1] == example["LORAFLEET_ADAPTERS"]
        assert command[command.index("--model") + 1] == example["LORAFLEET_MODEL"]
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert service["depends_on"]["model-init"]["condition"] == "service_completed_successfully"


@needs_compose
@pytest.mark.parametrize("profile", [None, "gpu", "cpu"], ids=["no-profile", "gpu-profile", "cpu-profile"])
def test_a_fresh_stack_puts_a_model_where_the_workers_read_it_before_they_start(profile):
    services = rendered(profile)
    init, example = services["model-init"], env_example()
    # `lorafleet models push synthetic:... MODEL --if-missing`, once the bucket exists
    assert init["command"][:2] == ["models", "push"]
    assert init["command"][2].startswith("synthetic:")
    assert init["command"][3] == example["LORAFLEET_MODEL"]
    assert "--if-missing" in init["command"]
    assert init["environment"]["LORAFLEET_S3_ENDPOINT"] == "minio:9000"
    assert init["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert init["restart"] == "no"


@needs_compose
def test_minio_uses_the_same_credentials_and_a_pinned_image():
    services, example = rendered(None), env_example()

    minio = services["minio"]
    assert minio["environment"]["MINIO_ROOT_USER"] == example["LORAFLEET_S3_ACCESS_KEY"]
    assert minio["environment"]["MINIO_ROOT_PASSWORD"] == example["LORAFLEET_S3_SECRET_KEY"]
    for name in ("redis", "minio", "minio-init"):
        image = services[name]["image"]
        assert re.search(r":[^/:]*\d[^/:]*$", image), f"{image} has no pinned version tag"


@needs_compose
def test_compose_refuses_to_start_without_the_secrets(tmp_path):
    example = env_example()
    no_secrets = tmp_path / "no-secrets.env"
    no_secrets.write_text("".join(f"{k}={v}\n" for k, v in example.items() if "_S3_" not in k))

    done = compose_config(no_secrets, "gpu")

    assert done.returncode != 0
    assert "LORAFLEET_S3_" in done.stderr
