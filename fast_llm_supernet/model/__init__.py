"""The PyTorch reference model: the four mixers (`attention`, `gdn`, `kda`, their math in `ops`), the supernet
(`supernet`), token choice in `generate` (`generation`) and checkpoint I/O (`checkpoint`)."""

from fast_llm_supernet.model.supernet import SupernetCaches, SupernetForCausalLM, SupernetOutput, build_mixer

__all__ = ["SupernetCaches", "SupernetForCausalLM", "SupernetOutput", "build_mixer"]
