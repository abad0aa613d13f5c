"""The controller's trust boundary, fuzzed black-box: valid messages of every kind that
docs/protocol.md documents, mutated to the values that break decoders and databases, sent on
every subject the controller listens on with the job, agent and operator credentials the NATS
server permits there, plus a few with the wrong credential to see the server refuse them.

The oracle never uses the project's decoders. After the storm: the controller is alive, no
supervised task crashed, `marduk status` answers, fresh valid messages are applied, every row
of the database is inside the bounds the doc gives its field, a job and a node that sent
nothing were not touched through their ids, and after a restart on the same state the
controller stays up for 30 s (a poison row or a durable message never acknowledged would
crash-loop it). Figures go to stdout and $MARDUK_TEST_ARTIFACTS/trust-fuzz.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import nats.errors
import protocol_schema as schema
import pytest
import trust_fuzz_cases as fuzz
from trust_checks import (
    database_violations,
    log_findings,
    query,
    refused_traces,
    roster_violations,
    victim_violations,
)

from marduk_slurm.adapters import nats_auth
from marduk_slurm.adapters.nats_server import reload_running
from marduk_slurm.cli.client import call

from harness import ControllerProcess, run_cli

pytest.importorskip("bcrypt")

ARTIFACTS = Path(os.environ.get("MARDUK_TEST_ARTIFACTS", "/tmp/marduk-test-artifacts"))
P = schema.PREFIX
DRAWN_CASES = 300  # compound mutations drawn by hypothesis, on top of the systematic ones
RESTART_WATCH_S = 30.0
REQUEST_TIMEOUT_S = 5.0
# A drain or resume may wait `wait_s` for Slurm (none here): no reply within the timeout is
# what an operator asked for then, not a fault (see asks_to_wait).


def asks_to_wait(data: bytes) -> bool:
    """Whether a drain or resume request asked to wait for Slurm longer than the fuzz waits
    for its answer (a number up to the documented 60 s: more is refused at once; none given
    or null means the default, 5 s)."""
    try:
        wait_s = json.loads(data)["args"].get("wait_s")
    except (ValueError, KeyError, TypeError, AttributeError):
        return False
    wait_s = 5.0 if wait_s is None else wait_s
    return (isinstance(wait_s, int | float) and not isinstance(wait_s, bool)
            and REQUEST_TIMEOUT_S <= wait_s <= 60)


AGENTS = ["n1", fuzz.OTHER_NODE, fuzz.DASH_NODE, fuzz.VICTIM_NODE]
JOBS = [7, fuzz.OTHER_JOB, fuzz.VICTIM_JOB]

# Every subject of docs/protocol.md: how the fuzz sends on it, or why it does not.
ROUTES = {
    f"{P}.evt.node.<node>.step_start": "jetstream, agent",
    f"{P}.evt.node.<node>.step_end": "jetstream, agent",
    f"{P}.evt.node.<node>.verdict": "jetstream, agent",
    f"{P}.evt.node.<node>.gpu_inventory": "jetstream, agent",
    f"{P}.evt.node.<node>.node_verdict": "jetstream, agent",
    f"{P}.evt.job.<job>.replica_register": "jetstream, job",
    f"{P}.evt.job.<job>.replica_leave": "jetstream, job",
    f"{P}.evt.job.<job>.config_ack": "jetstream, job",
    f"{P}.evt.job.<job>.assume_ack": "jetstream, job",
    f"{P}.hb.<job>": "core, job",
    f"{P}.health.<node>": "core, agent",
    f"{P}.rpc.<verb>": "request, operator",
    f"{P}.jobrpc.<job>.<verb>": "request, job",
    f"{P}.credrpc.<node>": "request, agent",
    f"{P}.feed.event": "only the controller may publish: refusal checked",
    f"{P}.evt.ctl.<controller>.action_applied": "only the controller may publish: refusal "
                                                "checked",
    f"{P}.evt.ctl.<controller>.config_revised": "only the controller may publish: refusal "
                                                "checked",
    f"{P}.cmd.job.<job>": "controller to jobs: not heard by the controller",
    f"{P}.cmd.replica.<job>.<group>": "controller to replicas: not heard by the controller",
    f"{P}.cmd.replica.<job>.standby": "controller to standbys: not heard by the controller",
    f"{P}.agent.<node>.<verb>": "controller to agents: not heard by the controller",
}


# -- the schema against the doc -------------------------------------------------------------


def test_schema_covers_every_message_kind_field_subject_and_verb_of_the_doc() -> None:
    doc = schema.doc_messages()
    assert set(doc) == {k for k in schema.KINDS if k != "health"}, "kinds drifted from the doc"
    for kind, fields in doc.items():
        assert schema.KINDS[kind].fields == fields, f"{kind}: fields drifted from the doc"
    assert schema.doc_envelope() == set(schema.ENVELOPE)
    subjects = schema.doc_subjects()
    assert set(subjects) == set(ROUTES), "subjects drifted from the doc"
    named = {k for cell in subjects.values() for k in re.findall(r"`(\w+)`", cell)}
    assert named - {"Request", "Reply"} <= set(schema.KINDS)
    verbs = schema.doc_verbs()
    assert {v: set(a) for v, a in schema.OPERATOR_ARGS.items()} == verbs["operator"]
    assert {v: set(a) for v, a in schema.JOB_ARGS.items()} == verbs["job"]
    assert {v: set(a) for v, a in schema.AGENT_ARGS.items()} == verbs["agent"]


# -- processes and credentials ----------------------------------------------------------------


class AuthController(ControllerProcess):
    """The controller with nats.auth on its embedded server; test requests as the operator."""

    @property
    def operator_creds(self) -> str:
        return str(self.state_dir / "auth" / nats_auth.OPERATOR_CREDS)

    def request(self, verb: str, args: dict[str, Any] | None = None, timeout_s: float = 10.0
                ) -> Any:
        return asyncio.run(call(self.url, verb, args or {}, timeout_s=timeout_s,
                                creds=self.operator_creds))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def fate(self) -> str:
        if self.alive():
            return "stopped answering `status`"
        return f"exited {self.proc.returncode if self.proc else None}"

    def restart(self) -> None:
        if self.alive():
            with contextlib.suppress(RuntimeError):  # ignored SIGTERM: killed, and logged
                self.stop(timeout_s=10)
        self.start()


def answering(ctl: AuthController) -> bool:
    if not ctl.alive():
        return False
    try:
        ctl.request("status", timeout_s=5)
    except Exception:
        return False
    return True


def issue_credentials(state: Path, out: Path) -> dict[str, Path]:
    """Agents and jobs of the fuzz (cheap bcrypt: the server checks it at every connect)."""
    auth = nats_auth.AuthDir(state / "auth", rounds=4)
    paths = {"operator": state / "auth" / nats_auth.OPERATOR_CREDS}
    for node in AGENTS:
        path = out / f"agent-{node}.json"
        nats_auth.write_private(path, auth.issue("agent", node).to_json())
        paths[f"agent-{node}"] = path
    for job in JOBS:  # kept where the controller's credrpc finds them, as in production
        auth.job_credential(str(job))
        paths[f"job-{job}"] = auth.job_credential_path(str(job))
    assert reload_running(state / "nats"), "the embedded nats-server is not running"
    return paths


class Conns:
    """One NATS connection per credential, each collecting the server's -ERR lines."""

    def __init__(self, url: str, creds: dict[str, Path]) -> None:
        self.url, self.creds = url, creds
        self.nc: dict[str, Any] = {}
        self.errors: dict[str, list[str]] = {}

    async def open(self) -> Conns:
        for name, path in self.creds.items():
            errors: list[str] = []
            self.errors[name] = errors

            async def on_error(exc: Exception, errors: list[str] = errors) -> None:
                errors.append(str(exc))

            deadline = time.monotonic() + 10
            while True:  # the reload that added the user is asynchronous
                try:
                    self.nc[name] = await nats.connect(
                        self.url, error_cb=on_error, max_reconnect_attempts=3,
                        **nats_auth.connect_options(str(path)))
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
        return self

    async def close(self) -> None:
        for nc in self.nc.values():
            await nc.close()

    async def reopen(self, url: str) -> None:
        """Connect again, to the embedded server a restarted controller started."""
        await self.close()
        self.url = url
        await self.open()

    async def flush(self) -> None:
        for nc in self.nc.values():
            if nc.is_connected:
                await nc.flush()


async def until(predicate: Callable[[], Any], timeout_s: float, interval_s: float,
                what: str) -> None:
    """harness.wait_for for coroutines: the connections keep being served while it waits."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


async def gather_limited(jobs: list[Callable[[], Awaitable[Any]]], limit: int) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with sem:
            return await job()

    return await asyncio.gather(*(one(j) for j in jobs))


# -- routing: each case on its subject, with the credential permitted there ----------------


def route(case: fuzz.Case) -> tuple[str, str, str]:
    """(credential, subject, how) for a case."""
    kind = schema.KINDS.get(case.kind)
    if kind is not None and kind.transport == "durable":
        if kind.scope == "node":
            return f"agent-{case.node}", f"{P}.evt.node.{case.node}.{case.kind}", "js"
        return f"job-{case.job}", f"{P}.evt.job.{case.job}.{case.kind}", "js"
    if case.kind == "heartbeat":
        return f"job-{case.job}", f"{P}.hb.{case.job}", "core"
    if case.kind == "health":
        return f"agent-{case.node}", f"{P}.health.{case.node}", "core"
    if case.kind.startswith("rpc:"):
        return "operator", f"{P}.rpc.{case.kind[4:]}", "request"
    if case.kind.startswith("jobrpc:"):
        return f"job-{case.job}", f"{P}.jobrpc.{case.job}.{case.kind[7:]}", "request"
    assert case.kind == "credrpc", case.kind
    return f"agent-{case.node}", f"{P}.credrpc.{case.node}", "request"


class Tally:
    def __init__(self) -> None:
        self.tried: Counter[str] = Counter()
        self.outcome: Counter[str] = Counter()
        self.internal: list[str] = []
        self.unanswered: list[str] = []
        self.waiting: list[str] = []  # an operator asked to wait that long for Slurm


async def send(conns: Conns, cases: list[fuzz.Case], how: str, tally: Tally) -> None:
    """The cases that travel `how` (core, request, js), each with its permitted credential."""
    routed = [(case, *route(case)) for case in cases]
    todo = [(case, cred, subject) for case, cred, subject, by in routed if by == how]
    for case, _, _ in todo:
        tally.tried[case.cls] += 1

    async def publish_js(case: fuzz.Case, cred: str, subject: str) -> None:
        try:
            await conns.nc[cred].jetstream().publish(subject, case.data, timeout=10)
            tally.outcome["jetstream acked"] += 1
        except Exception as exc:
            tally.outcome[f"jetstream publish failed: {type(exc).__name__}"] += 1

    async def ask(case: fuzz.Case, cred: str, subject: str) -> None:
        try:
            msg = await conns.nc[cred].request(subject, case.data, timeout=REQUEST_TIMEOUT_S)
        except nats.errors.TimeoutError:
            tally.outcome["request: no reply"] += 1
            if "args.wait_s" in case.path and asks_to_wait(case.data):
                tally.waiting.append(f"{case.cls} at {case.path}")
            else:
                tally.unanswered.append(f"{case.cls} at {case.path}")
            return
        except Exception as exc:
            tally.outcome[f"request failed: {type(exc).__name__}"] += 1
            return
        try:
            reply = json.loads(msg.data)
            kind = "ok" if reply["ok"] else reply.get("error_kind", "?")
        except (ValueError, KeyError, TypeError):
            kind = "unreadable reply"
        tally.outcome[f"reply {kind}"] += 1
        if kind == "internal":
            tally.internal.append(f"{case.cls} at {case.path}: {str(reply.get('error'))[:160]}")

    if how == "core":
        for case, cred, subject in todo:
            await conns.nc[cred].publish(subject, case.data)
            tally.outcome["core published"] += 1
        await conns.flush()
        await asyncio.sleep(0.5)  # heartbeats are written behind every 50 ms
    elif how == "request":
        await gather_limited([functools.partial(ask, *c) for c in todo], 32)
    else:
        await gather_limited([functools.partial(publish_js, *c) for c in todo], 64)


# -- wrong credentials ---------------------------------------------------------------------


def marked(subject: str) -> bytes:
    """A valid message for `subject`, marked so that it can be looked for in the database."""
    tail = subject.split(".")
    if tail[2] == "evt" and tail[3] == "ctl":
        mark = "reason" if tail[-1] == "action_applied" else "actor"
        msg = {**schema.KINDS[tail[-1]].example, "controller": tail[4], mark: "wrongcred"}
    elif tail[2] == "evt" and tail[-1] == "verdict":
        msg = {**schema.KINDS["verdict"].example, "node": tail[4], "reason": "wrongcred"}
    elif tail[2] in ("evt", "hb"):
        msg = {**schema.KINDS["replica_register"].example, "replica_id": "job7_rg0:wrongcred"}
        if tail[2] == "hb":
            msg = {**schema.KINDS["heartbeat"].example, "replica_id": "job7_rg0:wrongcred"}
    elif tail[2] == "health":
        msg = schema.KINDS["health"].example
    elif tail[2] == "feed":
        msg = {**schema.KINDS["event"].example, "reason": "wrongcred"}
    else:
        msg = schema.request({"nodes": "n1", "reason": "wrongcred", "job": 7, "uid": 0})
    return fuzz.encode(msg)


WRONG_CREDENTIAL = [
    ("job-8", f"{P}.evt.job.7.replica_register"), ("job-8", f"{P}.hb.7"),
    ("job-8", f"{P}.jobrpc.7.config_latest"), ("job-7", f"{P}.evt.node.n1.verdict"),
    ("job-7", f"{P}.health.n1"), ("job-7", f"{P}.rpc.drain"), ("job-7", f"{P}.credrpc.n1"),
    ("job-7", f"{P}.feed.event"), ("agent-n2", f"{P}.evt.node.n1.verdict"),
    ("agent-n2", f"{P}.health.n1"), ("agent-n2", f"{P}.credrpc.n1"), ("agent-n2", f"{P}.hb.7"),
    ("agent-n2", f"{P}.evt.job.7.replica_register"), ("agent-n2", f"{P}.rpc.drain"),
    ("agent-n2", f"{P}.feed.event"), ("agent--n1", f"{P}.evt.node.n1.verdict"),
    ("operator", f"{P}.evt.node.n1.verdict"), ("operator", f"{P}.hb.7"),
    ("operator", f"{P}.health.n1"), ("operator", f"{P}.feed.event"),
    ("operator", f"{P}.jobrpc.7.config_latest"), ("operator", f"{P}.credrpc.n1"),
    ("operator", f"{P}.evt.job.7.replica_register"),
    ("job-7", f"{P}.evt.ctl.ctl-a.action_applied"),
    ("agent-n1", f"{P}.evt.ctl.n1.action_applied"),
    ("operator", f"{P}.evt.ctl.ctl-a.config_revised"),
]


async def wrong_credentials(conns: Conns, result: dict[str, Any]) -> None:
    """Publish where each credential is not allowed to; counts what the server refused."""
    for cred, subject in WRONG_CREDENTIAL:
        await conns.nc[cred].publish(subject, marked(subject))
    await conns.flush()

    def missed() -> list[str]:
        out = []
        for cred, subject in WRONG_CREDENTIAL:
            needle = f'publish to "{subject}"'.lower()
            if not any("permissions violation" in e.lower() and needle in e.lower()
                       for e in conns.errors[cred]):
                out.append(f"{cred} -> {subject}")
        return out

    # The -ERR may trail the PONG of the flush, more so on a busy machine.
    with contextlib.suppress(AssertionError):
        await until(lambda: not missed(), 3.0, 0.1, "the server's refusals")
    not_refused = missed()
    result["refused"] = len(WRONG_CREDENTIAL) - len(not_refused)
    result["not refused"] = not_refused


# -- valid traffic: the victim before the storm, a fresh set after it ---------------------


def valid(kind: str, **changes: Any) -> bytes:
    return fuzz.encode({**schema.KINDS[kind].example, "ts": time.time(), **changes})


async def victim_setup(conns: Conns, db: Path) -> None:
    node, job, gpu = fuzz.VICTIM_NODE, fuzz.VICTIM_JOB, fuzz.VICTIM_GPU
    agent, jobc = conns.nc[f"agent-{node}"].jetstream(), conns.nc[f"job-{job}"]
    await agent.publish(f"{P}.evt.node.{node}.gpu_inventory", valid(
        "gpu_inventory", node=node, gpus=[{"uuid": gpu, "index": 0}]), timeout=10)
    await agent.publish(f"{P}.evt.node.{node}.step_start", valid(
        "step_start", job_id=job, step_id=0, node=node, gpu_indices=[0], gpu_uuids=[gpu]),
        timeout=10)
    await jobc.jetstream().publish(f"{P}.evt.job.{job}.replica_register", valid(
        "replica_register", replica_id=fuzz.VICTIM_REPLICA, job_id=job, node=node,
        gpu_uuids=[gpu], step=5), timeout=10)
    await until(lambda: query(db, "SELECT 1 FROM replicas WHERE replica_id=?",
                           fuzz.VICTIM_REPLICA), 20, 0.1, "the victim registered")
    await heartbeats(conns, job, fuzz.VICTIM_REPLICA, 5)
    await until(lambda: query(db, "SELECT 1 FROM replicas WHERE replica_id=? AND last_step=5",
                           fuzz.VICTIM_REPLICA), 10, 0.1, "the victim's heartbeat")


async def after_storm(conns: Conns, token: str, db: Path, failures: list[str]) -> None:
    """A fresh step_start, verdict, registration and heartbeat: all must be applied."""
    agent, job = conns.nc["agent-n1"].jetstream(), conns.nc["job-7"]
    await agent.publish(f"{P}.evt.node.n1.step_start", valid(
        "step_start", step_id=77_001, gpu_indices=[1], gpu_uuids=["GPU-n1-1"]), timeout=10)
    await agent.publish(f"{P}.evt.node.n1.verdict", valid(
        "verdict", gpu_uuid="GPU-n1-1", gpu_index=1, action="watch",
        reason=f"after the storm {token}"), timeout=10)
    await job.jetstream().publish(f"{P}.evt.job.7.replica_register", valid(
        "replica_register", replica_id=f"job7_rg1:{token}", replica_group=1,
        gpu_uuids=["GPU-n1-1"]), timeout=10)
    fresh = f"job7_rg1:{token}"
    try:
        await until(lambda: query(db, "SELECT 1 FROM replicas WHERE replica_id=?", fresh), 20,
                 0.2, "the fresh registration")
        await heartbeats(conns, 7, fresh, 99)
        await until(lambda: query(db, "SELECT 1 FROM replicas WHERE replica_id=? AND "
                                   "last_step=99", fresh), 10, 0.1, "the fresh heartbeat")
    except AssertionError as exc:
        failures.append(f"valid messages after the storm not applied: {exc}")


async def checkpoint(conns: Conns, db: Path, failures: list[str]) -> None:
    """A valid step_start after the first part of the storm, waited for in the database, so
    that everything before it is through the ingest before the second part starts."""
    await conns.nc["agent-n1"].jetstream().publish(f"{P}.evt.node.n1.step_start", valid(
        "step_start", step_id=77_000), timeout=10)
    try:
        await until(lambda: query(db, "SELECT 1 FROM job_steps WHERE job_id=7 AND "
                               "step_id=77000"), 30, 0.2, "the checkpoint step_start")
    except AssertionError as exc:
        failures.append(f"durable ingest stuck in the first part of the storm: {exc}")


async def heartbeats(conns: Conns, job: int, replica_id: str, step: int) -> None:
    await conns.nc[f"job-{job}"].publish(f"{P}.hb.{job}", valid(
        "heartbeat", replica_id=replica_id, job_id=job, step=step))
    await conns.flush()


# -- the controller's own account ------------------------------------------------------------


def status_figures(status: dict[str, Any]) -> dict[str, Any]:
    counters = status.get("counters", {})
    return {"rejected_total": status.get("rejected_total"), "rejected": status.get("rejected"),
            "rejections": status.get("rejections"), "dead_letters": status.get("dead_letters"),
            "crash counters": {k: v for k, v in counters.items() if "crash" in k}}


# -- the test ------------------------------------------------------------------------------


@pytest.mark.slow
def test_trust_boundary_fuzz(tmp_path: Path) -> None:
    started = time.monotonic()
    state = tmp_path / "state"
    ctl = AuthController(state, "", extra_env={"MARDUK_NATS_AUTH": "true"})
    ctl.start()
    db = state / "marduk.db"
    failures: list[str] = []
    tally = Tally()
    cases = fuzz.systematic() + fuzz.drawn(DRAWN_CASES)
    token = f"t{int(time.time())}"
    refusals: dict[str, Any] = {"refused": 0, "not refused": []}
    status: dict[str, Any] = {}
    storm_s, rc = 0.0, None
    storm_log: list[str] = []
    restart_log: list[str] = []
    try:
        creds = issue_credentials(state, tmp_path)

        async def storm() -> None:
            conns = await Conns(ctl.url, creds).open()
            try:
                await victim_setup(conns, db)
                ctl.last_setup_event = query(  # type: ignore[attr-defined]
                    db, "SELECT MAX(id) FROM events")[0][0]
                plain = [c for c in cases if not fuzz.overflows(c)]
                huge = [c for c in cases if fuzz.overflows(c)]
                parts: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
                    ("core messages", lambda: send(conns, plain, "core", tally)),
                    ("durable events", lambda: send(conns, plain, "js", tally)),
                    ("a checkpoint", lambda: checkpoint(conns, db, failures)),
                    ("requests", lambda: send(conns, plain, "request", tally)),
                    ("core messages past int64", lambda: send(conns, huge, "core", tally)),
                    ("requests past int64", lambda: send(conns, huge, "request", tally)),
                    ("durable events past int64", lambda: send(conns, huge, "js", tally)),
                    ("wrong credentials", lambda: wrong_credentials(conns, refusals)),
                    ("valid messages after the storm", lambda: after_storm(
                        conns, token, db, failures)),
                ]
                done = "the start"
                for what, part in parts:
                    if not await asyncio.to_thread(answering, ctl):
                        # Record it, and go on with a restarted controller: one crash must
                        # not hide what the rest of the storm does.
                        failures.append(f"the controller {ctl.fate()} after {done}")
                        try:
                            await asyncio.to_thread(ctl.restart)
                            await conns.reopen(ctl.url)
                        except Exception as exc:
                            failures.append(f"no restart after {done}: {exc}"[:600])
                            break
                    try:
                        await part()
                    except Exception as exc:
                        failures.append(f"{what}: {type(exc).__name__}: {exc}")
                    done = what
            finally:
                await conns.close()

        asyncio.run(storm())
        storm_s = time.monotonic() - started
        if refusals["not refused"]:
            failures.append(f"the server let wrong credentials publish: "
                            f"{refusals['not refused']}")
        if tally.unanswered:
            failures.append(f"{len(tally.unanswered)} requests got no reply in "
                            f"{REQUEST_TIMEOUT_S} s, e.g. {tally.unanswered[:5]}")
        if tally.internal:
            failures.append(f"{len(tally.internal)} requests answered with an internal error, "
                            f"e.g. {tally.internal[:5]}")
        if not ctl.alive():
            failures.append(f"the controller {ctl.fate()} at the end of the storm")
        else:
            failures += applied_through_cli(state, token)
            proc = run_cli("status", "--json", "--state-dir", str(state), timeout=30)
            if proc.returncode != 0:
                failures.append(f"`marduk status` failed ({proc.returncode}): {proc.stderr}")
            else:
                status = json.loads(proc.stdout)
                crashes = {k: v for k, v in status.get("counters", {}).items()
                           if "crash" in k and v}
                if crashes:
                    failures.append(f"crash counters in `marduk status`: {crashes}")
        storm_log = log_findings(state.joinpath("controller.log").read_text(errors="replace"))
        if any("crashed" in line or "CRITICAL" in line for line in storm_log):
            failures.append("supervised tasks crashed during the storm")
        if any("recursion depth" in line for line in storm_log):
            failures.append("a message handler hit the recursion limit during the storm")
        if any("disconnected" in line for line in storm_log):
            failures.append("the controller lost its NATS connection during the storm")
        failures += [f"database: {v}" for v in database_violations(db)[:30]]
        failures += victim_violations(db, getattr(ctl, "last_setup_event", 0) or 0)
        failures += refused_traces(db)
        failures += roster_violations(state)
        restart_log, restart_ok = restart_and_watch(ctl)
        if not restart_ok:
            failures.append(f"after a restart the controller did not stay up "
                            f"{RESTART_WATCH_S:.0f} s")
        if any("crashed" in line or "CRITICAL" in line for line in restart_log):
            failures.append("supervised tasks crashed after the restart")
    finally:
        if ctl.alive():
            rc = ctl.stop()
    elapsed = time.monotonic() - started
    summary = {
        "seconds": round(elapsed, 1), "storm_seconds": round(storm_s, 1),
        "cases": len(cases), "tried": dict(sorted(tally.tried.items())),
        "outcomes": dict(tally.outcome), "wrong credentials refused": refusals["refused"],
        "wrong credentials not refused": refusals["not refused"], "crashes": sum(
            1 for line in storm_log + restart_log if "crashed" in line),
        "controller": status_figures(status), "exit code at the end": rc,
        "requests with an internal error": tally.internal[:50],
        "requests without a reply": tally.unanswered[:50],
        "requests waiting wait_s for Slurm": tally.waiting,
        "log during the storm": storm_log[:40], "log after the restart": restart_log[:40],
        "failures": failures,
    }
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "trust-fuzz.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print_summary(summary)
    assert not failures, "\n".join(failures)


def applied_through_cli(state: Path, token: str) -> list[str]:
    """The fresh messages, as an operator sees them with the real `marduk` command."""
    found = []
    cli = ["--json", "--state-dir", str(state)]
    proc = run_cli("replicas", "--job", "7", *cli, timeout=30)
    replicas = json.loads(proc.stdout) if proc.returncode == 0 else []
    if not any(r["replica_id"] == f"job7_rg1:{token}" and r["last_step"] == 99
               for r in replicas):
        found.append(f"`marduk replicas` lacks the fresh replica job7_rg1:{token} at step 99 "
                     f"({proc.returncode}: {proc.stderr.strip()[:200]})")
    proc = run_cli("history", "--job", "7", "--limit", "10000", *cli, timeout=30)
    events = json.loads(proc.stdout) if proc.returncode == 0 else []
    if not any(e["kind"] == "step_start" and e["evidence"].get("step_id") == 77_001
               for e in events):
        found.append("`marduk history` lacks the fresh step_start 7.77001")
    proc = run_cli("history", "--node", "n1", "--limit", "10000", *cli, timeout=30)
    events = json.loads(proc.stdout) if proc.returncode == 0 else []
    if not any(e["kind"] == "gpu_verdict" and token in e["reason"] for e in events):
        found.append("`marduk history` lacks the fresh verdict")
    return found


def restart_and_watch(ctl: AuthController) -> tuple[list[str], bool]:
    """SIGTERM, start again on the same state and NATS store, and watch it for 30 s."""
    rc = ctl.stop()
    offset = ctl.log_path.stat().st_size
    lines = [] if rc == 0 else [f"exited {rc} on SIGTERM after the storm"]
    try:
        ctl.start()
    except RuntimeError as exc:
        return [*lines, f"restart failed: {str(exc)[:300]}"], False
    deadline = time.monotonic() + RESTART_WATCH_S
    while time.monotonic() < deadline and ctl.alive():
        time.sleep(0.5)
    ok = ctl.alive()
    if ok:
        try:
            ctl.request("status", timeout_s=10)
        except Exception as exc:
            ok = False
            lines.append(f"status after the restart: {exc}")
    with ctl.log_path.open(errors="replace") as fh:
        fh.seek(offset)
        lines += log_findings(fh.read())
    if not ok and ctl.proc is not None:
        lines.append(f"exit code after the restart: {ctl.proc.returncode}")
    return lines, ok


def print_summary(summary: dict[str, Any]) -> None:
    classes: Counter[str] = Counter()
    for cls, n in summary["tried"].items():
        classes[cls.split(" x ", 1)[1]] += n
    print(f"\ntrust-boundary fuzz: {summary['cases']} messages in {summary['seconds']} s "
          f"(storm {summary['storm_seconds']} s)")
    print("by mutation: " + ", ".join(f"{k}={v}" for k, v in sorted(classes.items())))
    print("by kind x mutation: " + ", ".join(f"{k}={v}" for k, v in summary["tried"].items()))
    print(f"outcomes: {summary['outcomes']}")
    print(f"wrong credentials refused: {summary['wrong credentials refused']}, not refused: "
          f"{summary['wrong credentials not refused']}")
    print(f"crashes: {summary['crashes']}; controller: {summary['controller']}")
    for title in ("log during the storm", "log after the restart", "failures"):
        print(f"{title}:")
        for line in summary[title]:
            print(f"  {line}")
