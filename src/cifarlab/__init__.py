"""cifarlab: neural networks on CIFAR-10, from hand-written NumPy backprop to ConvNets."""

__version__ = "0.1.0"
