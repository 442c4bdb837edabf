"""Model file of MARs built from a torchvision architecture name.

The explainer handlers build the architecture named in the model config's
``handler.architecture`` with ``tsexplain.serving.models.build_torchvision_classifier``
and load the MAR's serialized state dict into it; this file holds no class.
"""
