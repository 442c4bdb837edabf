"""TorchServe's stock ``image_classifier`` with the model's own input size.

The stock handler resizes every image to 256 and crops 224. For a model
trained at another size (the 64x64 ``shapes`` demo) that would make the
baseline do ~12x the work of the model's real input, so this subclass only
replaces ``image_processing`` with ``Resize(size), CenterCrop(size)`` read from
``image_size`` in the model config YAML. Everything else (decoding, batching,
``postprocess``, the captum IntegratedGradients explain path with n_steps 15)
is TorchServe's code, inherited unchanged.
"""
from torchvision import transforms
from ts.torch_handler.image_classifier import ImageClassifier


class SizedImageClassifier(ImageClassifier):
    def initialize(self, context):
        size = int((getattr(context, "model_yaml_config", None) or {}).get("image_size", 224))
        self.image_processing = transforms.Compose([
            transforms.Resize(size),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ])
        super().initialize(context)
