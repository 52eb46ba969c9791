"""Layer 3 of dgemma: generation over any backend. The canvas sampler (transformers' DiffusionGemma generate,
token for token) and infill templates. Imports dgemma.core, dgemma.model and dgemma.runtime.base."""
