"""What the engine can represent: the one table of request limits (no JAX).

The engine converts sampling settings to int32 / float32 / threefry keys on the host inside every shard
worker, so a value outside these ranges must be refused before it gets there (grok1.engine_api validates;
the engine's conversion also clips, as a second line). The HTTP and gRPC parsers use the same numbers.
"""

SEED_RANGE = (-(2 ** 63), 2 ** 63 - 1)  # a signed 64-bit seed (OpenAI's)
TOP_K_MAX = 2 ** 31 - 1  # int32; top_k beyond the vocabulary keeps the whole vocabulary
TEMPERATURE_MAX = 100.0
PENALTY_RANGE = (-2.0, 2.0)  # presence_penalty, frequency_penalty (OpenAI's)
LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's
MAX_LOGIT_BIAS = 300  # logit_bias entries per request (OpenAI's limit); the sampler keeps that many per slot
MAX_TIMEOUT_S = 86_400.0  # a request's deadline is at most a day away
MAX_TOP_LOGPROBS = 20  # top_logprobs per position (OpenAI's limit); the step computes this many for every slot
