"""The ``eventbus`` command line (``eventbus`` and ``python -m eventbus`` run :func:`main`).

    _main      the argparse tree; the commands that talk to a running service over its HTTP API
    _rules     ``eventbus rules validate|test|test-pattern``: rules checked offline
    _serve     ``eventbus serve``: the service and its HTTP edge, in one process or several
    _output    what those commands print: tables, or the API's JSON with ``--json``
    _display   ``eventbus display``: a function endpoint that prints what it receives
    _logging   structured logs, configured once for ``serve``

Where it sits: at the top, beside the HTTP edge. ``serve`` builds the service through the
composition root (``eventbus.app``) and serves it with ``eventbus.http``; the other commands
import what they need only when they run, so ``eventbus --help`` starts quickly.
"""

from __future__ import annotations

from eventbus.cli._main import main

__all__ = ["main"]
