"""Scale-out on torch.distributed: process topology, expert parallelism, distributed checkpoints, memory."""
