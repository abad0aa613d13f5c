"""Domain layer: pure values and decisions, no I/O, no adapters imported.

Messages of the wire protocol, the GPU fault policy, Slurm hostlists, node states, config
revisions, straggler statistics and the fault timeline live here, testable with plain values.
"""
