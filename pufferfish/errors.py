"""Errors meant for people: each says what was wrong, with the value, and what is allowed."""

from __future__ import annotations

import argparse
import functools
import sys
import warnings


class PufferfishError(Exception):
    """A problem the user can fix; printed as one message, without a traceback."""


class ConfigError(PufferfishError):
    pass


class DataError(PufferfishError):
    pass


class CheckpointError(PufferfishError):
    pass


class OutOfMemoryError(PufferfishError):
    """Out of memory even at a micro-batch of one: the model does not fit the device."""


class PufferfishWarning(UserWarning):
    """Something the user should know that does not stop the run; printed by the entry points as one line."""


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    if issubclass(category, PufferfishWarning):  # not Python's two lines of file, line number and source
        return f"pufferfish: warning: {message}\n"
    return _python_format(message, category, filename, lineno, line)


_python_format = warnings.formatwarning


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse for the entry points: a bad option is a ConfigError (one line, exit 2), not usage and error."""

    def error(self, message: str):
        raise ConfigError(f"{message}; `{self.prog} --help` lists the options")


def one_of(what: str, value, allowed) -> ConfigError:
    return ConfigError(f"{what}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # no Hydra, or not under @hydra.main
        return False


def exit_on_user_error(fn):
    """Wrap an entry point: a PufferfishError becomes one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        warnings.formatwarning = _one_line_warning
        try:
            return fn(*args, **kwargs)
        except PufferfishError as e:
            print(f"pufferfish: error: {e}", file=sys.stderr)
            if _in_multirun():  # one bad job of a sweep must not stop the others
                return None
            sys.exit(2)
        except KeyboardInterrupt:
            print("pufferfish: interrupted; run the same command again to resume", file=sys.stderr)
            sys.exit(130)

    return wrapper
