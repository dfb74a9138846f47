"""The ``cag`` command line: thin typer commands over the library."""
