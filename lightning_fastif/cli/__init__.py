"""The ``lightning-fastif`` command: ``app`` (the LightningCLI subclass and ``main``), ``commands`` (the bodies of
the subcommands), ``inputs`` (datasets, checkpoints, query selection), ``support`` (one-line errors, resume),
``correct`` (the ``correct`` subcommand) and ``demo``."""
