"""Model-randomisation sanity check (Adebayo et al., 2018, "Sanity Checks for Saliency Maps").

An explanation that describes the model must change when the model's weights are
destroyed. The check explains fixed inputs for fixed classes (the classes the intact
model predicted), then randomises the weights *cascading from the top*: the block
nearest the output first, then the one below it as well, and so on until every block
is random, explaining the same inputs after each step. Each map is compared with the
intact model's map of the same input by **Spearman's rank correlation** (average ranks
for ties), at the map's own resolution (image cells, or a text's words).

- **Blocks** (:func:`cascade_blocks`): the modules that hold parameters and run in the
  model's forward pass, grouped by name at the first element of a layer list or a
  numbered layer (``layer4``, ``features.7``, ``bert.encoder.layer.11``,
  ``encoder.layers.encoder_layer_3``; a name without one is its own block:
  ``fc``, ``classifier``, ``bert.embeddings.word_embeddings``), ordered from the
  output down by when they first run.
- **Randomising** (:func:`randomise_block`): a module with PyTorch's own
  ``reset_parameters`` (convolutions, linear layers, norms, embeddings) is re-initialised
  by it, as a freshly built model would be (batch-norm statistics included); any other
  parameter is drawn from a normal distribution with the tensor's own mean and standard
  deviation. Draws are seeded per block and made on the CPU, so a run is reproducible on
  any device. The weights are restored afterwards.
- **Verdict** (:func:`verdict`): *pass* when, with every block randomised, the mean rank
  correlation is at most ``threshold`` (default 0.5) and it has fallen below the intact
  model's by at least ``threshold`` too; otherwise *fail*: the maps did not follow the
  model. Before any randomisation the inputs are explained a second time: that
  correlation (1 for a deterministic explainer) is the reference.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

DEFAULT_THRESHOLD = 0.5
_NUMBERED = re.compile(r"^\d+$|\D\d+$")  # "3" (a list element) or "layer4", "encoder_layer_3"


@dataclass(frozen=True)
class Block:
    """A group of modules randomised together: ``name`` and its parameter-holding ``modules``."""

    name: str
    modules: tuple[str, ...]


def block_name(module_name: str) -> str:
    """The block a module belongs to: its name up to the first numbered part (see module doc)."""
    if not module_name:
        return "(model)"
    parts = module_name.split(".")
    for i, part in enumerate(parts):
        if _NUMBERED.search(part):
            return ".".join(parts[:i + 1])
    return module_name


def _holds_parameters(module: torch.nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def cascade_blocks(model: torch.nn.Module, run_forward: Callable[[], object]) -> list[Block]:
    """The model's blocks, top (nearest the output) first.

    ``run_forward()`` makes the model run once (on any input); the modules holding
    parameters are ordered by the first time their forward starts, and modules that
    never run are left out (they cannot change an explanation).
    """
    order: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if _holds_parameters(module):
            def hook(_module, _args, name=name):
                order.setdefault(name, len(order))
            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for handle in handles:
            handle.remove()
    if not order:
        raise ValueError("no module holding parameters ran in the forward pass")
    blocks: dict[str, list[str]] = {}
    first: dict[str, int] = {}
    for name, position in sorted(order.items(), key=lambda item: item[1]):
        key = block_name(name)
        blocks.setdefault(key, []).append(name)
        first.setdefault(key, position)
    return [Block(key, tuple(blocks[key])) for key in sorted(blocks, key=lambda k: -first[k])]


def randomise_block(model: torch.nn.Module, block: Block, seed: int) -> None:
    """Re-initialise ``block``'s parameters in place (see module doc), deterministically for ``seed``."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for k, name in enumerate(block.modules):
            module = modules[name]
            module_seed = seed * 100_003 + k
            has_children = any(True for _ in module.children())
            if callable(getattr(module, "reset_parameters", None)) and not has_children:
                fresh = copy.deepcopy(module).to("cpu")
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(module_seed)
                    fresh.reset_parameters()
                new = dict(fresh.named_parameters(recurse=False)) | dict(fresh.named_buffers(recurse=False))
                for key, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                    if key in new:
                        tensor.copy_(new[key].to(tensor.device, tensor.dtype))
                continue
            generator = torch.Generator().manual_seed(module_seed)
            for _, tensor in module.named_parameters(recurse=False):
                values = tensor.detach().float().cpu()
                mean = float(values.mean())
                std = float(values.std()) if values.numel() > 1 else 0.0
                std = std if std > 0 else (abs(mean) or 1.0)
                draw = torch.randn(values.shape, generator=generator) * std + mean
                tensor.copy_(draw.to(tensor.device, tensor.dtype))


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values`` (flattened), ties sharing their average rank."""
    values = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size, dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < values.size:
        end = start + 1
        while end < values.size and sorted_values[end] == sorted_values[start]:
            end += 1
        ranks[order[start:end]] = (start + end + 1) / 2.0  # mean of ranks start+1 .. end
        start = end
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    """Spearman's rank correlation of two maps of the same shape.

    ``None`` when ``a`` is constant (no ranking to compare with); 0 when only ``b`` is
    constant (it keeps none of ``a``'s ranking).
    """
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"maps of different shapes: {a.shape} and {b.shape}")
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    na, nb = float(np.sqrt((ra * ra).sum())), float(np.sqrt((rb * rb).sum()))
    if na == 0:
        return None
    if nb == 0:
        return 0.0
    return float((ra * rb).sum() / (na * nb))


def _stage(label: str, randomised: Sequence[str], originals: Sequence[np.ndarray],
           maps: Sequence[np.ndarray]) -> dict:
    signed = [spearman(o, m) for o, m in zip(originals, maps)]
    absolute = [spearman(np.abs(o), np.abs(m)) for o, m in zip(originals, maps)]
    kept = np.array([r for r in signed if r is not None])
    kept_abs = np.array([r for r in absolute if r is not None])
    return {"block": label, "randomised": list(randomised), "n": int(kept.size),
            "mean": float(kept.mean()) if kept.size else None,
            "std": float(kept.std(ddof=1)) if kept.size > 1 else 0.0,
            "mean_abs": float(kept_abs.mean()) if kept_abs.size else None,
            "per_input": signed}


def verdict(stages: list[dict], threshold: float = DEFAULT_THRESHOLD) -> tuple[str, str]:
    """("pass" | "fail", why), from the stages of :func:`sanity_check` (first: no randomisation)."""
    reference, final = stages[0]["mean"], stages[-1]["mean"]
    if reference is None or final is None:
        return "fail", "no input had a non-constant map to compare"
    if final > threshold:
        return "fail", (f"with every block randomised the maps still correlate with the intact model's "
                        f"(mean rank correlation {final:.3f} > {threshold:g}): they do not depend on the weights")
    if reference - final < threshold:
        return "fail", (f"the rank correlation fell only from {reference:.3f} to {final:.3f} "
                        f"(less than {threshold:g})")
    return "pass", (f"mean rank correlation {final:.3f} <= {threshold:g} with every block randomised, "
                    f"down from {reference:.3f}")


RULE = ("pass when, with every block randomised, the mean Spearman rank correlation with the intact "
        "model's maps is at most {t:g} and at least {t:g} below the intact model's own (explained twice)")


def sanity_check(model: torch.nn.Module, explain: Callable[[], list[np.ndarray]], blocks: Sequence[Block],
                 seed: int = 0, threshold: float = DEFAULT_THRESHOLD,
                 progress: Optional[Callable[[str], None]] = None) -> dict:
    """Cascading randomisation of ``blocks`` (top first) and the rank correlation of each stage's maps.

    ``explain()`` explains the fixed inputs for their fixed classes on ``model`` as it is
    now, one map per input (image cells or word attributions). The model's weights and
    buffers are restored at the end, also after an error.
    """
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        originals = [np.asarray(m, dtype=np.float64) for m in explain()]
        stages = [_stage("(none: explained again)", [], originals, explain())]
        randomised: list[str] = []
        for index, block in enumerate(blocks):
            randomise_block(model, block, seed + index)
            randomised.append(block.name)
            stages.append(_stage(block.name, list(randomised), originals, explain()))
            if progress:
                progress(f"sanity: {block.name} randomised, mean rank correlation {stages[-1]['mean']}")
    finally:
        model.load_state_dict(saved)
    outcome, reason = verdict(stages, threshold)
    return {"rule": RULE.format(t=threshold), "threshold": threshold, "seed": seed,
            "inputs": len(originals), "constant_originals": sum(1 for r in stages[0]["per_input"] if r is None),
            "stages": stages, "verdict": outcome, "reason": reason}
