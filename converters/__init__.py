"""Converters: find sparse factors of a dense model's linear layers (the "frontend").

The frontend never knows about storage formats or kernels: its output is a dict of
factor pairs as dense-with-zeros tensors, the only contract with the packers.
"""
