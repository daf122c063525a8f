"""The decoding layer: paged KV caches (C++ block manager), the `switchkd_paged` attention function, the
SWITCH generator (a ladder of small steps) and its static-shape, CUDA-graph path."""

from .generator import SwitchGenerator, SwitchOutput, output_vocab_size, switch_generate
from .state import DecodeStats

__all__ = ["DecodeStats", "SwitchGenerator", "SwitchOutput", "output_vocab_size", "switch_generate"]
