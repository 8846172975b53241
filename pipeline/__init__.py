"""modpipe: policy-driven, explainable content moderation on Kafka, Redis and Triton."""

__version__ = "0.1.0"
