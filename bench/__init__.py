"""Sluice's benchmark, its load generators and its demo servers: tools that use the runtime.

Nothing in the runtime (``app``, ``api``, ``agents``, ``schemas``) imports this package;
``tests/unit/test_runtime_imports.py`` checks it. ``sluice bench`` becomes ``python -m bench``
(an exec in app/cli.py, with the same arguments), and ``sluice run`` starts :mod:`bench.demo_tools` as a process of its own.
"""
