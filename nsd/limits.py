"""Process limits the daemons raise for themselves at start. No sockets, no torch."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("nsd.limits")


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit and return (soft, hard) as they now are.

    Every ZeroMQ peer costs the broker a file descriptor, and the common soft default (1,024) was
    exhausted by ~1,100 idle connections; the hard limit (LimitNOFILE= in the systemd units) is what
    the administrator allows. Never fails: a limit it cannot raise is logged and left as it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft, hard  # an unlimited hard limit is not a number to ask for; keep the soft one
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open files limit from %d to %d: %s", soft, hard, exc)
        return soft, hard
    return hard, hard
