"""`marduk auth`: NATS users for the controller, operators, node agents and training jobs.

The roster lives in `<state_dir>/auth/`; every change rewrites the nats-server config there and
asks a running embedded nats-server to reload it (SIGHUP). Run it as the controller's user on
the controller's host. See docs/security.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from marduk_slurm.cli import arguments, render

if TYPE_CHECKING:  # imported by the commands themselves: `marduk --help` stays fast
    from marduk_slurm.adapters import nats_auth


def _state_dir(args: argparse.Namespace) -> Path:
    from marduk_slurm import settings as settings_mod

    flags = {"controller.state_dir": args.state_dir} if args.state_dir else {}
    return Path(settings_mod.from_environment(args.config, flags).controller.state_dir)


def _auth_dir(args: argparse.Namespace) -> nats_auth.AuthDir:
    from marduk_slurm.adapters import nats_auth

    return nats_auth.AuthDir(_state_dir(args) / "auth")


def _reload(args: argparse.Namespace) -> None:
    from marduk_slurm.adapters.nats_server import reload_running

    if reload_running(_state_dir(args) / "nats"):
        print("embedded nats-server reloaded", file=sys.stderr)
    else:
        print("no embedded nats-server running here: the change takes effect when it starts "
              "(a site NATS server: reload it after including nats-auth.conf)", file=sys.stderr)


def _hand_out(args: argparse.Namespace, creds: nats_auth.Credentials) -> int:
    from marduk_slurm.adapters import nats_auth

    if args.output:
        nats_auth.write_private(Path(args.output), creds.to_json(),
                                uid=-1 if args.owner is None else args.owner)
        print(f"{creds.user}: credentials written to {args.output} (mode 0600)")
    else:
        sys.stdout.write(creds.to_json())
    _reload(args)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from marduk_slurm.adapters import nats_auth

    auth = _auth_dir(args)
    created = auth.ensure_initialised()
    verb = "created" if created else "already there"
    print(f"controller and operator users {verb}: {auth.path}/{nats_auth.CONTROLLER_CREDS}, "
          f"{auth.path}/{nats_auth.OPERATOR_CREDS}; server config {auth.server_config}")
    _reload(args)
    return 0


def cmd_add_node(args: argparse.Namespace) -> int:
    return _hand_out(args, _auth_dir(args).issue("agent", args.node))


def cmd_add_job(args: argparse.Namespace) -> int:
    return _hand_out(args, _auth_dir(args).issue("job", str(args.job)))


def cmd_add_operator(args: argparse.Namespace) -> int:
    return _hand_out(args, _auth_dir(args).issue("operator", args.name))


def cmd_remove(args: argparse.Namespace) -> int:
    from marduk_slurm.adapters import nats_auth

    if not _auth_dir(args).remove(args.user):
        raise nats_auth.AuthError(f"no user {args.user!r}")
    print(f"{args.user} removed")
    _reload(args)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    users = _auth_dir(args).users()
    rows = [{"user": u.name, "role": u.role, "scope": u.scope} for u in users]
    if args.json:
        render.as_json(rows)
    else:
        render.table(["USER", "ROLE", "SCOPE"], [[r["user"], r["role"], r["scope"]]
                                                 for r in rows])
    return 0


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", help="write the credential file here (mode 0600) "
                                          "instead of printing it")
    p.add_argument("--owner", type=arguments.int_in("--owner", 0, 2**32 - 2), metavar="UID",
                   help="chown the --output file to UID")


def add_parsers(sub: Any, add: Any) -> None:
    p = add(sub, "auth", "NATS users and permissions (nats.auth)",
            "marduk auth add-job 4242 -o /run/marduk/jobs/4242.json --owner 1000",
            None, json_flag=False)
    asub = p.add_subparsers(dest="auth_command", metavar="COMMAND", required=True)
    add(asub, "init", "create the controller and operator users",
        "marduk auth init --state-dir /var/lib/marduk", cmd_init, json_flag=False)
    c = add(asub, "add-node", "issue the credential of one node's agent",
            "marduk auth add-node n17 -o /etc/marduk/n17.json", cmd_add_node, json_flag=False)
    c.add_argument("node", type=arguments.node_name)
    _output_options(c)
    c = add(asub, "add-job", "issue the credential of one training job",
            "marduk auth add-job 4242 -o /run/marduk/jobs/4242.json --owner 1000",
            cmd_add_job, json_flag=False)
    c.add_argument("job", type=arguments.job_id)
    _output_options(c)
    c = add(asub, "add-operator", "issue a named operator credential",
            "marduk auth add-operator alice -o ~alice/.config/marduk/nats.json --owner 1001",
            cmd_add_operator, json_flag=False)
    c.add_argument("name", type=arguments.user_name)
    _output_options(c)
    c = add(asub, "remove", "remove a user (a job that ended, a retired node)",
            "marduk auth remove job-4242", cmd_remove, json_flag=False)
    c.add_argument("user", type=arguments.user_name)
    add(asub, "list", "the users and their roles (never their passwords)",
        "marduk auth list --json", cmd_list)
