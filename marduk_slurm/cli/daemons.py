"""Commands that run a daemon in the foreground (`controller`) or inspect settings."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from marduk_slurm import settings as settings_mod
from marduk_slurm.cli import arguments, render

DAEMONS = {"controller", "agent", "lighthouse-proxy"}


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def controller_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "controller.state_dir": args.state_dir,
        "nats.url": args.nats_url,
        "controller.log_level": args.log_level,
        "slurm.backend": args.slurm_backend,
        "controller.http_listen": args.listen,
        "controller.standby": True if args.standby else None,
        "controller.id": args.id,
    }


FAULT_PATH_SWITCH_INTERVAL_S = 0.0005


def cmd_controller(args: argparse.Namespace) -> int:
    from marduk_slurm.controller.daemon import Controller

    flags = controller_flags(args)
    s = settings_mod.from_environment(args.config, flags)
    setup_logging(s.controller.log_level)
    controller = Controller(s, reload=lambda: settings_mod.from_environment(args.config, flags))
    # The controller's threads (database lanes, risk scoring) hold the GIL in slices of the
    # switch interval; each time the event loop comes back from a wait it may queue behind
    # one. 0.5 ms instead of 5 ms keeps a fault's many small steps from paying that each time.
    sys.setswitchinterval(FAULT_PATH_SWITCH_INTERVAL_S)
    return asyncio.run(controller.run())


def cmd_agent(args: argparse.Namespace) -> int:
    from marduk_slurm.agent import daemon
    from marduk_slurm.cli.client import resolve_nats_url

    flags = {
        "agent.node": args.node,
        "agent.socket": args.socket,
        "agent.simulate_gpus": args.simulate_gpus,
        "agent.state_dir": getattr(args, "state_dir", None),
        "agent.log_level": args.log_level,
        "agent.allow_inject": args.allow_inject,
        "nats.url": getattr(args, "nats_url", None),
        "controller.state_dir": args.controller_state_dir,
    }
    s = settings_mod.from_environment(getattr(args, "config", None), flags)
    daemon.check_settings(s)
    setup_logging(s.agent.log_level)
    # nats.url, else the URL file of a controller's embedded server (a laptop demo).
    url = resolve_nats_url(s, None)
    return asyncio.run(daemon.run(
        s, url, reload=lambda: settings_mod.from_environment(getattr(args, "config", None),
                                                             flags)))


def cmd_settings_check(args: argparse.Namespace) -> int:
    path = args.file or args.config or str(settings_mod.DEFAULT_PATH)
    if not Path(path).exists():
        raise settings_mod.SettingsError(f"{path}: no such file")
    settings_mod.load(Path(path), env={})
    print(f"{path}: ok")
    return 0


def cmd_settings_show(args: argparse.Namespace) -> int:
    flags = {"controller.state_dir": args.state_dir, "nats.url": args.nats_url}
    s = settings_mod.from_environment(args.config, flags)
    data = s.effective()
    if args.json:
        render.as_json(data)
        return 0
    render.table(["SETTING", "VALUE", "SOURCE"],
                 [[k, v["value"], v["source"]] for k, v in data.items()])
    return 0


def add_parsers(sub: Any, add: Any) -> None:
    p = add(sub, "controller", "run the controller daemon in the foreground; it reads and "
            "drains nodes through Slurm (slurmctld must answer) unless --slurm-backend none",
            "marduk controller --state-dir ./state --slurm-backend none   # a laptop: "
            "embedded NATS, no Slurm\n  marduk controller --config /etc/marduk/marduk.toml"
            "           # a cluster\n  marduk controller --standby --id ctl-b --config "
            "/etc/marduk/marduk.toml   # a standby on a second host", cmd_controller,
            json_flag=False)
    p.add_argument("--standby", action="store_true",
                   help="start as a standby: ingest the events into this host's own database "
                        "and take over when the leader's lease lapses (needs nats.url)")
    p.add_argument("--id", metavar="NAME",
                   help="this controller's name among leader and standbys (default "
                        "controller.id, else the host name)")
    p.add_argument("--log-level", choices=settings_mod.LOG_LEVELS)
    p.add_argument("--slurm-backend", choices=settings_mod.SLURM_BACKENDS,
                   help="how to reach Slurm (default slurm.backend, auto: pyslurm when "
                        "importable, else the scontrol/sinfo commands); with anything but "
                        "none, Slurm must be reachable, or `marduk status` reports it "
                        "unreachable and drains wait in the outbox")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help='dashboard and /metrics address (default 127.0.0.1:9108; "" turns '
                        "them off)")
    # Built without the shared options: their --state-dir names the controller's directory,
    # while the agent's --state-dir is its own (the step journal).
    help_ = "run the node agent (GPU health, SPANK step relay) in the foreground"
    example = ("marduk agent --node n1 --simulate-gpus 2 --socket ./agent.sock "
               "--state-dir ./agent-state --controller-state-dir ./state")
    p = sub.add_parser("agent", help=help_, description=f"{help_}\n\nexample:\n  {example}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=cmd_agent)
    hide = argparse.SUPPRESS  # leaves the values of `marduk --config ... agent` alone
    p.add_argument("--config", default=hide, help="settings file (default /etc/marduk/marduk.toml)")
    p.add_argument("--nats-url", default=hide,
                   help="NATS URL (default: nats.url, else the URL file of the controller's "
                        "embedded server in --controller-state-dir)")
    p.add_argument("--state-dir", default=hide,
                   help="the agent's state directory (default /var/lib/marduk-agent)")
    p.add_argument("--controller-state-dir",
                   help="a local controller's state directory, to find its embedded NATS")
    p.add_argument("--node", help="this node's Slurm name (default: the short host name)")
    p.add_argument("--socket", help="the SPANK step socket (default /run/marduk/agent.sock)")
    p.add_argument("--simulate-gpus", type=arguments.int_in("--simulate-gpus", 0, 64), metavar="N",
                   help="present N simulated GPUs instead of NVML (demos, tests)")
    p.add_argument("--log-level", choices=settings_mod.LOG_LEVELS)
    p.add_argument("--allow-inject", action="store_true", default=None,
                   help="let `marduk inject` feed synthetic XIDs on real NVML GPUs")
    p = add(sub, "settings", "validate or show the daemon settings",
            "marduk settings check /etc/marduk/marduk.toml", None, json_flag=False)
    ssub = p.add_subparsers(dest="settings_command", metavar="{check,show}", required=True)
    c = add(ssub, "check", "validate a settings file (unknown keys are errors)",
            "marduk settings check /etc/marduk/marduk.toml", cmd_settings_check,
            json_flag=False)
    c.add_argument("file", nargs="?", help="the file (default: --config or the default path)")
    add(ssub, "show", "every effective setting and where it came from",
        "marduk settings show --json", cmd_settings_show)
