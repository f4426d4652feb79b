"""Model compression on trained detectors, as trainer hooks and model transforms.

Network Slimming: ``sparsity`` (L1 on BatchNorm γ while training), ``graph`` (which channels are coupled),
``pruning`` (physical channel removal with β compensation), ``channels`` (rebuilding a pruned architecture from
its channel spec), ``slim`` (the tools/slim.py pipeline), ``criteria`` (l1, taylor, apoz channel scores).
Distillation: ``distill``, ``distill_adapters``, ``distill_losses``. Beyond: ``magnitude`` (unstructured pruning,
DSD), ``deep_compression`` + ``huffman`` (weight sharing and coding), ``quantize`` (int8 PT2E), ``lowrank``.
"""
