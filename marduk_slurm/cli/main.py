"""`marduk` entry point: the argument parser and dispatch. Returns an exit status:
0 success; 1 the controller or Slurm refused, a replica failed to apply a change or did not
confirm it in time, or (`status`) the controller cannot reach Slurm; 2 bad usage or settings;
3 controller unreachable; 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from marduk_slurm import __version__
from marduk_slurm.cli import (
    arguments,
    auth_cmd,
    commands,
    daemons,
    lighthouse_cmd,
    observe,
    render,
    sbatch_cmd,
)
from marduk_slurm.cli import jobs as job_commands
from marduk_slurm.cli.client import RequestFailed
from marduk_slurm.errors import BusError, BusTimeout, MardukError, NotFound, SettingsError

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _common_options(parser: argparse.ArgumentParser, default: object) -> None:
    """Options every command takes, before or after the command's name."""
    parser.add_argument("--config", default=default,
                        help="settings file (default /etc/marduk/marduk.toml)")
    parser.add_argument("--nats-url", default=default,
                        help="NATS URL of the controller (default: settings, or the embedded "
                             "server's URL file in the state directory)")
    parser.add_argument("--state-dir", default=default, help="the controller's state directory")
    parser.add_argument("--timeout", type=arguments.timeout_s, default=default,
                        help="request timeout, seconds (default: nats.request_timeout_s)")


_COMMON = argparse.ArgumentParser(add_help=False)
_common_options(_COMMON, argparse.SUPPRESS)


def _add(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_: str,
         example: str, func: object, *, json_flag: bool = True) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=f"{help_}\n\nexample:\n  {example}",
                       formatter_class=_Formatter, parents=[_COMMON])
    if json_flag:
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="marduk", formatter_class=_Formatter,
        description="Runtime monitoring and control of TorchFT training on Slurm.\n\n"
                    "examples:\n  marduk status\n  marduk drain n3 reason=\"swap GPU\"\n"
                    "  marduk resume n3",
    )
    parser.add_argument("--version", action="version", version=f"marduk {__version__}")
    _common_options(parser, None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    daemons.add_parsers(sub, _add)
    commands.add_parsers(sub, _add)
    sbatch_cmd.add_parsers(sub, _add)
    job_commands.add_parsers(sub, _add)
    auth_cmd.add_parsers(sub, _add)
    observe.add_parsers(sub, _add)
    lighthouse_cmd.add_parsers(sub, _add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    if args.command not in daemons.DAEMONS:
        logging.basicConfig(level=os.environ.get("MARDUK_CLI_LOG", "WARNING").upper())
    try:
        return int(args.func(args) or 0)
    except (SettingsError, ValueError) as exc:
        render.error(exc)
        return EXIT_USAGE
    except (NotFound, RequestFailed) as exc:
        render.error(exc)
        return EXIT_REFUSED
    except (BusError, BusTimeout) as exc:
        render.error(f"cannot reach the controller: {exc}")
        return EXIT_UNREACHABLE
    except MardukError as exc:
        render.error(exc)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `marduk history | head`
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
