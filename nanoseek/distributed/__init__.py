"""Scale-out on torch.distributed: expert parallelism, pipeline parallelism (DualPipeV), ZeRO-1 data parallelism.

The model stays a plain ``nn.Module``; everything here is applied to a built model in one place.
"""
