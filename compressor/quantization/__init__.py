"""Quantization support shared by int8, int16 and the tuner: calibration observers (`calibration`),
parameter maths (`params`), the plan of what is quantized (`plan`), the int8 QDQ rewrite and its
config (`int8`), and per-layer sensitivity with the mixed-precision search (`sensitivity`).

Part of the core: it imports neither passes nor backends.
"""
