"""``ncp pull`` and ``ncp jobs``: country B's retrieval jobs from the command line, on the same
job machinery as the portal's JSON API.

``ncp pull`` acts for the HP named in ``[retrieval] cli_hp`` (a command line has no logged-in
HP): it signs that HP's assertion and a TRC for the patient, queues a job, runs it in this process
(unless a worker of ``ncp jobs work`` takes it first) and follows it to its end, with a live bar
in a terminal or one JSON summary with ``--json``. Exit codes: 0 stored, 1 the job ended
otherwise (failed, declined, cancelled, needs-hp), 2 usage or configuration error.

``ncp jobs list|show|cancel`` read and change jobs as the node's operator (every HP's jobs);
``ncp jobs work`` runs the node's workers (all lanes) and the purge until SIGTERM or Ctrl-C;
``ncp jobs purge`` runs the retention purge once.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ncp.config import NodeSettings, load_settings
from ncp.consumer.env import RetrievalEnv
from ncp.consumer.jobs import JobError, JobRequest, JobView, Requester, Status
from ncp.consumer.model import PeerAccess
from ncp.consumer.progress import follow
from ncp.consumer.purge import purge_expired
from ncp.consumer.service import RetrievalService
from ncp.consumer.wiring import PeerWiring, StudyFilters, default_wiring, retrieval_env
from ncp.consumer.worker import Retriever
from ncp.errors import ConfigError
from ncp.security.claims import PatientRef

if TYPE_CHECKING:
    from ncp.node import Node

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

WIRING: Callable[[Node], PeerWiring] = default_wiring
"""How the commands reach the peer client (the composition root's default; tests replace it)."""


def register_pull(subparsers: Any) -> None:
    """Add ``pull`` to the ``ncp`` command's sub-commands (``ncp.consumer.pull_command``)."""
    pull = subparsers.add_parser(
        "pull",
        help="pull studies of a patient from a peer: verify, store, follow the job",
        description="Queue a retrieval job for the HP of [retrieval] cli_hp and run it.",
    )
    pull.add_argument("--config", type=Path, required=True, help="the node's TOML file")
    pull.add_argument("--peer", required=True, help="country A's code, e.g. AT")
    pull.add_argument(
        "--patient", required=True, metavar="SYSTEM|VALUE", help="the patient by A's identifier"
    )
    which = pull.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", action="append", metavar="UID", help="a Study Instance UID")
    which.add_argument("--all", action="store_true", help="every study A lists (with filters)")
    pull.add_argument("--modality", action="append", default=[], help="with --all: modality")
    pull.add_argument("--since", type=date.fromisoformat, help="with --all: studies from")
    pull.add_argument("--until", type=date.fromisoformat, help="with --all: studies until")
    pull.add_argument("--option", choices=["A", "C"], default="A")
    pull.add_argument("--priority", choices=["emergency", "normal", "batch"], default="normal")
    pull.add_argument(
        "--purpose",
        choices=["TREAT", "ETREAT"],
        help="purpose of use in the TRC (default: ETREAT for --priority emergency, else TREAT)",
    )
    pull.add_argument(
        "--not-informed",
        action="store_true",
        help="the patient could not be informed yet (emergency treatment only)",
    )
    pull.add_argument("--local-patient", help="B's own identifier (import reconciliation)")
    pull.add_argument("--json", action="store_true", help="print one JSON summary at the end")
    pull.add_argument(
        "--no-wait", action="store_true", help="queue the job and exit (a worker runs it)"
    )
    pull.set_defaults(handler=cmd_pull)


def register(subparsers: Any) -> None:
    """Add ``jobs`` to the ``ncp`` command's sub-commands."""
    jobs = subparsers.add_parser(
        "jobs", help="country B's retrieval jobs: list, show, cancel, work, purge"
    )
    sub = jobs.add_subparsers(metavar="ACTION", required=True)
    listing = sub.add_parser("list", help="jobs, newest first")
    listing.add_argument("--config", type=Path, required=True)
    listing.add_argument("--status", action="append", choices=[s.value for s in Status])
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_list)
    show = sub.add_parser("show", help="one job with its history and problems")
    show.add_argument("--config", type=Path, required=True)
    show.add_argument("job")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_show)
    cancel = sub.add_parser("cancel", help="cancel a job")
    cancel.add_argument("--config", type=Path, required=True)
    cancel.add_argument("job")
    cancel.set_defaults(handler=cmd_cancel)
    work = sub.add_parser("work", help="run the workers of every lane and the purge")
    work.add_argument("--config", type=Path, required=True)
    work.add_argument(
        "--until-idle",
        action="store_true",
        help="exit once no job is queued or running (scripts and tests)",
    )
    work.set_defaults(handler=cmd_work)
    purge = sub.add_parser("purge", help="remove studies whose retention is over, now")
    purge.add_argument("--config", type=Path, required=True)
    purge.add_argument("--json", action="store_true")
    purge.set_defaults(handler=cmd_purge)


@contextmanager
def _retrieval(config: Path, *, peers: bool = True) -> Iterator[tuple[Node, RetrievalEnv, Any]]:
    from ncp.node import Node

    settings: NodeSettings = load_settings(config)
    node = Node.from_settings(settings)
    wiring = WIRING(node) if peers else None
    env = retrieval_env(node, wiring.access if wiring is not None else _no_peers)
    try:
        yield node, env, wiring
    finally:
        env.close()
        if wiring is not None:
            wiring.close()
        node.close()


def _no_peers(peer: str) -> PeerAccess:
    """For commands that never ask a peer (list, show, cancel, purge)."""
    raise ConfigError("this command does not ask peers")


def _patient(text: str) -> PatientRef:
    system, sep, value = text.partition("|")
    if not sep or not system or not value:
        raise ConfigError(f"--patient {text!r}: give SYSTEM|VALUE, e.g. urn:oid:1.2.3|PAT100")
    return PatientRef(system, value)


# -- ncp pull -----------------------------------------------------------------------------------


def cmd_pull(args: argparse.Namespace) -> int:
    patient = _patient(args.patient)
    purpose = args.purpose or ("ETREAT" if args.priority == "emergency" else "TREAT")
    if args.not_informed and purpose != "ETREAT":
        raise ConfigError("--not-informed: only emergency treatment (ETREAT) may go ahead first")
    with _retrieval(args.config) as (node, env, wiring):
        hp = node.settings.retrieval.cli_hp
        if hp is None:
            raise ConfigError(
                f"{args.config}: [retrieval.cli_hp] is not set: ncp pull needs the identity of "
                "the health professional it acts for"
            )
        request_id = f"pull-{uuid.uuid4()}"
        context = wiring.context(
            args.peer,
            hp,
            patient,
            purpose=purpose,
            informed=not args.not_informed,
            request_id=request_id,
        )
        if args.all:
            filters = StudyFilters(tuple(args.modality), args.since, args.until)
            studies = list(wiring.studies(context, filters))
            if not studies:
                _say(args, {"status": "nothing", "detail": "A lists no study under the filters"})
                return EXIT_FAILED
        else:
            studies = list(dict.fromkeys(args.study))
        requester = Requester(hp.id, hp.name, "cli")
        started = time.monotonic()
        try:
            job = env.jobs.create(
                requester,
                context,
                JobRequest(
                    peer=args.peer,
                    patient=patient,
                    studies=tuple(studies),
                    option=args.option,
                    priority=args.priority,
                    local_patient=args.local_patient,
                ),
            )
        except JobError as exc:
            raise ConfigError(str(exc)) from None
        if args.no_wait:
            _say(args, job.to_json(detail=False))
            return EXIT_OK
        final = _run_and_follow(env, job.id, live=not args.json and sys.stderr.isatty())
        summary = final.to_json()
        summary["elapsed_s"] = round(time.monotonic() - started, 3)
        _say(args, summary, text=_text(final))
        return EXIT_OK if final.status == Status.STORED else EXIT_FAILED


def _run_and_follow(env: RetrievalEnv, job_id: str, *, live: bool) -> JobView:
    """Run the job in a thread of this process (attempts and retries as a worker would) while
    the main thread shows its progress; Ctrl-C hands the job back to be resumed later."""
    retriever = Retriever(env)
    stopped = threading.Event()

    def work() -> None:
        while not retriever.stop_event.is_set():
            job = env.jobs.get(job_id)
            if job.ended or job.status == Status.NEEDS_HP:
                break
            if retriever.run_only(job_id) is None:
                # Not due (a retry waits) or another worker holds it: look again shortly.
                retriever.stop_event.wait(min(env.settings.poll_s, 1.0))
        stopped.set()

    thread = threading.Thread(target=work, name="pull", daemon=True)
    thread.start()

    def finished(job: JobView) -> bool:
        return stopped.is_set() and (job.ended or job.status == Status.NEEDS_HP)

    try:
        return follow(lambda: env.jobs.get(job_id), finished, live=live)
    except KeyboardInterrupt:
        retriever.stop_event.set()
        thread.join(60)
        print(
            f"interrupted: job {job_id} is handed back; `ncp jobs work` resumes it",
            file=sys.stderr,
        )
        raise
    finally:
        retriever.stop_event.set()
        thread.join(60)


def _text(job: JobView) -> str:
    lines = [
        f"job {job.id}: {job.status}" + (f" ({job.reason})" if job.reason else ""),
        f"  {job.instances_done}/{job.instances_total} instances, {job.bytes_done} bytes, "
        f"{job.instances_rejected} rejected",
    ]
    if job.purge_at:
        lines.append(f"  kept until {job.purge_at:%Y-%m-%d %H:%M}Z")
    lines += [f"  {p.kind} {p.sop_uid or p.study_uid}: {p.detail}" for p in job.problems[:20]]
    return "\n".join(lines)


def _say(args: argparse.Namespace, data: dict[str, Any], *, text: str | None = None) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2))
    else:
        print(text if text is not None else json.dumps(data, indent=2))


# -- ncp jobs -----------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    with _retrieval(args.config, peers=False) as (_node, env, _):
        found = env.jobs.list(statuses=args.status or (), limit=args.limit)
        if args.json:
            print(json.dumps({"jobs": [j.to_json(detail=False) for j in found]}, indent=2))
            return EXIT_OK
        for job in found:
            print(
                f"{job.id}  {job.status:<11} {job.priority:<9} {job.peer} "
                f"{job.instances_done}/{job.instances_total}  {job.hp.name} ({job.hp.source})"
                f"  {job.created_at:%Y-%m-%d %H:%M}Z" + (f"  {job.reason}" if job.reason else "")
            )
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    with _retrieval(args.config, peers=False) as (_node, env, _):
        try:
            job = env.jobs.get(args.job)
        except JobError as exc:
            print(f"ncp: {exc}", file=sys.stderr)
            return EXIT_FAILED
        if args.json:
            print(json.dumps(job.to_json(), indent=2))
        else:
            print(_text(job))
            for event in job.history:
                reason = f"  {event.reason}" if event.reason else ""
                print(f"  {event.at:%Y-%m-%d %H:%M:%S}Z {event.status}{reason}")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with _retrieval(args.config, peers=False) as (_node, env, _):
        try:
            job = env.jobs.cancel(args.job)
        except JobError as exc:
            print(f"ncp: {exc}", file=sys.stderr)
            return EXIT_FAILED
        later = "" if job.status == Status.CANCELLED else " (stops after the current instance)"
        print(f"job {job.id}: {job.status}{later}")
    return EXIT_OK


def cmd_purge(args: argparse.Namespace) -> int:
    with _retrieval(args.config, peers=False) as (_node, env, _):
        run = purge_expired(env)
        result = {
            "studies": run.studies,
            "instances": run.instances,
            "jobs": run.jobs,
            "failed": run.failed,
        }
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"purged {len(run.studies)} studies ({run.instances} instances)")
            for uid, why in run.failed.items():
                print(f"  not purged {uid}: {why}")
    return EXIT_FAILED if run.failed else EXIT_OK


def cmd_work(args: argparse.Namespace) -> int:
    with _retrieval(args.config) as (_node, env, _):
        service = RetrievalService(env)
        stop = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            stop.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        service.start()
        print(f"ncp jobs work: {service.describe()}", file=sys.stderr, flush=True)
        try:
            while not stop.is_set():
                if args.until_idle and service.idle():
                    break
                stop.wait(min(1.0, env.settings.poll_s))
        finally:
            service.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return EXIT_OK
