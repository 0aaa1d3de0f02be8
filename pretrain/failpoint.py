"""Named points where a test makes this process fail for real, at an exact moment.

`PRETRAIN_FAILPOINT=<name>` (optionally `<name>@<n>`, and/or `:raise`) in a process's
environment makes the point of that name SIGKILL the process (a crash: nothing runs after it),
with `:raise`, raise `FailpointError` (an ordinary exception in the middle of the work), or,
with `:interrupt`, send the process a SIGINT (a Ctrl-C at that moment), or, with `:sleep`, hold
the thread that reached it for 2 s (slow storage: a background write still in flight while
the run goes on).
`@<n>` fires on the n-th time the process reaches the point (the first by default): e.g. in the
second of several runs one process makes in turn. Tests set it for one process only, so "one
rank dies here" needs no race against a timer. Unset, a point costs one string comparison.
"""

from __future__ import annotations

import os
import signal
import time

_SPEC = os.environ.get("PRETRAIN_FAILPOINT", "")
_NAME, _, _AT = _SPEC.split(":", 1)[0].partition("@")
_hits = 0


class FailpointError(RuntimeError):
    """The exception a `<name>:raise` failpoint raises."""


def failpoint(name: str) -> None:
    global _hits
    if not _SPEC or name != _NAME:
        return
    _hits += 1
    if _hits < int(_AT or 1):
        return
    if _SPEC.endswith(":raise"):
        raise FailpointError(f"failpoint {name} (PRETRAIN_FAILPOINT={_SPEC})")
    if _SPEC.endswith(":sleep"):
        time.sleep(2.0)
        return
    if _SPEC.endswith(":interrupt"):
        os.kill(os.getpid(), signal.SIGINT)
        return
    os.kill(os.getpid(), signal.SIGKILL)
