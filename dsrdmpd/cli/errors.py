"""How every command reports problems: one line on stderr, ``error: <problem>``, naming
the file or key, and an exit code (2: bad usage or input; 1: a failure while running,
or some items failed). ``--debug`` shows the full traceback instead."""
from __future__ import annotations

import sys
import traceback
import warnings
from typing import Callable, List, Optional, Tuple, Type

from ..messages import one_line

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(ValueError):
    """Bad command-line input (a missing folder, an unavailable device, an empty input)."""


class ItemsFailed(RuntimeError):
    """The run finished, but some items could not be processed (listed in summary.md)."""


# Problems with what the user gave us: exit code 2. The package's own classes are named by
# module, not imported: this module (imported before the arguments are parsed) stays free of
# torch, and an exception of a class whose module was never imported cannot occur.
USER_ERRORS = (UsageError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
PACKAGE_USER_ERRORS = (("dsrdmpd.config", "ConfigError"), ("dsrdmpd.checkpoints", "CheckpointError"),
                       ("dsrdmpd.imageio", "ImageReadError"), ("dsrdmpd.data.pairing", "PairingError"),
                       ("dsrdmpd.data.dataset", "DataError"), ("dsrdmpd.runfolder", "RunFolderError"))
# the run stopped itself: its reason, exit code 1 (or the exception's ``exit_code``: 130 / 143 for a
# training run that saved its state on SIGINT / SIGTERM)
RUN_ENDED = (("dsrdmpd.evaluation", "RunStopped"), ("dsrdmpd.training.stopping", "TrainingStopped"))


def loaded_classes(names: Tuple[Tuple[str, str], ...]) -> Tuple[Type[BaseException], ...]:
    """The classes ``(module, name)`` of the modules imported so far."""
    return tuple(getattr(sys.modules[m], c) for m, c in names if m in sys.modules)


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the commands print it: ``warning: <message>`` on one line (Python's own
    form adds the file, line number and a line of package source)."""
    text = one_line(message) if isinstance(message, BaseException) else " ".join(str(message).split())
    return f"warning: {text}\n"


def run_command(fn: Callable[[Optional[List[str]]], object], argv: Optional[List[str]] = None) -> int:
    """Run ``fn(argv)`` and turn what it raises into a one-line message and an exit code;
    warnings it gives are printed as one line each (without ``--debug``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    formatwarning = warnings.formatwarning
    if not debug:
        warnings.formatwarning = one_line_warning
    try:
        fn([a for a in args if a != "--debug"])
        return EXIT_OK
    except SystemExit as exc:           # argparse: --help (0) or a usage error (2, already printed)
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        if isinstance(exc, (ItemsFailed, *loaded_classes(RUN_ENDED))):      # the run ended; its reason
            print(f"error: {one_line(exc)}", file=sys.stderr)
            code = getattr(exc, "exit_code", EXIT_FAILED)
            return code if isinstance(code, int) else EXIT_FAILED
        if isinstance(exc, (*USER_ERRORS, *loaded_classes(PACKAGE_USER_ERRORS))):
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
        print(f"error: {type(exc).__name__}: {one_line(exc)} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILED                                                      # a failure while running
    finally:
        warnings.formatwarning = formatwarning
