"""Generated gRPC stubs of proto/embps/*.proto (regenerate with `python -m ps.rpc.generate`)."""
