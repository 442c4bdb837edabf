"""TextExplainer: Hugging Face sequence classifiers with Layer Integrated Gradients,
gradient x input or word occlusion (chosen per request among ``explain.methods``).

The MAR carries a ``save_pretrained`` folder (model and fast tokenizer); nothing is
fetched from a hub. ``/predictions`` answers ``{label: probability}``;
``/explanations`` answers ``{"predictions": [...], "explanation": {...}}`` with
per-token and per-word attributions (README, "Text models"). The work is
:class:`tsexplain.serving.runners.text.TextRunner`'s.
"""
import copy
from pathlib import Path

from ts_glue import ExplainHandler, worker_device
from tsexplain.serving.models import load_text_classifier
from tsexplain.serving.runners.text import TextRunner
from tsexplain.serving.schema import TEXT


class TextExplainer(ExplainHandler):
    """Text classifier handler whose ``/explanations`` route serves Layer IG,
    gradient x input or word occlusion."""

    modality = TEXT

    def make_runner(self, context):
        device = worker_device(context)
        model_dir = Path(context.system_properties["model_dir"])
        model, tokenizer = load_text_classifier(model_dir / self.settings.handler.model_path, device)
        self.model = model
        # a fast tokenizer is not safe to call from two threads at once (its padding state is shared)
        explained_tokenizer = copy.deepcopy(tokenizer) if self.concurrent else tokenizer
        return TextRunner(model, tokenizer, self.explained_copy(model), explained_tokenizer, self.settings, device)
