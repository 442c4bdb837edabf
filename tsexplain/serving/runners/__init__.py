"""Runners: the model-specific steps of the batch flow, one module per kind of input.

A runner (:class:`~.base.Runner`) prepares a request's input, runs the prediction
forward for the batch (with the explanations it can fuse into it), explains groups
of requests, and renders an explanation as JSON. Everything else (parsing, the
gate, the cache, deadlines, failures, answers, KServe) is the flow's, shared by
every runner: a third kind of input is a new runner, not a new batch loop.
"""
