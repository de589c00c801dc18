"""Inference: sampling, the batched KV-cache generation engine, YaRN switch and terminal chat."""

from minimind.infer.engine import GenerationEngine, GenerationResult, TextStream, TokenEvent
from minimind.infer.sampling import (
                                     SamplingParams,
                                     apply_repetition_penalty,
                                     sample_next,
                                     seen_token_mask,
                                     top_k_filter,
                                     top_p_filter,
)
from minimind.infer.yarn import enable_yarn

__all__ = [
                                     "GenerationEngine",
                                     "GenerationResult",
                                     "SamplingParams",
                                     "TextStream",
                                     "apply_repetition_penalty",
                                     "enable_yarn",
                                     "sample_next",
                                     "seen_token_mask",
                                     "top_k_filter",
                                     "top_p_filter",
]
