"""B's WADO-RS requests (``ncp.consumer.retrieve`` over ``ncp.consumer.connections``) against a
scripted HTTPS server: parts into staging files, kept-alive connections (and one the peer
closed meanwhile), answers cut short, statuses, and a disk failure told from a network one."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ncp.consumer.connections import Connections
from ncp.consumer.retrieve import (
    Fetcher,
    NotAtPeer,
    Refused,
    TokenRefused,
    Transient,
    Unit,
)
from ncp.gateway.multipart import MultipartWriter, PartHead
from ncp.security import pki
from tests.support.dicom_factory import encode, make_instance

STUDY = "1.2.826.0.1.3680043.10.7.1"
SERIES = f"{STUDY}.1"


def _instance(n: int) -> bytes:
    ds = make_instance(
        patient_id="PAT-1", study_uid=STUDY, series_uid=SERIES, sop_uid=f"{SERIES}.{n}"
    )
    return encode(ds)


def _multipart(parts: list[bytes]) -> tuple[bytes, str]:
    writer = MultipartWriter("application/dicom")
    body = b"".join(writer.open_part(PartHead("application/dicom")) + p for p in parts)
    return body + writer.close(), writer.content_type


def _chunked(body: bytes, size: int = 3000) -> bytes:
    out = b"".join(
        f"{len(body[i : i + size]):x}\r\n".encode() + body[i : i + size] + b"\r\n"
        for i in range(0, len(body), size)
    )
    return out + b"0\r\n\r\n"


Answer = Callable[[bytes], tuple[bytes, bool]]
"""A request's head -> the raw answer, and whether to close the connection after it."""


@dataclass
class Peer:
    """A small HTTPS server that answers each request with the next scripted answer."""

    url: str
    context: ssl.SSLContext
    answers: list[Answer] = field(default_factory=list)
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Peer]:
    ca = pki.make_ca("AT", common_name="NCP-TEST fetch CA")
    key = pki.new_ec_key()
    cert = pki.issue_server_certificate(ca, key.public_key(), "AT")
    (tmp_path / "server.pem").write_bytes(pki.cert_pem(cert) + pki.private_pem(key))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "server.pem")
    client_ctx = ssl.create_default_context(cadata=pki.cert_pem(ca.certificate).decode())
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    state = Peer(f"https://localhost:{port}/dicomweb", client_ctx)

    def serve_one(raw: socket.socket) -> None:
        with server_ctx.wrap_socket(raw, server_side=True) as conn:
            buffered = b""
            while True:
                while b"\r\n\r\n" not in buffered:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffered += data
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                state.requests.append(head)
                answer, close = state.answers.pop(0)(head)
                conn.sendall(answer)
                if close:
                    return

    def accept() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            state.connections += 1
            threading.Thread(target=serve_one, args=(raw,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield state
    listener.close()


def _ok(parts: list[bytes], *, close: bool = False, cut: int | None = None) -> Answer:
    def answer(_: bytes) -> tuple[bytes, bool]:
        body, ctype = _multipart(parts)
        framed = _chunked(body)
        if cut is not None:
            framed, close_now = framed[:cut], True
        else:
            close_now = close
        head = f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n\r\n"
        return head.encode() + framed, close_now

    return answer


def _status(code: int, *extra: str) -> Answer:
    def answer(_: bytes) -> tuple[bytes, bool]:
        lines = [f"HTTP/1.1 {code} X", "Content-Length: 4", *extra]
        return ("\r\n".join(lines) + "\r\n\r\nnope").encode(), False

    return answer


def _fetcher(peer: Peer, staging: Path, connections: Connections) -> Fetcher:
    staging.mkdir(parents=True, exist_ok=True)
    return Fetcher(connections, "AT", staging, request_id="job-1")


@pytest.fixture
def connections(peer: Peer) -> Iterator[Connections]:
    made = Connections(lambda _: peer.context, timeout_s=5, connect_timeout_s=5, keep_idle=2)
    yield made
    made.close()


def _pull(fetcher: Fetcher, peer: Peer) -> list[bytes]:
    got = []
    with fetcher.open(peer.url, "tok", Unit(STUDY, SERIES)) as parts:
        for received in parts:
            assert received.header is not None and received.header.study_uid == STUDY
            got.append(received.path.read_bytes())
    return got


def test_parts_arrive_in_files_on_one_kept_connection(
    peer: Peer, connections: Connections, tmp_path: Path
) -> None:
    instances = [_instance(1), _instance(2)]
    peer.answers += [_ok(instances), _ok(instances[:1])]
    fetcher = _fetcher(peer, tmp_path / "staging", connections)
    assert _pull(fetcher, peer) == instances
    assert _pull(fetcher, peer) == instances[:1]
    assert peer.connections == 1  # the second request reused the first connection
    head = peer.requests[0].decode()
    assert f"GET /dicomweb/studies/{STUDY}/series/{SERIES} HTTP/1.1" in head
    assert "Authorization: Bearer tok" in head and "X-Request-ID: job-1" in head


def test_a_kept_connection_the_peer_closed_is_opened_again_once(
    peer: Peer, connections: Connections, tmp_path: Path
) -> None:
    instances = [_instance(1)]
    # The first answer does not say it closes the connection, and then the peer closes it.
    peer.answers += [_ok(instances, close=True), _ok(instances)]
    fetcher = _fetcher(peer, tmp_path / "staging", connections)
    assert _pull(fetcher, peer) == instances
    assert _pull(fetcher, peer) == instances
    assert peer.connections == 2


def test_an_answer_cut_short_is_transient_and_leaves_no_file(
    peer: Peer, connections: Connections, tmp_path: Path
) -> None:
    instances = [_instance(1), _instance(2)]
    peer.answers.append(_ok(instances, cut=len(instances[0]) + 500))
    fetcher = _fetcher(peer, tmp_path / "staging", connections)
    with pytest.raises(Transient):
        _pull(fetcher, peer)
    # The complete first part was handed out (and read above); nothing of the second is left.
    assert len(list((tmp_path / "staging").iterdir())) <= 1


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (_status(401), TokenRefused),
        (_status(404), NotAtPeer),
        (_status(403), Refused),
        (_status(503, "Retry-After: 7"), Transient),
    ],
)
def test_statuses_say_what_to_do_next(
    peer: Peer,
    connections: Connections,
    tmp_path: Path,
    answer: Answer,
    error: type[Exception],
) -> None:
    peer.answers.append(answer)
    fetcher = _fetcher(peer, tmp_path / "staging", connections)
    with pytest.raises(error) as raised:
        _pull(fetcher, peer)
    if isinstance(raised.value, Transient):
        assert raised.value.retry_after == 7.0


def test_a_failing_disk_is_not_taken_for_a_failing_network(
    peer: Peer, connections: Connections, tmp_path: Path
) -> None:
    # A transient error would be retried for ever; B's own disk failing is not the peer's.
    peer.answers.append(_ok([_instance(1)]))
    fetcher = _fetcher(peer, tmp_path / "staging", connections)
    (tmp_path / "staging").rmdir()
    with pytest.raises(FileNotFoundError):
        _pull(fetcher, peer)


def test_a_peer_that_is_not_there_is_transient(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    made = Connections(
        lambda _: ssl.create_default_context(), timeout_s=2, connect_timeout_s=2, keep_idle=1
    )
    fetcher = Fetcher(made, "AT", tmp_path, request_id="job-1")
    with (
        pytest.raises(Transient),
        fetcher.open(f"https://localhost:{port}/dicomweb", "tok", Unit(STUDY, SERIES)),
    ):
        pass
    made.close()
