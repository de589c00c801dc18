"""Export to, and import from, the Hugging Face transformers layout (Qwen3 / Qwen3-MoE)."""

from minimind.export.hf import (DTYPES, config_from_hf, export_hf, hf_config, hf_state_dict, import_hf,
                                read_hf_folder)

__all__ = ["DTYPES", "config_from_hf", "export_hf", "hf_config", "hf_state_dict", "import_hf",
           "read_hf_folder"]
