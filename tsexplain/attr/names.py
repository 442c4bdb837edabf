"""The names every room shares: methods, integration rules, precisions, layouts.

Defined once here (no imports, so the request schema and the settings can use
them without importing torch or captum).
"""

# Image methods. The CAM family shares the prediction's forward pass; the IG family
# costs n_steps forward and backward passes per request.
CAM_METHODS = ("gradcam", "gradcam++", "layercam")
IMAGE_IG_METHODS = ("layer_ig", "integrated_gradients")
IMAGE_METHODS = CAM_METHODS + IMAGE_IG_METHODS

# Text methods: Layer IG integrates; the others take one backward pass or one
# forward pass per word.
TEXT_METHODS = ("layer_ig", "grad_x_input", "occlusion")
INTEGRATING_METHODS = ("layer_ig", "integrated_gradients")  # the methods that take n_steps

# captum's integration rules; Gauss-Legendre converges much faster than the Riemann ones.
INTEGRATION_METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")

# Text baselines: every content token replaced by this special token ("auto": the family's, else PAD).
BASELINES = ("auto", "pad", "unk", "mask")

# Autocast precision of the path's forward passes (fp16 on CUDA only; auto: bf16 where supported).
PRECISIONS = ("fp32", "bf16", "fp16", "auto")

# How a layer lays out its output: CNN maps, channels-last maps (Swin), ViT tokens (class token first).
LAYOUTS = ("nchw", "nhwc", "tokens")

MAX_TEXT_N_STEPS = 1024  # integration steps one text explanation may take
