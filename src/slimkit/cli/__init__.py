"""The `slimkit` command line (typer). Technique packages add subcommands via `<pkg>/cli.py`."""
