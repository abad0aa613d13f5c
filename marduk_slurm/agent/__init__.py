"""The node agent (`marduk agent`, one per compute node).

- `daemon`: start-up order, tasks, signals and shutdown (`Agent.run`).
- `health`: GPU watching through NVML (or simulated GPUs): inventory, XID events, polls,
  verdicts published when they change, a periodic health summary, fault injection.
- `node_watch`: ports (sysfs) and mount points (bounded probes) judged like GPUs, verdicts
  published when they change, drills (docs/node-health.md).
- `step_relay`: the Unix socket the SPANK plugin reports job steps to.
- `journal`: the on-disk list of running steps, re-announced after a restart.
- `outbox`: durable publishing that survives NATS being away (bounded, retried in order).
- `rpc`: the agent's request/reply verbs on NATS (`inject`, `check`, `check_cancel`).
- `job_creds`: each job's NATS credential, fetched from the controller and written for the
  job's user while its steps run on the node (agent.job_credentials_dir).

docs/agent.md describes the agent for operators and the SPANK socket protocol.
"""
