"""The maths: attribution methods on plain PyTorch models, with captum.

No serving code and no TorchServe here; errors are plain exceptions
(:mod:`tsexplain.attr.errors` for bad inputs, ``ValueError`` for bad arguments).
Importing this package imports nothing heavy: each method's module pulls in
captum when it is imported itself.

- :mod:`.names`: the enums every layer above shares (methods, rules, layouts).
- :mod:`.layers`: which layer to explain and how its output lies on a grid.
- :mod:`.cam`: Grad-CAM, Grad-CAM++ and LayerCAM, fused with the prediction forward.
- :mod:`.image_ig`: Integrated Gradients on image inputs or layers.
- :mod:`.text`: Layer IG, gradient x input and occlusion for text classifiers.
"""
