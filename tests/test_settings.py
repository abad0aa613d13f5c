"""Settings: file, then environment, then flags; unknown keys are errors naming the source."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import get_type_hints

import msgspec
import pytest

from marduk_slurm import settings
from marduk_slurm.errors import SettingsError

from harness import run_cli


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "marduk.toml"
    path.write_text(text)
    return path


def test_precedence_and_sources(tmp_path: Path) -> None:
    path = write(tmp_path, '[controller]\nstate_dir = "/srv/m"\nheartbeat_flush_ms = 20\n'
                           '[nats]\nurl = "nats://file:4222"\n')
    env = {"MARDUK_NATS_URL": "nats://env:4222", "MARDUK_CONTROLLER_HEARTBEAT_FLUSH_MS": "30",
           "MARDUK_JOB_ID": "12", "HOME": "/root"}
    s = settings.load(path, env, {"controller.heartbeat_flush_ms": 40, "slurm.backend": None})
    assert s.controller.state_dir == "/srv/m"
    assert s.nats.url == "nats://env:4222"
    assert s.controller.heartbeat_flush_ms == 40
    eff = s.effective()
    assert eff["controller.state_dir"]["source"] == str(path)
    assert eff["nats.url"]["source"] == "$MARDUK_NATS_URL"
    assert eff["controller.heartbeat_flush_ms"]["source"] == "flag"
    assert eff["slurm.backend"] == {"value": "auto", "source": "default"}
    assert s.database_path == Path("/srv/m/marduk.db")


@pytest.mark.parametrize(("text", "needle"), [
    ("[controller]\nstat_dir = 'x'\n", "unknown key controller.stat_dir"),
    ("[controler]\n", "unknown section [controler]"),
    ("[controller]\nheartbeat_flush_ms = 'fast'\n", "expected int"),
    ("[controller]\nlog_level = 'loud'\n", "log_level must be one of"),
    ("[slurm]\nbackend = 'magic'\n", "slurm.backend must be one of"),
    ("[nats]\nurl = 'http://x'\n", "each starting with nats://"),
    ("[nats]\nurl = 'nats://a:4222,http://b'\n", "each starting with nats://"),
    ("[policy]\ndrain_xids = ['a']\n", "expected"),
    ("not toml [", "not valid TOML"),
    ("controller = 3\n", "must be a [section] table"),
])
def test_bad_files_name_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SettingsError) as err:
        settings.load(path, {})
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_unknown_environment_setting_is_an_error() -> None:
    with pytest.raises(SettingsError, match=r"\$MARDUK_CONTROLLER_STATEDIR: unknown key"):
        settings.load(None,
                      {"MARDUK_CONTROLLER_STATEDIR": "/x"})


def test_environment_values_are_converted() -> None:
    s = settings.load(None, {"MARDUK_CONTROLLER_LEAVE_ON_DRAIN": "no",
                             "MARDUK_POLICY_DRAIN_XIDS": "79, 48",
                             "MARDUK_AGENT_POLL_INTERVAL_S": "2.5"})
    assert s.controller.leave_on_drain is False
    assert s.policy.drain_xids == [79, 48]
    assert s.agent.poll_interval_s == 2.5


def test_cli_settings_check_and_show(tmp_path: Path) -> None:
    good = write(tmp_path, "[controller]\nreconcile_interval_s = 5\n")
    proc = run_cli("settings", "check", str(good))
    assert proc.returncode == 0 and "ok" in proc.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent]\nsimulate = 2\n")
    proc = run_cli("settings", "check", str(bad))
    assert proc.returncode == 2 and "unknown key agent.simulate" in proc.stderr
    proc = run_cli("settings", "show", "--json", "--config", str(good),
                   env={"MARDUK_SLURM_BACKEND": "none"})
    assert proc.returncode == 0, proc.stderr
    assert '"source": "$MARDUK_SLURM_BACKEND"' in proc.stdout
    assert f'"source": "{good}"' in proc.stdout


# -- conversion and bounds ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("MARDUK_AGENT_POLL_INTERVAL_S", "nan", "expected float > 0 and <= 3600"),
    ("MARDUK_AGENT_POLL_INTERVAL_S", "NaN", "expected float > 0 and <= 3600"),
    ("MARDUK_NATS_CONNECT_TIMEOUT_S", "inf", "expected float > 0 and <= 3600"),
    ("MARDUK_CONTROLLER_STEP_GRACE_S", "-inf", "expected float >= 0 and <= 86400"),
    ("MARDUK_CONTROLLER_RECONCILE_INTERVAL_S", "-5", "expected float > 0 and <= 86400"),
    ("MARDUK_CONTROLLER_RECONCILE_INTERVAL_S", "0", "expected float > 0 and <= 86400"),
    ("MARDUK_SLURM_COMMAND_TIMEOUT_S", "1e9", "expected float > 0 and <= 3600"),
    ("MARDUK_NATS_STREAM_MAX_AGE_S", "1e400", "expected float > 0"),
    ("MARDUK_CONTROLLER_HEARTBEAT_FLUSH_MS", "-1", "expected int >= 1 and <= 60000"),
    ("MARDUK_CONTROLLER_HEARTBEAT_FLUSH_MS", "9" * 40, "expected int >= 1 and <= 60000"),
    ("MARDUK_CONTROLLER_HEARTBEAT_FLUSH_MS", "nan", "expected int >= 1"),
    ("MARDUK_AGENT_BUFFER_MAX", "0", "expected int >= 1"),
    ("MARDUK_AGENT_SIMULATE_GPUS", "-2", "expected int >= 0"),
    ("MARDUK_CONTROLLER_RISK_DRAIN_THRESHOLD", "101", "expected int >= 0 and <= 100"),
    ("MARDUK_CONTROLLER_STRAGGLER_FACTOR", "0.5", "expected float >= 1 and <= 100"),
    ("MARDUK_NATS_STREAM_REPLICAS", "7", "expected int >= 1 and <= 5"),
    ("MARDUK_POLICY_DRAIN_XIDS", "79,-4", "expected list of int >= 0"),
])
def test_environment_numbers_out_of_range_are_refused(name: str, value: str,
                                                       expected: str) -> None:
    with pytest.raises(SettingsError) as err:
        settings.load(None, {name: value})
    message = str(err.value)
    assert message.startswith(f"${name}: "), message
    assert expected in message and repr(value) in message, message


@pytest.mark.parametrize(("value", "result"), [
    ("1", True), ("true", True), ("True", True), ("YES", True), ("on", True), (" yes ", True),
    ("0", False), ("false", False), ("FALSE", False), ("no", False), ("Off", False),
])
def test_environment_bool_spellings(value: str, result: bool) -> None:
    s = settings.load(None, {"MARDUK_NATS_AUTH": value})
    assert s.nats.auth is result
    assert s.sources["nats.auth"] == "$MARDUK_NATS_AUTH"


@pytest.mark.parametrize("value", ["maybe", "", "2", "y", "enabled"])
def test_environment_bool_other_words_are_refused(value: str) -> None:
    with pytest.raises(SettingsError,
                       match=r"^\$MARDUK_CONTROLLER_WATCHDOG: controller\.watchdog: expected bool"):
        settings.load(None, {"MARDUK_CONTROLLER_WATCHDOG": value})


@pytest.mark.parametrize(("text", "needle"), [
    ("[agent]\npoll_interval_s = nan\n", "agent.poll_interval_s: expected float > 0"),
    ("[nats]\nconnect_timeout_s = inf\n", "nats.connect_timeout_s: expected float > 0"),
    ("[controller]\nstep_grace_s = -1.0\n", "controller.step_grace_s: expected float >= 0"),
    # TOML has types: a quoted number or bool is a string, as written.
    ("[controller]\nheartbeat_flush_ms = '20'\n", "expected int >= 1 and <= 60000, got '20'"),
    ("[controller]\nleave_on_drain = 'no'\n", "controller.leave_on_drain: expected bool, got"),
    ("[controller]\ntask_max_restarts = 2.0\n", "expected int >= 0 and <= 1000, got 2.0"),
])
def test_file_values_are_checked_as_typed(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SettingsError) as err:
        settings.load(path, {})
    assert str(err.value).startswith(f"{path}: "), str(err.value)
    assert needle in str(err.value)


def test_file_int_for_a_float_setting_becomes_a_float(tmp_path: Path) -> None:
    s = settings.load(write(tmp_path, "[controller]\nreconcile_interval_s = 7\n"), {})
    assert s.controller.reconcile_interval_s == 7.0
    assert isinstance(s.controller.reconcile_interval_s, float)


def test_flags_are_converted_and_checked() -> None:
    s = settings.load(None, {}, {"agent.simulate_gpus": "4", "agent.allow_inject": True})
    assert s.agent.simulate_gpus == 4 and s.agent.allow_inject is True
    with pytest.raises(SettingsError, match=r"^flag: agent\.simulate_gpus: expected int >= 0"):
        settings.load(None, {}, {"agent.simulate_gpus": -1})


def test_every_number_has_finite_bounds_and_the_defaults_meet_them() -> None:
    """A new numeric setting without bounds would take NaN, inf or a negative interval."""
    for section, cls in settings.SECTIONS.items():
        for key, kind in get_type_hints(cls, include_extras=True).items():
            item = kind.__args__[0] if getattr(kind, "__origin__", None) is list else kind
            if getattr(item, "__origin__", item) not in (int, float):
                continue
            metas = [m for m in getattr(item, "__metadata__", ()) if isinstance(m, msgspec.Meta)]
            lower = [m for m in metas if m.ge is not None or m.gt is not None]
            upper = [m for m in metas if m.le is not None or m.lt is not None]
            assert lower and upper, f"{section}.{key} has no range"
        msgspec.convert(dataclasses.asdict(cls()), cls)  # raises if a default is out of range


def test_documented_ranges_match_the_schema() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    rows = {line.split("`")[1]: line for line in text.splitlines() if line.startswith("| `")}
    for section, cls in settings.SECTIONS.items():
        for key, kind in get_type_hints(cls, include_extras=True).items():
            # "float > 0 and <= 3600" -> "> 0 and <= 3600"; "list of int >= 0" -> "items >= 0"
            bounds = re.sub(r"^(list of )?\w+ ?", lambda m: "items " if m[1] else "",
                            settings.describe(kind))
            if settings.describe(kind).startswith("table of "):  # a table says its types
                bounds = settings.describe(kind)
            if bounds.removeprefix("items "):
                assert f"| {bounds}" in rows[key], f"{section}.{key}: docs should say {bounds}"
