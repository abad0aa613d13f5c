"""Settings: file, then environment, then flags; unknown keys are errors naming the source."""

from __future__ import annotations

from pathlib import Path

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
    ("[nats]\nurl = 'http://x'\n", "nats.url must start with"),
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
