"""torchserve-explain: explanations for TorchServe image and text classifiers.

Three rooms: :mod:`tsexplain.attr` (the maths), :mod:`tsexplain.serving` (requests,
settings, the batch flow and its runners; no TorchServe), and :mod:`tsexplain.tools`
(client, launcher, evaluation, synthetic data; never packed into a MAR). The
TorchServe handlers and the glue to TorchServe 0.12 are in ``handlers/``.
"""
