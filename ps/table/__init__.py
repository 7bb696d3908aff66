"""The table core: one embedding table in one process, with no RPC.

    config.py           TableConfig, OptimizerConfig, admission and eviction settings (validated)
    embedding_table.py  EmbeddingTable: key -> row (C++ hash map), rows, optimizer, admission, eviction
    row_store.py        rows in fixed-size blocks (growth never copies the table); also serving's rows
    init.py             a new row's initial value, pure in (seed, key); also serving's default rows
    state.py            TableState and TableChanges: what export/load and change tracking hand over
    optimizers.py       per-row optimizer state layout, hyper-parameters, the torch path for devices
    fbgemm_kernels.py   kernels = "fbgemm": fbgemm's fused optimizers, one call per group of tables
    multi.py            lookup and push of many tables in one native (or fbgemm) call

Only embedding_table.py, optimizers.py and fbgemm_kernels.py import torch: config, init, row_store (on CPU) and
state serve processes that must not load it (`embps serve`, `embps snapshot`).
"""
