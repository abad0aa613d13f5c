"""Fault -> full strength, hot spare against cold respawn, on the real local Slurm cluster.

Runs the fault drill (scripts/drill.py) in pairs, alternating: a job whose spare node runs a
standby (`marduk sbatch --hot-spares 1`) and the same job whose spare is respawned on cold
(the baseline). XID 79 on one replica group's GPU each time; the figure is the time from the
controller's `gpu_verdict` to the replaced group's first committed step in a quorum of both
groups (the training log of scripts/train_tiny.py, one clock: every node is this host).

Needs the local cluster (scripts/slurm-cluster.sh) and root, like the drill; takes the nodes
of the cluster while it runs (about a minute per job). Each run's fault timeline (step rate
and quorum size per group, the fault and what followed it marked) is drawn into
`--plots DIR` as run<N>-hot-spare.svg and run<N>-cold-respawn.svg (or .png with
`--plot-format png`; needs matplotlib, the `plots` extra).

    .venv/bin/python benchmarks/recovery.py [--runs 3] [--plots DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness import load_drill


def measure(runs: int, max_steps: int, step_sleep_s: float, plots: Path, plot_format: str
            ) -> tuple[dict[str, list[float]], dict[str, list[Any]]]:
    """(fault -> full strength per mode, and per mode the runs' other figures: survivors'
    longest step and median step in ms, steps trained without the replaced group, steps
    redone). Each run's timeline picture goes into `plots`."""
    drill = load_drill()
    times: dict[str, list[float]] = {"hot spare": [], "cold respawn": []}
    other: dict[str, list[Any]] = {"hot spare": [], "cold respawn": []}
    for i in range(runs):
        for label, hot in (("hot spare", 1), ("cold respawn", 0)):
            work = Path(tempfile.mkdtemp(prefix=f"marduk-recovery-{hot}-"))
            plot = plots / f"run{i + 1}-{label.replace(' ', '-')}.{plot_format}"
            result = drill.run_drill(work, max_steps=max_steps, step_sleep_s=step_sleep_s,
                                     hot_spares=hot, finish_after=60, plot=plot)
            if result.job_state != "COMPLETED" or result.fault_to_full_strength_s <= 0:
                raise RuntimeError(f"run {i + 1} ({label}) did not complete: {result.job_state}"
                                   f"; logs in {work}")
            if bool(hot) != result.assumed_by_standby:
                raise RuntimeError(f"run {i + 1} ({label}): standby took over: "
                                   f"{result.assumed_by_standby}; logs in {work}")
            times[label].append(result.fault_to_full_strength_s)
            longest = result.survivors_longest_step_ms
            other[label].append((longest, result.survivors_median_step_ms,
                                 result.steps_at_reduced_strength, result.steps_redone))
            print(f"run {i + 1} {label:<12}: fault -> full strength "
                  f"{result.fault_to_full_strength_s:.2f} s (drain "
                  f"{result.fault_to_drain_s * 1000:.0f} ms); survivors' longest step "
                  + (f"{longest:.0f} ms" if longest else "< 100 ms")
                  + f", median {result.survivors_median_step_ms:.0f} ms; "
                  f"{result.steps_at_reduced_strength} step(s) without the group; "
                  f"{result.steps_redone} redone; timeline "
                  f"{result.timeline_plot or 'not drawn'}", flush=True)
    return times, other


def p90(values: list[float]) -> float:
    """The 90th percentile, nearest rank (with under ten runs: the largest)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, -(-9 * len(ordered) // 10) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=5000,
                    help="long enough for a cold respawn; the job is ended 60 steps after "
                         "the group is back")
    ap.add_argument("--step-sleep", type=float, default=0.05)
    ap.add_argument("--plots", type=Path, default=None, metavar="DIR",
                    help="where each run's timeline picture goes (default: a new folder "
                         "under /tmp, printed)")
    ap.add_argument("--plot-format", choices=("svg", "png"), default="svg")
    args = ap.parse_args()
    plots = args.plots or Path(tempfile.mkdtemp(prefix="marduk-recovery-plots-"))
    plots.mkdir(parents=True, exist_ok=True)
    print(f"timeline pictures in {plots}", flush=True)
    times, other = measure(args.runs, args.max_steps, args.step_sleep, plots,
                           args.plot_format)
    print("\n| recovery | runs (s) | p50 (s) | p90 (s) |\n|---|---|---|---|")
    for label, values in times.items():
        print(f"| {label} | {', '.join(f'{v:.2f}' for v in values)} | "
              f"{statistics.median(values):.2f} | {p90(values):.2f} |")
    print("\n| mode | survivors' longest step, ms (p50 / p90 / max) | excess over their median "
          "step, ms (max) | steps without the group (p50) | steps redone (max) |\n"
          "|---|---|---|---|---|")
    excess: dict[str, float] = {}
    for label, rows in other.items():
        longest = [r[0] or 0.0 for r in rows]  # None: no step over 100 ms
        excess[label] = max((r[0] or 0.0) - r[1] for r in rows)
        print(f"| {label} | {statistics.median(longest):.0f} / {p90(longest):.0f} / "
              f"{max(longest):.0f} | {excess[label]:.0f} | "
              f"{statistics.median([r[2] for r in rows]):.0f} | {max(r[3] for r in rows)} |")
    hot = times["hot spare"]
    ratio = statistics.median(times["cold respawn"]) / statistics.median(hot)
    redone = max(r[3] for rows in other.values() for r in rows)
    print(f"\ncold / hot (p50): {ratio:.1f}x")
    print(f"target hot spare p50 <= 2 s: {'met' if statistics.median(hot) <= 2.0 else 'MISSED'} "
          f"({statistics.median(hot):.2f} s)")
    print(f"target survivors' longest step <= their median + 250 ms (hot spare, every run): "
          f"{'met' if excess['hot spare'] <= 250 else 'MISSED'} (worst +{excess['hot spare']:.0f}"
          " ms)")
    print(f"target 0 steps redone: {'met' if redone == 0 else 'MISSED'} ({redone})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
