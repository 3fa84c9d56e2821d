"""``ncp pull``: its parser, for the ``ncp`` command's lazy start-up (the command itself is
:func:`ncp.consumer.jobs_command.cmd_pull`)."""

from __future__ import annotations

from ncp.consumer.jobs_command import register_pull as register

__all__ = ["register"]
