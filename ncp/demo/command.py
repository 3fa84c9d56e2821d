"""``ncp demo``: prepare the data folder, start the pair, print where everything is, wait for
Ctrl-C (see the package's doc)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import webbrowser
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from ncp.demo.accounts import DemoLogin, ensure_demo_logins
from ncp.demo.configs import Archive, Configs, DemoError, generate_once, write_configs
from ncp.demo.data import TopPatient, index_and_list
from ncp.demo.describe import describe
from ncp.demo.layout import (
    COUNTRY_A,
    DEFAULT_BASE_PORT,
    Layout,
    choose_ports,
    fixed_ports,
)
from ncp.demo.services import (
    ChildDied,
    Command,
    Interrupted,
    NotReady,
    Service,
    Supervisor,
    client_contexts,
    ncp_command,
    pair_services,
    tail,
)
from ncp.errors import ConfigError
from ncp.fhir.identifiers import patient_system
from ncp.store.db import make_engine, migrate, session_factory

READY_TIMEOUT_S = 300.0
"""A node loads its profiles and terminology before it answers, and both gateways read what
QIDO answers with of every instance of the folder archive into their catalogue before they
serve (a few seconds for the demo's archive, decision 0014); generous for a busy machine."""
READY_LINE = "the pair is ready"
"""The start of the one line that says every service answers (scripts wait for it)."""

EXIT_OK, EXIT_FAILED = 0, 1


def demo_logins(configs: Configs) -> list[DemoLogin]:
    """B's database migrated, the demo's portal accounts in it (made once)."""
    engine = make_engine(configs.b.database.url)
    try:
        migrate(engine)
        issuer = configs.b.node.name or f"NCPeH {configs.b.node.country}"
        return ensure_demo_logins(session_factory(engine), issuer)
    finally:
        engine.dispose()


def run_demo(
    data: Path,
    *,
    patients: int = 8,
    seed: int = 1,
    big_patient_studies: int = 300,
    base_port: int = DEFAULT_BASE_PORT,
    setup_only: bool = False,
    archive: str = "folder",
    browser: bool = True,
    command: Command = ncp_command,
    ready_timeout: float = READY_TIMEOUT_S,
) -> int:
    """Prepare, start, wait for Ctrl-C; ``command`` replaces the services' commands (tests)."""
    began = time.monotonic()
    layout = Layout(data.resolve())
    # --setup-only binds nothing: write the ports the services would use, taken or not.
    ports = fixed_ports(base_port) if setup_only and base_port else choose_ports(base_port)
    generate_once(layout, patients=patients, seed=seed, big=big_patient_studies)
    stop = threading.Event()
    supervisor = Supervisor(layout.logs, command, stop, client_contexts(layout))
    # demo.json exists exactly while the services run: its appearance says they are ready.
    layout.demo_json.unlink(missing_ok=True)
    previous: dict[int, object] = {}
    try:
        source = Archive()
        if archive == "orthanc":
            source = _start_orthanc(layout, supervisor, ready_timeout)
        configs = write_configs(layout, ports, source)
        logins = demo_logins(configs)
        services = pair_services(layout, ports)
        if not setup_only:
            # The edge and node B need nothing of A's index: they start (loading their profiles
            # and catalogue) while A's archive is indexed; node A starts once it is.
            for service in services:
                if service.name != "node-a":
                    supervisor.start(service)
        top = index_and_list(configs.a)
        print(f"\nconfigs: {layout.node_a_config}, {layout.node_b_config}, {layout.edge_config}")
        if setup_only:
            more = f"ncp studies --config {layout.node_a_config} --patient {top.patient_id}"
            print(f"more:    {more}")
            return EXIT_OK
        supervisor.start(next(s for s in services if s.name == "node-a"))

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        return _run(
            layout, services, configs, top, logins, supervisor, stop, ready_timeout, browser, began
        )
    finally:
        supervisor.stop_all()
        layout.demo_json.unlink(missing_ok=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def _start_orthanc(layout: Layout, supervisor: Supervisor, timeout: float) -> Archive:
    from ncp.demo import orthanc

    local = orthanc.write_config(layout)
    service = local.service()
    supervisor.start(service)
    try:
        supervisor.wait_ready(service, timeout)
    except ChildDied as died:
        raise DemoError(f"Orthanc exited: {' | '.join(tail(died.service.stdout_log))}") from None
    except NotReady as failed:
        raise DemoError(str(failed.error)) from None
    sent = orthanc.load(local, layout.dicom)
    if sent:
        print(f"Orthanc holds the {sent} files of the demo's archive", flush=True)
    return Archive("orthanc", dicomweb=local.dicomweb)


def _run(
    layout: Layout,
    services: Sequence[Service],
    configs: Configs,
    top: TopPatient,
    logins: Sequence[DemoLogin],
    supervisor: Supervisor,
    stop: threading.Event,
    ready_timeout: float,
    browser: bool,
    began: float,
) -> int:
    try:
        for service in services:
            supervisor.wait_ready(service, ready_timeout)
    except Interrupted:
        print("interrupted while starting: stopping", flush=True)
        return EXIT_OK
    except ChildDied as died:
        return _report_death(died.service)
    except NotReady as failed:
        print(f"ncp demo: {failed.error}", file=sys.stderr)
        return _report_death(failed.service)
    running = [*(s for s in supervisor.services if s not in services), *services]
    layout.demo_json.write_text(
        json.dumps(describe(layout, running, configs, top, logins), indent=1) + "\n",
        encoding="utf-8",
    )
    _print_guide(layout, configs, top, logins)
    portal = configs.b.portal.url + "/"
    print(
        f"{READY_LINE} ({time.monotonic() - began:.0f} s after start): log in to country B's "
        f"portal at {portal} (Ctrl-C stops every service)"
    )
    sys.stdout.flush()
    if browser:
        open_browser(portal)
    while not stop.wait(0.25):
        dead = supervisor.dead()
        if dead is not None:
            return _report_death(dead)
    print("stopping", flush=True)
    return EXIT_OK


def _print_guide(
    layout: Layout, configs: Configs, top: TopPatient, logins: Sequence[DemoLogin]
) -> None:
    patient = f"{patient_system(top.issuer)}|{top.patient_id}"
    b, hp = layout.node_b_config, layout.hp_b
    print(f"\nportal logins of country B (password {logins[0].password!r} for each; the second")
    print("factor from the TOTP secret in an authenticator app, or `ncp demo --totp USER`):")
    for login in logins:
        print(f"  {login.username:<6} {login.name} ({login.language})  TOTP {login.totp_secret}")
    print(f"\ndemo.json: {layout.demo_json}")
    print("country B asks and pulls from the command line:")
    print(f"  ask:    ncp ask --config {b} --peer {COUNTRY_A} --hp {hp} list --patient '{patient}'")
    if top.newest:
        print(
            f"  pull:   ncp pull --config {b} --peer {COUNTRY_A} --patient '{patient}' "
            f"--study {top.newest}"
        )
    print(f"  viewer: ncp ask ... access --patient '{patient}' --study UID --option B")


def open_browser(url: str) -> None:
    """The portal in the user's browser, if there is one; never fails, never blocks the demo
    (a text browser in this terminal would take it over: only with a display)."""
    graphical = bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    if sys.platform.startswith("linux") and not graphical and not os.environ.get("BROWSER"):
        print(f"(no display: open {url} in a browser)", flush=True)
        return

    def attempt() -> None:
        try:
            if not webbrowser.open(url):
                print(f"(no browser found: open {url})", flush=True)
        except Exception as exc:  # a broken browser setup must not stop the demo
            print(f"(could not open a browser: {exc}; open {url})", flush=True)

    threading.Thread(target=attempt, name="browser", daemon=True).start()


def _report_death(service: Service) -> int:
    assert service.process is not None
    code = service.process.poll()
    state = "is running" if code is None else f"exited with code {code}"
    print(f"{service.name} {state}; its last stderr lines:", file=sys.stderr)
    for line in tail(service.stderr_log) or tail(service.stdout_log):
        print(f"  {line}", file=sys.stderr)
    return EXIT_FAILED


def print_totp(data: Path, username: str) -> int:
    """``ncp demo --totp USER``: the current TOTP code of a demo login."""
    from ncp.config import load_settings
    from ncp.demo.accounts import PROFILES

    layout = Layout(data.resolve())
    if not layout.node_b_config.is_file():
        raise ConfigError(f"{layout.node_b_config}: no demo here (run `ncp demo` first)")
    if username not in {p.username for p in PROFILES}:
        names = ", ".join(p.username for p in PROFILES)
        raise ConfigError(f"--totp {username}: not a demo login (the demo's: {names})")
    settings = load_settings(layout.node_b_config)
    engine = make_engine(settings.database.url)
    try:
        migrate(engine)
        logins = ensure_demo_logins(session_factory(engine), settings.node.name)
    finally:
        engine.dispose()
    [login] = [x for x in logins if x.username == username]
    print(login.code())
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        if getattr(args, "totp", None):
            return print_totp(args.data, args.totp)
        return run_demo(
            args.data,
            patients=args.patients,
            seed=args.seed,
            big_patient_studies=args.big_patient_studies,
            base_port=args.base_port,
            setup_only=args.setup_only,
            archive=args.archive,
            browser=not args.no_browser,
        )
    except KeyboardInterrupt:
        # Ctrl-C while preparing: the services are not running (Orthanc was stopped).
        print("interrupted", file=sys.stderr)
        return 130
