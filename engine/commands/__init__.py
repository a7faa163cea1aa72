"""The command line's layer: one module per ``clipdistill`` command, each with ``register(subparsers)``.

Nothing below this layer imports it (tests/test_layers.py checks). A command parses its flags,
calls the library with plain arguments and prints what it returns.
"""
