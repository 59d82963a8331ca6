"""Benchmark: plain (materialised logits) vs chunked fused-linear sparse KD loss, forward+backward.

    python scripts/bench_loss.py                 # CPU: N=4096, H=1024, V in {32768, 131072}
    python scripts/bench_loss.py --vocabs 32768  # a quicker look

On a CUDA machine it also runs the GPU configuration (N=16384, H=4096, V=131072, bf16);
``--device cuda`` runs that one alone (``scripts/gpu_check.sh``).

Both sides compute the same loss (``kl`` with the tail bucket, k=64 teacher ids, every position
selected) and the gradients of hidden and weight. "plain" is ``hidden @ weight.T`` followed by
``logitcache.loss.kd_loss``; "fused" is ``logitcache.loss.fused_linear_kd_loss`` with its default
chunk size. Results are ratios fused/plain measured side by side in one run, since absolute times
on a shared machine mean little.

Peak memory is the peak of torch allocations during the call above what was allocated before
it (inputs and weights excluded, the produced gradients included): on CUDA
``torch.cuda.max_memory_allocated``; on CPU, which has no allocator statistics, the profiler's
allocation events (``profile_memory=True``), each of which carries the running total of bytes
allocated, so their maximum is the true peak of live tensor bytes, not a sampled RSS.

The last line of output is one JSON object: ``mem_ratio_v<V>`` and ``time_ratio_v<V>`` for each
vocab, ``device``, and the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from logitcache.loss import TopKTeacher, default_chunk_size, fused_linear_kd_loss, kd_loss


@dataclass
class Case:
    hidden: torch.Tensor
    weight: torch.Tensor
    teacher: TopKTeacher
    loss: str

    def clear(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None


def make_case(n: int, h: int, v: int, k: int, dtype: torch.dtype, device: str, loss: str) -> Case:
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = (torch.randn(n, h, generator=g) / h**0.25).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.25).to(device, dtype).requires_grad_()
    # k distinct ids per row without building an [N, V] tensor: a random start and stride.
    start = torch.randint(0, v, (n, 1), generator=g)
    ids = (start + torch.arange(k) * (v // k)) % v
    logprobs = torch.log_softmax(torch.randn(n, k + 1, generator=g) * 2, -1)[:, :k]
    teacher = TopKTeacher(ids.to(device), logprobs.to(device))
    return Case(hidden, weight, teacher, loss)


def run_plain(c: Case) -> None:
    logits = c.hidden @ c.weight.t()
    total, count = kd_loss(logits, c.teacher, loss=c.loss)
    (total / count).backward()


def run_fused(c: Case) -> None:
    total, count = fused_linear_kd_loss(c.hidden, c.weight, c.teacher, loss=c.loss)
    (total / count).backward()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_bytes(fn: Callable[[Case], None], c: Case, device: str) -> tuple[int, float]:
    """Peak bytes allocated above the baseline during ``fn(c)``, and its wall time."""
    c.clear()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn(c)
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base), time.perf_counter() - t0
    from torch._C._profiler import _EventType

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.perf_counter()
        fn(c)
        wall = time.perf_counter() - t0
    allocs: list[tuple[int, int, int]] = []

    def walk(e: object) -> None:
        if e.tag == _EventType.Allocation:  # type: ignore[attr-defined]
            f = e.extra_fields  # type: ignore[attr-defined]
            allocs.append((e.start_time_ns, f.alloc_size, f.total_allocated))  # type: ignore[attr-defined]
        for child in e.children:  # type: ignore[attr-defined]
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    if not allocs:
        raise RuntimeError("the profiler recorded no allocations; cannot measure CPU memory")
    allocs.sort()
    base = allocs[0][2] - allocs[0][1]
    return int(max(total for _, _, total in allocs) - base), wall


def seconds(fn: Callable[[Case], None], c: Case, device: str) -> float:
    c.clear()
    _sync(device)
    t0 = time.perf_counter()
    fn(c)
    _sync(device)
    return time.perf_counter() - t0


def bench(c: Case, device: str, reps: int) -> dict[str, float]:
    mem_plain, t0_plain = peak_bytes(run_plain, c, device)  # doubles as warm-up
    mem_fused, t0_fused = peak_bytes(run_fused, c, device)
    # The profiled runs count as timed runs too: the profiler costs little on a handful of huge
    # ops (compare time_*_profiled_s with the others), and the minimum over runs is the figure
    # least disturbed by other load on a shared machine.
    t_plain: list[float] = [t0_plain]
    t_fused: list[float] = [t0_fused]
    for _ in range(reps):  # interleaved, so load changes on a shared machine hit both sides
        t_plain.append(seconds(run_plain, c, device))
        t_fused.append(seconds(run_fused, c, device))
    c.clear()
    return {
        "mem_plain_mib": mem_plain / 2**20,
        "mem_fused_mib": mem_fused / 2**20,
        "time_plain_profiled_s": t0_plain,
        "time_fused_profiled_s": t0_fused,
        "time_plain_s": min(t_plain),
        "time_fused_s": min(t_fused),
        "mem_ratio": mem_fused / mem_plain,
        "time_ratio": min(t_fused) / min(t_plain),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocabs", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--loss", default="kl")
    ap.add_argument(
        "--reps", type=int, default=1, help="timed repetitions (min); V > 32768 does one fewer"
    )
    ap.add_argument("--no-gpu", action="store_true", help="skip the GPU configuration")
    ap.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: CPU figures, then the GPU configuration when CUDA is there; "
        "cuda: the GPU configuration (N=16384, H=4096, V=131072, bf16) alone",
    )
    args = ap.parse_args()

    result: dict[str, object] = {
        "device": "cpu",
        "loss": args.loss,
        "threads": torch.get_num_threads(),
    }
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    for v in args.vocabs if args.device != "cuda" else []:
        c = make_case(args.tokens, args.hidden, v, args.k, torch.float32, "cpu", args.loss)
        r = bench(c, "cpu", args.reps if v <= 32768 else max(0, args.reps - 1))
        del c
        print(
            f"cpu N={args.tokens} H={args.hidden} V={v} chunk={default_chunk_size(v)}: "
            + ", ".join(f"{k}={x:.3f}" for k, x in r.items()),
            flush=True,
        )
        result[f"mem_ratio_v{v}"] = round(r["mem_ratio"], 4)
        result[f"time_ratio_v{v}"] = round(r["time_ratio"], 4)
        result[f"cpu_v{v}"] = {k: round(x, 4) for k, x in r.items()}
    if torch.cuda.is_available() and not args.no_gpu and args.device != "cpu":
        v = 131072
        c = make_case(16384, 4096, v, args.k, torch.bfloat16, "cuda", args.loss)
        r = bench(c, "cuda", 5)
        del c
        print(
            "cuda N=16384 H=4096 V=131072 bf16: " + ", ".join(f"{k}={x:.3f}" for k, x in r.items()),
            flush=True,
        )
        # The GPU configuration is the headline when there is one; CPU figures stay under cpu_v*.
        result["device"] = torch.cuda.get_device_name()
        result[f"mem_ratio_v{v}"] = round(r["mem_ratio"], 4)
        result[f"time_ratio_v{v}"] = round(r["time_ratio"], 4)
        result[f"cuda_v{v}"] = {k: round(x, 4) for k, x in r.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
