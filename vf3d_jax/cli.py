"""How every ``python -m vf3d_jax.<job>`` and ``python -m tools.<tool>`` starts and fails.

``cli.run(main)`` replaces ``absl.app.run(main)``. A user's mistake ends the
process with exactly one line on stderr, ``error: <what is wrong>``, and a
non-zero exit code, before any logging:

* flag and config errors while parsing the command line (a misspelt
  ``--config.x`` override, a config file that does not exist, a bad value,
  a missing required flag): exit code 2;
* the errors ``main`` raises that name a user's mistake (:data:`USER_ERRORS`,
  plus any the job adds): exit code 1, unless the exception sets its own
  ``exit_code``.

Anything else is a bug and keeps its traceback.

Every job also takes ``--distributed``: it starts JAX's distributed runtime
before ``main`` (``jax.distributed.initialize``) for a run over several
processes or hosts, from ``--coordinator_address``, ``--num_processes`` and
``--process_id``, or, without them, from a cluster environment JAX detects
(Slurm, Open MPI, Cloud TPU, Kubernetes). Jobs started with
``run(main, multiprocess=True)`` (the trainers) run ``main`` on every process;
only process 0 logs below warnings. Any other job runs on process 0 alone,
which writes its outputs once; the others wait for it and exit with its code.
"""

from __future__ import annotations

import logging as pylogging
import os
import re
import sys
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Start JAX's distributed runtime first (a run over several processes or hosts): from "
    "--coordinator_address, --num_processes and --process_id, or without them from the "
    "cluster environment JAX detects (Slurm, Open MPI, Cloud TPU, Kubernetes).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "With --distributed: host:port of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "With --distributed: the number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "With --distributed: this process' index, 0 to N - 1.")
# Process 0 of a job it runs alone publishes its exit code here for the others.
_EXIT_KEY = "vf3d_jax/exit_code"
_WAIT_MS = 7 * 24 * 3600 * 1000


class UserError(Exception):
  """A mistake in what the user asked for; printed as one line."""

  exit_code = 1


# Raised by the library for bad input (files, values, shapes) with a message that names it.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, FileNotFoundError,
                                                NotADirectoryError, IsADirectoryError,
                                                FileExistsError, PermissionError)


def one_line(error: BaseException) -> str:
  """The exception's message on one line (KeyError's quotes and newlines removed)."""
  message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  message = " ".join(str(message).split())
  return message or type(error).__name__


def fail(message: str, exit_code: int = 1):
  """Prints ``error: <message>`` on stderr and exits."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(exit_code)


def _config_error(error: BaseException, argv: Sequence[str]) -> str:
  """One line for an ml_collections error: the flag, then the cause without a traceback."""
  message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
  if "Traceback (most recent call last)" in message:
    # "flag --config=x.py:v: Error whilst parsing config file: Traceback ... ValueError: cause"
    prefix = message.split(": Error whilst parsing", 1)[0]
    cause = re.sub(r"^[A-Za-z_.]*(Error|Exception): ", "", lines[-1])
    return f"{prefix}: {cause}"
  # KeyError's text may arrive repr-quoted inside another message: unquote it.
  plain = message.strip().strip("\"").replace("\\'", "'").replace("\\n", "\n").strip("'")
  unknown = re.fullmatch(r"'?(\w+)'?\s*(.*?)", plain, re.S)
  if isinstance(error, (KeyError, AttributeError, flags.Error)) and unknown and (
      isinstance(error, (KeyError, AttributeError)) or "Did you mean" in message):
    # A misspelt override (possibly quoted into another message): name the argument.
    field, hint = unknown.group(1), " ".join(unknown.group(2).split())
    culprits = [a.split("=", 1)[0] for a in argv[1:]
                if a.startswith("--") and f".{field}" in a.split("=", 1)[0]]
    where = culprits[0] if culprits else "config override"
    return f"{where}: no config field {field!r}" + (f" ({hint})" if hint else "")
  missing = re.search(r"Attempted \[[^]]*\]:\s*(\S+)\s+(.*?)$", message, re.S)
  if missing:  # a config file that cannot be found or loaded
    return f"config file {missing.group(1)}: {' '.join(missing.group(2).split())}"
  return " ".join(lines) or type(error).__name__


def define_config(name: str, default: str, help_string: str):
  """``config_flags.DEFINE_config_file(..., lock_config=True)`` with one-line errors.

  When the command line gives no ``--<name>``, ml_collections loads the
  default file and applies the ``--<name>.<field>`` overrides right here, at
  import time, so their errors are caught here too.
  """
  try:
    return config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)
  except (KeyError, AttributeError, TypeError, ValueError, OSError) as e:
    fail(_config_error(e, sys.argv), 2)


def _parse_flags(argv: Sequence[str]) -> list[str]:
  try:
    remaining = flags.FLAGS(argv)
    # ml_collections defers a config file's load error to the first use of the config.
    for name in list(flags.FLAGS):
      value = flags.FLAGS[name].value
      if type(value).__module__.startswith("ml_collections"):
        getattr(value, "keys", None)
    return remaining
  except flags.Error as e:
    fail(_config_error(e, argv), 2)
  except (KeyError, AttributeError, TypeError, ValueError, OSError, SyntaxError) as e:
    # ml_collections raises these for bad --config files and overrides.
    fail(_config_error(e, argv), 2)
  except ImportError as e:  # a config file that imports something missing
    fail(f"cannot load the config: {one_line(e)}", 2)


def start_distributed() -> bool:
  """Starts JAX's distributed runtime when ``--distributed`` asks; returns whether it did."""
  given = [f"--{flag.name}" for flag in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)
           if flag.value is not None]
  if not _DISTRIBUTED.value:
    if given:
      fail(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --distributed", 2)
    return False
  import jax  # pylint: disable=g-import-not-at-top
  try:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  except (RuntimeError, ValueError) as e:
    fail(f"--distributed: {one_line(e)}", 1)
  if jax.process_index() > 0:  # only process 0 logs below warnings
    logging.get_absl_handler().addFilter(WarningsOnly())
  return True


def _client():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client


def run(main: Callable[[list[str]], None],
        errors: tuple[type[BaseException], ...] = (), multiprocess: bool = False) -> None:
  """``absl.app.run(main)`` with one-line user errors (see the module docstring).

  Args:
    main: the job.
    errors: exception types that name a user's mistake, besides USER_ERRORS.
    multiprocess: with ``--distributed``, run ``main`` on every process (a
      job whose computations span all processes' devices); otherwise process
      0 runs it alone and the others wait for its exit code.
  """
  user_errors = USER_ERRORS + tuple(errors)

  def guarded(argv):
    if len(argv) > 1:
      fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
    logging.get_absl_handler().addFilter(QuietLibraries())
    alone = start_distributed() and not multiprocess
    if alone:
      import jax  # pylint: disable=g-import-not-at-top
      if jax.process_index() > 0:
        sys.exit(int(_client().blocking_key_value_get(_EXIT_KEY, _WAIT_MS)))
    code = 1
    try:
      result = main(argv)
      code = 0
      return result
    except app.UsageError as e:
      code = 2
      fail(one_line(e), 2)
    except user_errors as e:
      code = getattr(e, "exit_code", 1)
      fail(one_line(e), code)
    except SystemExit as e:  # the job's own exit code
      code = e.code if isinstance(e.code, int) else int(e.code is not None)
      raise
    finally:
      if alone:
        _client().key_value_set(_EXIT_KEY, str(code))

  app.run(guarded, flags_parser=_parse_flags)


class WarningsOnly(pylogging.Filter):
  """Drops log records below warnings (the processes other than 0)."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING


class QuietLibraries(pylogging.Filter):
  """Drops the INFO chatter of Orbax, Grain, JAX's backend probing and distributed start-up;
  warnings and errors stay."""

  def filter(self, record):
    noisy = any(f"{os.sep}{lib}{os.sep}" in record.pathname for lib in ("orbax", "grain"))
    noisy = noisy or record.pathname.endswith(("xla_bridge.py", f"{os.sep}distributed.py"))
    return record.levelno >= pylogging.WARNING or not noisy
