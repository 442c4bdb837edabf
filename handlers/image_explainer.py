"""ImageExplainer: TorchServe's image classifier with CAM and IG explanations.

``/predictions`` answers as the stock ``image_classifier`` does (``{label: prob}`` for
the top k); ``/explanations`` answers ``{"predictions": [...], "explanation": {...}}``
with a map computed on the model the worker loaded (README, "Image models"). The
work is :class:`tsexplain.serving.runners.image.ImageRunner`'s; TorchServe's own
``BaseHandler`` loads the model (a model file, TorchScript, or a torchvision
architecture named in ``handler.architecture``).
"""
from ts.torch_handler.base_handler import BaseHandler

from ts_glue import ExplainHandler
from tsexplain.serving.models import build_torchvision_classifier
from tsexplain.serving.runners.image import ImageRunner
from tsexplain.serving.schema import IMAGE


class ImageExplainer(ExplainHandler, BaseHandler):
    """Image classifier handler whose ``/explanations`` route serves CAM and IG maps."""

    modality = IMAGE

    def make_runner(self, context):
        BaseHandler.initialize(self, context)  # the model, the device, index_to_name.json
        return ImageRunner(self.model, self.explained_copy(self.model), self.mapping, self.settings, self.device)

    def _load_pickled_model(self, model_dir, model_file, model_pt_path):
        architecture = self.settings.handler.architecture
        if not architecture:
            return super()._load_pickled_model(model_dir, model_file, model_pt_path)
        return build_torchvision_classifier(architecture, self.settings.handler.num_classes or 1000, model_pt_path,
                                            self.device)
