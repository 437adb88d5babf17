"""One module per ``recdistill`` subcommand group.

Each module defines ``add_commands(subparsers, with_config)``; ``pipelines.cli`` discovers them,
so adding a command is one new file here.
"""
