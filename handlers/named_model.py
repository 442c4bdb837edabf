"""Model file of MARs whose model is named in the model config's ``handler:`` section
(``architecture``: torchvision, ``timm``, ``model_path``: a Hugging Face folder).

It holds no class: it is there so that TorchServe's ``BaseHandler`` takes the eager
path (``_load_pickled_model``), where the explainer handlers load the model with
``tsexplain.serving.models.load_image_model``.
"""
