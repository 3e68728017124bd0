"""Generated gRPC stubs for the Grok-1 serving API (proto/grok1_api/); regenerate with `make protos`."""
