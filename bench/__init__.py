"""Sluice's benchmark, its load generators and its demo servers: tools that use the runtime.

Nothing in the runtime (``app``, ``api``, ``agents``, ``schemas``) imports this package;
``tests/unit/test_runtime_imports.py`` checks it. ``sluice bench`` reaches it through the
``sluice.commands`` entry point (see pyproject.toml), ``python -m bench`` runs the same command,
and ``sluice run`` starts :mod:`bench.demo_tools` as a process of its own.
"""
