"""Pure metric maths over predictions (classification, intervals, SSIM, cross-domain tables) and result files."""
