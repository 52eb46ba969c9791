"""Stage `make quantize`: ModelOpt FP8 / NVFP4 on the native model (recipe), calibration through both passes
(calibrate), the quantized checkpoint in ModelOpt's unified-HF layout (writer), the quality report against the
unquantized model (quality) and the stage itself (stage.run). Reads a checkpoint; writes quantize/<precision>/."""
