"""The application on top of the library: the ``laplace-llm`` command, the demo, evaluation.

The dependency arrows run one way: these modules import the core (:mod:`laplace_llm`),
the core never imports them.

- :mod:`laplace_llm.app.cli`: the ``laplace-llm`` console script (``main``), its parser
  :mod:`laplace_llm.app.parser` and one module per command in
  :mod:`laplace_llm.app.commands` (``demo``, ``fit``, ``evaluate``);
- :mod:`laplace_llm.app.demo`: the offline calibration demonstration;
- :mod:`laplace_llm.app.evaluation`: MAP and Laplace predictions over a loader, scored.
"""
