"""Every list of choices a flag takes, in one torch-free module at the bottom of the package:
the config (flags), the data, the models and the devices all read them from here."""

PREPROCESSINGS = ("seed", "standard", "imagenet", "tf")  # cifarlab.data.Preprocess
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
ACTIVATIONS = ("elu", "relu", "tanh", "gelu")
NUMPY_ACTIVATIONS = ("elu", "relu", "tanh")  # the NumPy MLP has no GELU
NORMS = ("none", "batch", "layer")
# --norm layer's implementation (cifarlab.ops.layernorm): the autograd.Function with the hand-written
# backward (its C kernel or eager ops: CIFARLAB_LAYERNORM), the autograd-derived module, or torch's
LAYERNORMS = ("function", "autograd", "torch")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # cifarlab.training.devices.resolve_precision
