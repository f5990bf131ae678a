"""Model and audit-data I/O: provider files are hostile, so models are loaded by crossaudit's
own ONNX translator (`onnx_graph`, `onnx_ops`), never by a loader that unpickles, proved
against ONNX Runtime (`runtime_parity`), and named by the sha256 of their bytes (`digest`)."""
