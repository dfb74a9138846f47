"""Options that several commands share, defined once so their names and help agree."""

from __future__ import annotations

import typer

ModelOpt = typer.Option(None, "--model", "-m", help="Model: 'smollm2' (embedded default), a local folder or a Hugging Face id.")
HomeOpt = typer.Option(None, "--home", help="Cache home (default $CAG_HOME or ~/.cache/cag).", envvar="CAG_HOME")
JsonOpt = typer.Option(False, "--json", help="Machine-readable output: one JSON object per line on stdout.")
QuantizeOpt = typer.Option(None, "--quantize", help="Weights on the CPU, each with caches of its own: 'q4' computes with the embedded "
                                                     "GGUF's own 4-bit weights through PyTorch's int4 kernel (bfloat16 activations: "
                                                     "answers drift), 'int8' quantizes any model, 'none' (the default) keeps "
                                                     "the weights as loaded (the embedded model's decode steps still read its "
                                                     "GGUF blocks, exactly).")
ThreadsOpt = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: $CAG_THREADS, else the cores this process may use).")
KvDtypeOpt = typer.Option(None, "--kv-dtype", help="Store the cache as float32, bfloat16, float16 or int8 (default: the model's dtype).")
StoreOpt = typer.Option(
    None, "--store", envvar="CAG_STORE", show_envvar=True,
    help="Where caches live: file:///PATH (default: the store under the cache home) or redis://[:PASSWORD@]HOST:PORT/DB "
         "(rediss:// for TLS; a cluster node's URL opens the cluster).",
)
