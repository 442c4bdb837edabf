"""Baseline: TorchServe's Hugging Face example handler, sequence classification only.

Reproduces the behaviour of ``examples/Huggingface_Transformers/Transformer_handler_generalized.py``
from pytorch/serve (Copyright (c) Facebook, Inc. and its affiliates; Apache License 2.0), the
handler TorchServe documents for serving and explaining Hugging Face classifiers (the ``ts``
package ships none). Re-written for this benchmark, keeping its behaviour and defaults:

- settings from the ``handler:`` section of the model config YAML (``max_length``,
  ``captum_explanation``, ``embedding_name``); the model from ``from_pretrained(model_dir)``;
  labels from ``index_to_name.json``;
- with ``captum_explanation: true`` every request body, on /predictions too, is a Python literal
  ``{'text': ..., 'target': ...}`` read with ``ast.literal_eval``;
- /predictions: each text padded to ``max_length`` (``max_length`` padding), one forward pass for
  the batch with autograd left on (the example does not disable it), the argmax label per request;
- /explanations: request 0 of the batch only (TorchServe's ``explain_handle``): a new captum
  ``LayerIntegratedGradients`` on ``model.<embedding_name>.embeddings`` per call, input
  ``[CLS] text [SEP]`` without padding against the baseline ``[CLS] [PAD]... [SEP]``, captum's
  defaults (n_steps 50, Gauss-Legendre, all steps in one pass), convergence delta returned;
  attributions summed over the hidden size and divided by their L2 norm; answers
  ``{"words", "importances", "delta"}``.

Trimmed: question answering, token classification, text generation, TorchScript loading,
model parallelism, FasterTransformer/BetterTransformer, the tokenizer download from the hub
(the tokenizer is read from the MAR) and debug prints. Adapted: ``encode_plus(...,
pad_to_max_length=True)``, removed in transformers 5, is the equivalent ``tokenizer(...,
padding="max_length", truncation=True)``.
"""
import ast
import json
import logging
import os

import torch
from captum.attr import LayerIntegratedGradients
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from ts.torch_handler.base_handler import BaseHandler

logger = logging.getLogger(__name__)


class TransformersSeqClassifierHandler(BaseHandler):
    def initialize(self, ctx):
        self.manifest = ctx.manifest
        properties = ctx.system_properties
        model_dir = properties.get("model_dir")
        gpu_id = properties.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu_id}" if torch.cuda.is_available() and gpu_id is not None else "cpu")
        self.setup_config = (ctx.model_yaml_config or {})["handler"]
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True)
        self.model.to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(
            model_dir, do_lower_case=self.setup_config.get("do_lower_case", True), local_files_only=True)
        self.model.eval()
        with open(os.path.join(model_dir, "index_to_name.json")) as f:
            self.mapping = json.load(f)
        self.initialized = True

    def _text(self, row):
        text = row.get("data")
        if text is None:
            text = row.get("body")
        if isinstance(text, (bytes, bytearray)):
            text = text.decode("utf-8")
        return text

    def preprocess(self, requests):
        input_ids, attention_mask = [], []
        for row in requests:
            text = self._text(row)
            if self.setup_config["captum_explanation"]:
                text = ast.literal_eval(text)["text"]
            inputs = self.tokenizer(text, max_length=int(self.setup_config["max_length"]), padding="max_length",
                                    truncation=True, add_special_tokens=True, return_tensors="pt")
            input_ids.append(inputs["input_ids"])
            attention_mask.append(inputs["attention_mask"])
        return torch.cat(input_ids).to(self.device), torch.cat(attention_mask).to(self.device)

    def inference(self, input_batch):
        input_ids, attention_mask = input_batch
        logits = self.model(input_ids, attention_mask)[0]
        return [self.mapping[str(row.argmax().item())] for row in logits]

    def postprocess(self, inference_output):
        return inference_output

    def get_insights(self, input_batch, text, target):
        embeddings = getattr(self.model, self.setup_config["embedding_name"]).embeddings
        lig = LayerIntegratedGradients(captum_sequence_forward, embeddings)
        if isinstance(text, (bytes, bytearray)):
            text = text.decode("utf-8")
        request = ast.literal_eval(text)
        input_ids, ref_input_ids, attention_mask = construct_input_ref(request["text"], self.tokenizer, self.device)
        tokens = [t.replace("Ġ", "") for t in self.tokenizer.convert_ids_to_tokens(input_ids[0].tolist())]
        attributions, delta = lig.attribute(inputs=input_ids, baselines=ref_input_ids, target=request["target"],
                                            additional_forward_args=(attention_mask, 0, self.model),
                                            return_convergence_delta=True)
        summed = attributions.sum(dim=-1).squeeze(0)
        summed = summed / torch.norm(summed)
        return [{"words": tokens, "importances": summed.tolist(), "delta": delta[0].tolist()}]


def construct_input_ref(text, tokenizer, device):
    text_ids = tokenizer.encode(text, add_special_tokens=False)
    input_ids = torch.tensor([[tokenizer.cls_token_id] + text_ids + [tokenizer.sep_token_id]], device=device)
    ref_input_ids = torch.tensor(
        [[tokenizer.cls_token_id] + [tokenizer.pad_token_id] * len(text_ids) + [tokenizer.sep_token_id]], device=device)
    return input_ids, ref_input_ids, torch.ones_like(input_ids)


def captum_sequence_forward(inputs, attention_mask=None, position=0, model=None):
    model.eval()
    model.zero_grad()
    return model(inputs, attention_mask=attention_mask)[position]
