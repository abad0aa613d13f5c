"""The `marduk` command: a thin layer over the library, in scontrol's idiom.

`main` parses arguments, `client` talks to the controller over NATS request/reply, and
`render` prints tables (or JSON with --json). Domain errors become one clear line on stderr
and a non-zero exit status.
"""
