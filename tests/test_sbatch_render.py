"""Rendering of the sbatch template (marduk_slurm/domain/sbatch.py, templates/torchft.sbatch.j2).

Golden files in tests/data/golden pin the rendered scripts. After a deliberate template
change, regenerate them with MARDUK_REGEN_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jinja2
import pytest

from marduk_slurm.cli.main import main as marduk_main
from marduk_slurm.domain import sbatch

GOLDEN = Path(__file__).parent / "data" / "golden"

CASES: dict[str, dict[str, Any]] = {
    "basic": {"train_script": "train.py", "replica_groups": 2},
    "full": {
        "train_script": "/shared/train.py",
        "train_args": ["--lr", "3e-4", "--name", "run one", "--note", "it's $HOME"],
        "replica_groups": 4, "nodes_per_group": 2, "gpus_per_node": 8, "spares": 1,
        "max_restarts": 5, "job_name": "llama-ft", "partition": "gpu", "time": "24:00:00",
        "account": "ml", "sbatch_args": {"mem": "0", "exclusive": "", "qos": "high"},
        "launcher": "torchrun --nproc-per-node=8", "heartbeat_timeout_ms": 2000,
        "nats_url": "nats://nats.example:4222", "lighthouse_port": 29500,
    },
    "cpu": {"train_script": "./train.sh", "replica_groups": 3, "gpus_per_node": 0,
            "launcher": "", "spares": 2, "lighthouse_bind": "0.0.0.0"},
    "hot": {"train_script": "train.py", "replica_groups": 2, "spares": 2, "hot_spares": 1,
            "assume_dir": "/shared/run 1/marduk", "assume_grace_s": 3,
            "nats_url": "nats://nats.example:4222"},
}


def rendered(case: str) -> str:
    return sbatch.render(CASES[case])


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_script_matches_golden_file(case: str) -> None:
    path = GOLDEN / f"{case}.sh"
    text = rendered(case)
    if os.environ.get("MARDUK_REGEN_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; MARDUK_REGEN_GOLDEN=1 regenerates it"


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_script_is_valid_bash(case: str, tmp_path: Path) -> None:
    script = tmp_path / f"{case}.sh"
    script.write_text(rendered(case))
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_script_passes_shellcheck(case: str, tmp_path: Path) -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    script = tmp_path / f"{case}.sh"
    script.write_text(rendered(case))
    result = subprocess.run(["shellcheck", "--severity=info", str(script)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


def test_sbatch_header() -> None:
    lines = [x for x in rendered("full").splitlines() if x.startswith("#SBATCH")]
    assert lines == [
        "#SBATCH --job-name=llama-ft", "#SBATCH --nodes=10", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gres=gpu:8", "#SBATCH --partition=gpu", "#SBATCH --time=24:00:00",
        "#SBATCH --account=ml", "#SBATCH --exclusive", "#SBATCH --mem=0", "#SBATCH --qos=high",
    ]
    assert not any(x.startswith("#SBATCH --gres") for x in rendered("cpu").splitlines())


def test_training_command_survives_the_shell(tmp_path: Path) -> None:
    """The arguments reach the program exactly, quotes and dollar signs included."""
    line = next(x for x in rendered("full").splitlines() if x.startswith("TRAIN_CMD="))
    probe = f"{line}\nprintf '%s\\n' \"${{TRAIN_CMD[@]}}\"\n"
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["torchrun", "--nproc-per-node=8", "/shared/train.py",
                                       *CASES["full"]["train_args"]]


def test_lighthouse_command() -> None:
    text = sbatch.render({**CASES["full"], "lighthouse_proxy": False})
    assert ('torchft_lighthouse --bind "$LIGHTHOUSE_ADDR:$LIGHTHOUSE_PORT" --min_replicas 1 \\\n'
            "  --quorum_tick_ms 25 --join_timeout_ms 10000 \\\n"
            "  --heartbeat_timeout_ms 2000 &") in text
    assert "lighthouse-proxy" not in text
    assert "LIGHTHOUSE_PORT=29500" in text
    assert "export MARDUK_NATS_URL=nats://nats.example:4222" in text


def test_lighthouse_behind_the_liveness_proxy() -> None:
    marduk = "'/opt/my env/bin/python' -m marduk_slurm.cli.main"
    text = sbatch.render({**CASES["full"], "marduk": marduk})
    assert ('torchft_lighthouse --bind "$REAL_LIGHTHOUSE" --min_replicas 1 \\\n'
            "  --quorum_tick_ms 25 --join_timeout_ms 10000 \\\n"
            "  --heartbeat_timeout_ms 150 &") in text
    assert ("'/opt/my env/bin/python' -m marduk_slurm.cli.main lighthouse-proxy --listen "
            '"$LIGHTHOUSE_ADDR:$LIGHTHOUSE_PORT" \\\n'
            '  --lighthouse "$REAL_LIGHTHOUSE" --long-timeout-ms 2000 \\\n'
            '  --lighthouse-timeout-ms 150 --job "$SLURM_JOB_ID" &') in text


def test_unknown_parameter_is_rejected_with_the_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        sbatch.render({**CASES["basic"], "replicas": 3, "gpu": 1})
    message = str(info.value)
    assert "unknown sbatch parameter(s) gpu, replicas" in message
    for name in sbatch.valid_parameters():
        assert name in message


def test_missing_required_parameter() -> None:
    with pytest.raises(ValueError, match=r"missing sbatch parameter.*train_script"):
        sbatch.render({"replica_groups": 2})


@pytest.mark.parametrize(("override", "match"), [
    ({"replica_groups": 0}, "replica_groups must be an integer >= 1"),
    ({"nodes_per_group": "2"}, "nodes_per_group must be an integer"),
    ({"gpus_per_node": -1}, "gpus_per_node must be an integer >= 0"),
    ({"spares": True}, "spares must be an integer"),
    ({"max_restarts": -2}, "max_restarts"),
    ({"heartbeat_timeout_ms": 0}, "heartbeat_timeout_ms"),
    ({"poll_s": 0}, "poll_s must be a positive number"),
    ({"lighthouse_port": 70000}, "lighthouse_port"),
    ({"master_port": 65535}, "master_port 65535 leaves the port range"),
    ({"min_replicas": 3}, r"min_replicas \(3\) exceeds replica_groups \(2\)"),
    ({"hot_spares": 1}, r"hot_spares \(1\) exceeds spares \(0\)"),
    ({"hot_spares": -1}, "hot_spares must be an integer >= 0"),
    ({"spares": 1, "hot_spares": 1, "max_restarts": 3, "master_port": 65531},
     "master_port 65531 leaves the port range"),
    ({"assume_dir": "/a\nb"}, "newlines"),
    ({"job_name": "my job"}, "job_name 'my job'"),
    ({"time": ""}, "time ''"),
    ({"sbatch_args": {"nodes": "4"}}, "is set by the template"),
    ({"sbatch_args": {"ntasks_per_node": "4"}}, "is set by the template"),
    ({"sbatch_args": {"--mem": "4"}}, "is not an option name"),
    ({"sbatch_args": {"comment": "a b"}}, "sbatch argument comment"),
    ({"train_args": "--lr 1"}, "must be a list"),
    ({"train_args": ["a\nb"]}, "newlines"),
    ({"train_script": " "}, "train_script must not be empty"),
    ({"lighthouse_short_timeout_ms": 1000}, r"must be below heartbeat_timeout_ms \(1000\)"),
    ({"lighthouse_short_timeout_ms": 0}, "lighthouse_short_timeout_ms must be an integer"),
    ({"lighthouse_proxy": "yes"}, "lighthouse_proxy must be true or false"),
    ({"marduk": " "}, "marduk .* is empty"),
    ({"marduk": "a\nb"}, "newlines"),
    ({"lighthouse_port": 65535}, "lighthouse_port 65535 leaves the port range"),
    ({"lighthouse_port": 29599}, "overlap the MASTER_PORTs"),
])
def test_bad_values_raise_value_error(override: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sbatch.render({**CASES["basic"], **override})


def test_template_uses_strict_undefined(tmp_path: Path) -> None:
    (tmp_path / sbatch.TEMPLATE_NAME).write_text("#!/bin/bash\n{{ not_a_parameter }}\n")
    with pytest.raises(jinja2.UndefinedError):
        sbatch.render({**CASES["basic"], "template_dir": str(tmp_path)})


def test_the_job_runs_the_marduk_that_rendered_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert marduk_main(["sbatch", "--json", "--replica-groups", "2", "train.py"]) == 0
    marduk = json.loads(capsys.readouterr().out)["parameters"]["marduk"]
    assert marduk == str(Path(sys.executable).with_name("marduk"))


def test_coerce_uses_the_type_of_the_default() -> None:
    assert sbatch.coerce("lighthouse_port", "1234") == 1234
    assert sbatch.coerce("poll_s", "0.5") == 0.5
    assert sbatch.coerce("train_args", "--a 'b c'") == ("--a", "b c")
    assert sbatch.coerce("nats_url", "nats://x:1") == "nats://x:1"
    with pytest.raises(ValueError, match="expected int"):
        sbatch.coerce("spares", "many")
    with pytest.raises(ValueError, match="valid parameters: train_script"):
        sbatch.coerce("bogus", "1")


def test_cli_prints_the_rendered_script(capsys: pytest.CaptureFixture[str]) -> None:
    rc = marduk_main(["sbatch", "--replica-groups", "4", "--nodes-per-group", "2",
                      "--gpus-per-node", "8", "--spares", "1", "--max-restarts", "5",
                      "--job-name", "llama-ft", "--partition", "gpu", "--time", "24:00:00",
                      "--account", "ml", "--sbatch-arg", "mem=0", "--sbatch-arg", "exclusive=",
                      "--sbatch-arg", "qos=high", "--launcher", "torchrun --nproc-per-node=8",
                      "--heartbeat-timeout-ms", "2000",
                      "--param", "nats_url=nats://nats.example:4222",
                      "--param", "lighthouse_port=29500", "--param", "marduk=marduk",
                      "/shared/train.py", "--", *CASES["full"]["train_args"]])
    assert rc == 0
    assert capsys.readouterr().out == (GOLDEN / "full.sh").read_text()


@pytest.mark.parametrize(("argv", "message"), [
    (["--param", "replicas=2"], "unknown sbatch parameter replicas; valid parameters:"),
    (["--sbatch-arg", "nodes=9"], "is set by the template"),
    (["--spares", "-1"], "spares must be an integer >= 0"),
])
def test_cli_rejects_bad_input_as_usage_error(argv: list[str], message: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    rc = marduk_main(["sbatch", "--replica-groups", "2", *argv, "train.py"])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_hot_spares_in_the_script() -> None:
    text = rendered("hot")
    assert "NUM_STANDBYS=1\nASSUME_GRACE_S=3\n" in text
    assert "ASSUME_DIR='/shared/run 1/marduk'" in text
    assert "--job-name=marduk-torchft-sb\"$s\"" in text
    assert "#SBATCH --nodes=4" in text
    assert 'ASSUME_DIR="${SLURM_SUBMIT_DIR:-$PWD}/.marduk-job-$SLURM_JOB_ID"' in rendered("basic")


def test_cli_hot_spares(capsys: pytest.CaptureFixture[str]) -> None:
    rc = marduk_main(["sbatch", "--replica-groups", "2", "--spares", "2", "--hot-spares", "1",
                      "--param", "assume_dir=/shared/run 1/marduk", "--param",
                      "assume_grace_s=3", "--param", "nats_url=nats://nats.example:4222",
                      "--param", "marduk=marduk", "--gpus-per-node", "8", "train.py"])
    assert rc == 0
    assert capsys.readouterr().out == (GOLDEN / "hot.sh").read_text()
    assert marduk_main(["sbatch", "--replica-groups", "2", "--hot-spares", "1",
                        "train.py"]) == 2
    assert "hot_spares (1) exceeds spares (0)" in capsys.readouterr().err
