"""The commands, one module each, as Python functions: ``boost``, ``calibrate``, ``distill``, ``eval``,
``ensemble``, ``info``, ``push`` and ``demo``.

Each one declares the options it takes (a :class:`posthoc.options.CommandOptions`, from which the command
line is generated), prepares its models and data with :func:`posthoc.pipeline.prepare`, does its own
work with the primitives below it, and returns a summary the command line prints.
"""
