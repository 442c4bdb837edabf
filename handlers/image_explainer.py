"""ImageExplainer: TorchServe's image classifier with CAM and IG explanations.

``/predictions`` answers as the stock ``image_classifier`` does (``{label: prob}`` for
the top k); ``/explanations`` answers ``{"predictions": [...], "explanation": {...}}``
with a map computed on the model the worker loaded (README, "Image models"). The
work is :class:`tsexplain.serving.runners.image.ImageRunner`'s.

TorchServe's ``BaseHandler.initialize`` picks the device, reads ``index_to_name.json``
and calls its loading hooks: a model file takes ``_load_pickled_model``, a serialized
file alone ``_load_torchscript_model``. Both hooks load with
:func:`tsexplain.serving.models.load_image_model`, the function ``build_mar.sh`` loads
with too, which decides the kind of model (torchvision or timm name, Hugging Face
folder, model file and state dict, TorchScript) from the settings and the manifest.
"""
from ts.torch_handler.base_handler import BaseHandler

from ts_glue import ExplainHandler
from tsexplain.serving.models import load_image_model
from tsexplain.serving.runners.image import ImageRunner
from tsexplain.serving.schema import IMAGE


class ImageExplainer(ExplainHandler, BaseHandler):
    """Image classifier handler whose ``/explanations`` route serves CAM and IG maps."""

    modality = IMAGE

    def make_runner(self, context):
        self.model_dir = context.system_properties["model_dir"]
        BaseHandler.initialize(self, context)  # the device, the model (hooks below), index_to_name.json
        return ImageRunner(self.model, self.explained_copy(self.model), self.mapping, self.settings, self.device)

    def _load_pickled_model(self, model_dir, model_file, model_pt_path):
        return load_image_model(model_dir, self.manifest["model"], self.settings.handler, self.device)

    def _load_torchscript_model(self, model_pt_path):
        return load_image_model(self.model_dir, self.manifest["model"], self.settings.handler, self.device)
