"""Straightforward reference CAMs for the tests: a fresh copy of the model, a plain
forward hook, a full forward with autograd on, ``loss.backward()``, and the
formulas written out in NumPy the way pytorch-grad-cam writes them."""
from __future__ import annotations

import copy

import numpy as np
import torch


def vit_reshape(tensor, height, width, prefix_tokens=1):
    # pytorch-grad-cam's documented ViT reshape_transform (which drops one class token).
    result = tensor[:, prefix_tokens:, :].reshape(tensor.size(0), height, width, tensor.size(2))
    return result.transpose(2, 3).transpose(1, 2)


def swin_reshape(tensor):
    return tensor.permute(0, 3, 1, 2)


def captured_activations_and_gradients(model, layer_name, inputs, targets, contrasts=None, reshape=None):
    """Activations and gradients of ``layer_name`` on a fresh copy of ``model``, as NumPy."""
    model = copy.deepcopy(model)
    layer = dict(model.named_modules())[layer_name]
    saved = {}

    def keep(_m, _a, out):
        out.retain_grad()
        saved["act"] = out
        return out.clone()  # in-place ops after the layer (DenseNet's ReLU) leave the saved activation as it was

    handle = layer.register_forward_hook(keep)
    try:
        logits = model(inputs.clone())
    finally:
        handle.remove()
    loss = sum(logits[row, t] for row, t in enumerate(targets))
    if contrasts is not None:
        loss = loss - sum(logits[row, c] for row, c in enumerate(contrasts) if c is not None)
    model.zero_grad()
    loss.backward()
    act, grad = saved["act"], saved["act"].grad
    if reshape is not None:
        act, grad = reshape(act), reshape(grad)
    return logits.detach(), act.detach().numpy().astype(np.float64), grad.detach().numpy().astype(np.float64)


def gradcam_np(acts, grads):
    weights = np.mean(grads, axis=(2, 3))
    return np.sum(weights[:, :, None, None] * acts, axis=1)


def gradcam_pp_np(acts, grads):
    # pytorch-grad-cam's GradCAMPlusPlus.get_cam_weights
    grads_power_2 = grads ** 2
    grads_power_3 = grads_power_2 * grads
    sum_activations = np.sum(acts, axis=(2, 3))
    eps = 0.000001
    aij = grads_power_2 / (2 * grads_power_2 + sum_activations[:, :, None, None] * grads_power_3 + eps)
    aij = np.where(grads != 0, aij, 0)
    weights = np.maximum(grads, 0) * aij
    weights = np.sum(weights, axis=(2, 3))
    return np.sum(weights[:, :, None, None] * acts, axis=1)


def layercam_np(acts, grads):
    # pytorch-grad-cam's LayerCAM
    return np.sum(np.maximum(grads, 0) * acts, axis=1)


REFERENCE = {"gradcam": gradcam_np, "gradcam++": gradcam_pp_np, "layercam": layercam_np}


def normalized(cams):
    cams = np.maximum(cams, 0)
    low = cams.min(axis=(1, 2), keepdims=True)
    span = cams.max(axis=(1, 2), keepdims=True) - low
    return np.where(span > 0, (cams - low) / np.where(span > 0, span, 1), 0)


def reference_maps(method, model, layer_name, inputs, targets, contrasts=None, reshape=None):
    """(logits, pre-ReLU maps, normalised maps) of ``method`` computed the plain way."""
    logits, acts, grads = captured_activations_and_gradients(model, layer_name, inputs, targets, contrasts, reshape)
    raw = REFERENCE[method](acts, grads)
    return logits, torch.from_numpy(raw).float(), torch.from_numpy(normalized(raw)).float()
