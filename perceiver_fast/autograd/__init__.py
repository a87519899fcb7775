"""torch.autograd.Functions over the fused kernels, one module per kernel family."""
