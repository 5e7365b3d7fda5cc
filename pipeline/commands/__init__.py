"""CLI subcommands: each parses its arguments and calls one function."""
