"""Node settings: one TOML file per node, environment overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ncp.cli import main
from ncp.config import DicomwebArchive, FolderArchive, load_settings
from ncp.errors import ConfigError

GOOD = """
[node]
country = "AT"
patient_id_issuer = "urn:oid:1.2.40.0.10.1.4.3.1"

[urls]
standard = "https://ncp-at.example/fhir"

[database]
url = "sqlite:///data/index.db"

[archive]
kind = "folder"
path = "archive"

[trust]
list = "trust.toml"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, GOOD), environ={})
    assert s.node.country == "AT"
    assert isinstance(s.archive, FolderArchive)
    assert s.archive.path == tmp_path / "archive"
    assert s.database.url == f"sqlite:///{tmp_path}/data/index.db"
    assert s.trust.list == tmp_path / "trust.toml"
    assert s.keys.dir == tmp_path / "keys"


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    env = {
        "NCP_DATABASE__URL": "postgresql+psycopg://ncp@db:5432/ncp",
        "NCP_ARCHIVE__KIND": "dicomweb",
        "NCP_ARCHIVE__URL": "http://pacs:8042/dicom-web",
        "NCP_NODE__COUNTRY": "BE",
    }
    text = GOOD.replace('kind = "folder"\npath = "archive"', 'kind = "folder"')
    s = load_settings(write(tmp_path, text), environ=env)
    assert s.database.url == "postgresql+psycopg://ncp@db:5432/ncp"
    assert isinstance(s.archive, DicomwebArchive)
    assert s.archive.url == "http://pacs:8042/dicom-web"
    assert s.node.country == "BE"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            GOOD.replace('country = "AT"', 'country = "Austria"'),
            "node.country: Value error, must be",
        ),
        (GOOD.replace("[database]", "[database]\nurll = 1"), "database.urll: unknown key"),
        (GOOD.replace('path = "archive"', ""), "archive.path: Field required"),
        (GOOD.replace('kind = "folder"', 'kind = "tape"'), "archive: Input tag 'tape'"),
        (GOOD.replace("[node]\n", "[nodes]\n"), "nodes: unknown key"),
        ("[node\ncountry=1", "not valid TOML"),
    ],
)
def test_bad_file_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_settings(path, environ={})
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_settings(tmp_path / "absent.toml", environ={})


def test_bad_environment_value_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"archive\.timeout_s"):
        load_settings(
            write(tmp_path, GOOD),
            environ={
                "NCP_ARCHIVE__KIND": "dicomweb",
                "NCP_ARCHIVE__URL": "http://x",
                "NCP_ARCHIVE__TIMEOUT_S": "-1",
            },
        )


def test_cli_reports_config_errors_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, GOOD.replace("[database]", "[database]\nurll = 1"))
    assert main(["config", str(path)]) == 2
    assert "database.urll: unknown key" in capsys.readouterr().err
    assert main(["config", str(write(tmp_path, GOOD))]) == 0
    assert '"country": "AT"' in capsys.readouterr().out


RETRIEVAL = """
[retrieval]
normal_workers = 3
retention_days = 7

[retrieval.store]
kind = "folder"
path = "pulled"

[retrieval.cli_hp]
id = "BE-HP-1"
name = "Dr. One"
organisation = "Hospital"
organisation_id = "urn:oid:2.16.56.1.1.1.9"
point_of_care = "Radiology"
"""


def test_retrieval_paths_resolve_and_staging_sits_beside_the_store(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, GOOD + RETRIEVAL), environ={})
    assert s.retrieval.normal_workers == 3 and s.retrieval.retention_days == 7
    assert s.retrieval.store.kind == "folder"
    assert s.retrieval.store.path == tmp_path / "pulled"
    assert s.retrieval.staging == tmp_path / "pulled" / ".incoming"
    assert s.retrieval.cli_hp is not None and s.retrieval.cli_hp.id == "BE-HP-1"
    defaults = load_settings(write(tmp_path, GOOD), environ={})
    assert defaults.retrieval.cli_hp is None and defaults.retrieval.emergency_workers == 1


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (RETRIEVAL.replace("normal_workers = 3", "normal_workers = -1"), "normal_workers"),
        (RETRIEVAL.replace("normal_workers = 3", "emergency_workers = 0"), "emergency_workers"),
        (RETRIEVAL.replace("normal_workers = 3", "nomral_workers = 3"), "nomral_workers"),
        (RETRIEVAL.replace('id = "BE-HP-1"', 'id = ""'), "cli_hp.id"),
        (
            RETRIEVAL.replace(
                'kind = "folder"\npath = "pulled"', 'kind = "stowrs"\nurl = "ftp://x"'
            ),
            "store.url",
        ),
    ],
)
def test_unsafe_retrieval_settings_are_refused_by_name(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_settings(write(tmp_path, GOOD + text), environ={})
