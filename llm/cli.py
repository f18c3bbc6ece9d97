"""Command-line plumbing shared by every entry point: flag errors as one line and exit status 2.

absl would print a traceback for a misspelt `--config.train.stpes=8` (ml_collections raises a
KeyError/AttributeError while applying the override) and exit 1 for a bad value. Users should see
one line naming the flag and the fix, and scripts should see status 2 ("bad input, nothing
written"), the same status a ConfigError raised later (invalid combination) gives.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Callable

from llm.registry import ConfigError

EXIT_BAD_INPUT = 2


def fail(message: str, code: int = EXIT_BAD_INPUT):
    """Print `error: <message>` (first line only: no traceback) on stderr and exit."""
    first = " ".join(str(message).strip().split("\n")) or "invalid input"
    print(f"error: {first}", file=sys.stderr, flush=True)
    sys.exit(code)


def explain_flag_error(exc: BaseException, argv: list[str]) -> str:
    """One readable line for an exception raised while parsing flags."""
    text = str(exc.args[0]) if exc.args else str(exc)
    # AttributeError(KeyError(msg)) carries msg as a repr, possibly twice: unquote it.
    while len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        try:
            text = str(ast.literal_eval(text))
        except (ValueError, SyntaxError):
            break
    if isinstance(exc, KeyError | AttributeError):
        # ml_collections: "'stpes'\nDid you mean \"steps\" instead of \"stpes\"?" (or no suggestion)
        m = re.match(r"""[ \t]*['"]?([^'"\n]+)['"]?[ \t]*(?:\n(.*))?""", text, re.S)
        key = m.group(1) if m else text
        s = re.search(r'Did you mean "([^"]+)"', (m and m.group(2)) or "")
        hint = f" Did you mean {s.group(1)!r}?" if s else ""
        flag = next(
            (a.split("=", 1)[0] for a in argv if re.search(rf"[.]{re.escape(key)}(=|$|[.])", a)), None
        )
        if flag is None:
            return f"unknown config field {key!r}.{hint}"
        parts = flag.lstrip("-").split(".")
        parent = ".".join(parts[1 : parts.index(key)]) or "the config"
        return f"unknown config flag {flag}: {parent} has no field {key!r}.{hint}"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if isinstance(exc, OSError | ImportError | SyntaxError) and "config" in text:
        # "Failed loading config file ... Attempted [Relative path]: <path> [Errno 2] No such file"
        detail = next(
            (ln.strip() for ln in reversed(lines) if ln.strip().startswith("[Errno")), lines[-1].strip()
        )
        own = next((ln.strip() for ln in lines if "Error:" in ln), None)
        return f"cannot load the config file: {own.split('Error:', 1)[1].strip() if own else detail}"
    # A ConfigError raised inside a config file's get_config() (e.g. an unknown preset) comes
    # wrapped by ml_collections; its own message is the line that names the problem.
    own = next((ln.strip() for ln in lines if "ConfigError:" in ln), None)
    if own:
        return own.split("ConfigError:", 1)[1].strip()
    return lines[0] if lines else repr(exc)


def define_config(name: str = "config", default: str | None = None, help_text: str = "Config file."):
    """`config_flags.DEFINE_config_file` (locked: unknown keys fail). ml_collections applies the
    `--config.a.b=v` overrides of sys.argv right here, at definition, so a misspelt key fails
    here: as one line and exit 2."""
    from ml_collections import config_flags  # noqa: PLC0415

    try:
        return config_flags.DEFINE_config_file(name, default, help_text, lock_config=True)
    except Exception as e:  # noqa: BLE001 (KeyError/AttributeError from ml_collections)
        fail(explain_flag_error(e, sys.argv))


def config_value(holder):
    """The parsed ConfigDict of a `define_config` flag; a config file that fails to load
    (missing, syntax error, error in get_config) is one line and exit 2."""
    try:
        value = holder.value
        value.to_dict()  # a config that failed to load raises only when it is first read
        return value
    except Exception as e:  # noqa: BLE001
        fail(explain_flag_error(e, sys.argv))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every failure turned into one line on stderr and exit 2."""
    from absl import flags  # noqa: PLC0415

    if any(a in ("--help", "-h", "--helpshort", "--helpfull", "-?") for a in argv[1:]):
        # absl's app.run handles these; entry points that parse flags themselves must too.
        doc = (sys.modules["__main__"].__doc__ or "").strip()
        print((doc + "\n\n" if doc else "") + flags.FLAGS.main_module_help())
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 (absl, ml_collections and config files raise many types)
        fail(explain_flag_error(e, argv))


def run(main: Callable[[list[str]], object]) -> None:
    """`absl.app.run(main)` for our CLIs: flag errors and bad input (ConfigError,
    FileNotFoundError) raised by `main` become one line on stderr and exit status 2."""
    from absl import app  # noqa: PLC0415

    def guarded(argv):
        try:
            return main(argv)
        except (ConfigError, FileNotFoundError) as e:
            fail(str(e))

    app.run(guarded, flags_parser=parse_flags)


def build_config(config: str, overrides: dict[str, str]):
    """The RunConfig `llm.train --config=<config> --config.<k>=<v> ...` would build, in this
    process (ml_collections reads the override flags from sys.argv when the flag is defined, so
    argv is set for the moment). Raises what llm.train would report (explain_flag_error words it)."""
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    from llm.config import from_config_dict  # noqa: PLC0415

    argv = ["llm.train", f"--config={config}", *(f"--config.{k}={v}" for k, v in overrides.items())]
    fv = flags.FlagValues()
    saved, sys.argv = sys.argv, argv
    try:
        config_flags.DEFINE_config_file("config", None, "config file", lock_config=True, flag_values=fv)
        fv(argv)
        return from_config_dict(fv.config)
    finally:
        sys.argv = saved
