"""How every command reports problems: one line on stderr, ``error: <problem>``, naming
the file or key, and an exit code (2: bad usage or input; 1: a failure while running,
or some items failed). ``--debug`` shows the full traceback instead."""
from __future__ import annotations

import sys
import traceback
from typing import Callable, List, Optional

from ..checkpoints import CheckpointError
from ..config import ConfigError
from ..data import DataError, PairingError
from ..evaluation import RunStopped
from ..imageio import ImageReadError
from ..runfolder import RunFolderError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(ValueError):
    """Bad command-line input (a missing folder, an unavailable device, an empty input)."""


class ItemsFailed(RuntimeError):
    """The run finished, but some items could not be processed (listed in summary.md)."""


# Problems with what the user gave us: exit code 2.
USER_ERRORS = (UsageError, ConfigError, CheckpointError, ImageReadError, PairingError, DataError, RunFolderError,
               FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (multi-line messages joined with '; ')."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def run_command(fn: Callable[[Optional[List[str]]], object], argv: Optional[List[str]] = None) -> int:
    """Run ``fn(argv)`` and turn what it raises into a one-line message and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        fn([a for a in args if a != "--debug"])
        return EXIT_OK
    except SystemExit as exc:           # argparse: --help (0) or a usage error (2, already printed)
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (ItemsFailed, RunStopped) as exc:      # the run ended; its reason is the message
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except USER_ERRORS as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a failure while running
        if debug:
            traceback.print_exc()
        print(f"error: {type(exc).__name__}: {one_line(exc)} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILED
