"""The Ray Serve ingress: OpenAI-compatible HTTP and gRPC in front of a replica's router (see ingress/app.py)."""
