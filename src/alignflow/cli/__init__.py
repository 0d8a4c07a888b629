"""The `alignflow` command line: thin commands over library calls."""
