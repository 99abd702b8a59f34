"""What the methods share: the contract (``base``), the registry, config errors, and the pieces
several methods build on (zeroth-order estimators, timestep samplers, quantized layers, the
denoising objective, text conditioning, training-image draws, atomic writes)."""
