"""Following a job from the command line: a live progress bar in a terminal (rich), one line
per status change otherwise; the same job rows the API reads."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ncp.consumer.jobs import JobView, Status


def follow(
    read: Callable[[], JobView],
    done: Callable[[JobView], bool],
    *,
    live: bool,
    out: TextIO | None = None,
    every_s: float = 0.2,
) -> JobView:
    """Poll ``read`` until ``done``; a bar when ``live`` (a terminal), else a line per status."""
    stream = out or sys.stderr
    if not live:
        return _lines(read, done, stream, every_s)
    console = Console(file=stream)
    columns = (
        TextColumn("{task.description:<11}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[instances]} instances"),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("queued", total=None, instances="0/?")
        while True:
            job = read()
            # The bar measures bytes when A's manifests gave sizes, else instances.
            by_bytes = job.bytes_total > 0
            bar.update(
                task,
                description=str(job.status),
                total=(job.bytes_total if by_bytes else job.instances_total) or None,
                completed=job.bytes_done if by_bytes else job.instances_done,
                instances=f"{job.instances_done}/{job.instances_total or '?'}",
            )
            if done(job):
                return job
            time.sleep(every_s)


def _lines(
    read: Callable[[], JobView], done: Callable[[JobView], bool], out: TextIO, every_s: float
) -> JobView:
    seen: tuple[Status, str | None] | None = None
    while True:
        job = read()
        now = (job.status, job.reason)
        if now != seen:
            reason = f": {job.reason}" if job.reason else ""
            print(
                f"{job.status} {job.instances_done}/{job.instances_total} instances{reason}",
                file=out,
                flush=True,
            )
            seen = now
        if done(job):
            return job
        time.sleep(every_s)
