"""Graceful shutdown of a real ``ncp serve`` process with a study being streamed through the
option A gateway: SIGTERM stops new connections at once and says "draining" on /readyz, the
transfer under way finishes whole (and is audited), then the process exits 0; a transfer that
outlasts ``ops.shutdown_grace_s`` is cut (the client sees a broken transfer, never a clean short
one) and the process still exits."""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.ops_node import BIG_PATIENT, BIG_STUDY, ServedNode, served_node

INSTANCES = 24  # 2 MiB each: about 48 MiB, more than socket buffers hold
RETRIEVE = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _stream(node: ServedNode, http: httpx.Client) -> Iterator[bytes]:
    token = node.token(BIG_PATIENT, [BIG_STUDY])
    headers = {"Authorization": f"Bearer {token}", "Accept": RETRIEVE}
    with http.stream("GET", f"{node.imaging}/studies/{BIG_STUDY}", headers=headers) as answer:
        assert answer.status_code == 200
        yield answer.headers["content-type"].encode()
        yield from answer.iter_raw(64 * 1024)


def _retrieves(node: ServedNode) -> list[tuple[int, int | None, int | None]]:
    with sqlite3.connect(node.root / "node.db") as db:
        return list(
            db.execute(
                "SELECT outcome, num_instances, size_bytes FROM audit_record "
                "WHERE action = 'image-retrieve' AND side = 'gateway' ORDER BY seq"
            )
        )


def _refused(node: ServedNode) -> bool:
    try:
        with node.client(timeout=3) as http:
            http.get("/fhir/metadata")
    except httpx.ConnectError:
        return True
    return False


def test_sigterm_lets_the_transfer_in_flight_finish_then_exits_0(tmp_path: Path) -> None:
    with served_node(tmp_path / "node", big_instances=INSTANCES) as node:
        with httpx.Client(verify=node.context(), timeout=60) as http:
            chunks = _stream(node, http)
            content_type = next(chunks).decode()
            received = [next(chunks)]
            node.signal(signal.SIGTERM)
            time.sleep(1.0)  # the transfer waits for us meanwhile
            assert node.process.poll() is None, "exited with a transfer under way"
            ready = node.ops_get("/readyz")
            assert (ready.status_code, ready.json()["status"]) == (503, "draining")
            assert _refused(node), "a new connection was accepted while draining"
            for chunk in chunks:
                received.append(chunk)
                time.sleep(0.002)  # a slow reader: the transfer outlives the signal by seconds
        body = b"".join(received)
        boundary = content_type.split("boundary=")[1].split(";")[0].strip('"').encode()
        assert body.rstrip().endswith(b"--" + boundary + b"--"), "the transfer was cut"
        assert body.count(b"--" + boundary + b"\r\n") == INSTANCES
        assert len(body) > INSTANCES * 2 * 1024 * 1024
        assert node.wait(timeout=30) == 0
        assert _retrieves(node)[-1] == (0, INSTANCES, len(body))
        messages = [r["message"] for r in node.log_records()]
        assert any(m.startswith("SIGTERM: no new connections") for m in messages)


def test_a_transfer_beyond_the_grace_is_cut_and_the_process_exits(tmp_path: Path) -> None:
    ops = {"shutdown_grace_s": 1}
    with served_node(tmp_path / "node", big_instances=INSTANCES, ops=ops) as node:
        with httpx.Client(verify=node.context(), timeout=60) as http:
            chunks = _stream(node, http)
            next(chunks)
            next(chunks)
            started = time.monotonic()
            node.signal(signal.SIGTERM)
            # The reader stalls: the node waits 1 s for it, then closes what is left.
            assert node.wait(timeout=30) == 0
            assert time.monotonic() - started < 15
            with pytest.raises(httpx.HTTPError):
                for _ in chunks:
                    pass
        outcome, _, sent = _retrieves(node)[-1]
        assert outcome != 0 and sent is not None and sent < INSTANCES * 2 * 1024 * 1024
