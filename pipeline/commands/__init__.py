"""Sub-commands of the CLI: each module exposes `add_arguments(parser)` and `run(args) -> int`."""
