"""The subcommands: explain, render, debug, merge, evaluate, analyze/virelay, export."""
