"""The table core: one embedding table in one process, with no RPC.

    config.py           TableConfig, OptimizerConfig, admission and eviction settings (validated)
    embedding_table.py  EmbeddingTable: key -> row (C++ hash map), rows, optimizer, admission, eviction
    row_store.py        rows in fixed-size blocks (growth never copies the table); also serving's rows
    init.py             a new row's initial value, pure in (seed, key); also serving's default rows
    optimizers.py       per-row optimizer state layout, hyper-parameters, the torch path for devices
"""
