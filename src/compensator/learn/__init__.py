"""Block-wise learned quantization: a few parameters per block trained so that the quantized
block reproduces the FP block, then folded into plain weights (OmniQuant LWC/LET, LSI, SDE,
SSVQ). Handed a :class:`compensator.types.BlockContext`; drives no engine."""
