"""How much memory a trial needs, from the model's config alone (no weights are loaded).

    python -m trainers.memory llama-2-7b --seq-len 1024 --batch-size 4
    python -m trainers.memory path/to/config.json --methods full,lora --precisions bf16 --breakdown
    python -m trainers.memory fit llama-3-8b --memory 24GiB --seq-len 2048 --global-batch 64

`estimate(cfg)` predicts the peak bytes of live tensors in one trial, the quantity that
`trainers.runtime.PeakMemory` measures (and `mem/peak_bytes` records): base weights at their
storage width, the method's trainable parameters, their gradients and optimizer states,
activations saved for backward, the logits and loss, and the evaluation pass. `total_bytes` adds
a fixed runtime overhead (CUDA context, or the Python/torch process) for planning resources.

What the estimate follows is what `trainers` does, op by op (SDPA attention), on the decoder
families whose layouts shapes.py knows (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2, GPT-2,
GPT-NeoX, OPT; another model_type with Llama's config keys is read as Llama-style): float
precisions train the weights in their own dtype (bf16 full fine-tuning keeps bf16 weights, grads
and AdamW states: 8 B/param, no fp32 master copy); on an int8/nf4/fp4 base every unquantized
tensor (embeddings, norms, biases) is upcast to fp32 and so are the hidden states; PEFT adapters
are fp32. What a method adds comes from its registry entry (MethodSpec.trainable_sizes,
memory_terms), and what a stage adds from its recipe's (RecipeSpec.memory_terms: sequences per
row, models held, output head), so adding a method or a stage touches its own file only.

    shapes.py       the model from config.json: ModelShape, Layout per family, known names
    terms.py        MethodTerms and StageTerms: what methods and stages contribute
    counts.py       tensor sizes a target list selects, weight bytes (bitsandbytes formats), optimizer states
    activations.py  bytes saved for backward, eval pass
    estimate.py     estimate(cfg) -> MemoryEstimate, by component (reads the registries)
    sizes.py        sizes as typed (24GiB, 8GB) and as shown (4.00 GiB, 12.3 ± 0.4 MiB)
    fit.py          the largest micro-batch that fits a memory limit
    cli.py          python -m trainers.memory [fit]

Accuracy against measurements: tests/test_architectures.py (each family), tests/test_memory.py
(sft, dpo, rl), benchmarks/estimator_accuracy.py (every method x precision).
"""
from trainers.memory.counts import FLOAT_BYTES, GIB, optimizer_state_bytes, quantized_linear_bytes, weight_bytes
from trainers.memory.estimate import (RUNTIME_OVERHEAD, Component, MemoryEstimate, estimate, trainable_params,
                                      trainable_tensor_sizes)
from trainers.memory.shapes import HUB_IDS, KNOWN_MODELS, ModelShape, UnknownModelError, load_shape
from trainers.memory.cli import main

__all__ = ["FLOAT_BYTES", "GIB", "HUB_IDS", "KNOWN_MODELS", "RUNTIME_OVERHEAD", "Component", "MemoryEstimate",
           "ModelShape", "UnknownModelError", "estimate", "load_shape", "main", "optimizer_state_bytes",
           "quantized_linear_bytes", "trainable_params", "trainable_tensor_sizes", "weight_bytes"]
