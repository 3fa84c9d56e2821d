"""The deployment files, checked without a Docker engine: the Dockerfile's syntax and what it
promises (multi-stage, non-root, health check, volumes, command), its command run outside Docker
with its environment against a generated config (health check answered, SIGTERM exits 0), and
the compose file's services, ports, volumes and mounted configs against docs/operations.md."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from ncp.config import load_edge_settings, load_settings
from ncp.ops.checks import check_file
from ncp.security import pki
from tests.gateway_support import free_port
from tests.ops_node import NCP
from tests.ops_support import node_folder, toml_text

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OPS_DOC = ROOT / "docs" / "operations.md"


# -- the Dockerfile -------------------------------------------------------------------------------


def _instructions() -> list[dict[str, Any]]:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    return list(parser.structure)


def _final_stage(instructions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    starts = [i for i, ins in enumerate(instructions) if ins["instruction"] == "FROM"]
    return instructions[starts[-1] :]


def _exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"not exec form: {value}"
    return [str(v) for v in parsed]


def _image() -> dict[str, Any]:
    """What the final stage of the Dockerfile sets up."""
    final = _final_stage(_instructions())
    by: dict[str, list[str]] = {}
    for ins in final:
        by.setdefault(ins["instruction"], []).append(ins["value"])
    env: dict[str, str] = {}
    for value in by.get("ENV", []):
        env.update(dict(item.split("=", 1) for item in shlex.split(value)))
    health = by["HEALTHCHECK"][0]
    return {
        "env": env,
        "user": by["USER"][-1],
        "entrypoint": _exec_form(by["ENTRYPOINT"][-1]),
        "cmd": _exec_form(by["CMD"][-1]),
        "volumes": _exec_form(by["VOLUME"][-1]),
        "health": _exec_form(health[health.index("CMD") + 3 :].strip()),
        "health_options": health[: health.index("CMD")],
        "copies": by.get("COPY", []),
        "stopsignal": by.get("STOPSIGNAL", [""])[-1],
        "workdir": by["WORKDIR"][-1],
    }


def test_the_dockerfile_is_multi_stage_non_root_with_a_health_check() -> None:
    instructions = _instructions()
    stages = [ins["value"] for ins in instructions if ins["instruction"] == "FROM"]
    assert len(stages) >= 2 and stages[0].endswith(" AS build")
    image = _image()
    assert image["user"] not in ("root", "0") and not image["user"].startswith("0:")
    assert any(c.startswith("--from=build ") for c in image["copies"])
    assert "/healthz" in " ".join(image["health"]) and "--start-period" in image["health_options"]
    assert image["volumes"] == ["/etc/ncp", "/var/lib/ncp"]
    assert image["entrypoint"] == ["ncp"]
    assert image["cmd"][:3] == ["serve", "--config", "/etc/ncp/node.toml"]
    assert image["stopsignal"] == "SIGTERM"
    # The health check asks the port the image sets for the operations listener of both kinds.
    port = re.search(r"127\.0\.0\.1:(\d+)/healthz", " ".join(image["health"]))
    assert port is not None
    assert image["env"]["NCP_LISTEN__OPS_PORT"] == port.group(1)
    assert image["env"]["NCP_EDGE_LISTEN__OPS_PORT"] == port.group(1)


def test_what_the_build_copies_exists_and_is_not_ignored() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    sources = []
    for ins in _instructions():
        if ins["instruction"] == "COPY" and not ins["value"].startswith("--from="):
            sources += ins["value"].split()[:-1]
    assert set(sources) >= {"pyproject.toml", "README.md", "ncp", "profiles", "terminology"}
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source not in ignored, f"{source} is copied but .dockerignore leaves it out"


def _run_image_command(
    tmp_path: Path, command: list[str], image: dict[str, Any], ops_port: int, config_dir: Path
) -> tuple[subprocess.Popen[bytes], list[str], dict[str, str], Path]:
    """The image's entrypoint and ``command`` as a process here: /etc/ncp is ``config_dir``, the
    image's environment with its paths mapped, its ops port replaced by a free one."""
    share = tmp_path / "usr-share-ncp"  # what COPY puts in /usr/share/ncp
    share.mkdir()
    for name in ("profiles", "terminology"):
        (share / name).symlink_to(ROOT / name)
    health_port = image["env"]["NCP_LISTEN__OPS_PORT"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key, value in image["env"].items():
        if key == "PATH":
            continue
        value = value.replace("/usr/share/ncp", str(share))
        env[key] = value.replace(health_port, str(ops_port)) if "OPS_PORT" in key else value
    argv = [NCP] + [arg.replace("/etc/ncp", str(config_dir)) for arg in command]
    workdir = tmp_path / "var-lib-ncp"
    workdir.mkdir()
    log = tmp_path / "image.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    health = [
        arg.replace(f"127.0.0.1:{health_port}", f"127.0.0.1:{ops_port}") for arg in image["health"]
    ]
    if health[0] == "python":
        health[0] = str(Path(NCP).with_name("python"))
    return process, health, env, log


def _healthy(process: subprocess.Popen[bytes], health: list[str], log: Path) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            if subprocess.run(health, capture_output=True, timeout=10).returncode == 0:
                return
        except subprocess.TimeoutExpired:
            pass  # a probe that times out failed, as Docker counts it; the next may pass
        assert time.monotonic() < deadline, "health check never passed:\n" + log.read_text()[-3000:]
        time.sleep(0.3)


def _stop(process: subprocess.Popen[bytes], log: Path) -> None:
    process.send_signal(signal.SIGTERM)  # the image's STOPSIGNAL
    try:
        code = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)
        raise
    assert code == 0, log.read_text()[-3000:]


def test_the_image_command_serves_a_node_and_its_health_check_passes(tmp_path: Path) -> None:
    image = _image()
    port = free_port()
    folder = node_folder(tmp_path / "etc-ncp", standard=f"https://localhost:{port}/fhir")
    folder.settings["listen"] = {"host": "127.0.0.1"}
    folder.settings["database"] = {"url": f"sqlite:///{tmp_path / 'data.db'}"}
    folder.write()
    ops_port = free_port()
    process, health, _, log = _run_image_command(
        tmp_path, image["cmd"], image, ops_port, folder.root
    )
    try:
        _healthy(process, health, log)
        # JSON lines, as the image's command asks.
        first = next(line for line in log.read_text().splitlines() if line.strip())
        assert first.startswith("{") and '"request_id"' in first
    finally:
        if process.poll() is None:
            _stop(process, log)


def test_the_image_runs_an_edge_gateway_with_the_compose_command(tmp_path: Path) -> None:
    image = _image()
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    command = compose["services"]["edge-a"]["command"]
    folder = node_folder(tmp_path / "node")
    edge = tmp_path / "etc-ncp"
    (edge / "tls").mkdir(parents=True)
    key = pki.new_ec_key()
    cert = pki.issue_server_certificate(folder.ca, key.public_key(), "AT")
    pki.write_file(edge / "tls" / "server.pem", pki.cert_pem(cert))
    pki.write_private_key(edge / "tls" / "server.key", key)
    (edge / "jwks.json").write_bytes((folder.keys / "jwks.json").read_bytes())
    port = free_port()
    (edge / "edge.toml").write_text(
        toml_text(
            {
                "edge": {
                    "country": "AT",
                    "audience": f"https://localhost:{port}/dicomweb",
                    "jwks": "jwks.json",
                },
                "archive": {"kind": "folder", "path": str(folder.root / "archive")},
                "tls": {"certificate": "tls/server.pem", "key": "tls/server.key"},
                "listen": {"host": "127.0.0.1", "port": port},
                "database": {"url": f"sqlite:///{tmp_path / 'edge-audit.db'}"},
            }
        )
    )
    assert check_file(edge / "edge.toml").problems == []
    process, health, _, log = _run_image_command(tmp_path, command, image, free_port(), edge)
    try:
        _healthy(process, health, log)
    finally:
        if process.poll() is None:
            _stop(process, log)


# -- the compose file -----------------------------------------------------------------------------


def _documented_services() -> dict[str, dict[str, Any]]:
    """The table "Services of the compose file" of docs/operations.md."""
    text = OPS_DOC.read_text()
    section = text.split("### Services of the compose file", 1)[1]
    rows: dict[str, dict[str, Any]] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name, image, ports, volumes, config = cells

        def items(cell: str) -> list[str]:
            return re.findall(r"`([^`]+)`", cell)

        rows[items(name)[0]] = {
            "image": items(image)[0],
            "ports": items(ports),
            "volumes": items(volumes),
            "config": items(config),
        }
    return rows


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_the_compose_services_are_the_documented_ones() -> None:
    services = _compose()["services"]
    documented = _documented_services()
    assert set(services) == set(documented)
    for name, service in services.items():
        doc = documented[name]
        assert service["image"] == doc["image"], name
        assert service.get("ports", []) == doc["ports"], name
        assert service.get("volumes", []) == doc["volumes"], name


def test_every_volume_and_network_is_declared_and_every_mount_exists() -> None:
    compose = _compose()
    declared_volumes = set(compose["volumes"])
    declared_networks = set(compose["networks"])
    for name, service in compose["services"].items():
        assert set(service["networks"]) <= declared_networks, name
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (DEPLOY / source).is_dir(), f"{name}: {source} is missing"
            else:
                assert source in declared_volumes, f"{name}: volume {source} is not declared"
        assert service.get("image") or service.get("build"), name


def _mounted_config(service: dict[str, Any]) -> Path:
    """The file a service's command names under /etc/ncp, in the folder mounted there."""
    command = service["command"]
    inside = command[command.index("--config") + 1]
    mount = next(v for v in service["volumes"] if v.split(":")[1] == "/etc/ncp")
    assert mount.endswith(":ro"), "configs and keys are mounted read-only"
    return DEPLOY / mount.split(":")[0] / Path(inside).relative_to("/etc/ncp")


def _published(service: dict[str, Any]) -> set[int]:
    return {int(p.split(":")[1]) for p in service.get("ports", [])}


def _networks_of(compose: dict[str, Any], name: str) -> set[str]:
    return set(compose["services"][name]["networks"])


def test_the_mounted_configs_agree_with_the_compose_file() -> None:
    compose = _compose()
    documented = _documented_services()
    services = compose["services"]
    ops_port = int(_image()["env"]["NCP_LISTEN__OPS_PORT"])
    for name, service in services.items():
        if not documented[name]["config"]:
            continue
        config = _mounted_config(service)
        assert config.relative_to(DEPLOY).as_posix() == documented[name]["config"][0]
        if service["command"][0] == "serve":
            settings = load_settings(config, environ={})
            listen = settings.listen
            assert _published(service) == {
                p
                for p in (
                    listen.standard_port,
                    listen.imaging_port,
                    listen.viewer_port,
                    listen.portal_port,
                )
                if p
            }
            assert listen.ops_port == ops_port and listen.ops_host == "127.0.0.1"
            database = service["environment"]["NCP_DATABASE__URL"]
            db_host = re.search(r"@([\w-]+):", database)
            assert db_host is not None
            assert _networks_of(compose, db_host.group(1)) & _networks_of(compose, name)
            depends = service.get("depends_on", {})
            assert db_host.group(1) in depends
        else:
            edge = load_edge_settings(config, environ={})
            assert _published(service) == {edge.listen.port}
            assert edge.listen.ops_port == ops_port
        archive = (settings if service["command"][0] == "serve" else edge).archive
        url = getattr(archive, "url", None)
        if url is not None:  # the archive is a service on one of this node's networks
            host = re.search(r"//([\w-]+):", url)
            assert host is not None and host.group(1) in services
            assert _networks_of(compose, host.group(1)) & _networks_of(compose, name)


def test_the_compose_file_keeps_secrets_out_and_ports_of_internals_closed() -> None:
    compose = _compose()
    text = (DEPLOY / "compose.yaml").read_text()
    assert "change-me" not in text  # passwords come from .env
    for name in ("db-a", "orthanc-a", "db-b"):
        assert "ports" not in compose["services"][name], f"{name} must not publish a port"
    for name, service in compose["services"].items():
        for value in (service.get("environment") or {}).values():
            if "PASSWORD" in str(value) or "@" in str(value):
                assert "${" in str(value), f"{name}: a secret written into compose.yaml"


@pytest.mark.parametrize("name", ["country-a/node.toml", "country-b/node.toml", "edge-a/edge.toml"])
def test_the_deploy_configs_load(name: str) -> None:
    path = DEPLOY / name
    if name.startswith("edge"):
        load_edge_settings(path, environ={})
    else:
        load_settings(path, environ={})
