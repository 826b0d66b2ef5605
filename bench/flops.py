"""What the benchmarks hold FLOPs against: a device's matmul rate and the weights in a model's matmuls."""
import time

import torch


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device="cpu", n=2048, dtype=torch.float32, reps=5, rounds=5):
    """Best-of-rounds FLOP/s of torch.mm(n x n, n x n) in `dtype` on `device` (on CPU: this process's threads)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    sync(device)
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        sync(device)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
    return best


def matmul_params(model):
    """N of the 2 N FLOPs per token of a forward: the weights of every linear layer, the LM head included
    (tied or not), no embeddings."""
    head = model.get_output_embeddings()
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    return body + head.weight.numel()
