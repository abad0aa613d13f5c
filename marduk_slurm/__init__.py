"""marduk-slurm: runtime monitoring and control for TorchFT training on Slurm GPU clusters.

Three layers, one folder each:

- ``domain``: pure logic with no I/O (messages, fault policy, hostlists, config revisions).
- ``adapters``: one module per real system (NATS, SQLite, Slurm, NVML, systemd, torchft).
- the apps that wire them together: ``controller`` (the daemon), ``agent`` (per node),
  ``runtime`` (inside training) and ``cli`` (the ``marduk`` command).
"""

__version__ = "0.1.0"
