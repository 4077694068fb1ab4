"""The ONNX front end, by job: reading the classifier (:mod:`.classifier`), its graph and shapes (:mod:`.graph`),
the head's collapse (:mod:`.collapse`), the size-free trunk (:mod:`.trunk`), the cut before conversion
(:mod:`.truncate`), the rewrite (:mod:`.rewrite`) and the converted model and its file (:mod:`.assemble`).

:mod:`fcconv.onnx_rewrite` is its public face.
"""
