"""Measurement, apart from the stages it measures: benchmarks, QA evaluation, the
retrievers RAG baselines use, and peers (other engines run on the same inputs).

It imports the stages; nothing in the stages imports it.
"""
