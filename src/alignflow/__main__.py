"""`python -m alignflow ...` (what `torchrun ... -m alignflow STAGE CONFIG` runs in every process).

Under torchrun a process ends with ``os._exit`` once the command is done, its exit handlers have run and its
output is flushed: it skips the interpreter's finalization. There, Python stops threads that try to take the
GIL by unwinding them, and a Gloo worker thread caught inside a C++ ``noexcept`` frame turns that into
``std::terminate``: "terminate called without an active exception" and SIGABRT, after the work was done (seen
twice here: once in the test suite, once in about 115 plain 2-process runs; the process group was destroyed,
but DDP and FSDP keep references to it until their modules are collected). torchrun reports such a worker as
failed.
"""

import atexit
import os
import sys

from alignflow.cli.main import main
from alignflow.train.torchrun_env import under_torchrun


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


if under_torchrun():
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:  # noqa: BLE001 - reported like the interpreter would, then the same fast exit
        import traceback

        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # checkpoint writers' joins, logging's flush: what a normal exit would run
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
else:
    main()
