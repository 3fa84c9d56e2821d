"""``ncp demo --archive orthanc``: a local Orthanc (Debian's ``orthanc`` and ``orthanc-dicomweb``)
as country A's archive, holding the demo's generated files, behind node A and A's edge gateway.

Its storage and index stay in ``DATA/orthanc-a/``: the files are sent once (``POST /instances``),
a later start finds them there. Orthanc binds every interface whatever its config says; its
config refuses clients other than loopback (``RemoteAccessAllowed`` false) and it runs on free
ports.
"""

from __future__ import annotations

import json
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from ncp.demo.configs import DemoError
from ncp.demo.layout import HOST, Layout
from ncp.demo.services import Endpoint, Service

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
UPLOAD_THREADS = 4


def orthanc_binary() -> str:
    binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
    if binary is None:
        raise DemoError(
            "--archive orthanc: Orthanc is not installed (Debian: apt-get install orthanc "
            "orthanc-dicomweb)"
        )
    if not DICOMWEB_PLUGIN.is_file():
        raise DemoError(
            f"--archive orthanc: the DICOMweb plugin {DICOMWEB_PLUGIN} is missing (Debian: "
            "apt-get install orthanc-dicomweb)"
        )
    return binary


def _free_port() -> int:
    # Orthanc listens on all interfaces: a port free on all of them.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class LocalOrthanc:
    config: Path
    http_port: int

    @property
    def rest(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.rest}/dicom-web"

    def service(self) -> Service:
        return Service(
            name="orthanc-a",
            role="country A's archive (Orthanc with DICOMweb), behind node A and the edge gateway",
            country="AT",
            kind="orthanc",
            config=self.config,
            endpoints=(
                Endpoint("rest", self.rest, "/system", 200, "plain"),
                Endpoint("dicomweb", self.dicomweb, "/studies?limit=1", 200, "plain"),
            ),
        )


def write_config(layout: Layout) -> LocalOrthanc:
    """Orthanc's config for this start (fresh ports, the same storage)."""
    orthanc_binary()
    folder = layout.orthanc
    for sub in ("storage", "index"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = _free_port(), _free_port()
    config = {
        "Name": "NCP-DEMO-A",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "StorageCompression": False,
        "HttpPort": http_port,
        "HttpCompressionEnabled": False,
        "KeepAlive": True,
        "TcpNoDelay": True,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "SslEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": "NCPDEMOA",
        "DicomPort": dicom_port,
        "DicomAlwaysAllowStore": False,
        "OverwriteInstances": False,
        "SaveJobs": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": False,
            "Host": f"{HOST}:{http_port}",
            "Ssl": False,
            "StudiesMetadata": "Full",
            "SeriesMetadata": "Full",
        },
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return LocalOrthanc(path, http_port)


def load(orthanc: LocalOrthanc, dicom: Path) -> int:
    """Send the generated files Orthanc does not hold yet; returns how many were sent."""
    files = sorted(p for p in dicom.rglob("*") if p.is_file() and p.name != "DICOMDIR")
    with httpx.Client(base_url=orthanc.rest, timeout=60, trust_env=False) as client:
        held = int(client.get("/statistics").json().get("CountInstances", 0))
        if held >= len(files):
            return 0
        print(
            f"sending {len(files)} files to Orthanc (it holds {held}; once) ...",
            flush=True,
        )

        def send(path: Path) -> None:
            answer = client.post(
                "/instances",
                content=path.read_bytes(),
                headers={"Content-Type": "application/dicom"},
            )
            if answer.status_code != 200:
                raise DemoError(f"Orthanc refused {path}: {answer.status_code} {answer.text[:200]}")

        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            list(pool.map(send, files))
    return len(files)
