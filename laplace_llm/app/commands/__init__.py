"""The subcommands of ``laplace-llm``, one module each: ``demo``, ``fit``, ``evaluate``.

Each ``cmd_<name>(args)`` takes the parsed arguments (:mod:`laplace_llm.app.parser`) and
returns the exit status; :func:`laplace_llm.app.cli.main` dispatches to them.
"""
