"""Training throughput, peak memory and MFU of the trainers library on one GPU, without Ray.

    python benchmarks/gpu_throughput.py [--json results.json] [--peak-tflops 989]
    python benchmarks/gpu_throughput.py --tiny          # a tiny model, CPU if no GPU: checks the script

A random-init Llama-style model (default: hidden 1024, 32 layers, 16 heads, MLP 2816, vocab
32000; the parameter count is printed) is saved as bf16 safetensors and trained through the
library's own path - `trainers.model.load_base_model` (bf16, or nf4 for QLoRA), the method
registry, `trainers.training.train_loop` - on full rows of random tokens, for full fine-tuning,
LoRA (r=16, all linear layers) and QLoRA (nf4 base, bf16 compute; needs bitsandbytes, else
"skipped: bitsandbytes missing").

--batching: `full` (default) trains on full rows of random tokens; `padded` on examples of random
lengths (seq_len/8 to seq_len tokens) padded to each micro-batch's longest; `padding_free` on the
same examples as data.packing=padding_free trains them, one unpadded row of batch_size x seq_len
tokens per micro-batch (with --attn flash_attention_2, flash-attention's varlen kernels get the
example boundaries). tokens/s counts the examples' own tokens, never padding, so `padded` and
`padding_free` compare directly. --attn: model.attn_implementation (default sdpa).

tokens/s: median over the steps after --warmup-steps (train_loop logs every step, and its
per-step loss.item() synchronises the GPU). Peak memory: torch.cuda.max_memory_allocated from
before the model is loaded (weights, gradients, optimizer state, activations). MFU = tokens/s x
FLOP/token / peak. FLOP/token counts the weight matmuls (`train_flops_per_token`): 2 per weight
forward and 2 for the input gradient, plus 2 for the weight gradient of trained weights - 6N for
full fine-tuning, 4N of the frozen base + 6x the adapter's for LoRA/QLoRA, N = the weights of the
linear layers (the input embedding is a lookup, not a matmul). Attention's own FLOPs (~12 x layers
x hidden x seq per token) are left out, as is customary. tests/test_benchmarks.py checks the count
against torch.utils.flop_counter.
--peak-tflops: the device's dense bf16 peak (H100/H200 SXM: 989).

Imports nothing of Ray, Hydra, MLflow, TRL or datasets (the config is built from
trainers.config's dataclasses), so it runs on a bare GPU box with torch, transformers and peft.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FULL_SIZE = dict(hidden_size=1024, num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=16,
                 intermediate_size=2816, vocab_size=32000)
TINY_SIZE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=128, vocab_size=512)  # 4-bit CPU kernels want multiples of 64
METHODS = ("full", "lora", "qlora")
ABSENT_ON_GPU_BOX = ("ray", "hydra", "mlflow", "trl", "datasets")
LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4}
BATCHINGS = ("full", "padded", "padding_free")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model and budget: checks the script (CPU ok)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch-size", type=int, default=None, help="rows per step (default 8; tiny 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 1024; tiny 64)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default 30; tiny 6)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="steps left out of tokens/s (default 5; tiny 2)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA/QLoRA rank")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the device, TFLOP/s")
    parser.add_argument("--compile", action="store_true", help="train.compile=true")
    parser.add_argument("--liger", action="store_true", help="train.liger=true (needs liger-kernel)")
    parser.add_argument("--batching", choices=BATCHINGS, default="full",
                        help="full rows | padded examples of random lengths | the same as padding-free rows")
    parser.add_argument("--attn", default="sdpa", help="model.attn_implementation: sdpa | eager | "
                                                       "flash_attention_2 | flex_attention")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    for key, full, tiny in (("batch_size", 8, 4), ("seq_len", 1024, 64), ("steps", 30, 6), ("warmup_steps", 5, 2)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    if args.warmup_steps >= args.steps:
        parser.error("--warmup-steps must be below --steps")
    return args


class StepRecorder:
    """A tracker (trainers.tracking.Tracker's methods) keeping each logged train/tokens_per_s."""

    def __init__(self):
        self.tokens_per_s: list[float] = []

    def log_metrics(self, metrics, step=None):
        if "train/tokens_per_s" in metrics:
            self.tokens_per_s.append(metrics["train/tokens_per_s"])

    def log_artifacts(self, local_dir, artifact_path):
        pass


def save_random_model(size: dict, directory: Path) -> int:
    """A random-init Llama saved as bf16 safetensors; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**size, max_position_embeddings=4096, tie_word_embeddings=False, use_cache=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(directory), safe_serialization=True)
    return n_params


def train_flops_per_token(model) -> int:
    """Matmul FLOPs of one token's forward and backward through `model` (the method applied):
    (4 + 2 if trained) x in x out per linear layer. bitsandbytes' 4-bit layers are nn.Linear with
    the logical in/out features, so QLoRA counts as LoRA. Slightly high for the first layer's
    projections, whose input (the frozen embedding) needs no gradient."""
    import torch

    return sum((6 if m.weight.requires_grad else 4) * m.in_features * m.out_features
               for m in model.modules() if isinstance(m, torch.nn.Linear))


def experiment(args, method: str, model_dir: Path, use_gpu: bool):
    """The trial config, straight from the dataclasses (no Hydra), checked like any other."""
    from trainers.config import ConfigError, DataConfig, ExperimentConfig, ModelConfig, PrecisionConfig, TrainConfig
    from trainers.methods.full import FullConfig
    from trainers.methods.lora import LoraConfig
    from trainers.methods.qlora import QLoraConfig
    from trainers.recipes.sft import SftConfig
    from trainers.validate import check

    method_cfg = {"full": FullConfig(), "lora": LoraConfig(r=args.rank, alpha=2.0 * args.rank),
                  "qlora": QLoraConfig(r=args.rank, alpha=2.0 * args.rank)}[method]
    precision = PrecisionConfig(name="nf4" if method == "qlora" else "bf16", compute_dtype="bf16")
    cfg = ExperimentConfig(
        model=ModelConfig(name_or_path=str(model_dir), attn_implementation=args.attn),
        data=DataConfig(train_file="random-tokens", eval_file=None, max_seq_len=args.seq_len,
                        packing="padding_free" if args.batching == "padding_free" else False),
        method=method_cfg, precision=precision, stage=SftConfig(),
        train=TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=LR[method], log_every=1,
                          checkpoint_every=0, use_gpu=use_gpu, compile=args.compile, liger=args.liger,
                          warmup_ratio=0.0, scheduler="constant"),
    )
    problems = check(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def random_rows(n: int, seq_len: int, vocab: int, seed: int = 0, varied: bool = False):
    """n examples of random tokens: all seq_len long, or (varied) seq_len/8 to seq_len."""
    import torch

    from trainers.data import Example

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq_len), generator=generator).tolist()
    lengths = torch.randint(max(2, seq_len // 8), seq_len + 1, (n,), generator=generator).tolist() if varied \
        else [seq_len] * n
    return [Example(row[:k], row[:k], f"random:{i}") for i, (row, k) in enumerate(zip(ids, lengths))]


def batches_and_loss(args, cfg, rows, device):
    """What train_loop draws micro-batches from, its train config and loss, per --batching."""
    import dataclasses

    from trainers.config import VARLEN_ATTENTION
    from trainers.data import DatasetStats, padding_free_rows
    from trainers.training import causal_lm_loss

    if args.batching != "padding_free":
        return rows, cfg.train, causal_lm_loss(0, device)
    free = padding_free_rows(rows, cfg.data.token_budget(cfg.train.batch_size), "error", 0, DatasetStats())
    varlen = cfg.model.attn_implementation in VARLEN_ATTENTION
    return free, dataclasses.replace(cfg.train, batch_size=1), causal_lm_loss(0, device, varlen=varlen)


def measure(args, method: str, model_dir: Path, vocab: int, device) -> dict:
    import torch

    from trainers.methods import METHODS as REGISTRY
    from trainers.model import count_parameters, load_base_model
    from trainers.runtime import DistInfo, PeakMemory
    from trainers.training import train_loop

    if method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        return {"method": method, "skipped": "bitsandbytes missing"}
    cfg = experiment(args, method, model_dir, device.type == "cuda")
    torch.manual_seed(0)
    peak = PeakMemory(device)
    peak.start()
    started = time.perf_counter()
    model = REGISTRY[method].apply(load_base_model(cfg, device), cfg)
    trainable, _ = count_parameters(model)
    flops_per_token = train_flops_per_token(model)
    recorder = StepRecorder()
    rows = random_rows(max(64, args.batch_size * 4), args.seq_len, vocab, varied=args.batching != "full")
    batches, train, loss_fn = batches_and_loss(args, cfg, rows, device)
    train_loop(model, batches, train, 0, device, DistInfo(), recorder, loss_fn=loss_fn)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak_bytes = peak.peak_bytes()
    tokens_per_s = statistics.median(recorder.tokens_per_s[args.warmup_steps:])
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"method": method, "trainable_params": trainable, "tokens_per_s": tokens_per_s,
            "peak_bytes": peak_bytes, "flops_per_token": flops_per_token,
            "mfu": tokens_per_s * flops_per_token / (args.peak_tflops * 1e12),
            "wall_s": time.perf_counter() - started}


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    use_gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    if not use_gpu and not args.tiny:
        print("no CUDA device: the full-size run is for a GPU (use --tiny to check the script on CPU)",
              file=sys.stderr)
        return 2
    size = TINY_SIZE if args.tiny else FULL_SIZE
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name(device) if use_gpu else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        n_params = save_random_model(size, Path(tmp))
        print(f"model: random-init Llama {size}, {n_params:,} parameters ({n_params / 1e9:.3f} B); "
              f"device {device_name}; batch {args.batch_size} x {args.seq_len} tokens ({args.batching}, "
              f"attention {args.attn}); {args.steps} steps "
              f"({args.warmup_steps} warm-up); peak {args.peak_tflops:g} TFLOP/s; torch {torch.__version__}",
              flush=True)
        results = []
        for method in methods:
            try:
                results.append(measure(args, method, Path(tmp), size["vocab_size"], device))
            except Exception as err:  # one method failing (OOM, a kernel missing) still reports the others
                results.append({"method": method, "skipped": f"{type(err).__name__}: {str(err).splitlines()[0]}"})
            print(f"  {method}: done", flush=True)
    print()
    print("| method | trainable params | tokens/s | peak memory MiB | FLOP/token | MFU |")
    print("| --- | ---: | ---: | ---: | --- | ---: |")
    for r in results:
        if "skipped" in r:
            print(f"| {r['method']} | skipped: {r['skipped']} | | | | |")
            continue
        print(f"| {r['method']} | {r['trainable_params']:,} | {r['tokens_per_s']:,.0f} | "
              f"{r['peak_bytes'] / 2**20:,.1f} | {r['flops_per_token']:.3g} | {100 * r['mfu']:.3g}% |")
    imported = [name for name in ABSENT_ON_GPU_BOX if name in sys.modules]
    if imported:  # a trainers module grew a top-level import the GPU box cannot satisfy
        print(f"\nwarning: imported {', '.join(imported)}", file=sys.stderr)
    if args.json:
        payload = {"date": time.strftime("%Y-%m-%d"), "device": device_name, "torch": torch.__version__,
                   "model": size, "params": n_params, "batch_size": args.batch_size, "seq_len": args.seq_len,
                   "steps": args.steps, "warmup_steps": args.warmup_steps, "peak_tflops": args.peak_tflops,
                   "compile": args.compile, "liger": args.liger, "batching": args.batching, "attn": args.attn,
                   "results": results}
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
