"""Serving: everything between a request's bytes and its answer, without TorchServe.

- :mod:`.schema`: the ONE table of request fields (parsing, bounds, defaults, override rights).
- :mod:`.settings`: the model config's ``handler:`` and ``explain:`` sections, validated at load.
- :mod:`.errors`: every error type a client can get, and its status (the only place statuses live).
- :mod:`.policy`: who may get an explanation (the gate).
- :mod:`.models`: loading a MAR's model, the same at build time and in the worker; :mod:`.probe`: the
  build's check (a MAR loaded and explained as the worker will).
- :mod:`.cache`, :mod:`.deadline`, :mod:`.kserve`, :mod:`.concurrency`, :mod:`.images`.
- :mod:`.flow`: one batch, as an explicit :class:`~.flow.Batch`, through parse, gate, cache,
  forward, explain, render and the audit records.
- :mod:`.tokens`, :mod:`.audit`, :mod:`.recording`: named explain tokens, the audit trail, and the
  flow's recording step (every served explanation recorded before its answer is released).
- :mod:`.runners`: what differs between images and text (preprocess, forward, explain, render).

TorchServe itself is touched only in ``handlers/ts_glue.py``.
"""
