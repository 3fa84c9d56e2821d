"""Access token verification cost per request, against a bare ECDSA verify of the same input.

    python bench/token_bench.py [--tokens 2000] [--repeat 5] [--studies 2] [--cpu 0]

Issues ``--tokens`` image access tokens (each its own ``jti``, ``--studies`` Study Instance UIDs),
then times each token ``--repeat`` times on one core (pinned with ``--cpu`` where the OS allows),
the three measurements interleaved token by token so that load from other processes falls on
all three alike:

- *bare*: ``cryptography``'s ECDSA P-256 / SHA-256 verify of the token's signing input, the DER
  signature prepared beforehand: the cost no verifier can go below;
- *verify*: ``ncp.security.tokens.verify``: size, parse, header, key, ES256 signature, audience,
  claims, time and lifetime checks;
- *check*: ``AccessVerifier.check``, what a gateway calls per request (``verify`` plus the
  study and patient checks, and building the grant).

Prints one JSON object: medians and 90th percentiles in microseconds, and the ratios of
*verify* and *check* to *bare*. The goal is *check* under 500 us.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import cryptography
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ncp.security.access import AccessVerifier
from ncp.security.claims import IMAGE_ACCESS, ImageAccess, PatientRef
from ncp.security.keys import KeySet, PublicKey, SigningKey
from ncp.security.tokens import issue, verify

GOAL_US = 500.0
AUDIENCE = "https://gw.at.example/dicomweb"
NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
PATIENT = PatientRef("urn:oid:1.2.40.0.10.1.4.3.1", "PAT200")


def make_tokens(count: int, studies: int, key: SigningKey) -> list[str]:
    tokens = []
    for n in range(count):
        uids = tuple(f"1.2.826.0.1.3680043.10.{n}.{s}" for s in range(1, studies + 1))
        claims = ImageAccess(
            issuer="AT",
            audience=AUDIENCE,
            subject="BE-HP-0042",
            issued_at=NOW,
            expires_at=NOW + timedelta(minutes=5),
            requesting_country="BE",
            patient=PATIENT,
            studies=uids,
            purpose_of_use="TREAT",
            priority="routine",
            option="A",
        )
        tokens.append(issue(IMAGE_ACCESS, claims, key, now=NOW))
    return tokens


def bare_inputs(tokens: Sequence[str]) -> list[tuple[bytes, bytes]]:
    prepared = []
    for token in tokens:
        head, body, signature = token.split(".")
        raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
        der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        prepared.append((der, f"{head}.{body}".encode("ascii")))
    return prepared


def time_interleaved(
    calls: Sequence[tuple[Callable[[int], object]]], count: int, repeat: int
) -> list[list[float]]:
    """Microseconds per call, for each call, interleaved token by token: under a shared machine's
    varying load, each token's bare, verify and check run at nearly the same moment."""
    samples: list[list[float]] = [[] for _ in calls]
    clock = time.perf_counter_ns
    for _ in range(repeat):
        for index in range(count):
            for slot, (call,) in enumerate(calls):
                started = clock()
                call(index)
                samples[slot].append((clock() - started) / 1000)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_us": round(statistics.median(ordered), 1),
        "p90_us": round(ordered[int(len(ordered) * 0.9)], 1),
        "mean_us": round(statistics.fmean(ordered), 1),
    }


def pin(cpu: int | None) -> int | None:
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return None
    os.sched_setaffinity(0, {cpu})
    return cpu


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--studies", type=int, default=2)
    parser.add_argument("--cpu", type=int, default=0, help="core to pin to (-1: do not pin)")
    options = parser.parse_args(args)
    pinned = pin(None if options.cpu < 0 else options.cpu)

    key = SigningKey("at-bench", ec.generate_private_key(ec.SECP256R1()))
    public = key.private_key.public_key()
    keys = KeySet("AT", {key.kid: PublicKey(key.kid, public)})
    tokens = make_tokens(options.tokens, options.studies, key)
    prepared = bare_inputs(tokens)
    algorithm = ec.ECDSA(hashes.SHA256())
    verifier = AccessVerifier(keys, AUDIENCE, "AT", clock=lambda: NOW)
    later = NOW + timedelta(minutes=1)

    studies = [f"1.2.826.0.1.3680043.10.{n}.1" for n in range(len(tokens))]

    def bare(index: int) -> None:
        der, signing_input = prepared[index]
        public.verify(der, signing_input, algorithm)

    def full_verify(index: int) -> None:
        verify(IMAGE_ACCESS, tokens[index], keys, audience=AUDIENCE, issuer="AT", now=later)

    def gateway_check(index: int) -> None:
        verifier.check(tokens[index], study_uid=studies[index], patient=PATIENT, now=later)

    # Warm up every path once (imports, caches), then measure.
    for call in (bare, full_verify, gateway_check):
        call(0)
    bare_us, verify_us, check_us = time_interleaved(
        [(bare,), (full_verify,), (gateway_check,)], len(tokens), options.repeat
    )
    results = {"bare": summary(bare_us), "verify": summary(verify_us), "check": summary(check_us)}
    bare_median = results["bare"]["median_us"]
    report = {
        "tokens": options.tokens,
        "repeat": options.repeat,
        "studies_per_token": options.studies,
        "token_chars": round(statistics.fmean(len(t) for t in tokens)),
        "pinned_cpu": pinned,
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        **results,
        "ratio_verify_to_bare": round(results["verify"]["median_us"] / bare_median, 2),
        "ratio_check_to_bare": round(results["check"]["median_us"] / bare_median, 2),
        "goal_us": GOAL_US,
        "goal_met": results["check"]["median_us"] < GOAL_US,
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
