"""The decoding layer: paged KV caches (C++ block manager), the `switchkd_paged` attention function and
the SWITCH generator."""

from .generator import SwitchGenerator, SwitchOutput, switch_generate

__all__ = ["SwitchGenerator", "SwitchOutput", "switch_generate"]
