"""One module per `piip6b` sub-command; each defines `add_arguments(parser)` and `run(args) -> int`."""
