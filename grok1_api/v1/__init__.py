"""grok1.v1: generated from proto/grok1_api/v1/grok1.proto by `make protos`; do not edit."""
