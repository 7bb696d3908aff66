"""embps parameter-server core: tables, optimizers, sharding, server and client.

This package imports neither `worker` nor `serving`.
"""
