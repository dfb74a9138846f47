"""Measurement, apart from the stages it measures: benchmarks, QA evaluation, the
bundled workload, and peers (other engines run on the same inputs). Retrieval is a
stage of answering (``cag.retrieval``); the RAG baselines use it from here.

It imports the stages; nothing in the stages imports it.
"""
