"""The ``factscope`` commands that draw HTML or run notebooks; :mod:`widgets.cli` registers them
with the engine's command line (:func:`tracer.cli.main`'s ``extra_commands``).

- :mod:`widgets.commands.report`: ``factscope report`` (trace, edit, check; one offline HTML file).
- :mod:`widgets.commands.export`: ``factscope export`` (notebooks to offline HTML).
- :mod:`widgets.commands.averages`: ``--html`` of ``factscope averages`` and ``factscope trace-dataset``.
- :mod:`widgets.commands.eval_table`: ``--html`` of ``factscope eval-table`` on the page template.
- :mod:`widgets.commands.health`: ``factscope health-page`` (a sequential-editing run's health page).
"""
