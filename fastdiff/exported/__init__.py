"""The exported-file format: what ``python -m fastdiff.export`` writes and what the model runners read.

The exporter (:mod:`fastdiff.export`) and the runners (:mod:`fastdiff.backends`) both need the same description of
an exported ONNX file or TensorRT engine; it lives here, on its own, so that neither package has to import the
other to read a file. Nothing here imports the rest of fastdiff except :mod:`fastdiff.errors` (and
:mod:`fastdiff._atomic`), so loading a runner never loads the exporter.

    specs     tensor specs (:class:`TensorSpec`) and dimension ranges (:class:`DimRange`)
    metadata  the ``fastdiff.*`` metadata of an exported graph (:class:`GraphInfo`) and its label table
    session   onnxruntime sessions over an exported file (:func:`make_session`)
    engine    the TensorRT engine container (``FDTRTENG`` header + plan) and :class:`EngineSession`
    manifest  the manifest of a text-to-image pipeline export (files + sha256, signatures, parity) and its check
"""
