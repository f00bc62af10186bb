"""The `esper` command line: the root Typer app, global options, and errors -> exit codes."""
